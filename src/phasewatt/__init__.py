"""phasewatt: phase-aware energy measurement of LLM inference on NVIDIA GPUs."""

__version__ = "0.1.0"
