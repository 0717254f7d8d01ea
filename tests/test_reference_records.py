"""The real-GPU pipeline records kept as reference data (results/reference/issue4/pipeline*):
the aggregate step still reads every one of them, every job is ok and not simulated, and the
committed measurements.csv is what aggregating them gives today (a change to the record
format or the aggregation that would orphan the published numbers fails here)."""

from pathlib import Path

import pandas as pd
import pytest

from phasewatt.analysis.aggregate import aggregate
from phasewatt.io import write_csv

ROOT = Path(__file__).resolve().parents[1] / "results" / "reference" / "issue4"
PIPELINES = sorted(p for p in ROOT.glob("pipeline*") if (p / "measurements.csv").is_file())


def test_the_reference_pipelines_are_there():
    assert {p.name for p in PIPELINES} >= {"pipeline", "pipeline_h100", "pipeline_h100_round7", "pipeline_h100_round8"}


@pytest.mark.parametrize("directory", PIPELINES, ids=[p.name for p in PIPELINES])
def test_reference_records_aggregate_to_their_committed_table(directory, tmp_path):
    records = sorted((directory / "runs").glob("*/*/*.json"))
    assert len(records) == 10  # five models at batch 1 and 32
    measurements, status = aggregate(records)
    assert set(status["status"]) == {"ok"} and not status["simulated"].any()
    write_csv(tmp_path / "measurements.csv", measurements)  # both read back the same way
    ours, committed = pd.read_csv(tmp_path / "measurements.csv"), pd.read_csv(directory / "measurements.csv")
    assert len(committed) == 60  # 10 jobs x 2 phases x 3 repetitions
    pd.testing.assert_frame_equal(ours, committed, check_exact=False, rtol=1e-9)
