"""Per-layer Hessian traces (weights and activations) with standard errors: HAWQ-V2 step 1."""

from hawq.hessian.estimate import estimate_activation_traces, estimate_traces, weights_hash
from hawq.hessian.hutchinson import NoDoubleBackwardError
from hawq.hessian.result import LayerTrace, TraceResult

__all__ = [
    "LayerTrace",
    "NoDoubleBackwardError",
    "TraceResult",
    "estimate_activation_traces",
    "estimate_traces",
    "weights_hash",
]
