"""Engines: prefill(batch) and decode(n) behind one protocol; native, vllm, sim, microbench.

Engines know the GPU only through what they run on it; they know nothing of measurement.
"""

from phasewatt.engines.base import Engine, make_engine

__all__ = ["Engine", "make_engine"]
