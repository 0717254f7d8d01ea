"""Plotting style shared by every figure: sizes for a two-column paper, colours, the
provenance stamp (GPU name, SIMULATED in red), point labels that never overlap, an overlap
check for tests, and the atomic PDF + PNG writer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from phasewatt.io import atomic_path  # noqa: E402

# Widths of a two-column paper (IEEE/ACM): one column and the full text width, inches.
COLUMN_WIDTH_IN = 3.5
PAGE_WIDTH_IN = 7.16
# Height of the band kept free at the top of every figure for the stamp, inches.
STAMP_BAND_IN = 0.2

# Colour-blind-safe (Okabe-Ito), one per model in config order.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = {"default": "*", "power_cap": "o", "clock_lock": "s"}
FAMILY_LABELS = {"default": "default", "power_cap": "power cap (pl)", "clock_lock": "SM clock lock (sm)"}
FAMILY_COLORS = {"default": "#000000", "power_cap": "#D55E00", "clock_lock": "#0072B2"}
PHASE_COLORS = {"prefill": "#E69F00", "decode": "#56B4E9"}
# Marker per prompt length position in the grid (first, second, ... length).
SEQLEN_MARKERS = ["o", "^", "s", "D", "v", "P"]
SIMULATED_COLOR = "#B00020"

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 200,
        "font.size": 8,
        "axes.titlesize": 8.5,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "legend.title_fontsize": 7,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "lines.linewidth": 1.2,
        "lines.markersize": 5,
        "figure.constrained_layout.use": True,
        "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by publishers
    }
)


def model_colors(models) -> dict:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def batch_colors(batches) -> dict:
    """A sequential colour per batch size (light = small, dark = large), readable in greyscale."""
    batches = sorted(batches)
    cmap = plt.get_cmap("viridis")
    if len(batches) == 1:
        return {batches[0]: cmap(0.35)}
    return {b: cmap(0.85 - 0.75 * i / (len(batches) - 1)) for i, b in enumerate(batches)}


def seqlen_markers(seqlens) -> dict:
    return {s: SEQLEN_MARKERS[i % len(SEQLEN_MARKERS)] for i, s in enumerate(sorted(seqlens))}


def new_figure(width_in: float, height_in: float, nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure and its axes grid (always 2-D) with constrained layout."""
    kwargs.setdefault("squeeze", False)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width_in, height_in), **kwargs)
    return fig, axes


def provenance(frame) -> tuple[bool, str]:
    """(simulated, GPU name) of the rows a figure shows. A frame mixing simulated and real
    rows counts as simulated: any simulated number on a figure must be said."""
    simulated = False
    if frame is not None and "simulated" in frame and len(frame):
        simulated = bool(frame["simulated"].fillna(False).astype(bool).any())
    name = ""
    if frame is not None and "gpu_name" in frame and len(frame):
        names = sorted({clean_gpu_name(n) for n in frame["gpu_name"].dropna().unique()})
        name = " + ".join(n for n in names if n)
    return simulated, name


def clean_gpu_name(name) -> str:
    return str(name).replace("(simulated)", "").strip()


def stamp(fig, simulated: bool, gpu_name: str = "", title: str = "", legend_handles=None, legend_ncols=None):
    """Say on the figure where the numbers come from: the GPU (and title) at the top left,
    SIMULATED in red at the top right, and put the figure's legend (if any) in a row under
    them. Space for both is taken from the top of the layout, so neither covers a panel or
    an axis label. Returns the legend."""
    height_in = fig.get_figheight()
    band = STAMP_BAND_IN / height_in
    y = 1 - 0.5 * band
    left = " - ".join(part for part in (gpu_name, title) if part)
    if left:
        fig.text(0.005, y, left, ha="left", va="center", fontsize=7.5, color="#333333")
    if simulated:
        fig.text(
            0.995, y, "SIMULATED", ha="right", va="center", color=SIMULATED_COLOR, fontsize=9,
            fontweight="bold",
        )
    top = 1 - band
    legend = None
    if legend_handles:
        ncols = legend_ncols or min(len(legend_handles), 5)
        legend = fig.legend(
            handles=legend_handles, loc="upper center", bbox_to_anchor=(0.5, top), bbox_transform=fig.transFigure,
            ncols=ncols, frameon=False, borderaxespad=0.0, handletextpad=0.4, columnspacing=1.2,
        )
        renderer = _renderer(fig)
        top -= legend.get_window_extent(renderer).height / fig.bbox.height + 0.02 / height_in
    engine = fig.get_layout_engine()
    if engine is not None and hasattr(engine, "set"):
        engine.set(rect=(0, 0, 1, top))
    return legend


def _renderer(fig):
    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def readable_log_axis(ax, which: str = "y") -> None:
    """Plain-number ticks on a log axis, dense enough that a narrow range still gets at
    least two labels: decades over a wide range, 1-2-5 steps over a narrower one, and
    1-2-3-5-7 steps over less than a decade. Call once the data are drawn."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = sorted(axis.get_view_interval())
    ratio = hi / lo if lo > 0 else np.inf
    subs = (1.0,) if ratio > 200 else (1.0, 2.0, 5.0) if ratio > 8 else (1.0, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def no_data(ax, message: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=7, color="#555555", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def freeze_layout(fig) -> None:
    """Run the layout once and keep it: labels placed in display space stay where they were
    checked, whatever the renderer (PDF or PNG) measures later."""
    fig.canvas.draw()
    fig.set_layout_engine("none")


def place_point_labels(ax, xs, ys, labels, *, color="#333333", fontsize=6.0, merge_px=4.0, obstacle_px=4.0,
                       join=", ".join, avoid_lines=True) -> int:
    """Label points without any label covering another label, a marker or the legend, or
    leaving the axes. Points closer than merge_px share one label (join of their labels). Each label tries
    positions around its point at growing distances; one that fits nowhere is left out.
    With avoid_lines, the axes' lines are obstacles too. Call after the layout is frozen
    (freeze_layout). Returns how many labels were left out."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    points = np.array([to_display((x, y)) for x, y in zip(xs, ys)]) if len(xs) else np.zeros((0, 2))
    groups: list[list[int]] = []
    for i, point in enumerate(points):
        for group in groups:
            if np.hypot(*(points[group[0]] - point)) <= merge_px:
                group.append(i)
                break
        else:
            groups.append([i])
    axes_box = ax.get_window_extent(renderer)
    occupied = [Bbox.from_extents(px - obstacle_px, py - obstacle_px, px + obstacle_px, py + obstacle_px) for px, py in points]
    legend = ax.get_legend()
    if legend is not None:
        occupied.append(legend.get_window_extent(renderer))
    occupied += [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
    if avoid_lines:
        for line in ax.get_lines():
            occupied += _line_boxes(line, half_px=1.0)
    offsets = []
    for radius in (3.0, 7.0, 12.0, 18.0):
        for dx, dy in ((1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1), (0, 1), (0, -1)):
            offsets.append((dx * radius, dy * radius))
    skipped = 0
    for group in groups:
        text = join(list(dict.fromkeys(str(labels[i]) for i in group)))
        x, y = xs[group[0]], ys[group[0]]
        placed = False
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            far = max(abs(dx), abs(dy)) > 7.0
            note = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                color=color, annotation_clip=False,
                arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "shrinkA": 0, "shrinkB": 2} if far else None,
            )
            box = note.get_window_extent(renderer)
            inside = (
                box.x0 >= axes_box.x0 + 1 and box.x1 <= axes_box.x1 - 1
                and box.y0 >= axes_box.y0 + 1 and box.y1 <= axes_box.y1 - 1
            )
            if inside and not any(box.overlaps(other) for other in occupied):
                occupied.append(box)
                placed = True
                break
            note.remove()
        skipped += not placed
    return skipped


def _drawn_texts(fig):
    """(text, box in display pixels) of every text the figure draws."""
    renderer = _renderer(fig)
    fig.canvas.draw()
    hidden = _undrawn_tick_labels(fig)
    out = []
    for text in fig.findobj(Text):
        if id(text) in hidden or not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            out.append((text.get_text(), box))
    return out


def _line_boxes(line, half_px: float, step_px: float = 2.0) -> list:
    """Small boxes every step_px along a drawn line, in display pixels."""
    xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    boxes = []
    for a, b in zip(xy[:-1], xy[1:]):
        n = max(int(np.hypot(*(b - a)) / step_px), 1)
        for t in np.linspace(0.0, 1.0, n + 1):
            x, y = a + t * (b - a)
            boxes.append(Bbox.from_extents(x - half_px, y - half_px, x + half_px, y + half_px))
    return boxes


def text_overlaps(fig, tolerance_px: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of drawn texts of the figure whose boxes overlap (for tests: a readable figure
    has none). Works on a figure already saved and closed."""
    boxes = [
        (text, Bbox.from_extents(b.x0 + tolerance_px, b.y0 + tolerance_px, b.x1 - tolerance_px, b.y1 - tolerance_px))
        for text, b in _drawn_texts(fig)
    ]
    pairs = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if boxes[i][1].overlaps(boxes[j][1]):
                pairs.append((boxes[i][0], boxes[j][0]))
    return pairs


def texts_outside(fig, tolerance_px: float = 0.5) -> list[str]:
    """Drawn texts that the edge of the figure cuts."""
    frame = fig.bbox
    return [
        text for text, b in _drawn_texts(fig)
        if b.x0 < frame.x0 - tolerance_px or b.x1 > frame.x1 + tolerance_px
        or b.y0 < frame.y0 - tolerance_px or b.y1 > frame.y1 + tolerance_px
    ]


def _undrawn_tick_labels(fig) -> set:
    """Tick labels of ticks outside the view limits: they exist but are not drawn."""
    hidden = set()
    for ax in fig.axes:
        for axis, index in ((ax.xaxis, 0), (ax.yaxis, 1)):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-9
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                loc = tick.get_loc()
                if loc is None or not (lo - span <= loc <= hi + span):
                    hidden.add(id(tick.label1))
                    hidden.add(id(tick.label2))
                elif not tick.label1.get_visible():
                    hidden.add(id(tick.label1))
    return hidden


def save_figure(fig, pdf_path) -> None:
    """Write the PDF and a PNG twin beside it, atomically. No creation date in the PDF, so
    the same data give the same file."""
    pdf_path = Path(pdf_path)
    with atomic_path(pdf_path) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    with atomic_path(pdf_path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
