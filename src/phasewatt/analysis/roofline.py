"""Roofline of a GPU and where each measured phase sits on it.

Arithmetic intensity = FLOPs / HBM bytes of one run of the phase, from the model's shapes
(the `flops` and `hbm_bytes` columns of the measurement table); achieved FLOP/s = FLOPs /
the median measured time of that run. The roof is min(compute ceiling, bandwidth x
intensity). The bandwidth is the measured device-to-device copy bandwidth (what a kernel
can actually stream), not the datasheet's. Two compute ceilings are available, and a figure
says which it draws:

- datasheet: dense BF16 tensor-core peak as quoted by NVIDIA (at the datasheet's clock);
- gemm_max_clock: that peak scaled to the highest SM clock, times the efficiency a large
  BF16 GEMM reached in the probe: what a GEMM could reach if the power limit let the clock
  stay at its maximum;
- gemm_power_limited: the same efficiency at the clock the probe GEMM sustained under the
  default power limit: what a long compute-bound kernel reaches in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from phasewatt.analysis.summary import excluded_mask
from phasewatt.errors import PhasewattError

CEILINGS = ("datasheet", "gemm_max_clock", "gemm_power_limited")
POINT_KEYS = ["model", "batch", "seqlen"]


@dataclass(frozen=True)
class Roofline:
    peak_flops_s: float
    bandwidth_bytes_s: float
    ceiling: str
    label: str

    @property
    def ridge_flop_per_byte(self) -> float:
        """Intensity at which the kernel stops being bandwidth-bound."""
        return self.peak_flops_s / self.bandwidth_bytes_s

    def attainable_flops_s(self, intensity) -> np.ndarray:
        intensity = np.asarray(intensity, dtype=float)
        return np.minimum(self.peak_flops_s, self.bandwidth_bytes_s * intensity)


def gpu_roofline(spec, ceiling: str = "datasheet") -> Roofline:
    """The roofline of a GpuSpec (phasewatt.gpu.specs) with the named compute ceiling."""
    bandwidth = spec.copy_bandwidth_bytes_s
    if ceiling == "datasheet":
        peak = spec.peak_bf16_tflops * 1e12
        label = f"datasheet BF16 peak {peak / 1e12:.0f} TFLOP/s ({spec.peak_clock_mhz:.0f} MHz)"
    elif ceiling == "gemm_max_clock":
        peak = spec.peak_flops_at(spec.sm_clock_max_mhz) * spec.gemm_efficiency
        label = (
            f"BF16 peak at {spec.sm_clock_max_mhz:.0f} MHz x GEMM efficiency {spec.gemm_efficiency:.3g}"
            f" = {peak / 1e12:.0f} TFLOP/s"
        )
    elif ceiling == "gemm_power_limited":
        peak = spec.peak_flops_at(spec.gemm_clock_mhz) * spec.gemm_efficiency
        label = (
            f"BF16 GEMM at the {spec.power_limit_max_w:.0f} W limit ({spec.gemm_clock_mhz:.0f} MHz)"
            f" = {peak / 1e12:.0f} TFLOP/s"
        )
    else:
        raise PhasewattError(f"ceiling: {ceiling!r} is not known; allowed: {', '.join(CEILINGS)}")
    return Roofline(peak_flops_s=peak, bandwidth_bytes_s=bandwidth, ceiling=ceiling, label=label)


def roofline_points(measurements: pd.DataFrame, phase: str, roof: Roofline, dvfs: str = "default") -> pd.DataFrame:
    """One row per (model, batch, seqlen) of the phase at one setting: intensity (FLOP/byte),
    achieved FLOP/s (FLOPs / median time of the kept repetitions), the roof there, the
    fraction of it reached, and which side of the ridge the point is on."""
    columns = POINT_KEYS + [
        "intensity_flop_per_byte", "achieved_flops_s", "attainable_flops_s", "fraction_of_roof", "bound",
    ]
    frame = measurements[(measurements["phase"] == phase) & (measurements["dvfs"] == dvfs)]
    frame = frame[~excluded_mask(frame)] if len(frame) else frame
    if frame.empty:
        return pd.DataFrame(columns=columns)
    grouped = frame.groupby(POINT_KEYS, sort=True).agg(
        flops=("flops", "first"), hbm_bytes=("hbm_bytes", "first"), time_s=("time_s", "median")
    )
    out = grouped.reset_index()
    out["intensity_flop_per_byte"] = out["flops"] / out["hbm_bytes"]
    out["achieved_flops_s"] = out["flops"] / out["time_s"]
    out["attainable_flops_s"] = roof.attainable_flops_s(out["intensity_flop_per_byte"])
    out["fraction_of_roof"] = out["achieved_flops_s"] / out["attainable_flops_s"]
    out["bound"] = np.where(out["intensity_flop_per_byte"] < roof.ridge_flop_per_byte, "memory", "compute")
    return out[columns]
