"""Captions of every figure and table: what it shows, how its numbers were made, and where
they come from (SIMULATED when they come from the simulated GPU).

One text serves every output: `caption()` returns reStructuredText for the Snakemake report;
`caption_text()` the same words without markup for the Markdown and LaTeX tables.
"""

from __future__ import annotations

from phasewatt.analysis import dvfs_classes as dc
from phasewatt.analysis.request_energy import REFERENCE_MODEL
from phasewatt.analysis.savings import THROUGHPUT_LOSS_BUDGET
from phasewatt.analysis.stats import BOOTSTRAP_RESAMPLES, CONFIDENCE_LEVEL
from phasewatt.errors import PhasewattError

KINDS = ("figure", "table")
_CI = f"{CONFIDENCE_LEVEL:.0%} percentile-bootstrap intervals over repetitions ({BOOTSTRAP_RESAMPLES} resamples)"
_MEDIANS = (
    "Each value is the median over a configuration's repetitions after excluding windows slowed by thermal or "
    "hardware slowdown."
)

TABLE_TEXT = {
    "decode_power": (
        "Decode power per model and batch size: minimum, median and maximum over every prompt length and DVFS "
        "setting of the per-configuration median of the mean decode power, against the GPU's TDP. "
        "Decode draws a fraction of the power budget, so a power cap above the maximum cannot bind. " + _MEDIANS
    ),
    "cap_binding": (
        "Whether each power cap ever bound in decode: the share of decode window time in windows with the SW power "
        "cap clocks-event reason set, the share of decode time the power-violation counter accumulated, and the "
        "highest power read in any decode window. A cap that never binds cannot change decode energy."
    ),
    "savings": (
        "Decode energy per token at the default setting, the best SM clock lock and the best power cap, per model, "
        "batch size and prompt length. Best = lowest median energy per token among the settings of the family whose "
        f"median decode throughput is at most {THROUGHPUT_LOSS_BUDGET:.0%} below the default's. Saving = "
        "1 - E/E_default; throughput loss = 1 - T/T_default; brackets: " + _CI + ", each configuration resampled "
        "independently. p: one-sided exact sign-flip permutation test that the best lock uses less energy per token "
        "than the best cap, repetitions paired by index; Holm: adjusted across the table's rows."
    ),
    "dvfs_classes": (
        "DVFS response class of each model, from the shape of decode throughput and energy per token against the "
        "locked SM clock, per batch size and prompt length, and the evidence. "
        f"{dc.CLOCK_BOUND}: throughput tracks the clock (elasticity d ln T / d ln f >= {dc.TRACKING_ELASTICITY} "
        f"at the top of the range); {dc.CLOCK_INSENSITIVE}: throughput within {dc.KNEE_THROUGHPUT_LOSS:.0%} of "
        f"its best down to a knee and energy falling monotonically (steps under {dc.ENERGY_TOLERANCE:.0%} are "
        f"noise) as the clock drops; {dc.INTERIOR_OPTIMUM}: energy minimum at an interior clock. A model's class "
        "is the most common over its curves; the evidence columns are medians over them."
    ),
    "request_energy": (
        "Energy of one request: its share of the batch's prefill (prefill energy per token x prompt tokens) plus "
        "output tokens x decode energy per token, at the default setting, against the reference model "
        f"({REFERENCE_MODEL}) at the same batch size and prompt length. Ratio brackets: " + _CI + ". Crossover: "
        "the output length beyond which (or below which) the model's request costs less than the reference's. "
        "Decode energy per token is measured over the decode window and held constant for longer outputs, which "
        "understates long requests of attention models."
    ),
}

FIGURE_TEXT = {
    "roofline_decode": (
        "Decode on the roofline of the GPU: achieved compute (TFLOP/s, FLOPs of the model's shapes over the measured "
        "time) against arithmetic intensity (FLOPs per byte of HBM traffic) for each model, batch size and prompt "
        "length at the default setting. Ceilings: the copy bandwidth, the datasheet bf16 peak, the peak at the "
        "highest clock x the measured GEMM efficiency, and the GEMM rate at the 700 W limit, each named in the legend."
    ),
    "roofline_prefill": (
        "Prefill on the roofline of the GPU: achieved compute (TFLOP/s) against arithmetic intensity for each model, "
        "batch size and prompt length at the default setting, under the same bandwidth and compute ceilings as the "
        "decode roofline."
    ),
    "power_vs_cap": (
        "Decode power under each power cap, per model: the median of each configuration's mean decode power against "
        "the cap, with the line power = cap and the GPU's TDP. Filled markers: a decode window of that configuration "
        "had the SW power cap reason set (the cap bound); open markers: it never did."
    ),
    "energy_vs_seqlen": (
        "Energy per token against prompt length, prefill and decode, per model at the default setting: medians "
        "with a band of +/- 1 standard deviation over repetitions."
    ),
    "request_energy": (
        "Energy of one request against its output length: prefill share plus output tokens x decode energy per "
        f"token, per model at the default setting; crossovers with the reference model ({REFERENCE_MODEL}) are "
        "where a line crosses the reference's."
    ),
    "clock_sustained": (
        "Sustained (median of the sampled SM clock during the window) against requested SM clock for every clock "
        "lock, prefill and decode, per model, with the line sustained = requested. The study reports that a 1980 MHz "
        "lock sustains about 1830 MHz on an H200 and that locks up to 1590 MHz are held exactly."
    ),
    "pareto": (
        "Decode energy per token against decode throughput for every DVFS setting of {model}, one panel per batch "
        "size (columns) and prompt length (rows): default, power caps and SM clock locks marked apart, and each "
        "family's Pareto front (settings no other setting of the family beats on both; the default belongs to "
        "both families). Filled markers lie on their family's front."
    ),
    "timeline": (
        "One run of {model} over time: instant power, SM clock and the power cap, with the prefill and decode "
        "windows and every window flagged by a clocks-event reason marked."
    ),
}
# Figures made once per model: name_<model> uses the text of name with {model} filled in.
PER_MODEL_FIGURES = ("pareto", "timeline")


class CaptionError(PhasewattError):
    """A caption was asked for a figure or table that has none."""


def source_sentence(simulated: bool, gpu_name: str = "") -> str:
    """Where the numbers come from, naming the GPU."""
    gpu = gpu_name.strip()
    if simulated:
        # the simulated device calls itself "<GPU> (simulated)"; the sentence already says so
        gpu = gpu.removesuffix("(simulated)").strip()
        model = f" of the {gpu}" if gpu else ""
        return (
            f"SIMULATED: computed by phasewatt's GPU simulator{model} (a first-principles model), not measured "
            "on hardware; it shows what the pipeline computes, not what a GPU does."
        )
    return f"Measured on {gpu}." if gpu else "Measured on hardware."


def _body(name: str, kind: str, model: str | None) -> str:
    if kind not in KINDS:
        raise CaptionError(f"kind: {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    texts = TABLE_TEXT if kind == "table" else FIGURE_TEXT
    if kind == "figure" and name not in texts:
        for prefix in PER_MODEL_FIGURES:
            if name.startswith(prefix + "_") and model is None:
                name, model = prefix, name[len(prefix) + 1 :]
    if name not in texts:
        names = sorted(texts) if kind == "table" else sorted(texts) + [f"{p}_<model>" for p in PER_MODEL_FIGURES]
        raise CaptionError(f"{kind}: {name!r} has no caption; allowed: {', '.join(names)}")
    text = texts[name]
    if "{model}" in text:
        if not model:
            raise CaptionError(f"{kind} {name}: needs the model it shows (model=...)")
        text = text.replace("{model}", model)
    return text


def caption_text(name: str, kind: str = "table", *, simulated: bool, gpu_name: str = "", model: str | None = None) -> str:
    """Plain-text caption: the source sentence first when simulated, so it cannot be missed."""
    body = _body(name, kind, model)
    source = source_sentence(simulated, gpu_name)
    return f"{source} {body}" if simulated else f"{body} {source}"


def caption(name: str, kind: str = "table", *, simulated: bool, gpu_name: str = "", model: str | None = None) -> str:
    """reStructuredText caption for the Snakemake report (SIMULATED in bold)."""
    body = _rst_escape(_body(name, kind, model))
    source = _rst_escape(source_sentence(simulated, gpu_name))
    if simulated:
        head, _, tail = source.partition(":")
        return f"**{head}**:{tail} {body}\n"
    return f"{body} {source}\n"


def figure_caption(name: str, *, simulated: bool, gpu_name: str = "", model: str | None = None) -> str:
    return caption(name, "figure", simulated=simulated, gpu_name=gpu_name, model=model)


def table_caption(name: str, *, simulated: bool, gpu_name: str = "") -> str:
    return caption(name, "table", simulated=simulated, gpu_name=gpu_name)


def _rst_escape(text: str) -> str:
    """Characters that start inline markup in reStructuredText, made literal."""
    for char in ("\\", "*", "`", "|", "_"):
        text = text.replace(char, "\\" + char)
    return text
