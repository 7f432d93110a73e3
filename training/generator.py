"""The generator as training sees it: the same ``OneStepGenerator`` inference runs, with trainable adapters.

Shared by every method that trains a one-step generator: on SD 2.x-shaped bases (D3SR, OSEDiff, TAD-SR on SD)
and on SD3-shaped ones (TSD-SR).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from d3sr_core.backbones import BaseModel, load_base
from d3sr_core.backbones.base import FAMILIES
from d3sr_core.backbones.resshift import is_resshift_unet_state
from d3sr_core.backbones.patch_autoencoder import autoencoder_from_config
from d3sr_core.backbones.sd2 import sd2_base
from d3sr_core.backbones.sd3 import sd3_base
from d3sr_core.checkpoints import (
    TSDSR_TRANSFORMER_TARGETS,
    OneStepCheckpoint,
    generator_on_base,
    load_checkpoint,
    peek,
    save_checkpoint,
    write_tsdsr_dir,
)
from d3sr_core.files import ModelFileError, atomic_output, read_pickle
from d3sr_core.kohya import kohya_unet_lora
from d3sr_core.generator import OneStepGenerator, vae_scale_factor
from d3sr_core.lora import AdapterSpec, add_adapters, unwrapped_name
from d3sr_core.options import UpscaleOptions

from .prompts import read_prompt_embeddings

OSEDIFF_LORA_SUFFIXES = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
    "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)
"""OSEDiff's UNet LoRA patterns (``osediff.py: initialize_unet``), which D3SR's UNet LoRA also uses by default."""
DENOISER_LORA_SUFFIXES = {"sd2": OSEDIFF_LORA_SUFFIXES, "sd3": TSDSR_TRANSFORMER_TARGETS}
"""The generator's denoiser LoRA patterns by base family (SD3: TSD-SR's ``test_tsdsr.py`` list)."""
VAE_ENCODER_LORA_SUFFIXES = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")

TRAINED_DEFAULTS = UpscaleOptions(upsample="torch_bicubic", color_fix="wavelet")
"""Inference defaults stored in the models we train: the upsampling their training used, the wavelet colour fix."""
OFFICIAL_SCRIPT_DEFAULTS = {
    "osediff": {"tile_rule": "area"},
    "tsdsr": {"tile_rule": "area", "vae_encoder_tile_size": 0, "vae_decoder_tile_size": 0},
}
"""Over ``TRAINED_DEFAULTS`` for the methods whose official inference script a trained model mirrors: that script's
latent tiling rule, and TSD-SR's untiled VAE (see ``d3sr_core.options.PRESETS``)."""


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


def is_resshift_base(model: dict) -> bool:
    """Whether ``model`` (the run's ``model`` section) names a ResShift base: ResShift configs in
    ``model.base_configs`` (``vae`` holds the official autoencoder's ``ddconfig``), a VQ autoencoder in
    ``model.autoencoder``, or a ``model.base`` file that reads as a ResShift model."""
    configs = model.get("base_configs")
    if isinstance(configs, dict):
        return isinstance(configs.get("vae"), dict) and "ddconfig" in configs["vae"]
    if model.get("autoencoder") is not None:
        return True
    base = model.get("base")
    # The official ResShift / TAD-SR files are .pth (.pt), read here (weights only) as their keys tell nothing
    # else; ours are .safetensors, whose header says the family. SD single files (.ckpt) are never unpickled here.
    if base is None or not Path(base).is_file() or Path(base).suffix not in (".pth", ".pt", ".safetensors"):
        return False
    try:
        if Path(base).suffix == ".safetensors":
            return peek(base)[0] == "resshift"
        return is_resshift_unet_state(read_pickle(base, "a ResShift or TAD-SR UNet checkpoint (.pth)"))
    except (ModelFileError, ValueError, OSError):
        return False


def build_training_base(model_config: dict, families: tuple[str, ...] = ("sd2",)) -> TrainingBase:
    """Load ``model.base`` (a path) or build ``model.base_configs`` with random weights (seed the global RNG first).

    ``families``: the base families the method trains on (SD 2.x with epsilon prediction; SD3 with rectified flow).
    The conditioning comes from ``model.prompt_embeddings`` when given (``python -m training.prompts``), else
    from the base's text encoder, used once for ``model.prompt`` / ``model.negative_prompt`` and dropped. A base
    without text (built from configs) gets zero embeddings: one zero token of each width, the "empty prompt" of a
    model that never had text (attention over identical zero tokens gives the same result whatever their count).
    ``model.embed_base`` makes exports self-contained for a base loaded from a path too.
    """
    path, configs = model_config.get("base"), model_config.get("base_configs")
    if is_resshift_base(model_config):
        raise ValueError("the model section describes a ResShift base, which only --method tadsr trains on.")
    if (path is None) == (configs is None):
        raise ValueError("give exactly one of model.base (a base model path) and model.base_configs (configs to build one).")
    base = load_base(path) if path is not None else _base_from_configs(configs)
    if base.family not in families:
        wanted = " or ".join(FAMILIES[f] for f in families)
        raise ValueError(f"this method trains on {wanted} bases; {base.source} is {FAMILIES.get(base.family, base.family)}.")
    expected = "flow" if base.family == "sd3" else "epsilon"
    prediction = "flow" if base.family == "sd3" else base.scheduler_config.get("prediction_type", "epsilon")
    if prediction != expected:
        raise ValueError(f"training needs a base with epsilon prediction; {base.source} uses {prediction} (e.g. SD 2.1-768).")
    conditioning, null = _conditioning(base, model_config, built=configs is not None)
    base.prompt_encoder = None
    base._prompt_cache.clear()
    if path is not None and model_config.get("embed_base"):
        configs = {
            base.denoiser_component: dict(base.denoiser.config), "vae": dict(base.vae.config),
            "scheduler": dict(base.scheduler_config),
        }
    original = {}
    if configs is not None:
        original = {f"{base.denoiser_component}.{k}": v.detach().clone() for k, v in base.denoiser.state_dict().items()}
        original.update({f"vae.{k}": v.detach().clone() for k, v in base.vae.state_dict().items()})
    return TrainingBase(base, conditioning, null, copy.deepcopy(_json_safe(configs)), original)


def _base_from_configs(configs: dict) -> BaseModel:
    """A base of random weights from ``{unet | transformer, vae, scheduler}`` configs."""
    if ("unet" in configs) == ("transformer" in configs):
        raise ValueError("model.base_configs needs exactly one of unet (SD 2.x-shaped) and transformer (SD3-shaped).")
    vae = autoencoder_from_config(configs["vae"])
    source = Path("model.base_configs")
    if "transformer" in configs:
        return sd3_base(SD3Transformer2DModel.from_config(configs["transformer"]), vae, dict(configs["scheduler"]), source)
    return sd2_base(UNet2DConditionModel.from_config(configs["unet"]), vae, dict(configs["scheduler"]), source)


def _conditioning(base: BaseModel, model_config: dict, built: bool) -> tuple[dict, dict]:
    """``(conditioning, null conditioning)`` of the run: from ``model.prompt_embeddings``, the base's text
    encoder, or (for a base built from configs) zeros."""
    if model_config.get("prompt_embeddings"):
        return read_prompt_embeddings(model_config["prompt_embeddings"], base.conditioning_widths())
    if base.prompt_encoder is not None:
        encode = base.encode_prompt
        clone = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731
        return clone(encode(model_config.get("prompt") or "")), clone(encode(model_config.get("negative_prompt") or ""))
    if not built and base.family == "sd3":
        raise ValueError(
            f"{base.source} has no text encoder loaded; give model.prompt_embeddings, the file that "
            "python -m training.prompts writes from the base's text encoders."
        )
    zeros = {
        name: torch.zeros(1, 1, width) if name == "prompt_embeds" else torch.zeros(1, width)
        for name, width in base.conditioning_widths().items()
    }
    return zeros, {k: v.clone() for k, v in zeros.items()}


def inference_defaults(model_config: dict, scale: int, method: str | None = None) -> UpscaleOptions:
    """The upscaling options an exported model carries: ``TRAINED_DEFAULTS``, then ``method``'s
    ``OFFICIAL_SCRIPT_DEFAULTS``, then ``model.inference_defaults``."""
    overrides = model_config.get("inference_defaults") or {}
    unknown = sorted(set(overrides) - set(UpscaleOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model.inference_defaults has no option {unknown[0]!r}; see d3sr_core.options.UpscaleOptions.")
    return replace(TRAINED_DEFAULTS, scale=scale, **{**OFFICIAL_SCRIPT_DEFAULTS.get(method, {}), **overrides})


def portable_paths(value):
    """``value`` (a config) with every absolute path cut to its last component: a model's record of how it was trained
    must not carry the folders of the machine that trained it."""
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


def check_crop_size(data_config: dict, vae: nn.Module, paired: bool = True) -> None:
    """HR crops (and, when ``paired``, their upsampled LQ partners) must be whole numbers of VAE pixels."""
    factor = vae_scale_factor(vae)
    crop, scale = int(data_config["crop_size"]), int(data_config["scale"]) if paired else 1
    if crop % (factor * scale):
        raise ValueError(f"data.crop_size {crop} must be a multiple of {factor * scale} (VAE factor {factor} x scale {scale}).")


def _json_safe(value):
    """A diffusers config as plain JSON types (tuples to lists, private ``_`` keys dropped)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def lora_targets(model: nn.Module, suffixes: tuple[str, ...], prefix: str = "") -> tuple[str, ...]:
    """Full names of the Linear/Conv2d layers under ``prefix`` whose names end in one of ``suffixes`` (a layer that
    already carries another adapter counts by its base layer)."""
    names = []
    for name, module in model.named_modules():
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if name.startswith(prefix) and isinstance(layer, (nn.Linear, nn.Conv2d)):
            if any(name == s or name.endswith("." + s) for s in suffixes):
                names.append(name)
    return tuple(names)


class TrainableGenerator(nn.Module):
    """A ``OneStepGenerator`` whose denoiser (UNet or transformer, and optionally the VAE encoder) carries trainable
    LoRA, and optionally a fully trained ``conv_in`` (OSEDiff). The VAE decoder and every base weight stay frozen.

    ``forward(lq)`` takes the upsampled low-quality image ``(B, 3, H, W)`` in [-1, 1] and returns the predicted
    clean latent ``(B, C, H/f, W/f)`` (f = the VAE's factor) and its decoding ``(B, 3, H, W)`` in [-1, 1]. An SD
    2.x generator recovers x0 from epsilon at ``timestep``; an SD3 one from the flow velocity (``timestep`` 1000
    is sigma = 1: ``x0 = z - v``).
    """

    def __init__(
        self,
        training_base: TrainingBase,
        *,
        timestep: int,
        lora_rank: int,
        lora_alpha: float | None = None,
        vae_encoder_lora_rank: int = 0,
        vae_encoder_lora_alpha: float | None = None,
        train_conv_in: bool = False,
    ):
        super().__init__()
        base = training_base.base
        self.component = base.denoiser_component
        # The untrained conv_in, to export a trained one as a kohya difference.
        self.base_conv_in = {}
        if train_conv_in:
            self.base_conv_in = {f"conv_in.{k}": v.detach().clone() for k, v in base.denoiser.conv_in.state_dict().items()}
        self.adapters: list[AdapterSpec] = []
        if lora_rank:
            targets = lora_targets(base.denoiser, DENOISER_LORA_SUFFIXES[base.family])
            self.adapters.append(AdapterSpec("default", self.component, lora_rank, float(lora_alpha or lora_rank), targets))
            add_adapters(base.denoiser, self.adapters[-1:])
        if vae_encoder_lora_rank:
            targets = lora_targets(base.vae, VAE_ENCODER_LORA_SUFFIXES, "encoder.")
            if getattr(base.vae, "quant_conv", None) is not None:
                targets += ("quant_conv",)
            alpha = float(vae_encoder_lora_alpha or vae_encoder_lora_rank)
            self.adapters.append(AdapterSpec("default_encoder", "vae", vae_encoder_lora_rank, alpha, targets))
            add_adapters(base.vae, self.adapters[-1:])
        if train_conv_in:
            base.denoiser.conv_in.requires_grad_(True)
        self.generator: OneStepGenerator = generator_on_base(
            base, prediction_type="flow" if base.family == "sd3" else "epsilon", timestep=timestep,
            conditioning=training_base.conditioning,
        )
        self.training_base = training_base

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """``unet.<name>`` (``transformer.<name>``) / ``vae.<name>`` (peft names) of every parameter that trains."""
        params = {f"{self.component}.{n}": p for n, p in self.generator.denoiser.named_parameters() if p.requires_grad}
        params.update({f"vae.{n}": p for n, p in self.generator.vae.named_parameters() if p.requires_grad})
        return params

    def start_from_(self, path: str | Path) -> None:
        """Set the trained weights to those of the model exported at ``path`` (a later stage fine-tuning an earlier
        stage's result, ``model.init_generator``). The file must carry the same adapters and trained tensors, and
        for an embedded base the same base weights: anything else is refused with one sentence."""
        checkpoint = load_checkpoint(path)
        mine = [a.to_json() for a in self.adapters]
        if [a.to_json() for a in checkpoint.adapters] != mine:
            raise ValueError(f"model.init_generator {path} carries other LoRA adapters (ranks, alphas or targets) than this run's generator.")
        for key, original in self.training_base.original.items():
            theirs = checkpoint.base_tensors.get(key)
            if theirs is None or theirs.shape != original.shape or not torch.equal(theirs.to(original.dtype), original):
                raise ValueError(f"model.init_generator {path} was trained on another base than model.base ({key} differs).")
        trained = {unwrapped_name(k): p for k, p in self.trained_parameters().items()}
        if set(trained) != set(checkpoint.tensors):
            raise ValueError(f"model.init_generator {path} trains other weights than this run's generator (e.g. conv_in or the VAE encoder).")
        for name, param in trained.items():
            if checkpoint.tensors[name].shape != param.shape:
                raise ValueError(f"model.init_generator {path} holds {name} of shape {tuple(checkpoint.tensors[name].shape)}, expected {tuple(param.shape)}.")
        with torch.no_grad():
            for name, param in trained.items():
                param.copy_(checkpoint.tensors[name])

    def cast_frozen_(self, dtype: torch.dtype) -> None:
        """Store the frozen base weights in ``dtype`` (half precision saves memory); trained weights stay fp32."""
        for p in self.generator.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def forward(
        self, lq: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample``: draw the LR latent from the VAE posterior with ``generator`` (as OSEDiff's and TSD-SR's
        training do) instead of taking its mode."""
        latents = self.generator.encode(lq, sample=sample, generator=generator)
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
            base_family=training_base.base.family,
            prediction_type=self.generator.prediction_type,
            timestep=self.generator.timestep,
            adapters=list(self.adapters),
            tensors=tensors,
            conditioning={k: v.detach().cpu() for k, v in training_base.conditioning.items()},
            defaults=inference_defaults(training_config["model"], scale, training_config.get("method")),
            base_configs=training_base.configs,
            base_tensors=dict(training_base.original),
            training_config=portable_paths(training_config),
        )

    def write_exports(self, folder: Path, method: str, trained: dict[str, torch.Tensor], training_config: dict) -> Path:
        """``folder/model.safetensors`` (ours), all written atomically, and where the format can hold the model:
        ``folder/model_kohya_unet_lora.safetensors`` when the UNet carries LoRA (for ComfyUI's and A1111's own LoRA
        loaders); ``folder/model_tsdsr/`` for an SD3 LoRA model on a base loaded from a path (the official TSD-SR
        folder, for its own scripts)."""
        checkpoint = self.to_checkpoint(method, trained, training_config, int(training_config["data"]["scale"]))
        path = save_checkpoint(checkpoint, folder / "model.safetensors")
        only_lora = all(".lora_" in k for k in checkpoint.tensors)
        if checkpoint.base_family == "sd3" and checkpoint.base_configs is None and only_lora and len(checkpoint.adapters) == 2:
            write_tsdsr_dir(checkpoint, folder / "model_tsdsr")
        unet_adapters = [a for a in checkpoint.adapters if a.component == "unet"]
        if unet_adapters:
            unet = {k[len("unet."):]: v for k, v in checkpoint.tensors.items() if k.startswith("unet.")}
            kohya = kohya_unet_lora(unet, unet_adapters, self.base_conv_in)
            with atomic_output(folder / "model_kohya_unet_lora.safetensors") as tmp:
                save_file(kohya, str(tmp), metadata={"ss_network_module": "networks.lora", "d3sr_method": method})
        return path
