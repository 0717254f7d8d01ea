"""The paper's figures. Each plot_* function takes tables (or a record path), draws one
figure, writes the PDF and its PNG twin, and returns the Figure (closed; tests inspect it).
make_figure(name, ...) is the one entry the workflow calls.

Every figure: medians over the kept repetitions (analysis.summary), the GPU's name and a
red SIMULATED stamp when any of its numbers come from the simulated GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from phasewatt.analysis import pareto, request_energy, roofline, style, timeline
from phasewatt.analysis.summary import summarise
from phasewatt.errors import ConfigError, PhasewattError
from phasewatt.gpu.specs import gpu_spec

FIGURES = (
    "pareto", "roofline_decode", "roofline_prefill", "power_vs_cap", "energy_vs_seqlen", "request_energy",
    "clock_sustained", "timeline",
)
PHASES = ("prefill", "decode")
TERA = 1e12


class FigureError(PhasewattError):
    """A figure was asked for with inputs it cannot draw."""


# ---------------------------------------------------------------- helpers


def load_measurements(measurements) -> pd.DataFrame:
    """A measurement table from a DataFrame or a parquet/CSV path."""
    if isinstance(measurements, pd.DataFrame):
        return measurements
    path = Path(measurements)
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def _models(frame: pd.DataFrame, models) -> list:
    present = list(dict.fromkeys(frame["model"])) if "model" in frame else []
    if models is None:
        return present
    return [m for m in models if m in present]


def _spec(frame: pd.DataFrame, gpu):
    if gpu is None and "gpu_spec" in frame and frame["gpu_spec"].notna().any():
        gpu = str(frame["gpu_spec"].dropna().iloc[0])
    if gpu is None:
        raise FigureError("gpu: not given and the table has no gpu_spec column; allowed: a key of gpu/specs.yaml (H200, H100)")
    return gpu_spec(gpu)


def _finish(fig, frame, title: str, handles=None, ncols=None):
    """Stamp, legend row, final layout."""
    simulated, name = style.provenance(frame)
    style.stamp(fig, simulated, name, title, legend_handles=handles, legend_ncols=ncols)
    style.freeze_layout(fig)
    return fig


def _compact_settings(tokens, grid_tokens=()) -> str:
    """One label for settings whose points coincide: pl500, pl600 -> pl500/600, and a run of
    three or more that leaves out no setting of the grid between its ends -> pl400-700.
    Different kinds go on lines of their own when the label would be long."""
    def split(token):
        if token[:2] in ("pl", "sm") and token[2:].isdigit():
            return token[:2], int(token[2:])
        return token, None

    grid = {}
    for token in grid_tokens:
        prefix, value = split(token)
        if value is not None:
            grid.setdefault(prefix, set()).add(value)
    parts, by_prefix = [], {}
    for token in tokens:
        prefix, value = split(token)
        by_prefix.setdefault(prefix, []).append(value)
    for prefix, values in by_prefix.items():
        if values == [None]:
            parts.append(prefix)
            continue
        values = sorted(v for v in values if v is not None)
        between = sorted(v for v in grid.get(prefix, set()) | set(values) if values[0] <= v <= values[-1])
        if len(values) >= 3 and between == values:
            parts.append(f"{prefix}{values[0]}\u2013{values[-1]}")
        else:
            parts.append(prefix + "/".join(str(v) for v in values))
    one_line = ", ".join(parts)
    return one_line if len(one_line) <= 14 else ",\n".join(parts)


def _log2_ticks(ax, values) -> None:
    values = sorted(set(int(v) for v in values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.minorticks_off()


def _jitter(index: int, count: int, width: float) -> float:
    """Offset of the index-th of count points side by side within +-width/2."""
    if count <= 1:
        return 0.0
    return width * (index / (count - 1) - 0.5)


# ---------------------------------------------------------------- issue 2


def plot_pareto(measurements, model: str, out_pdf, *, label_points: bool = True):
    """Decode energy per token vs throughput of one model: power caps, clock locks and the
    default, each family's Pareto front; one panel per batch size, one row per prompt length."""
    frame = load_measurements(measurements)
    frame = frame[frame["model"] == model]
    if frame.empty:
        raise FigureError(f"model: {model!r} has no rows in the measurement table")
    points = pareto.decode_points(summarise(frame), model)
    batches = sorted(points["batch"].unique())
    seqlens = sorted(points["seqlen"].unique())
    nrows, ncols = len(seqlens), len(batches)
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN, 0.75 + 1.85 * nrows, nrows, ncols)
    for r, seqlen in enumerate(seqlens):
        for c, batch in enumerate(batches):
            ax = axes[r][c]
            panel = points[(points["batch"] == batch) & (points["seqlen"] == seqlen)]
            for family in pareto.FAMILIES:
                line = pareto.front_line(panel, family)
                if len(line) > 1:
                    ax.plot(line["tokens_per_s"], line["energy_mj_per_token"], ls="--", lw=0.9,
                            color=style.FAMILY_COLORS[family], zorder=1)
            for kind in ("power_cap", "clock_lock", "default"):
                sub = panel[panel["dvfs_kind"] == kind]
                if sub.empty:
                    continue
                on_front = sub[[f"front_{f}" for f in pareto.FAMILIES]].any(axis=1) if kind == "default" else sub[f"front_{kind}"]
                color = style.FAMILY_COLORS[kind]
                size = 70 if kind == "default" else 22
                ax.scatter(sub["tokens_per_s"], sub["energy_mj_per_token"], marker=style.MARKERS[kind], s=size,
                           facecolors=np.where(on_front, color, "white").tolist(), edgecolors=color, linewidths=0.9,
                           zorder=3)
            ax.set_title(f"batch {batch}, prompt {seqlen}")
            ax.margins(x=0.2, y=0.15)
            left, right = ax.get_xlim()
            ax.set_xlim(left, right + 0.25 * (right - left))  # room for labels right of the fastest settings
    fig.supxlabel("decode throughput (tokens/s)", fontsize=8)
    fig.supylabel("decode energy (mJ/token)", fontsize=8)
    handles = [
        Line2D([], [], ls="", marker=style.MARKERS["default"], color=style.FAMILY_COLORS["default"], markersize=9, label="default"),
        Line2D([], [], ls="", marker=style.MARKERS["power_cap"], color=style.FAMILY_COLORS["power_cap"], label="power cap (pl<W>)"),
        Line2D([], [], ls="", marker=style.MARKERS["clock_lock"], color=style.FAMILY_COLORS["clock_lock"], label="SM clock lock (sm<MHz>)"),
        Line2D([], [], ls="--", color=style.FAMILY_COLORS["power_cap"], label="power-cap front"),
        Line2D([], [], ls="--", color=style.FAMILY_COLORS["clock_lock"], label="clock-lock front"),
        Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="#555555", color="#555555",
               label="hollow: not on its family's front"),
    ]
    _finish(fig, frame, f"{model}: decode energy vs throughput (medians)", handles, ncols=3)
    if label_points:
        for r, seqlen in enumerate(seqlens):
            for c, batch in enumerate(batches):
                panel = points[(points["batch"] == batch) & (points["seqlen"] == seqlen)]
                grid_tokens = panel["dvfs"].tolist()
                style.place_point_labels(
                    axes[r][c], panel["tokens_per_s"].to_numpy(), panel["energy_mj_per_token"].to_numpy(),
                    grid_tokens, join=lambda tokens, grid=grid_tokens: _compact_settings(tokens, grid),
                )
    style.save_figure(fig, out_pdf)
    return fig


def plot_roofline(measurements, phase: str, out_pdf, *, gpu: str | None = None, models=None, dvfs: str = "default"):
    """Every model's phase on the GPU's roofline at one setting: marker colour = model,
    marker size = batch size, marker shape = prompt length."""
    if phase not in PHASES:
        raise FigureError(f"phase: {phase!r} is not known; allowed: {', '.join(PHASES)}")
    frame = load_measurements(measurements)
    spec = _spec(frame, gpu)
    roof = roofline.gpu_roofline(spec, "datasheet")
    gemm_roof = roofline.gpu_roofline(spec, "gemm_max_clock")
    limited_roof = roofline.gpu_roofline(spec, "gemm_power_limited")
    points = roofline.roofline_points(frame, phase, roof, dvfs=dvfs)
    models = _models(points, models)
    colors = style.model_colors(models)
    batches = sorted(points["batch"].unique())
    shapes = style.seqlen_markers(points["seqlen"].unique())
    sizes = {b: 14 + 16 * i for i, b in enumerate(batches)}
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN * 0.8, 3.3)
    ax = axes[0][0]
    if points.empty:
        style.no_data(ax, f"no {phase} windows at the {dvfs} setting")
    else:
        lo = min(points["intensity_flop_per_byte"].min() / 3, roof.ridge_flop_per_byte / 30)
        hi = max(points["intensity_flop_per_byte"].max() * 3, roof.ridge_flop_per_byte * 10)
        x = np.geomspace(lo, hi, 400)
        ax.plot(x, roof.attainable_flops_s(x) / TERA, color="#222222", lw=1.4, zorder=1)
        ax.plot(x, gemm_roof.attainable_flops_s(x) / TERA, color="#777777", lw=1.0, ls=":", zorder=1)
        ax.plot(x, limited_roof.attainable_flops_s(x) / TERA, color="#777777", lw=1.0, ls="-.", zorder=1)
        for _, row in points.iterrows():
            ax.scatter(row["intensity_flop_per_byte"], row["achieved_flops_s"] / TERA, s=sizes[row["batch"]],
                       marker=shapes[row["seqlen"]], color=colors[row["model"]], edgecolors="black", linewidths=0.4,
                       alpha=0.9, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        top = max(roof.peak_flops_s, gemm_roof.peak_flops_s) * 2.5
        ax.set_ylim(min(points["achieved_flops_s"].min(), roof.attainable_flops_s(lo)) / 3 / TERA, top / TERA)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("arithmetic intensity (FLOP/byte of HBM traffic)")
    ax.set_ylabel("achieved compute (TFLOP/s)")
    ax.set_title(f"{phase}, {dvfs} setting")
    bw = roof.bandwidth_bytes_s / 1e12
    handles = [Line2D([], [], ls="", marker="o", color=colors[m], label=m) for m in models]
    handles += [Line2D([], [], ls="", marker="o", color="#999999", markeredgecolor="black", markeredgewidth=0.4,
                       markersize=math.sqrt(sizes[b]), label=f"batch {b}") for b in batches]
    handles += [Line2D([], [], ls="", marker=shapes[s], color="#999999", label=f"prompt {s}") for s in sorted(shapes)]
    handles += [
        Line2D([], [], color="#222222", lw=1.4, label=f"roof: copy {bw:.2f} TB/s,\n{roof.label}"),
        Line2D([], [], color="#777777", ls=":", label=gemm_roof.label.replace(" = ", "\n= ")),
        Line2D([], [], color="#777777", ls="-.", label=limited_roof.label.replace(" = ", "\n= ")),
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=6.5)
    _finish(fig, frame, f"{phase} roofline (FLOPs and bytes from the model shapes)")
    style.save_figure(fig, out_pdf)
    return fig


def plot_power_vs_cap(measurements, out_pdf, *, gpu: str | None = None, models=None):
    """Decode power drawn under each power cap against the cap (y = x), one panel per model;
    filled markers: a window saw the SW power cap clock event (the cap bound)."""
    frame = load_measurements(measurements)
    spec = _spec(frame, gpu)
    summary = summarise(frame)
    caps = summary[(summary["phase"] == "decode") & (summary["dvfs_kind"] == "power_cap")]
    models = _models(frame, models)
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN, 2.55, 1, max(len(models), 1), sharex=True, sharey=True)
    batches = sorted(caps["batch"].unique())
    seqlens = sorted(caps["seqlen"].unique())
    colors = style.batch_colors(batches) if batches else {}
    shapes = style.seqlen_markers(seqlens)
    combos = [(b, s) for b in batches for s in seqlens]
    cap_values = sorted(caps["dvfs_value"].unique())
    step = min(np.diff(cap_values)) if len(cap_values) > 1 else 100.0
    span = (min(cap_values + [spec.tdp_w]) - step * 0.6, spec.tdp_w + step * 0.6)
    for i, model in enumerate(models):
        ax = axes[0][i]
        sub = caps[caps["model"] == model]
        ax.plot(span, span, color="#888888", ls="--", lw=0.9, zorder=1)
        ax.axvline(spec.tdp_w, color=style.SIMULATED_COLOR, ls=":", lw=1.0, zorder=1)
        for _, row in sub.iterrows():
            k = combos.index((row["batch"], row["seqlen"]))
            bound = row["sw_power_cap_windows"] > 0
            color = colors[row["batch"]]
            ax.scatter(row["dvfs_value"] + _jitter(k, len(combos), 0.6 * step), row["mean_power_w_median"],
                       marker=shapes[row["seqlen"]], s=20, facecolors=color if bound else "white", edgecolors=color,
                       linewidths=0.9, zorder=3)
        if sub.empty:
            style.no_data(ax, "no power-cap settings")
        ax.set_title(model)
        ax.set_xlim(*span)
        ax.set_ylim(0, span[1])
        ticks = sorted(set(cap_values) | {float(spec.tdp_w)})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{c:.0f}" for c in ticks], rotation=45)
    fig.supxlabel("power cap (W)", fontsize=8)
    axes[0][0].set_ylabel("decode power, window mean (W)")
    handles = [Line2D([], [], ls="", marker="o", color=colors[b], label=f"batch {b}") for b in batches]
    handles += [Line2D([], [], ls="", marker=shapes[s], color="#777777", label=f"prompt {s}") for s in seqlens]
    handles += [
        Line2D([], [], ls="", marker="o", color="#777777", markerfacecolor="#777777", label="filled: SW power cap reason in a window"),
        Line2D([], [], ls="", marker="o", color="#777777", markerfacecolor="white", label="hollow: cap never bound"),
        Line2D([], [], ls="--", color="#888888", label="power = cap"),
        Line2D([], [], ls=":", color=style.SIMULATED_COLOR, label=f"TDP {spec.tdp_w:.0f} W"),
    ]
    _finish(fig, frame, "decode power under a power cap", handles, ncols=5)
    style.save_figure(fig, out_pdf)
    return fig


# ---------------------------------------------------------------- issue 5


def plot_energy_vs_seqlen(measurements, out_pdf, *, models=None, batches=None, dvfs: str = "default"):
    """Energy per token vs prompt length, per model: median and a +-1 sd band over the kept
    repetitions; rows = phases, columns = batch sizes."""
    frame = load_measurements(measurements)
    summary = summarise(frame)
    summary = summary[summary["dvfs"] == dvfs]
    models = _models(summary, models)
    colors = style.model_colors(models)
    all_batches = sorted(summary["batch"].unique())
    batches = [b for b in (batches or all_batches) if b in all_batches]
    seqlens = sorted(summary["seqlen"].unique())
    ncols = max(len(batches), 1)
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN, 4.3, 2, ncols, sharex=True)
    for r, phase in enumerate(PHASES):
        for c, batch in enumerate(batches):
            ax = axes[r][c]
            for model in models:
                sub = summary[(summary["model"] == model) & (summary["batch"] == batch) & (summary["phase"] == phase)]
                sub = sub.sort_values("seqlen")
                if sub.empty:
                    continue
                median = sub["energy_mj_per_token_median"].to_numpy()
                sd = sub["energy_mj_per_token_sd"].to_numpy()
                ax.plot(sub["seqlen"], median, marker="o", markersize=3, color=colors[model], zorder=3)
                ax.fill_between(sub["seqlen"], median - sd, median + sd, color=colors[model], alpha=0.25, lw=0, zorder=2)
            _log2_ticks(ax, seqlens)
            ax.set_title(f"{phase}, batch {batch}")
            if c == 0:
                ax.set_ylabel(f"{phase} energy (mJ/token)")
    fig.supxlabel("prompt length (tokens)", fontsize=8)
    handles = [Line2D([], [], marker="o", markersize=3, color=colors[m], label=m) for m in models]
    handles.append(Patch(color="#999999", alpha=0.35, label="\u00b11 sd over repetitions"))
    _finish(fig, frame, f"energy per token vs prompt length ({dvfs} setting, medians)", handles, ncols=len(handles))
    style.save_figure(fig, out_pdf)
    return fig


REQUEST_CURVE_COLUMNS = ("model", "batch", "seqlen", "output_tokens", "request_energy_j", "crossover_tokens")


def plot_request_energy(curves: pd.DataFrame, out_pdf, *, simulated: bool, gpu_name: str = "", models=None,
                        reference: str = request_energy.REFERENCE_MODEL):
    """Total energy of one request (one sequence: its share of the prefill plus n decode
    tokens) vs the number of output tokens n, per model; rows = prompt lengths, columns =
    batch sizes; an X where a model's curve crosses the reference model's. curves: as
    analysis.request_energy.request_energy_curves returns them (REQUEST_CURVE_COLUMNS)."""
    missing = [c for c in REQUEST_CURVE_COLUMNS if c not in curves]
    if missing:
        raise FigureError(f"request energy curves: missing columns {', '.join(missing)}; needed: {', '.join(REQUEST_CURVE_COLUMNS)}")
    models = _models(curves, models)
    colors = style.model_colors(models)
    batches = sorted(curves["batch"].unique())
    seqlens = sorted(curves["seqlen"].unique())
    nrows, ncols = max(len(seqlens), 1), max(len(batches), 1)
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN, 0.75 + 1.8 * nrows, nrows, ncols, sharex=True)
    for r, seqlen in enumerate(seqlens):
        for c, batch in enumerate(batches):
            ax = axes[r][c]
            for model in models:
                sub = curves[(curves["model"] == model) & (curves["batch"] == batch) & (curves["seqlen"] == seqlen)]
                sub = sub.sort_values("output_tokens")
                if sub.empty:
                    continue
                is_reference = model == reference
                ax.plot(sub["output_tokens"], sub["request_energy_j"], color=colors[model], lw=1.8 if is_reference else 1.1,
                        zorder=4 if is_reference else 3)
                crossing = sub["crossover_tokens"].dropna()
                n_cross = float(crossing.iloc[0]) if len(crossing) else math.nan
                lo, hi = sub["output_tokens"].min(), sub["output_tokens"].max()
                if model != reference and math.isfinite(n_cross) and lo <= n_cross <= hi:
                    energy = np.interp(n_cross, sub["output_tokens"], sub["request_energy_j"])
                    ax.scatter([n_cross], [energy], marker="X", s=36, color=colors[model], edgecolors="black",
                               linewidths=0.5, zorder=5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            style.readable_log_axis(ax, "y")
            ax.set_title(f"batch {batch}, prompt {seqlen}")
    fig.supxlabel("output tokens per request", fontsize=8)
    fig.supylabel("request energy (J/sequence)", fontsize=8)
    handles = [Line2D([], [], color=colors[m], label=m) for m in models]
    handles.append(Line2D([], [], ls="", marker="X", color="#999999", markeredgecolor="black", markeredgewidth=0.5,
                          label=f"crossover with {reference}"))
    frame = pd.DataFrame({"simulated": [simulated], "gpu_name": [gpu_name]})
    _finish(fig, frame, "request energy = prefill share + n x decode energy per token", handles, ncols=len(handles))
    style.save_figure(fig, out_pdf)
    return fig


def plot_clock_sustained(measurements, out_pdf, *, gpu: str | None = None, models=None):
    """Requested vs sustained SM clock under each clock lock, per model (y = x: the lock is
    honoured). The points of one lock sit side by side: decode then prefill, each from the
    smallest to the largest batch; prompt lengths by marker."""
    frame = load_measurements(measurements)
    spec = _spec(frame, gpu)
    summary = summarise(frame)
    locks = summary[summary["dvfs_kind"] == "clock_lock"]
    models = _models(frame, models)
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN, 2.9, 1, max(len(models), 1), sharex=True, sharey=True)
    batches = sorted(locks["batch"].unique())
    seqlens = sorted(locks["seqlen"].unique())
    shapes = style.seqlen_markers(seqlens)
    phases = [p for p in ("decode", "prefill") if p in set(locks["phase"])]
    combos = [(p, b, s) for p in phases for b in batches for s in seqlens]
    clocks = sorted(locks["dvfs_value"].unique())
    step = min(np.diff(clocks)) if len(clocks) > 1 else 200.0
    lo = min(clocks + [spec.sm_clock_max_mhz]) - 0.6 * step
    span = (max(lo, 0), spec.sm_clock_max_mhz + 0.6 * step)
    for i, model in enumerate(models):
        ax = axes[0][i]
        ax.plot(span, span, color="#888888", ls="--", lw=0.9, zorder=1)
        sub = locks[locks["model"] == model]
        for _, row in sub.iterrows():
            k = combos.index((row["phase"], row["batch"], row["seqlen"]))
            ax.errorbar(row["dvfs_value"] + _jitter(k, len(combos), 0.7 * step), row["sustained_sm_clock_mhz_median"],
                        yerr=row["sustained_sm_clock_mhz_sd"], marker=shapes[row["seqlen"]], markersize=3,
                        color=style.PHASE_COLORS[row["phase"]], markeredgecolor="black", markeredgewidth=0.3,
                        elinewidth=0.7, ls="", zorder=3)
        if sub.empty:
            style.no_data(ax, "no clock-lock settings")
        ax.set_title(model)
        ax.set_xlim(*span)
        ax.set_ylim(*span)
        ax.set_xticks(clocks)
        ax.set_xticklabels([f"{c:.0f}" for c in clocks], rotation=45)
    fig.supxlabel("requested SM clock (MHz)", fontsize=8)
    axes[0][0].set_ylabel("sustained SM clock, median (MHz)")
    handles = [Line2D([], [], ls="", marker="o", color=style.PHASE_COLORS[p], markeredgecolor="black",
                      markeredgewidth=0.3, label=p) for p in phases]
    handles += [Line2D([], [], ls="", marker=shapes[s], color="#999999", label=f"prompt {s}") for s in seqlens]
    handles.append(Line2D([], [], ls="--", color="#888888", label="sustained = requested"))
    if batches:
        order = ", ".join(str(b) for b in batches)
        handles.append(Line2D([], [], ls="", label=f"in a lock, left to right: {' then '.join(phases)}, each batch {order}"))
    _finish(fig, frame, "SM clock locks: requested vs sustained", handles, ncols=3)
    style.save_figure(fig, out_pdf)
    return fig


def plot_timeline(record_path, out_pdf, *, gpu: str | None = None):
    """One run's power trace (instant and 1-s average), its prefill and decode windows, the
    power limit, the SM clock and the clock-event reasons over time."""
    run = timeline.load_run(record_path)
    key = gpu or run.record.get("gpu_spec")
    if not key:
        raise FigureError(f"gpu: not given and record {record_path} names no gpu_spec; allowed: a key of gpu/specs.yaml")
    spec = gpu_spec(key)
    trace = run.trace
    fig, axes = style.new_figure(style.PAGE_WIDTH_IN, 4.4, 3, 1, sharex=True,
                                 gridspec_kw={"height_ratios": [3.0, 1.6, max(0.35 * len(run.reasons), 0.5)]})
    power_ax, clock_ax, reason_ax = axes[0][0], axes[1][0], axes[2][0]
    for ax in (power_ax, clock_ax):
        for window in run.windows.itertuples():
            ax.axvspan(window.t_begin_s, window.t_end_s, color=style.PHASE_COLORS[window.phase], alpha=0.25, lw=0, zorder=0)
    power_ax.plot(trace["t_s"], trace["power_instant_w"], color="#555555", lw=0.5, alpha=0.8, label="instant power")
    power_ax.plot(trace["t_s"], trace["power_average_w"], color="#000000", lw=1.3, label="1-s average power")
    limit = run.power_limit_w if run.power_limit_w is not None else spec.tdp_w
    power_ax.axhline(limit, color=style.SIMULATED_COLOR, ls="--", lw=1.0, label=f"power limit {limit:.0f} W")
    if run.idle_power_w is not None:
        power_ax.axhline(run.idle_power_w, color="#777777", ls=":", lw=0.9, label=f"idle power {run.idle_power_w:.0f} W")
    power_ax.set_ylim(0, max(limit, trace["power_instant_w"].max() if len(trace) else 0) * 1.08)
    power_ax.set_ylabel("power (W)")
    clock_ax.plot(trace["t_s"], trace["sm_clock_mhz"], color="#0072B2", lw=1.0, label="SM clock")
    if run.requested_sm_clock_mhz is not None:
        clock_ax.axhline(run.requested_sm_clock_mhz, color="#0072B2", ls="--", lw=0.8,
                         label=f"requested lock {run.requested_sm_clock_mhz:.0f} MHz")
    clock_ax.set_ylim(0, spec.sm_clock_max_mhz * 1.1)
    clock_ax.set_ylabel("SM clock (MHz)")
    for k, reason in enumerate(run.reasons):
        times = trace["t_s"][(trace["clocks_event_reasons"].astype(int) & timeline.reason_bit(reason)) != 0]
        reason_ax.vlines(times, k - 0.38, k + 0.38, color=timeline.reason_color(reason), lw=0.6)
    reason_ax.set_yticks(range(len(run.reasons)))
    reason_ax.set_yticklabels(run.reasons)
    reason_ax.set_ylim(-0.6, max(len(run.reasons), 1) - 0.4)
    reason_ax.grid(False)
    if not run.reasons:
        reason_ax.text(0.5, 0.5, "no clock-event reasons set", transform=reason_ax.transAxes, ha="center", va="center", fontsize=7)
        reason_ax.set_yticks([])
    reason_ax.set_xlabel("time since the start of the run (s)")
    reason_ax.set_title("clock-event reasons (NVML)", fontsize=7, loc="left")
    handles, _ = power_ax.get_legend_handles_labels()
    handles += clock_ax.get_legend_handles_labels()[0]
    handles += [Patch(color=style.PHASE_COLORS[p], alpha=0.4, label=f"{p} windows") for p in PHASES]
    frame = pd.DataFrame({"simulated": [run.record.get("simulated", False)], "gpu_name": [run.record.get("gpu_name", "")]})
    _finish(fig, frame, f"run {run.record['run_id']}", handles, ncols=4)
    style.save_figure(fig, out_pdf)
    return fig


# ---------------------------------------------------------------- entry


def make_figure(name: str, out_pdf, *, measurements=None, record=None, model: str | None = None, models=None,
                gpu: str | None = None):
    """Draw the named figure (FIGURES) into out_pdf and its PNG twin. measurements: table or
    path (every figure but timeline); record: run record path (timeline); model: pareto's
    model; models: order of the models (config order); gpu: spec key, else the table's."""
    if name not in FIGURES:
        raise ConfigError(f"figure: {name!r} is not known; allowed: {', '.join(FIGURES)}")
    if name == "timeline":
        if record is None:
            raise FigureError("timeline: needs record (a run record path)")
        return plot_timeline(record, out_pdf, gpu=gpu)
    if measurements is None:
        raise FigureError(f"{name}: needs measurements (the measurement table or its path)")
    frame = load_measurements(measurements)
    if name == "pareto":
        if model is None:
            raise FigureError("pareto: needs model (one of the table's models)")
        return plot_pareto(frame, model, out_pdf)
    if name in ("roofline_decode", "roofline_prefill"):
        return plot_roofline(frame, name.split("_")[1], out_pdf, gpu=gpu, models=models)
    if name == "power_vs_cap":
        return plot_power_vs_cap(frame, out_pdf, gpu=gpu, models=models)
    if name == "energy_vs_seqlen":
        return plot_energy_vs_seqlen(frame, out_pdf, models=models)
    if name == "clock_sustained":
        return plot_clock_sustained(frame, out_pdf, gpu=gpu, models=models)
    simulated, gpu_name = style.provenance(frame)
    curves = request_energy.request_energy_curves(summarise(frame))
    return plot_request_energy(curves, out_pdf, simulated=simulated, gpu_name=gpu_name, models=models,
                               reference=request_energy.REFERENCE_MODEL)
