"""Analysis: from run records to tidy tables, statistics, figures and paper tables.

Reads records written by measure; imports nothing from measure, engines or gpu backends.
"""
