"""Every one-step checkpoint format in and out, and the generator built from a checkpoint and a base model.

**Ours** is one ``.safetensors`` file. Tensors are named ``<component>.<name>`` with component ``unet`` or
``vae``: LoRA weights keep peft's names (``unet.<module>.lora_A.<adapter>.weight``), fully replaced weights
use the plain module names (``unet.conv_in.weight``), and a stored prompt embedding is
``conditioning.prompt_embeds``. ``__metadata__`` (all strings) holds:

=====================  ===============================================================
``format``             ``"d3sr-onestep"``
``format_version``     ``"1"``
``method``             who trained it: ``osediff``, ``d3sr``, ...
``base_family``        the base it needs: ``sd2``, ...
``prediction_type``    ``epsilon``, ``v_prediction`` or ``flow``
``timestep``           the one timestep, e.g. ``"999"``
``scale``              the trained upscaling factor
``adapters``           JSON list of ``{name, component, rank, alpha, targets}``
``prompt_embedding``   ``"true"`` when ``conditioning.prompt_embeds`` is stored
``defaults``           JSON of the method's :class:`UpscaleOptions` preset
=====================  ===============================================================

**OSEDiff** ``.pkl`` (read only): the dict written by ``OSEDiff_gen.save_model`` (reference/methods.md 1.2), read
with the weights-only unpickler. Its LoRA alpha is peft's default (8), which the file does not store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .backbones import BaseModel
from .backbones.base import FAMILIES
from .files import PICKLE_SUFFIXES, ModelFileError, atomic_output, read_pickle, read_safetensors
from .generator import PREDICTION_TYPES, OneStepGenerator, alphas_cumprod_from_config
from .lora import (
    PEFT_DEFAULT_LORA_ALPHA,
    AdapterSpec,
    adapters_from_json,
    adapters_to_json,
    add_adapters,
    lora_state_keys,
    merge_adapters,
    unwrapped_name,
    wrapped_name,
)
from .options import PRESETS, UpscaleOptions

FORMAT_NAME = "d3sr-onestep"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "vae")
CONDITIONING_PREFIX = "conditioning."


@dataclass
class OneStepCheckpoint:
    """A one-step SR model independent of its file format. ``tensors`` are component-prefixed (see module doc)."""

    method: str
    base_family: str
    prediction_type: str
    timestep: int
    scale: int
    adapters: list[AdapterSpec]
    tensors: dict[str, torch.Tensor]
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    defaults: UpscaleOptions = field(default_factory=UpscaleOptions)
    source: Path | None = None

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "base_family": self.base_family,
            "prediction_type": self.prediction_type,
            "timestep": str(self.timestep),
            "scale": str(self.scale),
            "adapters": adapters_to_json(self.adapters),
            "prompt_embedding": "true" if "prompt_embeds" in self.conditioning else "false",
            "defaults": json.dumps(self.defaults.to_json()),
        }


def save_checkpoint(checkpoint: OneStepCheckpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` in our ``.safetensors`` format (to a temporary name, then renamed)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} must end in .safetensors.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in checkpoint.tensors.items()}
    tensors.update({CONDITIONING_PREFIX + k: v.detach().contiguous().cpu() for k, v in checkpoint.conditioning.items()})
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=checkpoint.metadata())
    return path


def _read_ours(path: Path) -> OneStepCheckpoint:
    what = "a d3sr one-step checkpoint (.safetensors with d3sr metadata)"
    tensors, meta = read_safetensors(path, what)
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} has no d3sr metadata (format={meta.get('format')!r}); expected {what}.")
    try:
        version = int(meta["format_version"])
        if version > FORMAT_VERSION:
            raise ModelFileError(
                f"{path} uses checkpoint format version {version}, newer than the {FORMAT_VERSION} this d3sr reads; update d3sr."
            )
        checkpoint = OneStepCheckpoint(
            method=meta["method"],
            base_family=meta["base_family"],
            prediction_type=meta["prediction_type"],
            timestep=int(meta["timestep"]),
            scale=int(meta["scale"]),
            adapters=adapters_from_json(meta["adapters"]),
            tensors={k: v for k, v in tensors.items() if not k.startswith(CONDITIONING_PREFIX)},
            conditioning={k[len(CONDITIONING_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONDITIONING_PREFIX)},
            defaults=UpscaleOptions.from_json(json.loads(meta.get("defaults", "{}"))),
            source=path,
        )
    except ModelFileError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise ModelFileError(f"{path} has invalid d3sr metadata ({type(err).__name__}: {err}); expected {what}.") from None
    if checkpoint.prediction_type not in PREDICTION_TYPES:
        raise ModelFileError(f"{path} declares prediction_type {checkpoint.prediction_type!r}; expected one of {PREDICTION_TYPES}.")
    if (meta.get("prompt_embedding") == "true") != ("prompt_embeds" in checkpoint.conditioning):
        raise ModelFileError(f"{path} metadata says prompt_embedding={meta.get('prompt_embedding')!r} but the tensor does not agree.")
    for spec in checkpoint.adapters:
        if spec.component not in COMPONENTS:
            raise ModelFileError(f"{path} has an adapter on {spec.component!r}; expected one of {COMPONENTS}.")
    return checkpoint


OSEDIFF_KEYS = (
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "vae_lora_encoder_modules",
    "rank_unet",
    "rank_vae",
    "state_dict_unet",
    "state_dict_vae",
)


def read_osediff_pkl(path: str | os.PathLike) -> OneStepCheckpoint:
    """An official OSEDiff ``.pkl`` as a :class:`OneStepCheckpoint` (3 UNet adapters, 1 VAE-encoder adapter, full conv_in)."""
    path = Path(path)
    what = "an OSEDiff checkpoint (.pkl written by OSEDiff_gen.save_model)"
    obj = read_pickle(path, what)
    missing = [k for k in OSEDIFF_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ModelFileError(f"{path} lacks the key {missing[0]!r}; expected {what}.")
    rank_unet, rank_vae = int(obj["rank_unet"]), int(obj["rank_vae"])

    def spec(name: str, component: str, rank: int, modules: list) -> AdapterSpec:
        # The VAE module list can repeat names (its collection loop has no break); order is kept, repeats dropped.
        return AdapterSpec(name, component, rank, PEFT_DEFAULT_LORA_ALPHA, tuple(dict.fromkeys(str(m) for m in modules)))

    adapters = [
        spec("default_encoder", "unet", rank_unet, obj["unet_lora_encoder_modules"]),
        spec("default_decoder", "unet", rank_unet, obj["unet_lora_decoder_modules"]),
        spec("default_others", "unet", rank_unet, obj["unet_lora_others_modules"]),
        spec("default_encoder", "vae", rank_vae, obj["vae_lora_encoder_modules"]),
    ]
    tensors = {}
    for component, state in (("unet", obj["state_dict_unet"]), ("vae", obj["state_dict_vae"])):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ModelFileError(f"{path} holds a non-tensor at {component} key {key!r}; expected {what}.")
            tensors[f"{component}.{unwrapped_name(key)}"] = value
    return OneStepCheckpoint(
        method="osediff",
        base_family="sd2",
        prediction_type="epsilon",
        timestep=999,
        scale=4,
        adapters=adapters,
        tensors=tensors,
        defaults=PRESETS["osediff"],
        source=path,
    )


def load_checkpoint(path: str | os.PathLike) -> OneStepCheckpoint:
    """Read any supported one-step checkpoint: ours (``.safetensors``) or OSEDiff (``.pkl``/``.pt``/``.pth``)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist; expected a one-step SR checkpoint (.safetensors or OSEDiff .pkl).")
    if path.suffix == ".safetensors":
        return _read_ours(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_osediff_pkl(path)
    raise ModelFileError(f"{path} has an unknown extension; expected a one-step SR checkpoint (.safetensors or OSEDiff .pkl).")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, prompt_embeds: torch.Tensor | None = None) -> Path:
    """Convert any readable checkpoint to ours; ``prompt_embeds`` ``(1, 77, D)`` is stored with it when given."""
    checkpoint = load_checkpoint(src)
    if prompt_embeds is not None:
        checkpoint.conditioning["prompt_embeds"] = prompt_embeds
    return save_checkpoint(checkpoint, dst)


def _load_component(model: torch.nn.Module, component: str, checkpoint: OneStepCheckpoint) -> None:
    """Add the component's adapters to ``model`` and copy every checkpoint tensor of the component into it."""
    source = checkpoint.source or "the checkpoint"
    add_adapters(model, [s for s in checkpoint.adapters if s.component == component])
    prefix = component + "."
    given = {k[len(prefix):]: v for k, v in checkpoint.tensors.items() if k.startswith(prefix)}
    expected_lora = lora_state_keys(model)
    given_lora = {k for k in given if ".lora_A." in k or ".lora_B." in k}
    for missing in sorted(expected_lora - given_lora)[:1]:
        raise ModelFileError(f"{source} lacks the {component} LoRA weight {missing!r} that its adapter list implies.")
    params = dict(model.named_parameters())
    for key, value in given.items():
        target = key if key in given_lora else wrapped_name(model, key) if _has_module(model, key) else None
        if target not in params:
            raise ModelFileError(f"{source} has the {component} weight {key!r}, which the base model does not have.")
        if params[target].shape != value.shape:
            raise ModelFileError(
                f"{source} has {component} weight {key!r} of shape {tuple(value.shape)}, but the base model expects "
                f"{tuple(params[target].shape)}: the checkpoint was made for a different base model."
            )
        with torch.no_grad():
            params[target].copy_(value)


def _has_module(model: torch.nn.Module, key: str) -> bool:
    module_name = key.rpartition(".")[0]
    try:
        model.get_submodule(module_name)
    except AttributeError:
        return False
    return True


def build_generator(
    checkpoint: OneStepCheckpoint,
    base: BaseModel,
    *,
    prompt: str | None = None,
    merge_lora: bool = True,
) -> OneStepGenerator:
    """The generator of ``checkpoint`` on ``base`` (fp32, on the base's device).

    The base model's UNet and VAE are changed in place and become the generator's: load a fresh base for
    another checkpoint. ``prompt`` overrides the stored prompt embedding; without either the empty prompt is used.
    ``merge_lora`` folds the adapters into the weights, which gives the same output faster.
    """
    source = checkpoint.source or "the checkpoint"
    if checkpoint.base_family != base.family:
        made_for = FAMILIES.get(checkpoint.base_family, checkpoint.base_family)
        raise ModelFileError(f"{source} was made for base family {made_for}, but {base.source} is {FAMILIES[base.family]}.")
    config = base.scheduler_config
    if checkpoint.prediction_type != "flow" and config.get("prediction_type", "epsilon") != checkpoint.prediction_type:
        raise ModelFileError(
            f"{source} expects a base with {checkpoint.prediction_type} prediction, but {base.source} uses "
            f"{config.get('prediction_type')}."
        )
    _load_component(base.denoiser, "unet", checkpoint)
    _load_component(base.vae, "vae", checkpoint)
    if prompt is not None or not checkpoint.conditioning:
        conditioning = base.encode_prompt(prompt or "")
    else:
        conditioning = checkpoint.conditioning
    # DDPMScheduler clamps x0 unless its config says clip_sample=false (its default is true).
    clip_range = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
    generator = OneStepGenerator(
        base.vae,
        base.denoiser,
        base.predict_fn,
        prediction_type=checkpoint.prediction_type,
        timestep=checkpoint.timestep,
        alphas_cumprod=alphas_cumprod_from_config(config),
        clip_sample_range=clip_range,
        latent_scaling_factor=base.vae.config.scaling_factor,
        conditioning=conditioning,
    )
    if merge_lora:
        merge_adapters(base.denoiser)
        merge_adapters(base.vae)
    return generator.eval().requires_grad_(False)
