"""GPU abstraction: the Gpu protocol, NvmlGpu (real cards), SimGpu (the simulated GPU),
DVFS settings, the power/clock sampler and the GPU spec table.

This package knows nothing of measurement windows or engines.
"""

from phasewatt.gpu.base import CLOCK_EVENT_REASONS, THROTTLE_REASONS, Gpu, Sample, decode_reasons

__all__ = ["CLOCK_EVENT_REASONS", "THROTTLE_REASONS", "Gpu", "Sample", "decode_reasons"]
