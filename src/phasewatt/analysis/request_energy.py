"""Energy of one request (one sequence): its prefill plus n decode steps, and the output
length at which a model's request becomes cheaper (or dearer) than the reference model's.

    request_energy_j(n) = prefill_mj_per_token x prompt_tokens / 1000
                        + decode_mj_per_token  x n             / 1000

Both per-token energies are medians of one configuration (model, batch, prompt length,
setting), measured with every sequence of the batch in flight, so the request's energy is
its share of the batch's. The decode energy per token is measured over the decode window
(decode_tokens steps after the prompt) and held constant for longer outputs: for attention
models, whose per-step cost grows with the cache, this understates long requests, so it
understates the advantage of constant-state (linear-attention) models, never overstates it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from phasewatt.analysis.stats import Interval, bootstrap_groups
from phasewatt.analysis.summary import repetition_table, repetitions_of
from phasewatt.errors import PhasewattError

REFERENCE_MODEL = "gqa"
# Output lengths of the curves when none are given: 1 to 8192 tokens, evenly on a log axis.
DEFAULT_OUTPUT_LENGTHS = tuple(int(n) for n in np.unique(np.geomspace(1, 8192, 40).round()))
CURVE_COLUMNS = [
    "model", "batch", "seqlen", "output_tokens", "request_energy_j", "prefill_energy_j", "decode_energy_j",
    "crossover_tokens",
]
# How a model's request energy compares with the reference's as the output grows.
ALWAYS_CHEAPER = "always_cheaper"
CHEAPER_BEYOND = "cheaper_beyond"
CHEAPER_BELOW = "cheaper_below"
NEVER_CHEAPER = "never_cheaper"
EQUAL = "equal"


class RequestEnergyError(PhasewattError):
    """Request energy asked for a model or setting the measurements do not have."""


def _per_token(summary: pd.DataFrame, dvfs: str) -> pd.DataFrame:
    """(model, batch, seqlen) -> prefill and decode mJ/token medians at one setting."""
    rows = summary[summary["dvfs"] == dvfs]
    if rows.empty:
        allowed = ", ".join(sorted(summary["dvfs"].unique()))
        raise RequestEnergyError(f"dvfs: {dvfs!r} was not measured; measured: {allowed}")
    wide = rows.pivot_table(
        index=["model", "batch", "seqlen"], columns="phase", values="energy_mj_per_token_median", aggfunc="first"
    )
    wide = wide.rename(columns={"prefill": "prefill_mj_per_token", "decode": "decode_mj_per_token"})
    wide.columns.name = None
    return wide.dropna(subset=["prefill_mj_per_token", "decode_mj_per_token"]).reset_index()


def request_energy_curves(
    summary: pd.DataFrame,
    output_lengths=DEFAULT_OUTPUT_LENGTHS,
    batch: int | None = None,
    dvfs: str = "default",
    reference: str = REFERENCE_MODEL,
) -> pd.DataFrame:
    """Request energy against output length: one row per (model, batch, seqlen, output
    length). `summary` is analysis.summary.summarise(measurements); batch None = every batch.
    crossover_tokens: where the model's line crosses the reference model's at the same batch
    and prompt length (NaN for the reference itself, where they do not cross at a positive
    length, or where the reference was not measured)."""
    lengths = [int(n) for n in output_lengths]
    if any(n < 0 for n in lengths):
        raise RequestEnergyError(f"output_lengths: {lengths} must all be >= 0")
    per_token = _per_token(summary, dvfs)
    if batch is not None:
        measured = sorted(per_token["batch"].unique())
        per_token = per_token[per_token["batch"] == batch]
        if per_token.empty:
            raise RequestEnergyError(f"batch: {batch!r} was not measured; measured: {', '.join(map(str, measured))}")
    ref = per_token[per_token["model"] == reference].set_index(["batch", "seqlen"])
    rows = []
    for rec in per_token.itertuples(index=False):
        prefill_j = rec.prefill_mj_per_token * rec.seqlen / 1000.0
        n_star = math.nan
        if rec.model != reference and (rec.batch, rec.seqlen) in ref.index:
            r = ref.loc[(rec.batch, rec.seqlen)]
            n_star, _ = crossover(prefill_j, rec.decode_mj_per_token / 1000.0,
                                  r["prefill_mj_per_token"] * rec.seqlen / 1000.0, r["decode_mj_per_token"] / 1000.0)
        for n in lengths:
            decode_j = rec.decode_mj_per_token * n / 1000.0
            rows.append((rec.model, rec.batch, rec.seqlen, n, prefill_j + decode_j, prefill_j, decode_j, n_star))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def crossover(
    prefill_j: float, decode_j_per_token: float, ref_prefill_j: float, ref_decode_j_per_token: float
) -> tuple[float, str]:
    """Output length n* where prefill_j + n d = ref_prefill_j + n d_ref, and which side of it
    the model is cheaper on. n* is NaN when the lines do not cross at a positive length."""
    d_prefill = prefill_j - ref_prefill_j
    d_decode = decode_j_per_token - ref_decode_j_per_token
    if d_decode == 0:
        if d_prefill == 0:
            return math.nan, EQUAL
        return math.nan, ALWAYS_CHEAPER if d_prefill < 0 else NEVER_CHEAPER
    n_star = -d_prefill / d_decode
    if d_decode < 0:
        return (n_star, CHEAPER_BEYOND) if n_star > 0 else (math.nan, ALWAYS_CHEAPER)
    return (n_star, CHEAPER_BELOW) if n_star > 0 else (math.nan, NEVER_CHEAPER)


def crossovers(summary: pd.DataFrame, reference: str = REFERENCE_MODEL, dvfs: str = "default") -> pd.DataFrame:
    """One row per (model, batch, seqlen) of the non-reference models: per-request prefill
    energy, decode energy per output token, the crossover output length against the
    reference model at the same batch and prompt length, and its kind."""
    per_token = _per_token(summary, dvfs)
    models = sorted(per_token["model"].unique())
    if reference not in models:
        raise RequestEnergyError(f"reference: {reference!r} was not measured at {dvfs}; measured: {', '.join(models)}")
    per_token["prefill_energy_j"] = per_token["prefill_mj_per_token"] * per_token["seqlen"] / 1000.0
    per_token["decode_j_per_token"] = per_token["decode_mj_per_token"] / 1000.0
    ref = per_token[per_token["model"] == reference].set_index(["batch", "seqlen"])
    rows = []
    for rec in per_token[per_token["model"] != reference].itertuples(index=False):
        if (rec.batch, rec.seqlen) not in ref.index:
            continue
        r = ref.loc[(rec.batch, rec.seqlen)]
        n_star, kind = crossover(
            rec.prefill_energy_j, rec.decode_j_per_token, r["prefill_energy_j"], r["decode_j_per_token"]
        )
        rows.append(
            {
                "model": rec.model, "batch": rec.batch, "seqlen": rec.seqlen,
                "prefill_energy_j": rec.prefill_energy_j, "decode_mj_per_token": rec.decode_mj_per_token,
                "reference": reference, "crossover_output_tokens": n_star, "crossover_kind": kind,
            }
        )
    columns = ["model", "batch", "seqlen", "prefill_energy_j", "decode_mj_per_token", "reference",
               "crossover_output_tokens", "crossover_kind"]
    return pd.DataFrame(rows, columns=columns)


def request_energy_ratio_ci(
    measurements: pd.DataFrame,
    model: str,
    batch: int,
    seqlen: int,
    output_tokens: int,
    reference: str = REFERENCE_MODEL,
    dvfs: str = "default",
    table: pd.DataFrame | None = None,
    **options,
) -> Interval:
    """Bootstrap interval of request_energy(model) / request_energy(reference) at one output
    length. Each configuration's repetitions are resampled as units (prefill and decode of
    one repetition together), the two models independently. `table` is a precomputed
    summary.repetition_table(measurements, 'energy_mj_per_token')."""
    table = repetition_table(measurements, "energy_mj_per_token") if table is None else table
    groups = []
    for name in (model, reference):
        reps = repetitions_of(table, name, batch, seqlen, dvfs)
        groups.append(reps.reindex(columns=["prefill", "decode"]).to_numpy(dtype=float))
    weights = np.array([seqlen, output_tokens], dtype=float)

    def ratio(medians):
        denominator = float(medians[1] @ weights)
        return float(medians[0] @ weights) / denominator if denominator > 0 else math.nan

    return bootstrap_groups(groups, ratio, **options)
