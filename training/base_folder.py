"""Base models the trainer makes itself (a VAE, a diffusion prior), written as diffusers folders that
``d3sr_core.backbones.load_base`` and ``model.base`` read: ``unet/``, ``vae/``, ``scheduler/scheduler_config.json``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def write_base_folder(folder: Path, unet: torch.nn.Module, vae: torch.nn.Module, scheduler_config: dict) -> Path:
    """Write the folder under a temporary name and rename it, so a reader never sees half a base."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    unet.save_pretrained(partial / "unet", safe_serialization=True)
    vae.save_pretrained(partial / "vae", safe_serialization=True)
    (partial / "scheduler").mkdir(parents=True)
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    with open(partial / "scheduler" / "scheduler_config.json", "w", encoding="utf-8") as f:
        json.dump({"_class_name": "DDPMScheduler", **config}, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder
