"""Rule study_figure: a figure over every model of the study (rooflines, caps, request energy...)."""

from phasewatt.analysis.figures import make_figure
from phasewatt.config import exit_on_error
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    exit_on_error(
        make_figure,
        snakemake.wildcards.figure,
        snakemake.output.pdf,
        measurements=snakemake.input.measurements,
        models=snakemake.config["grid"]["models"],
        gpu=snakemake.config["gpu"],
    )
