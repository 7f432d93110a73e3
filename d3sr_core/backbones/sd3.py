"""Stable Diffusion 3 bases: ``SD3Transformer2DModel`` (rectified-flow velocity) + the 16-channel ``AutoencoderKL``.

Only the transformer and the VAE are loaded: TSD-SR conditions on fixed, precomputed prompt embeddings, so no
text encoder is needed at inference (the text encoders inside a single file are not even read). The SD3-medium
configs ship in ``configs/sd3_medium``, so a single file in Stability's layout (``sd3_medium.safetensors``, the MMDiT
under ``model.diffusion_model.``, the VAE under ``first_stage_model.``) needs nothing from a hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ..files import ModelFileError, read_safetensors
from .base import (
    BaseModel,
    build_borrowing,
    build_with_weights,
    check_embedded_configs,
    embedded_part_state,
    folder_scheduler_config,
    from_pretrained,
    in_fresh_storage,
    read_json,
)

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs" / "sd3_medium"
MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
MMDIT_PROBE_KEY = "joint_blocks.0.context_block.attn.qkv.weight"
"""A tensor only an MMDiT (SD3) has, named without ``MMDIT_PREFIX``."""
VAE_PROBE_KEY = "decoder.conv_in.weight"


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
    transformer = in_fresh_storage(from_pretrained(SD3Transformer2DModel, path, "transformer", what))
    vae = in_fresh_storage(from_pretrained(AutoencoderKL, path, "vae", what))
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


# Stability's MMDiT names -> diffusers' SD3Transformer2DModel names. The facts come from Stability's reference files
# (sd3_medium.safetensors) and diffusers' single-file tables; the mapping is written out here as data.
MMDIT_TOP_LEVEL = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
MMDIT_BLOCK_PARTS = {
    "x_block": {
        "attn.proj": "attn.to_out.0", "attn.ln_q": "attn.norm_q", "attn.ln_k": "attn.norm_k",
        "attn2.proj": "attn2.to_out.0", "attn2.ln_q": "attn2.norm_q", "attn2.ln_k": "attn2.norm_k",
        "adaLN_modulation.1": "norm1.linear", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
    },
    "context_block": {
        "attn.proj": "attn.to_add_out", "attn.ln_q": "attn.norm_added_q", "attn.ln_k": "attn.norm_added_k",
        "adaLN_modulation.1": "norm1_context.linear", "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2",
    },
}
MMDIT_FUSED_QKV = {
    ("x_block", "attn"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn2"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("context_block", "attn"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BLOCK_KEY = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)")


def _scale_then_shift(modulation: torch.Tensor) -> torch.Tensor:
    """An output adaLN projection (Stability: shift rows, then scale rows) in diffusers' order (scale, then shift)."""
    shift, scale = modulation.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def mmdit_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MMDiT state in Stability's names (without ``model.diffusion_model.``) under ``SD3Transformer2DModel``'s
    names. Fused ``qkv`` projections become views of their thirds (no copy); only the two output modulations whose
    halves swap order (the final layer's, and the context block's in a block whose context stream ends there) are
    new tensors. Names that are not MMDiT weights are left out."""
    pre_only = {m[1] for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m[2] == "context_block" and m[3] == "adaLN_modulation.1"}
    pre_only -= {m[1] for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m[2] == "context_block" and m[3] == "attn.proj"}
    out = {}
    for key, tensor in state.items():
        if key == "pos_embed":
            out[MMDIT_TOP_LEVEL[key]] = tensor
            continue
        stem, _, kind = key.rpartition(".")
        if stem in MMDIT_TOP_LEVEL:
            swapped = stem == "final_layer.adaLN_modulation.1"
            out[f"{MMDIT_TOP_LEVEL[stem]}.{kind}"] = _scale_then_shift(tensor) if swapped else tensor
            continue
        match = _BLOCK_KEY.fullmatch(key)
        if not match:
            continue
        index, stream, part, kind = match.groups()
        attention, _, rest = part.partition(".")
        if rest == "qkv" and (stream, attention) in MMDIT_FUSED_QKV:
            for name, third in zip(MMDIT_FUSED_QKV[stream, attention], tensor.chunk(3, dim=0)):
                out[f"transformer_blocks.{index}.{name}.{kind}"] = third
        elif part in MMDIT_BLOCK_PARTS[stream]:
            swapped = stream == "context_block" and part == "adaLN_modulation.1" and index in pre_only
            out[f"transformer_blocks.{index}.{MMDIT_BLOCK_PARTS[stream][part]}.{kind}"] = (
                _scale_then_shift(tensor) if swapped else tensor
            )
    return out


def ldm_vae_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A VAE state in the original (LDM) names, without ``first_stage_model.``, under ``AutoencoderKL``'s names;
    the attention's 1x1 convolutions become views as linear weights (no copy). Diffusers-named states pass as they are."""
    if any(k.startswith("encoder.down_blocks.") for k in state):
        return dict(state)
    return convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in state.items()}, config)


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def sd3_base_from_stability_state(
    mmdit_state: dict[str, torch.Tensor],
    vae_state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    *,
    borrowed: tuple | None = None,
) -> BaseModel:
    """An SD3 base from an MMDiT in Stability's names and a VAE in LDM names (both without their prefixes), in the
    dtypes they come in (fp16, bf16, fp8: converted at run time, see ``pipeline.Upscaler``).

    ``config_dir`` holds ``transformer.json``, ``vae.json`` and ``scheduler.json`` (default: the shipped SD3-medium
    ones). ``borrowed = (read_mmdit, read_vae)``: functions that give the host's current states in the same names;
    the base then borrows the host's tensors instead of copying them (see ``d3sr_core.borrowed``).
    """
    scaled = next((k for k in mmdit_state if k == "scaled_fp8" or k.endswith(".scale_weight")), None)
    if scaled is not None:  # each weight would need its own scale, which these layers do not apply
        raise ModelFileError(f"{source} is a scaled fp8 MMDiT ({scaled!r}); use a plain fp8, fp16, bf16 or fp32 SD3 file.")
    config_dir = Path(config_dir) if config_dir else SHIPPED_CONFIG_DIR
    for name in ("transformer.json", "vae.json", "scheduler.json"):
        if not (config_dir / name).is_file():
            raise ModelFileError(f"{config_dir} has no {name}; an SD3 base config folder holds transformer.json, vae.json and scheduler.json.")
    vae_config = read_json(config_dir / "vae.json")
    transformer_config = read_json(config_dir / "transformer.json")
    parts = (
        (lambda: SD3Transformer2DModel.from_config(transformer_config), lambda s: mmdit_to_diffusers(s), mmdit_state, "transformer"),
        (lambda: AutoencoderKL.from_config(vae_config), lambda s: ldm_vae_to_diffusers(s, vae_config), vae_state, "VAE"),
    )
    models = []
    for index, (factory, convert, state, what) in enumerate(parts):
        if borrowed is None:
            models.append(build_with_weights(factory, convert(state), Path(source), what))
        else:
            read_host = borrowed[index]
            models.append(build_borrowing(factory, lambda convert=convert, read_host=read_host: convert(read_host()), Path(source), what))
    return sd3_base(*models, read_json(config_dir / "scheduler.json"), Path(source))


def is_stability_sd3_state(names) -> bool:
    """Whether tensor ``names`` hold an MMDiT in Stability's layout, with or without ``model.diffusion_model.``."""
    return any(k == MMDIT_PROBE_KEY or k == MMDIT_PREFIX + MMDIT_PROBE_KEY for k in names)


def load_sd3_single_file(
    path: str | os.PathLike, config_dir: str | os.PathLike | None = None, vae_path: str | os.PathLike | None = None
) -> BaseModel:
    """An SD3 base from one ``.safetensors`` in Stability's layout (text encoders inside or not; they are not read),
    or from an MMDiT file (``models/diffusion_models``, prefixed or not) with its VAE in ``vae_path``
    (``models/vae``, LDM or diffusers names). Weights keep the dtype they are stored in."""
    path = Path(path)
    what = "a single-file SD3 checkpoint (Stability's layout: model.diffusion_model.*, first_stage_model.*)"
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path} is not a .safetensors file; SD3 single files are read from .safetensors only.")
    wanted = (MMDIT_PREFIX, VAE_PREFIX, "joint_blocks.", "x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.",
              "final_layer.", "pos_embed")
    state, _ = read_safetensors(path, what, keep=lambda k: k.startswith(wanted))
    if not is_stability_sd3_state(state):
        raise ModelFileError(f"{path} holds no MMDiT in Stability's layout; expected {what}.")
    mmdit = _unprefixed(state, MMDIT_PREFIX) if any(k.startswith(MMDIT_PREFIX) for k in state) else state
    vae = _unprefixed(state, VAE_PREFIX)
    if vae_path is not None:
        vae_file_state, _ = read_safetensors(vae_path, "an SD3 VAE (.safetensors)")
        vae = _unprefixed(vae_file_state, VAE_PREFIX) or vae_file_state
    if VAE_PROBE_KEY not in vae:
        raise ModelFileError(
            f"{path} holds no VAE (no {VAE_PREFIX}{VAE_PROBE_KEY}); give the SD3 VAE file with it (models/vae, --base-vae)."
        )
    return sd3_base_from_stability_state(mmdit, vae, path, config_dir)
