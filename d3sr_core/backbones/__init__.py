"""Base models (the pretrained diffusion model a one-step checkpoint was trained from), loaded with no network.

``load_base(path)`` accepts a diffusers folder or a single-file checkpoint in the original (LDM) key layout,
the kind that ComfyUI and A1111 keep in ``models/checkpoints``.
"""

from __future__ import annotations

from pathlib import Path

from .base import BaseModel, detect_family_from_unet_config
from .sd2 import load_sd2_base
from .sd3 import is_sd3_folder, load_sd3_base

__all__ = ["BaseModel", "detect_family_from_unet_config", "load_base"]


def load_base(path, config_dir=None, *, load_text_encoder: bool = True) -> BaseModel:
    """Load the base model at ``path``: an SD 3 diffusers folder, or an SD 2.x diffusers folder or single
    ``.safetensors``/``.ckpt`` file.

    ``config_dir`` overrides the shipped SD 2.1-base configs used for single files (a folder holding
    ``unet.json``, ``vae.json``, ``scheduler.json`` and optionally ``text_encoder.json``).
    """
    if Path(path).is_dir() and is_sd3_folder(Path(path)):
        return load_sd3_base(Path(path))
    return load_sd2_base(path, config_dir, load_text_encoder=load_text_encoder)
