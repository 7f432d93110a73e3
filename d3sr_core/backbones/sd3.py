"""Stable Diffusion 3 bases: ``SD3Transformer2DModel`` (rectified-flow velocity) + the 16-channel ``AutoencoderKL``.

Only the transformer and the VAE are loaded: TSD-SR conditions on fixed, precomputed prompt embeddings, so no
text encoder is needed at inference. The SD3-medium configs ship in ``configs/sd3_medium`` for reference and
for benchmarks with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from ..files import ModelFileError
from .base import (
    BaseModel,
    build_with_weights,
    check_embedded_configs,
    embedded_part_state,
    folder_scheduler_config,
    from_pretrained,
    read_json,
)

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs" / "sd3_medium"


def predict_transformer(
    transformer: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict
) -> torch.Tensor:
    return transformer(
        hidden_states=latents,
        timestep=timestep,
        encoder_hidden_states=conditioning["prompt_embeds"],
        pooled_projections=conditioning["pooled_prompt_embeds"],
    ).sample


def sd3_base(transformer, vae, scheduler_config: dict, source: Path) -> BaseModel:
    """An SD3-shaped base of ``transformer`` and ``vae``, both put in eval mode and frozen."""
    return BaseModel(
        family="sd3",
        denoiser=transformer.eval().requires_grad_(False),
        vae=vae.eval().requires_grad_(False),
        predict_fn=predict_transformer,
        scheduler_config=scheduler_config,
        source=source,
        denoiser_component="transformer",
    )


def is_sd3_folder(path: Path) -> bool:
    config = path / "transformer" / "config.json"
    return config.is_file() and read_json(config).get("_class_name") == "SD3Transformer2DModel"


def load_sd3_base(path: Path) -> BaseModel:
    """An SD3 diffusers folder (``transformer/``, ``vae/``), fp32, CPU, eval."""
    if not (path / "vae" / "config.json").is_file():
        raise ModelFileError(f"{path} is not a diffusers SD3 folder: vae/config.json is missing.")
    what = "a diffusers SD3 folder"
    transformer = from_pretrained(SD3Transformer2DModel, path, "transformer", what)
    vae = from_pretrained(AutoencoderKL, path, "vae", what)
    scheduler_config = folder_scheduler_config(path, SHIPPED_CONFIG_DIR)
    return sd3_base(transformer, vae, scheduler_config, path)


def sd3_base_from_embedded(configs: dict, state: dict[str, torch.Tensor], source: Path) -> BaseModel:
    """An SD3-shaped base stored inside a checkpoint: ``configs`` holds the ``transformer``, ``vae`` and
    ``scheduler`` configs, ``state`` the weights as ``transformer.<name>`` / ``vae.<name>`` (diffusers names)."""
    check_embedded_configs(configs, ("transformer", "vae", "scheduler"), source)
    transformer = build_with_weights(
        lambda: SD3Transformer2DModel.from_config(configs["transformer"]),
        embedded_part_state(state, "transformer"), source, "transformer",
    )
    vae = build_with_weights(lambda: AutoencoderKL.from_config(configs["vae"]), embedded_part_state(state, "vae"), source, "VAE")
    return sd3_base(transformer, vae, configs["scheduler"], source)
