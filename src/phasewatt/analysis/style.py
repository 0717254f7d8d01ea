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
from matplotlib.collections import PathCollection  # noqa: E402
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
    """Label points without any label covering another label, a marker (of any scatter in
    the axes, at its drawn size) or the legend, or leaving the axes. Points closer than
    merge_px share one label (join of their labels). Each label tries positions around its
    point at growing distances; one that fits nowhere is left out.
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
    boxes = [Bbox.from_extents(px - obstacle_px, py - obstacle_px, px + obstacle_px, py + obstacle_px) for px, py in points]
    legend = ax.get_legend()
    if legend is not None:
        boxes.append(legend.get_window_extent(renderer))
    boxes += [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
    boxes += _marker_boxes(ax)
    if avoid_lines:
        for line in ax.get_lines():
            boxes += _line_boxes(line, half_px=1.0)
    occupied = np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes]).reshape(-1, 4)
    px_per_pt = fig.dpi / 72.0
    directions = [(1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1), (0, 1), (0, -1),
                  (1, 0.5), (-1, 0.5), (1, -0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1)]
    offsets = [(dx * r, dy * r) for r in (4.5, 8.0, 12.0, 18.0, 26.0, 36.0) for dx, dy in directions[: 8 if r < 12 else 16]]
    anchors = np.array([points[group[0]] for group in groups]).reshape(-1, 2)
    skipped = 0
    for k, group in enumerate(groups):
        text = join(list(dict.fromkeys(str(labels[i]) for i in group)))
        size = _text_size(ax, renderer, text, fontsize)
        others = np.delete(anchors, k, axis=0)
        placed = None
        # First only where the label is nearer its own point than any other (unambiguous),
        # then anywhere free, with its leader line to say which point it names.
        for strict in (True, False):
            for dx, dy in offsets:
                ha, va = _alignment(dx, dy)
                box = _box_at(anchors[k] + np.array([dx, dy]) * px_per_pt, size, ha, va)
                if not _fits(box, axes_box, occupied):
                    continue
                if strict and not _nearest_is_own(box, anchors[k], others):
                    continue
                note = ax.annotate(
                    text, (xs[group[0]], ys[group[0]]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                    fontsize=fontsize, color=color, annotation_clip=False,
                    arrowprops=(
                        {"arrowstyle": "-", "color": color, "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
                        if max(abs(dx), abs(dy)) > 8.0 else None
                    ),
                )
                drawn = note.get_window_extent(renderer)
                drawn = np.array([drawn.x0, drawn.y0, drawn.x1, drawn.y1])
                if _fits(drawn, axes_box, occupied):
                    placed = drawn
                    break
                note.remove()
            if placed is not None:
                break
        if placed is None:
            skipped += 1
        else:
            occupied = np.vstack([occupied, placed])
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


def _alignment(dx: float, dy: float) -> tuple[str, str]:
    """Text alignment that puts a label on the far side of its offset from the point."""
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    if abs(dx) < abs(dy):
        ha = "center"
    elif abs(dy) < abs(dx) and dy != 0:
        va = "center"
    return ha, va


def _text_size(ax, renderer, text: str, fontsize: float) -> tuple[float, float]:
    probe = ax.text(0, 0, text, fontsize=fontsize)
    box = probe.get_window_extent(renderer)
    probe.remove()
    return box.width, box.height


def _box_at(anchor, size, ha: str, va: str) -> np.ndarray:
    """(x0, y0, x1, y1) of a text of size (w, h) aligned (ha, va) at anchor, in pixels."""
    w, h = size
    x0 = anchor[0] - {"left": 0.0, "center": w / 2, "right": w}[ha]
    y0 = anchor[1] - {"bottom": 0.0, "center": h / 2, "top": h}[va]
    return np.array([x0, y0, x0 + w, y0 + h])


def _fits(box, axes_box, occupied) -> bool:
    """Inside the axes (1 px in) and overlapping none of the occupied boxes."""
    x0, y0, x1, y1 = box
    if x0 < axes_box.x0 + 1 or x1 > axes_box.x1 - 1 or y0 < axes_box.y0 + 1 or y1 > axes_box.y1 - 1:
        return False
    hits = (x0 < occupied[:, 2]) & (x1 > occupied[:, 0]) & (y0 < occupied[:, 3]) & (y1 > occupied[:, 1])
    return not bool(hits.any())


def _nearest_is_own(box, own, others) -> bool:
    """The label's box is nearer its own point than any other point (by at least 1 px)."""
    def distance(points):
        points = np.atleast_2d(points)
        dx = np.maximum.reduce([box[0] - points[:, 0], np.zeros(len(points)), points[:, 0] - box[2]])
        dy = np.maximum.reduce([box[1] - points[:, 1], np.zeros(len(points)), points[:, 1] - box[3]])
        return np.hypot(dx, dy)

    if len(others) == 0:
        return True
    return bool(np.all(distance(others) > distance(own)[0] + 1.0))


def _marker_boxes(ax) -> list:
    """The box of every scatter marker of the axes at its drawn size, in display pixels."""
    boxes = []
    px_per_pt = ax.figure.dpi / 72.0
    for collection in ax.collections:
        if not isinstance(collection, PathCollection):
            continue
        offsets = collection.get_offset_transform().transform(collection.get_offsets())
        sizes = collection.get_sizes()
        for k, (x, y) in enumerate(offsets):
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            size = sizes[k % len(sizes)] if len(sizes) else 36.0
            half = 0.5 * np.sqrt(size) * px_per_pt + 1.0
            boxes.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return boxes


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


def text_problems(fig, tolerance_px: float = 0.5) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs of drawn texts whose boxes overlap, texts the figure's edge cuts): a readable
    figure has neither. Works on a figure already saved and closed (tests use it)."""
    texts = _drawn_texts(fig)
    frame = fig.bbox
    outside = [
        text for text, b in texts
        if b.x0 < frame.x0 - tolerance_px or b.x1 > frame.x1 + tolerance_px
        or b.y0 < frame.y0 - tolerance_px or b.y1 > frame.y1 + tolerance_px
    ]
    boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for _, b in texts]).reshape(-1, 4)
    boxes += np.array([tolerance_px, tolerance_px, -tolerance_px, -tolerance_px])
    overlaps = []
    for i in range(len(boxes)):
        rest = boxes[i + 1 :]
        hits = (boxes[i, 0] < rest[:, 2]) & (boxes[i, 2] > rest[:, 0]) & (boxes[i, 1] < rest[:, 3]) & (boxes[i, 3] > rest[:, 1])
        overlaps += [(texts[i][0], texts[i + 1 + j][0]) for j in np.flatnonzero(hits)]
    return overlaps, outside


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
