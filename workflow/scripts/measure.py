"""Rule measure: one measurement job (see phasewatt.measure.run)."""

from phasewatt.config import Job, exit_on_error
from phasewatt.measure.run import run_job
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    job = Job(
        snakemake.wildcards.model,
        int(snakemake.wildcards.batch),
        int(snakemake.wildcards.seqlen),
        snakemake.wildcards.dvfs,
    )
    exit_on_error(
        run_job,
        snakemake.config,
        job,
        snakemake.output.record,
        snakemake.output.trace,
        snakemake.params.journal_dir,
    )
