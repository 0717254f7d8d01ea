"""Decode energy savings of the DVFS settings against the default, with confidence intervals,
and the paired test of "the best clock lock beats the best power cap".

"Best" setting of a family (clock locks, power caps), per (model, batch, prompt length): the
one with the lowest median decode energy per token among those whose median decode
throughput is at most THROUGHPUT_LOSS_BUDGET below the default's. A saving bought with a
slower service is a different claim, so it is not allowed to win; the budget is the paper's
"< 1% throughput loss".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from phasewatt.analysis.stats import holm_adjust, paired_permutation_test, saving_ci
from phasewatt.analysis.summary import repetition_table, repetitions_of, summarise
from phasewatt.errors import PhasewattError

THROUGHPUT_LOSS_BUDGET = 0.01
BASELINE = "default"
FAMILIES = {"lock": "clock_lock", "cap": "power_cap"}
KEYS = ["model", "batch", "seqlen"]


class SavingsError(PhasewattError):
    """Savings cannot be computed from these measurements."""


def best_settings(summary: pd.DataFrame, budget: float = THROUGHPUT_LOSS_BUDGET) -> pd.DataFrame:
    """One row per (model, batch, seqlen) with a default run: the best lock and best cap
    (see the module docstring), their median energy and throughput loss; '' where no
    setting of the family met the budget."""
    if not 0 <= budget < 1:
        raise SavingsError(f"throughput_loss_budget: {budget!r} is out of range; it must be >= 0 and < 1")
    decode = summary[summary["phase"] == "decode"]
    rows = []
    for key, group in decode.groupby(KEYS, sort=True):
        base = group[group["dvfs"] == BASELINE]
        if base.empty:
            continue
        e0 = float(base["energy_mj_per_token_median"].iloc[0])
        t0 = float(base["tokens_per_s_median"].iloc[0])
        row = dict(zip(KEYS, key), default_mj_per_token=e0, default_tokens_per_s=t0)
        for short, kind in FAMILIES.items():
            family = group[group["dvfs_kind"] == kind].copy()
            family["loss"] = 1.0 - family["tokens_per_s_median"] / t0
            eligible = family[(family["loss"] <= budget) & family["energy_mj_per_token_median"].notna()]
            if eligible.empty:
                row.update({f"best_{short}": "", f"{short}_mj_per_token": math.nan})
                continue
            best = eligible.sort_values(["energy_mj_per_token_median", "dvfs_value"]).iloc[0]
            row.update({f"best_{short}": best["dvfs"], f"{short}_mj_per_token": float(best["energy_mj_per_token_median"])})
        rows.append(row)
    if not rows:
        raise SavingsError(f"grid.dvfs: savings need the {BASELINE!r} setting measured; no run has it")
    return pd.DataFrame(rows)


def _pairs(lock: pd.DataFrame, cap: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    joined = lock[["decode"]].rename(columns={"decode": "decode_lock"}).join(
        cap[["decode"]].rename(columns={"decode": "decode_cap"}), how="inner"
    ).dropna()
    return joined["decode_lock"].to_numpy(), joined["decode_cap"].to_numpy()


def savings(measurements: pd.DataFrame, budget: float = THROUGHPUT_LOSS_BUDGET, **bootstrap) -> pd.DataFrame:
    """Per (model, batch, seqlen): decode energy per token at default, best lock, best cap;
    each saving (1 - E/E_default) and throughput loss (1 - T/T_default) as a fraction with
    its bootstrap interval; the one-sided paired sign-flip test of E_lock < E_cap over
    repetitions paired by index, with Holm-adjusted p-values across configurations."""
    summary = summarise(measurements)
    best = best_settings(summary, budget)
    energy = repetition_table(measurements, "energy_mj_per_token")
    throughput = repetition_table(measurements, "tokens_per_s")
    out = []
    for rec in best.to_dict("records"):
        where = (rec["model"], rec["batch"], rec["seqlen"])
        e_default = repetitions_of(energy, *where, BASELINE)["decode"]
        t_default = repetitions_of(throughput, *where, BASELINE)["decode"]
        reps = {}
        for short in FAMILIES:
            setting = rec[f"best_{short}"]
            for stat in ("saving", "throughput_loss"):
                for end in ("", "_ci_low", "_ci_high"):
                    rec[f"{short}_{stat}{end}"] = math.nan
            if not setting:
                continue
            e = repetitions_of(energy, *where, setting)
            t = repetitions_of(throughput, *where, setting)
            reps[short] = e
            for stat, values, base in (("saving", e["decode"], e_default), ("throughput_loss", t["decode"], t_default)):
                interval = saving_ci(values, base, **bootstrap)
                rec[f"{short}_{stat}"] = interval.point
                rec[f"{short}_{stat}_ci_low"] = interval.low
                rec[f"{short}_{stat}_ci_high"] = interval.high
        if len(reps) == 2:
            test = paired_permutation_test(*_pairs(reps["lock"], reps["cap"]), alternative="less")
            rec.update(lock_vs_cap_pairs=test.n_pairs, lock_vs_cap_mj_per_token=test.mean_difference,
                       lock_vs_cap_p=test.p_value, lock_vs_cap_note=test.note)
        else:
            rec.update(lock_vs_cap_pairs=0, lock_vs_cap_mj_per_token=math.nan, lock_vs_cap_p=math.nan,
                       lock_vs_cap_note="no lock or no cap within the throughput budget")
        out.append(rec)
    frame = pd.DataFrame(out)
    frame["lock_vs_cap_p_holm"] = holm_adjust(frame["lock_vs_cap_p"])
    return frame
