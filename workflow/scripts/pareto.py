"""Rule pareto: one model's decode energy per token vs throughput, Pareto fronts per family."""

from phasewatt.analysis.figures import make_figure
from phasewatt.config import exit_on_error
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    exit_on_error(
        make_figure,
        "pareto",
        snakemake.output.pdf,
        measurements=snakemake.input.measurements,
        model=snakemake.wildcards.model,
        gpu=snakemake.config["gpu"],
    )
