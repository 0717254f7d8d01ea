"""Rule table: one of the paper's tables as CSV, Markdown and LaTeX."""

from pathlib import Path

from phasewatt.analysis.tables import write_table
from phasewatt.config import exit_on_error
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    exit_on_error(
        write_table,
        snakemake.wildcards.table,
        snakemake.input.measurements,
        Path(snakemake.output.csv).parent,
        snakemake.config["gpu"],
    )
