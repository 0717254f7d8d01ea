"""The paper's tables: each builder returns a DataFrame of raw numbers (what the CSV holds);
the writer renders it as CSV, Markdown and LaTeX (booktabs) with the caption, atomically.

Entry point for the workflow: write_table(name, measurements_path, out_dir, gpu).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from phasewatt.analysis.captions import caption_text
from phasewatt.analysis.dvfs_classes import CLASS_DESCRIPTIONS, classify_curves, model_classes
from phasewatt.analysis.request_energy import REFERENCE_MODEL, crossovers, request_energy_ratio_ci
from phasewatt.analysis.savings import THROUGHPUT_LOSS_BUDGET, savings
from phasewatt.analysis.summary import repetition_table, summarise
from phasewatt.errors import PhasewattError
from phasewatt.gpu.specs import gpu_spec
from phasewatt.io import write_csv, write_text

TABLE_NAMES = ("decode_power", "cap_binding", "savings", "dvfs_classes", "request_energy")
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
MISSING = "n/a"


class TableError(PhasewattError):
    """A table cannot be built from these measurements."""


# ---------------------------------------------------------------- builders


def decode_power_table(summary: pd.DataFrame, tdp_w: float, models=None) -> pd.DataFrame:
    """Per model and batch: min / median / max over prompt lengths and DVFS settings of the
    per-configuration median decode power, where the extremes occur, and the max against TDP.
    models: the row order (default: as they appear in summary)."""
    decode = summary[summary["phase"] == "decode"].dropna(subset=["mean_power_w_median"])
    rows = []
    for (model, batch), group in decode.groupby(["model", "batch"], sort=False):
        power = group["mean_power_w_median"]
        low, high = group.loc[power.idxmin()], group.loc[power.idxmax()]
        rows.append(
            {
                "model": model, "batch": int(batch), "configurations": int(len(group)),
                "min_power_w": float(power.min()), "min_at": f"{low['dvfs']}, prompt {int(low['seqlen'])}",
                "median_power_w": float(power.median()),
                "max_power_w": float(power.max()), "max_at": f"{high['dvfs']}, prompt {int(high['seqlen'])}",
                "tdp_w": float(tdp_w), "max_share_of_tdp_pct": 100.0 * float(power.max()) / tdp_w,
            }
        )
    frame = pd.DataFrame(rows)
    return _in_model_order(frame, summary["model"] if models is None else models, "batch")


def cap_binding_table(measurements: pd.DataFrame) -> pd.DataFrame:
    """Per power cap, over every decode window measured under it: how much of the decode time
    ran with the SW power cap reason set and with the power-violation counter running."""
    decode = measurements[(measurements["phase"] == "decode") & (measurements["dvfs_kind"] == "power_cap")]
    rows = []
    for cap, group in decode.groupby("dvfs_value", sort=True):
        flagged = group["sw_power_cap"].astype(bool)
        window_s = group["window_s"].astype(float)
        total_s = float(window_s.sum())
        violation_s = float(group["power_violation_s"].fillna(0.0).clip(upper=window_s).sum())
        rows.append(
            {
                "cap_w": float(cap), "decode_windows": int(len(group)), "flagged_windows": int(flagged.sum()),
                "flagged_time_pct": 100.0 * float(window_s[flagged].sum()) / total_s if total_s else math.nan,
                "violation_time_pct": 100.0 * violation_s / total_s if total_s else math.nan,
                "bound": "yes" if flagged.any() or violation_s > 0 else "no",
                "max_decode_power_w": float(group["max_power_w"].max()),
                "median_decode_power_w": float(group["mean_power_w"].median()),
            }
        )
    columns = ["cap_w", "decode_windows", "flagged_windows", "flagged_time_pct", "violation_time_pct", "bound",
               "max_decode_power_w", "median_decode_power_w"]
    return pd.DataFrame(rows, columns=columns)


def savings_table(measurements: pd.DataFrame, throughput_loss_budget: float = THROUGHPUT_LOSS_BUDGET) -> pd.DataFrame:
    """analysis.savings.savings with the fractions as percentages, in the table's columns."""
    frame = savings(measurements, throughput_loss_budget)
    for short in ("lock", "cap"):
        for stat in ("saving", "throughput_loss"):
            for end in ("", CI_LOW, CI_HIGH):
                frame[f"{short}_{stat}_pct{end}"] = 100.0 * frame.pop(f"{short}_{stat}{end}")
    columns = ["model", "batch", "seqlen", "default_mj_per_token"]
    for short in ("lock", "cap"):
        columns += [f"best_{short}", f"{short}_mj_per_token"]
        for stat in ("saving", "throughput_loss"):
            columns += [f"{short}_{stat}_pct", f"{short}_{stat}_pct{CI_LOW}", f"{short}_{stat}_pct{CI_HIGH}"]
    columns += ["lock_vs_cap_pairs", "lock_vs_cap_mj_per_token", "lock_vs_cap_p", "lock_vs_cap_p_holm", "lock_vs_cap_note"]
    return _in_model_order(frame[columns], measurements["model"], "batch", "seqlen")


def dvfs_classes_table(summary: pd.DataFrame, models=None) -> pd.DataFrame:
    """One row per model with clock locks: its DVFS class, what it means, and the evidence.
    models: the row order (default: as they appear in summary)."""
    frame = model_classes(classify_curves(summary))
    if frame.empty:
        return frame
    frame = _in_model_order(frame, summary["model"] if models is None else models)
    frame.insert(2, "meaning", frame["dvfs_class"].map(CLASS_DESCRIPTIONS))
    for col in ("throughput_drop_at_min_clock", "energy_saving_at_min", "energy_monotone_share"):
        frame[f"{col}_pct"] = 100.0 * frame.pop(col)
    order = ["model", "dvfs_class", "meaning", "curves_in_class", "curves", "class_by_batch", "knee_clock_mhz",
             "throughput_drop_at_min_clock_pct", "upper_elasticity", "energy_min_clock_mhz",
             "energy_saving_at_min_pct", "energy_monotone_share_pct"]
    return frame[order]


def request_energy_table(
    measurements: pd.DataFrame,
    output_tokens: int | None = None,
    reference: str = REFERENCE_MODEL,
    dvfs: str = "default",
) -> pd.DataFrame:
    """Per model, batch and prompt length: per-request prefill energy, decode energy per
    output token, the request's energy at `output_tokens` (default: the measured decode
    window length), its ratio to the reference model's with a bootstrap interval, and the
    crossover output length."""
    if output_tokens is None:
        output_tokens = int(measurements["decode_tokens"].dropna().iloc[0])
    if output_tokens < 0:
        raise TableError(f"output_tokens: {output_tokens!r} is out of range; it must be >= 0")
    summary = summarise(measurements)
    cross = crossovers(summary, reference=reference, dvfs=dvfs)
    per_token = summary[(summary["dvfs"] == dvfs)].pivot_table(
        index=["model", "batch", "seqlen"], columns="phase", values="energy_mj_per_token_median", aggfunc="first"
    ).dropna().reset_index()
    table = repetition_table(measurements, "energy_mj_per_token")
    rows = []
    for rec in per_token.itertuples(index=False):
        prefill_j = rec.prefill * rec.seqlen / 1000.0
        row = {
            "model": rec.model, "batch": int(rec.batch), "seqlen": int(rec.seqlen), "prefill_energy_j": prefill_j,
            "decode_mj_per_token": rec.decode, "output_tokens": int(output_tokens),
            "request_energy_j": prefill_j + rec.decode * output_tokens / 1000.0,
        }
        if rec.model == reference:
            row.update(ratio_vs_reference=1.0, ratio_vs_reference_ci_low=1.0, ratio_vs_reference_ci_high=1.0,
                       crossover_output_tokens=math.nan, crossover_kind="reference")
        else:
            interval = request_energy_ratio_ci(measurements, rec.model, rec.batch, rec.seqlen, output_tokens,
                                               reference=reference, dvfs=dvfs, table=table)
            match = cross[(cross["model"] == rec.model) & (cross["batch"] == rec.batch) & (cross["seqlen"] == rec.seqlen)]
            row.update(ratio_vs_reference=interval.point, ratio_vs_reference_ci_low=interval.low,
                       ratio_vs_reference_ci_high=interval.high,
                       crossover_output_tokens=float(match["crossover_output_tokens"].iloc[0]) if len(match) else math.nan,
                       crossover_kind=match["crossover_kind"].iloc[0] if len(match) else "no reference run")
        rows.append(row)
    return _in_model_order(pd.DataFrame(rows), measurements["model"], "batch", "seqlen")


def _in_model_order(frame: pd.DataFrame, models, *keys: str) -> pd.DataFrame:
    """Rows sorted by model in the order models first appear in `models` (the measurement
    table follows the config's order, not A-Z), then by `keys`."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = {m: i for i, m in enumerate(dict.fromkeys(models))}
    ranked = frame.assign(_order=frame["model"].map(order))
    return ranked.sort_values(["_order", *keys], kind="stable").drop(columns="_order").reset_index(drop=True)


# ---------------------------------------------------------------- rendering

_UNITS = (("_mj_per_token", "mJ/token"), ("_tokens_per_s", "tokens/s"), ("_pct", "%"), ("_mhz", "MHz"),
          ("_w", "W"), ("_j", "J"))
_LABELS = {"seqlen": "prompt", "lock_vs_cap_p": "p (lock < cap)", "lock_vs_cap_p_holm": "p Holm",
           "lock_vs_cap_mj_per_token": "lock - cap (mJ/token)"}
# Columns kept in the CSV but left out of the Markdown and LaTeX renderings (too wide or
# only for machines).
HIDDEN = {"lock_vs_cap_note", "lock_vs_cap_pairs", "curves_in_class", "curves"}


def column_label(name: str) -> str:
    """Header for humans: words and the unit, e.g. min_power_w -> 'min power (W)'."""
    if name in _LABELS:
        return _LABELS[name]
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return f"{name[: -len(suffix)].replace('_', ' ')} ({unit})"
    return name.replace("_", " ")


def format_value(name: str, value) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        text = _format_float(name, float(value))
        # Rounding a tiny negative (a -0.001% throughput "loss") must not print as "-0.0".
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return str(value)


def _format_float(name: str, value: float) -> str:
    """Digits by what the column holds: p-values 2 significant, percentages 1 decimal, ..."""
    if name.endswith(("_p", "_p_holm")):
        return f"{value:.2g}"
    if name.endswith("_pct"):
        return f"{value:.1f}"
    if "elasticity" in name:
        return f"{value:.2f}"
    if name.startswith("ratio"):
        return f"{value:.3f}"
    if name.endswith(("_w", "_mhz", "_tokens")):
        return f"{value:.0f}"
    return f"{value:.4g}"


def display_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[bool]]:
    """Strings for Markdown and LaTeX, and which columns are numeric (right-aligned):
    X, X_ci_low, X_ci_high become one 'X [95% CI]' column reading 'x [low, high]'; hidden
    columns dropped; headers carry units."""
    out, numeric = {}, []
    for col in frame.columns:
        if col in HIDDEN or col.endswith((CI_LOW, CI_HIGH)):
            continue
        values = [format_value(col, v) for v in frame[col]]
        label = column_label(col)
        if f"{col}{CI_LOW}" in frame and f"{col}{CI_HIGH}" in frame:
            lows = [format_value(col, v) for v in frame[f"{col}{CI_LOW}"]]
            highs = [format_value(col, v) for v in frame[f"{col}{CI_HIGH}"]]
            values = [v if v == MISSING else f"{v} [{lo}, {hi}]" for v, lo, hi in zip(values, lows, highs)]
            label = f"{label} [95% CI]"
        out[label] = values
        numeric.append(pd.api.types.is_numeric_dtype(frame[col]) and not pd.api.types.is_bool_dtype(frame[col]))
    return pd.DataFrame(out, columns=list(out)), numeric


def markdown_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(display: pd.DataFrame, numeric: list[bool], caption: str) -> str:
    headers = list(display.columns)
    align = ["---:" if right else ":---" for right in numeric]
    lines = [f"Table: {markdown_escape(caption)}", ""]
    lines.append("| " + " | ".join(markdown_escape(h) for h in headers) + " |")
    lines.append("|" + "|".join(align) + "|")
    for row in display.itertuples(index=False):
        lines.append("| " + " | ".join(markdown_escape(v) for v in row) + " |")
    if display.empty:
        lines.append("")
        lines.append("(no rows: nothing in the measurements to tabulate)")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(display: pd.DataFrame, numeric: list[bool], caption: str, label: str) -> str:
    headers = list(display.columns)
    spec = "".join("r" if right else "l" for right in numeric) or "l"
    lines = [
        "% Generated by phasewatt.analysis.tables; needs \\usepackage{booktabs}.",
        "\\begin{table}[htbp]",
        "\\centering",
        "\\small",
        f"\\caption{{{latex_escape(caption)}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in headers) + " \\\\",
        "\\midrule",
    ]
    for row in display.itertuples(index=False):
        lines.append(" & ".join(latex_escape(v) for v in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_table_files(frame: pd.DataFrame, out_dir, name: str, caption: str) -> list[Path]:
    """Write out_dir/name.csv (raw numbers), .md and .tex (formatted, captioned), atomically."""
    out_dir = Path(out_dir)
    display, numeric = display_frame(frame)
    paths = [out_dir / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    write_csv(paths[0], frame)
    write_text(paths[1], to_markdown(display, numeric, caption))
    write_text(paths[2], to_latex(display, numeric, caption, f"tab:{name}"))
    return paths


# ---------------------------------------------------------------- entry point


def source_of(measurements: pd.DataFrame) -> tuple[bool, str]:
    """(simulated?, GPU name) of the measurements; several GPU names are joined."""
    simulated = bool(measurements["simulated"].fillna(False).astype(bool).any()) if "simulated" in measurements else False
    names = [str(n) for n in dict.fromkeys(measurements.get("gpu_name", pd.Series(dtype=str)).dropna())]
    return simulated, " / ".join(names)


def build_table(name: str, measurements: pd.DataFrame, gpu: str, **options) -> pd.DataFrame:
    """The raw table `name` from the measurement table. gpu: the config's GPU key (for TDP)."""
    if name not in TABLE_NAMES:
        raise TableError(f"table: {name!r} is not known; allowed: {', '.join(TABLE_NAMES)}")
    if measurements.empty or "phase" not in measurements:
        raise TableError(f"table {name}: the measurement table is empty (no run finished with status ok)")
    models = list(dict.fromkeys(measurements["model"]))
    if name == "decode_power":
        return decode_power_table(summarise(measurements), float(gpu_spec(gpu).tdp_w), models)
    if name == "cap_binding":
        return cap_binding_table(measurements)
    if name == "savings":
        return savings_table(measurements, **options)
    if name == "dvfs_classes":
        return dvfs_classes_table(summarise(measurements), models)
    return request_energy_table(measurements, **options)


def write_table(name: str, measurements_path, out_dir, gpu: str, **options) -> list[Path]:
    """Build table `name` from results/measurements.parquet and write out_dir/name.{csv,md,tex}.
    options go to the builder (savings: throughput_loss_budget; request_energy: output_tokens,
    reference, dvfs)."""
    measurements = pd.read_parquet(measurements_path)
    frame = build_table(name, measurements, gpu, **options)
    simulated, gpu_name = source_of(measurements)
    text = caption_text(name, "table", simulated=simulated, gpu_name=gpu_name)
    return write_table_files(frame, out_dir, name, text)
