"""The GPU spec table (specs.yaml): datasheet and probe numbers, each with its source."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from phasewatt.errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    values: dict
    sources: dict

    def __getattr__(self, item):
        values = object.__getattribute__(self, "values")
        if item in values:
            return values[item]
        raise AttributeError(item)

    @property
    def memory_bytes(self) -> int:
        return int(self.values["memory_gb"] * 1e9)

    @property
    def copy_bandwidth_bytes_s(self) -> float:
        return self.values["copy_bandwidth_tbs"] * 1e12

    def peak_flops_at(self, sm_clock_mhz: float) -> float:
        """Dense BF16 tensor-core peak at a given SM clock (scales with the clock)."""
        return self.values["peak_bf16_tflops"] * 1e12 * sm_clock_mhz / self.values["peak_clock_mhz"]

    def supported_sm_clocks(self) -> list[int]:
        lo, hi, step = (int(self.values[k]) for k in ("sm_clock_min_mhz", "sm_clock_max_mhz", "sm_clock_step_mhz"))
        return list(range(lo, hi + 1, step))


@lru_cache(maxsize=None)
def _table() -> dict:
    return yaml.safe_load(resources.files("phasewatt.gpu").joinpath("specs.yaml").read_text())



def gpu_spec(key: str) -> GpuSpec:
    table = _table()
    if key not in table:
        raise ConfigError(f"gpu: {key!r} is not a known GPU; allowed: {', '.join(sorted(table))}")
    entry = table[key]
    values = {k: v["value"] for k, v in entry.items() if isinstance(v, dict)}
    sources = {k: v["source"] for k, v in entry.items() if isinstance(v, dict)}
    return GpuSpec(key=key, name=entry["name"], values=values, sources=sources)

