"""The generator as training sees it: the same ``OneStepGenerator`` inference runs, with trainable adapters.

Shared by every method that trains an SD 2.x-shaped one-step generator (D3SR, OSEDiff, TAD-SR on SD).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from d3sr_core.backbones import BaseModel, load_base
from d3sr_core.backbones.sd2 import predict_unet
from d3sr_core.backbones.base import detect_family_from_unet_config
from d3sr_core.checkpoints import OneStepCheckpoint, generator_on_base, save_checkpoint
from d3sr_core.files import atomic_output
from d3sr_core.kohya import kohya_unet_lora
from d3sr_core.generator import OneStepGenerator, vae_scale_factor
from d3sr_core.lora import AdapterSpec, add_adapters, unwrapped_name
from d3sr_core.options import UpscaleOptions

OSEDIFF_LORA_SUFFIXES = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
    "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)
"""OSEDiff's UNet LoRA patterns (``osediff.py: initialize_unet``), which D3SR's UNet LoRA also uses by default."""
VAE_ENCODER_LORA_SUFFIXES = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")

TRAINED_DEFAULTS = UpscaleOptions(upsample="torch_bicubic", color_fix="wavelet")
"""Inference defaults stored in the models we train: the upsampling their training used, the wavelet colour fix."""


@dataclass
class TrainingBase:
    """The base a run starts from: the model, the conditioning its generator sees, and how exports name it."""

    base: BaseModel
    conditioning: dict[str, torch.Tensor]
    null_conditioning: dict[str, torch.Tensor]
    """``model.negative_prompt``'s conditioning: the unconditional side of classifier-free guidance."""
    configs: dict | None
    """``{unet, vae, scheduler}`` when the base was built from configs (exports then embed it), else ``None``."""
    original: dict[str, torch.Tensor]
    """For an embedded base, its weights before training as ``unet.<name>`` / ``vae.<name>`` (what the export
    embeds); empty for a base loaded from a path that exports name instead."""


def build_training_base(model_config: dict) -> TrainingBase:
    """Load ``model.base`` (a path) or build ``model.base_configs`` with random weights (seed the global RNG first).

    The text encoder is used once, for ``model.prompt``, and dropped. A base without one (built from configs, or
    a folder without ``text_encoder/``) gets one zero token of the cross-attention width: the "empty prompt" of a
    model that never had text (attention over identical zero tokens gives the same result whatever their count).
    ``model.embed_base`` makes exports self-contained for a base loaded from a path too.
    """
    path, configs = model_config.get("base"), model_config.get("base_configs")
    if (path is None) == (configs is None):
        raise ValueError("give exactly one of model.base (a base model path) and model.base_configs (configs to build one).")
    if path is not None:
        base = load_base(path)
        if base.prompt_encoder is not None:
            conditioning = {k: v.clone() for k, v in base.encode_prompt(model_config.get("prompt") or "").items()}
            null = {k: v.clone() for k, v in base.encode_prompt(model_config.get("negative_prompt") or "").items()}
            base.prompt_encoder = None
            base._prompt_cache.clear()
        else:
            conditioning = null = _no_text(base.denoiser)
        if model_config.get("embed_base"):
            configs = {
                "unet": dict(base.denoiser.config), "vae": dict(base.vae.config), "scheduler": dict(base.scheduler_config)
            }
    else:
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        base = BaseModel(
            family=detect_family_from_unet_config(configs["unet"]),
            denoiser=unet.eval().requires_grad_(False),
            vae=vae.eval().requires_grad_(False),
            predict_fn=predict_unet,
            scheduler_config=dict(configs["scheduler"]),
            source=Path("model.base_configs"),
        )
        conditioning = null = _no_text(unet)
    if base.family != "sd2":
        raise ValueError(f"training needs an SD 2.x-shaped base; {base.source} is {base.family}.")
    prediction = base.scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"training needs a base with epsilon prediction; {base.source} uses {prediction} (e.g. SD 2.1-768).")
    original = {}
    if configs is not None:
        original = {f"unet.{k}": v.detach().clone() for k, v in base.denoiser.state_dict().items()}
        original.update({f"vae.{k}": v.detach().clone() for k, v in base.vae.state_dict().items()})
    return TrainingBase(base, conditioning, null, copy.deepcopy(_json_safe(configs)), original)


def inference_defaults(model_config: dict, scale: int) -> UpscaleOptions:
    """The upscaling options an exported model carries: ``TRAINED_DEFAULTS`` with ``model.inference_defaults``."""
    overrides = model_config.get("inference_defaults") or {}
    unknown = sorted(set(overrides) - set(UpscaleOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model.inference_defaults has no option {unknown[0]!r}; see d3sr_core.options.UpscaleOptions.")
    return replace(TRAINED_DEFAULTS, scale=scale, **overrides)


def check_crop_size(data_config: dict, vae: nn.Module, paired: bool = True) -> None:
    """HR crops (and, when ``paired``, their upsampled LQ partners) must be whole numbers of VAE pixels."""
    factor = vae_scale_factor(vae)
    crop, scale = int(data_config["crop_size"]), int(data_config["scale"]) if paired else 1
    if crop % (factor * scale):
        raise ValueError(f"data.crop_size {crop} must be a multiple of {factor * scale} (VAE factor {factor} x scale {scale}).")


def _no_text(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.zeros(1, 1, unet.config.cross_attention_dim)}


def _json_safe(value):
    """A diffusers config as plain JSON types (tuples to lists, private ``_`` keys dropped)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def lora_targets(model: nn.Module, suffixes: tuple[str, ...], prefix: str = "") -> tuple[str, ...]:
    """Full names of the Linear/Conv2d layers under ``prefix`` whose names end in one of ``suffixes``."""
    names = []
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, (nn.Linear, nn.Conv2d)):
            if any(name == s or name.endswith("." + s) for s in suffixes):
                names.append(name)
    return tuple(names)


class TrainableGenerator(nn.Module):
    """A ``OneStepGenerator`` whose UNet (and optionally VAE encoder) carry trainable LoRA, and optionally a fully
    trained ``conv_in`` (OSEDiff). The VAE decoder and every base weight stay frozen.

    ``forward(lq)`` takes the upsampled low-quality image ``(B, 3, H, W)`` in [-1, 1] and returns the predicted
    clean latent ``(B, 4, H/8, W/8)`` and its decoding ``(B, 3, H, W)`` in [-1, 1].
    """

    def __init__(
        self,
        training_base: TrainingBase,
        *,
        timestep: int,
        unet_lora_rank: int,
        unet_lora_alpha: float | None = None,
        vae_encoder_lora_rank: int = 0,
        vae_encoder_lora_alpha: float | None = None,
        train_conv_in: bool = False,
    ):
        super().__init__()
        base = training_base.base
        # The untrained conv_in, to export a trained one as a kohya difference.
        self.base_conv_in = {}
        if train_conv_in:
            self.base_conv_in = {f"conv_in.{k}": v.detach().clone() for k, v in base.denoiser.conv_in.state_dict().items()}
        self.adapters: list[AdapterSpec] = []
        if unet_lora_rank:
            targets = lora_targets(base.denoiser, OSEDIFF_LORA_SUFFIXES)
            self.adapters.append(AdapterSpec("default", "unet", unet_lora_rank, float(unet_lora_alpha or unet_lora_rank), targets))
            add_adapters(base.denoiser, self.adapters[-1:])
        if vae_encoder_lora_rank:
            targets = lora_targets(base.vae, VAE_ENCODER_LORA_SUFFIXES, "encoder.") + ("quant_conv",)
            alpha = float(vae_encoder_lora_alpha or vae_encoder_lora_rank)
            self.adapters.append(AdapterSpec("default_encoder", "vae", vae_encoder_lora_rank, alpha, targets))
            add_adapters(base.vae, self.adapters[-1:])
        if train_conv_in:
            base.denoiser.conv_in.requires_grad_(True)
        self.generator: OneStepGenerator = generator_on_base(
            base, prediction_type="epsilon", timestep=timestep, conditioning=training_base.conditioning
        )
        self.training_base = training_base

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """``unet.<name>`` / ``vae.<name>`` (peft names) of every parameter that trains."""
        params = {f"unet.{n}": p for n, p in self.generator.denoiser.named_parameters() if p.requires_grad}
        params.update({f"vae.{n}": p for n, p in self.generator.vae.named_parameters() if p.requires_grad})
        return params

    def cast_frozen_(self, dtype: torch.dtype) -> None:
        """Store the frozen base weights in ``dtype`` (half precision saves memory); trained weights stay fp32."""
        for p in self.generator.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def forward(self, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.generator.encode(lq)
        z_hat = self.generator.x0(latents, self.generator.predict(latents))
        return z_hat, self.generator.decode(z_hat)

    def to_checkpoint(
        self, method: str, trained: dict[str, torch.Tensor], training_config: dict, scale: int
    ) -> OneStepCheckpoint:
        """Our checkpoint of the generator with ``trained`` (names as :meth:`trained_parameters`) as its weights:
        LoRA weights under peft's names, fully trained weights under their plain names; the base embedded when
        it was built from configs."""
        tensors = {unwrapped_name(k): v.detach().float().cpu().clone() for k, v in trained.items()}
        training_base = self.training_base
        return OneStepCheckpoint(
            method=method,
            base_family="sd2",
            prediction_type="epsilon",
            timestep=self.generator.timestep,
            adapters=list(self.adapters),
            tensors=tensors,
            conditioning={k: v.detach().cpu() for k, v in training_base.conditioning.items()},
            defaults=inference_defaults(training_config["model"], scale),
            base_configs=training_base.configs,
            base_tensors=dict(training_base.original),
            training_config=training_config,
        )

    def write_exports(self, folder: Path, method: str, trained: dict[str, torch.Tensor], training_config: dict) -> Path:
        """``folder/model.safetensors`` (ours) and, when the UNet carries LoRA, ``folder/model_kohya_unet_lora.safetensors``
        (for ComfyUI's and A1111's own LoRA loaders), both written atomically."""
        checkpoint = self.to_checkpoint(method, trained, training_config, int(training_config["data"]["scale"]))
        path = save_checkpoint(checkpoint, folder / "model.safetensors")
        unet_adapters = [a for a in checkpoint.adapters if a.component == "unet"]
        if unet_adapters:
            unet = {k[len("unet."):]: v for k, v in checkpoint.tensors.items() if k.startswith("unet.")}
            kohya = kohya_unet_lora(unet, unet_adapters, self.base_conv_in)
            with atomic_output(folder / "model_kohya_unet_lora.safetensors") as tmp:
                save_file(kohya, str(tmp), metadata={"ss_network_module": "networks.lora", "d3sr_method": method})
        return path
