"""Rule aggregate_model: one model's records -> its tidy table and run status."""

from phasewatt.analysis.aggregate import aggregate
from phasewatt.io import write_csv, write_parquet
from phasewatt.workflow import log_to

with log_to(snakemake.log[0]):
    measurements, status = aggregate(snakemake.input.records)
    write_parquet(snakemake.output.measurements, measurements)
    write_csv(snakemake.output.status, status)
