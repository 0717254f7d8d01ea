"""Rule aggregate: the per-model tables -> results/measurements.parquet/.csv and run status."""

from phasewatt.analysis.aggregate import concatenate
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    concatenate(
        snakemake.input.measurements,
        snakemake.input.status,
        parquet_out=snakemake.output.parquet,
        csv_out=snakemake.output.csv,
        status_out=snakemake.output.status,
    )
