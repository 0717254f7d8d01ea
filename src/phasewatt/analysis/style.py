"""Plotting style shared by every figure, and the SIMULATED stamp."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from phasewatt.io import atomic_path  # noqa: E402

# Colour-blind-safe (Okabe-Ito), one per model in config order.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = {"default": "*", "power_cap": "o", "clock_lock": "s"}
FAMILY_LABELS = {"default": "default", "power_cap": "power cap (pl)", "clock_lock": "SM clock lock (sm)"}

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "figure.constrained_layout.use": True,
    }
)


def model_colors(models) -> dict:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def stamp(fig, simulated: bool, gpu_name: str = "") -> None:
    """Say on the figure where the numbers come from; SIMULATED in red when they are."""
    if simulated:
        fig.text(
            0.995, 0.995, "SIMULATED", ha="right", va="top", color="#B00020", fontsize=11,
            fontweight="bold", alpha=0.85,
        )
        fig.text(0.005, 0.995, f"simulated {gpu_name}".strip(), ha="left", va="top", fontsize=7, color="#555555")
    elif gpu_name:
        fig.text(0.005, 0.995, gpu_name, ha="left", va="top", fontsize=7, color="#555555")


def save_figure(fig, pdf_path) -> None:
    """Write the PDF and a PNG twin beside it, atomically."""
    pdf_path = Path(pdf_path)
    with atomic_path(pdf_path) as tmp:
        fig.savefig(tmp, format="pdf")
    with atomic_path(pdf_path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
