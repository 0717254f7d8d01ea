"""Model shape specs and native PyTorch implementations (gqa, mla, gdn, mamba2).

This package knows nothing of measurement: it turns a shape spec into costs
(FLOPs, bytes, memory) and, in the per-architecture files, into runnable models.
"""

from phasewatt.models.spec import ARCHITECTURES, ModelSpec, StepCost

__all__ = ["ARCHITECTURES", "ModelSpec", "StepCost"]
