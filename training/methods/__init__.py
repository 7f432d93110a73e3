"""Training methods by ``--method`` name."""

from .base import OptimizerSpec, Prepared, TrainingMethod
from .d3sr import D3SRMethod

METHODS: dict[str, type[TrainingMethod]] = {D3SRMethod.name: D3SRMethod}

__all__ = ["METHODS", "OptimizerSpec", "Prepared", "TrainingMethod"]
