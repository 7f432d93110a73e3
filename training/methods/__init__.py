"""Training methods by ``--method`` name: the one-step SR methods and the stages that make a base of our own."""

from .autoencoder import AutoencoderMethod
from .base import OptimizerSpec, Prepared, TrainingMethod
from .d3sr import D3SRMethod
from .diffusion import DiffusionMethod
from .osediff import OSEDiffMethod
from .plain_cnn import PlainCNNMethod
from .tadsr import TADSRMethod
from .tsdsr import TSDSRMethod

METHODS: dict[str, type[TrainingMethod]] = {
    m.name: m for m in (D3SRMethod, OSEDiffMethod, TADSRMethod, TSDSRMethod, AutoencoderMethod, DiffusionMethod, PlainCNNMethod)
}

__all__ = ["METHODS", "OptimizerSpec", "Prepared", "TrainingMethod"]
