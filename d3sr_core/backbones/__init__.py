"""Base models (the pretrained diffusion model a one-step checkpoint was trained from), loaded with no network.

``load_base(path)`` accepts a diffusers folder or a single-file checkpoint in the original (LDM) key layout,
the kind that ComfyUI and A1111 keep in ``models/checkpoints``.
"""

from __future__ import annotations

from .base import BaseModel, detect_family_from_unet_config
from .sd2 import load_sd2_base

__all__ = ["BaseModel", "detect_family_from_unet_config", "load_base"]


def load_base(path, config_dir=None, *, load_text_encoder: bool = True) -> BaseModel:
    """Load the base model at ``path`` (diffusers folder, or ``.safetensors``/``.ckpt`` single file).

    ``config_dir`` overrides the shipped SD 2.1-base configs used for single files (a folder holding
    ``unet.json``, ``vae.json``, ``scheduler.json`` and optionally ``text_encoder.json``).
    """
    return load_sd2_base(path, config_dir, load_text_encoder=load_text_encoder)
