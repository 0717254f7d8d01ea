"""Rule timeline: one run's power trace with its prefill and decode windows."""

from phasewatt.analysis.figures import make_figure
from phasewatt.config import exit_on_error
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    exit_on_error(
        make_figure,
        "timeline",
        snakemake.output.pdf,
        record=snakemake.input.record,
        gpu=snakemake.config["gpu"],
    )
