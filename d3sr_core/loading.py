"""A generator from paths, and a one-model cache for hosts that upscale image after image (A1111)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .backbones import load_base
from .backbones.resshift import load_resshift_base
from .checkpoints import build_generator, embedded_base, load_checkpoint
from .files import ModelFileError
from .generator import OneStepGenerator
from .options import UpscaleOptions

DEFAULT_MODEL = Path(__file__).parent / "weights" / "d3sr-small-x4.safetensors"
"""The bundled default model: small, self-contained, trained by ``python -m training.default_model``."""


def bundled_models() -> dict[str, Path]:
    """Name -> path of the models shipped inside the package (what hosts list before their own folders)."""
    return {DEFAULT_MODEL.stem: DEFAULT_MODEL} if DEFAULT_MODEL.is_file() else {}


@dataclass
class LoadedModel:
    """A built generator and the defaults of the method that trained it."""

    generator: OneStepGenerator
    defaults: UpscaleOptions


def load_model(
    model: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    embeddings_dir: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    prompt: str | None = None,
    merge_lora: bool = True,
) -> LoadedModel:
    """Read the checkpoint at ``model``, load its base, and build the generator (see ``checkpoints.build_generator``).

    A self-contained checkpoint brings its own base, and ``base`` is not used (no other base fits it); otherwise
    the base at ``base`` is loaded, with its text encoder only when a prompt must be encoded. A ResShift / TAD-SR
    UNet's base is its VQ autoencoder (``autoencoder_vq_f4.pth``), with ``base_config`` the official YAML config
    (default: the shipped realsr x4 v1).
    """
    checkpoint = load_checkpoint(model, embeddings_dir=embeddings_dir)
    if checkpoint.base_configs is not None:
        loaded_base = embedded_base(checkpoint)
    elif base is None:
        raise ModelFileError(f"{model} needs the base model it was trained on, and none was given.")
    elif checkpoint.base_family == "resshift":
        loaded_base = load_resshift_base(base, base_config)
    else:
        needs_text = prompt is not None or not checkpoint.conditioning
        loaded_base = load_base(base, base_config, load_text_encoder=needs_text)
    generator = build_generator(checkpoint, loaded_base, prompt=prompt, merge_lora=merge_lora)
    return LoadedModel(generator, checkpoint.defaults)


class ModelCache:
    """Keeps the last model loaded; asking for another one drops it first, so one model is in memory at a time."""

    def __init__(self):
        self._key: tuple | None = None
        self._loaded: LoadedModel | None = None

    def get(self, model: str | os.PathLike, base: str | os.PathLike | None, **kwargs) -> LoadedModel:
        key = (str(Path(model)), str(base and Path(base)), tuple(sorted(kwargs.items())))
        if key != self._key:
            self.clear()
            self._loaded = load_model(model, base, **kwargs)
            self._key = key
        return self._loaded

    def clear(self) -> None:
        self._key = self._loaded = None
