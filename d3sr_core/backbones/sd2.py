"""Stable Diffusion 2.x bases: ``UNet2DConditionModel`` (epsilon or v prediction) + ``AutoencoderKL`` + OpenCLIP text encoder.

Configs for SD 2.1-base ship in ``configs/sd21_base`` so a single-file checkpoint needs nothing from a hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from ..files import ModelFileError, read_state_dict
from .patch_autoencoder import autoencoder_from_config, is_patch_autoencoder_config
from .base import (
    BaseModel,
    build_borrowing,
    build_with_weights,
    check_embedded_configs,
    check_weights,
    detect_family_from_unet_config,
    embedded_part_state,
    folder_scheduler_config,
    from_pretrained,
    read_json,
)

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs" / "sd21_base"
LDM_UNET_PROBE_KEY = "model.diffusion_model.input_blocks.0.0.weight"
LDM_VAE_PROBE_KEY = "first_stage_model.decoder.conv_in.weight"
OPEN_CLIP_PREFIX = "cond_stage_model.model."

SD2_BOS, SD2_EOS, SD2_PAD = 49406, 49407, 0
"""OpenCLIP token ids; SD 2.x's tokenizer pads with ``!`` (id 0), unlike SD 1.x which pads with end-of-text."""


def predict_unet(unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
    return unet(latents, timestep, encoder_hidden_states=conditioning["prompt_embeds"]).sample


def sd2_base(unet, vae, scheduler_config: dict, source: Path, prompt_encoder=None) -> BaseModel:
    """An SD 2.x-shaped base (family read from the UNet config) of ``unet`` and ``vae``, both put in eval mode and frozen."""
    return BaseModel(
        family=detect_family_from_unet_config(dict(unet.config)),
        denoiser=unet.eval().requires_grad_(False),
        vae=vae.eval().requires_grad_(False),
        predict_fn=predict_unet,
        scheduler_config=scheduler_config,
        source=source,
        prompt_encoder=prompt_encoder,
    )


def _empty_prompt_ids(length: int) -> torch.Tensor:
    return torch.tensor([[SD2_BOS, SD2_EOS] + [SD2_PAD] * (length - 2)])


def make_prompt_encoder(text_encoder: torch.nn.Module, tokenizer, source: Path):
    """A function ``prompt -> {"prompt_embeds": (1, 77, D)}``: the last hidden state, as OSEDiff takes it.

    Without a tokenizer (single-file bases carry none) only the empty prompt can be encoded.
    """

    def encode(prompt: str) -> dict[str, torch.Tensor]:
        length = text_encoder.config.max_position_embeddings
        if tokenizer is not None:
            ids = tokenizer(
                prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
        elif prompt == "":
            ids = _empty_prompt_ids(length)
        else:
            raise ValueError(
                f"The base model at {source} has no tokenizer, so only the empty prompt can be used, not {prompt!r}: "
                "use a diffusers folder (with tokenizer/) as the base to encode other prompts."
            )
        device = next(text_encoder.parameters()).device
        return {"prompt_embeds": text_encoder(ids.to(device))[0].float().cpu()}

    return encode


def _from_diffusers_folder(path: Path, load_text_encoder: bool) -> BaseModel:
    for sub in ("unet", "vae"):
        if not (path / sub / "config.json").is_file():
            raise ModelFileError(f"{path} is not a diffusers SD 2.x folder: {sub}/config.json is missing.")
    what = "a diffusers SD 2.x folder"
    unet = from_pretrained(UNet2DConditionModel, path, "unet", what)
    vae = _folder_autoencoder(path, what)
    scheduler_config = folder_scheduler_config(path, SHIPPED_CONFIG_DIR)
    prompt_encoder = None
    if load_text_encoder and (path / "text_encoder" / "config.json").is_file():
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder = from_pretrained(CLIPTextModel, path, "text_encoder", what).eval()
        tokenizer = None
        if (path / "tokenizer").is_dir():
            tokenizer = from_pretrained(CLIPTokenizer, path, "tokenizer", what)
        prompt_encoder = make_prompt_encoder(text_encoder, tokenizer, path)
    return sd2_base(unet, vae, scheduler_config, path, prompt_encoder)


def _folder_autoencoder(path: Path, what: str) -> torch.nn.Module:
    """``vae/`` of a diffusers folder: an ``AutoencoderKL``, or a weightless ``PatchAutoencoder`` (config only)."""
    try:
        config = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFileError(f"{path / 'vae' / 'config.json'} could not be read ({err}); expected {what}.") from None
    if isinstance(config, dict) and is_patch_autoencoder_config(config):
        return autoencoder_from_config(config)
    return from_pretrained(AutoencoderKL, path, "vae", what)


def sd2_base_from_embedded(configs: dict, state: dict[str, torch.Tensor], source: Path) -> BaseModel:
    """An SD 2.x-shaped base stored inside a checkpoint: ``configs`` holds the ``unet``, ``vae`` and ``scheduler``
    configs, ``state`` the weights as ``unet.<name>`` / ``vae.<name>`` (diffusers names)."""
    check_embedded_configs(configs, ("unet", "vae", "scheduler"), source)
    unet = build_with_weights(
        lambda: UNet2DConditionModel.from_config(configs["unet"]), embedded_part_state(state, "unet"), source, "UNet"
    )
    vae = build_with_weights(lambda: autoencoder_from_config(configs["vae"]), embedded_part_state(state, "vae"), source, "VAE")
    return sd2_base(unet, vae, configs["scheduler"], source)


def _from_single_file(path: Path, config_dir: str | os.PathLike | None, load_text_encoder: bool) -> BaseModel:
    checkpoint = read_state_dict(path, "a single-file SD 2.x checkpoint (original key layout)")
    return sd2_base_from_ldm_state_dict(checkpoint, path, config_dir, load_text_encoder=load_text_encoder)


def sd2_base_from_ldm_state_dict(
    checkpoint: dict[str, torch.Tensor],
    path: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    *,
    load_text_encoder: bool = True,
    borrowed: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> BaseModel:
    """An SD 2.x base from weights in the original (LDM) key layout: ``model.diffusion_model.*`` for the UNet,
    ``first_stage_model.*`` for the VAE, optionally ``cond_stage_model.model.*`` for the OpenCLIP text encoder.

    This is what single files hold, and what a host that keeps SD models in that layout (ComfyUI) can hand over.
    ``path`` names the source in messages; ``config_dir`` defaults to the shipped SD 2.1-base configs.
    ``borrowed``: a function that gives the host's current state in that layout; the UNet and VAE then borrow the
    host's tensors instead of copying them (see ``d3sr_core.borrowed``).
    """
    what = "a single-file SD 2.x checkpoint (original key layout)"
    config_dir = Path(config_dir) if config_dir else SHIPPED_CONFIG_DIR
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in checkpoint):
        raise ModelFileError(f"{path} is an SD3 model, not SD 2.x; SD3 bases load from a diffusers folder or a single .safetensors file.")
    if LDM_UNET_PROBE_KEY not in checkpoint or LDM_VAE_PROBE_KEY not in checkpoint:
        raise ModelFileError(f"{path} has no UNet and VAE in the original key layout; expected {what}.")
    unet_config = read_json(config_dir / "unet.json")
    context_key = next((k for k in checkpoint if k.endswith("attn2.to_k.weight")), None)
    if context_key is not None and checkpoint[context_key].shape[1] == 768:
        raise ModelFileError(f"{path} is an SD 1.x model (768-wide text tokens); expected an SD 2.x base.")
    vae_config = read_json(config_dir / "vae.json")
    parts = (
        (lambda: UNet2DConditionModel.from_config(unet_config), lambda s: convert_ldm_unet_checkpoint(s, unet_config), "UNet"),
        (lambda: AutoencoderKL.from_config(vae_config), lambda s: convert_ldm_vae_checkpoint(s, vae_config), "VAE"),
    )
    if borrowed is None:
        unet, vae = (build_with_weights(factory, convert(checkpoint), path, what) for factory, convert, what in parts)
    else:
        unet, vae = (
            build_borrowing(factory, lambda convert=convert: convert(borrowed()), Path(path), what) for factory, convert, what in parts
        )
    prompt_encoder = None
    text_config_file = config_dir / "text_encoder.json"
    has_text = any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint)
    if load_text_encoder and has_text and text_config_file.is_file():
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(**read_json(text_config_file))).eval()
        converted = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=OPEN_CLIP_PREFIX)
        # position_ids is a buffer that some transformers versions save and others do not: keep the model's own.
        expected = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
        check_weights(expected, converted, path, "text encoder")
        text_encoder.load_state_dict({k: converted[k] for k in expected}, strict=False)
        prompt_encoder = make_prompt_encoder(text_encoder, None, path)
    return sd2_base(unet, vae, read_json(config_dir / "scheduler.json"), Path(path), prompt_encoder)


def load_sd2_base(
    path: str | os.PathLike, config_dir: str | os.PathLike | None = None, *, load_text_encoder: bool = True
) -> BaseModel:
    """Load an SD 2.x base from a diffusers folder or a single ``.safetensors``/``.ckpt`` file (fp32, CPU, eval)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist; expected an SD 2.x base model (diffusers folder or single file).")
    if path.is_dir():
        return _from_diffusers_folder(path, load_text_encoder)
    return _from_single_file(path, config_dir, load_text_encoder)
