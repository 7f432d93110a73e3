"""Base models (the pretrained diffusion model a one-step checkpoint was trained from), loaded with no network.

``load_base(path)`` accepts a diffusers folder or a single-file checkpoint in the original (LDM) key layout,
the kind that ComfyUI and A1111 keep in ``models/checkpoints``.
"""

from __future__ import annotations

from pathlib import Path

from .base import BaseModel, detect_family_from_unet_config
from .sd2 import load_sd2_base
from .sd3 import is_sd3_folder, is_stability_sd3_state, load_sd3_base, load_sd3_single_file

__all__ = ["BaseModel", "detect_family_from_unet_config", "load_base"]


def _is_sd3_single_file(path: Path) -> bool:
    """A ``.safetensors`` whose header names an MMDiT in Stability's layout (read without its tensors)."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return is_stability_sd3_state(f.keys())
    except (SafetensorError, OSError):
        return False  # the SD 2.x loader says what is wrong with the file


def load_base(path, config_dir=None, *, load_text_encoder: bool = True, vae_path=None) -> BaseModel:
    """Load the base model at ``path``: an SD 3 diffusers folder or single ``.safetensors`` in Stability's layout,
    or an SD 2.x diffusers folder or single ``.safetensors``/``.ckpt`` file.

    ``config_dir`` overrides the shipped configs used for single files: for SD 2.x a folder holding ``unet.json``,
    ``vae.json``, ``scheduler.json`` and optionally ``text_encoder.json``; for SD3 ``transformer.json``, ``vae.json``
    and ``scheduler.json``. ``vae_path`` is the VAE file for an SD3 file that holds the MMDiT alone.
    """
    path = Path(path)
    if path.is_dir() and is_sd3_folder(path):
        return load_sd3_base(path)
    if _is_sd3_single_file(path):
        return load_sd3_single_file(path, config_dir, vae_path)
    if vae_path is not None:
        raise ValueError(f"a separate VAE file is taken with an SD3 MMDiT file only; {path} is not one.")
    return load_sd2_base(path, config_dir, load_text_encoder=load_text_encoder)
