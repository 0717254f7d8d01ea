"""The phase-aware harness: warm-up, windows, repetitions, one run record out.

Knows gpu and engines; knows nothing of analysis.
"""
