"""Every one-step checkpoint format in and out, and the generator built from a checkpoint and a base model.

**Ours** is one ``.safetensors`` file. Tensors are named ``<component>.<name>`` with component ``unet``,
``transformer`` or ``vae``: LoRA weights keep peft's names (``unet.<module>.lora_A.<adapter>.weight``), fully replaced weights
use the plain module names (``unet.conv_in.weight``), and stored prompt embeddings are
``conditioning.prompt_embeds`` (and ``conditioning.pooled_prompt_embeds`` for SD3). ``__metadata__`` (all strings) holds:

=====================  ===============================================================
``format``             ``"d3sr-onestep"``
``format_version``     ``"1"``
``method``             who trained it: ``osediff``, ``d3sr``, ...
``base_family``        the base it needs: ``sd2``, ...
``prediction_type``    ``epsilon``, ``v_prediction`` or ``flow``
``timestep``           the one timestep, e.g. ``"999"``
``scale``              the trained upscaling factor (also the ``scale`` of ``defaults``)
``adapters``           JSON list of ``{name, component, rank, alpha, targets}``
``prompt_embedding``   ``"true"`` when ``conditioning.prompt_embeds`` is stored
``defaults``           JSON of the method's :class:`UpscaleOptions` preset
``base_configs``       only in a self-contained file: JSON ``{unet|transformer, vae, scheduler}`` configs
``training_config``    optional: JSON of the training run that wrote it
=====================  ===============================================================

A **self-contained** file (a model trained from a base that exists nowhere else, such as the bundled default)
also stores its base: ``base.unet.<name>`` (``base.transformer.<name>`` for SD3) and ``base.vae.<name>`` hold the
base weights before LoRA, and ``base_configs`` their configs, so it runs with no base model given.

**OSEDiff** ``.pkl`` (read only): the dict written by ``OSEDiff_gen.save_model`` (reference/methods.md 1.2), read
with the weights-only unpickler. Its LoRA alpha is peft's default (8), which the file does not store.

**TSD-SR** folder (read by :func:`read_tsdsr_dir`, written by :func:`write_tsdsr_dir`; methods.md 2.2):
``transformer.safetensors`` and ``vae.safetensors`` whose keys are ``transformer.<module>.lora_A.weight`` /
``lora_B`` (no adapter name, the same prefix even in the VAE file), and
the fixed prompt embeddings ``prompt_embeds.pt`` ``(1, 333, 4096)`` and ``pool_embeds.pt`` ``(1, 2048)`` (the
batch dimension may be missing). Rank and alpha are not stored: rank is read from the tensors, alpha = rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .backbones import BaseModel
from .backbones.base import FAMILIES
from .backbones.sd2 import sd2_base_from_embedded
from .backbones.sd3 import sd3_base_from_embedded
from .borrowed import own_weights, release
from .backbones.resshift import (
    check_official_buffer,
    embedded_configs,
    is_resshift_unet_state,
    load_resshift_base,
    load_unet_weights,
    resshift_base_from_embedded,
    unwrap_state_dict,
)
from .files import (
    PICKLE_SUFFIXES,
    ModelFileError,
    atomic_output,
    atomic_output_dir,
    read_pickle,
    read_safetensors,
    require_file,
)
from .generator import PREDICTION_TYPES, OneStepGenerator, alphas_cumprod_from_config
from .residual_shift import ResShiftGenerator
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
from .options import DEFAULT_MAX_SCALE, PRESETS, UpscaleOptions

log = logging.getLogger("d3sr")

FORMAT_NAME = "d3sr-onestep"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "transformer", "vae")
CONDITIONING_PREFIX = "conditioning."
EMBEDDED_BASE_PREFIX = "base."
CHECKPOINT_PREDICTION_TYPES = PREDICTION_TYPES + ("x_start",)
"""What a checkpoint's denoiser predicts: the one-step kinds, or x_start (ResShift / TAD-SR)."""


@dataclass
class OneStepCheckpoint:
    """A one-step SR model independent of its file format. ``tensors`` are component-prefixed (see module doc)."""

    method: str
    base_family: str
    prediction_type: str
    timestep: int
    adapters: list[AdapterSpec]
    tensors: dict[str, torch.Tensor]
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    defaults: UpscaleOptions = field(default_factory=UpscaleOptions)
    source: Path | None = None
    base_configs: dict | None = None
    """The embedded base's ``{unet|transformer, vae, scheduler}`` configs; ``None`` when the file needs a base model."""
    base_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The embedded base's weights, ``unet.<name>`` (``transformer.<name>``) / ``vae.<name>``."""
    training_config: dict | None = None

    def metadata(self) -> dict[str, str]:
        extra = {}
        if self.base_configs is not None:
            extra["base_configs"] = json.dumps(self.base_configs)
        if self.training_config is not None:
            extra["training_config"] = json.dumps(self.training_config)
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "base_family": self.base_family,
            "prediction_type": self.prediction_type,
            "timestep": str(self.timestep),
            "scale": str(self.defaults.scale),
            "adapters": adapters_to_json(self.adapters),
            "prompt_embedding": "true" if "prompt_embeds" in self.conditioning else "false",
            "defaults": json.dumps(self.defaults.to_json()),
            **extra,
        }


def save_checkpoint(checkpoint: OneStepCheckpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` in our ``.safetensors`` format (to a temporary name, then renamed)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} must end in .safetensors.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in checkpoint.tensors.items()}
    tensors.update({CONDITIONING_PREFIX + k: v.detach().contiguous().cpu() for k, v in checkpoint.conditioning.items()})
    tensors.update({EMBEDDED_BASE_PREFIX + k: v.detach().contiguous().cpu() for k, v in checkpoint.base_tensors.items()})
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=checkpoint.metadata())
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(require_file(path, "a one-step SR checkpoint")), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{path} is not a readable .safetensors file ({err}).") from None


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
"""Adapter names become parts of parameter names: no ``.`` or ``/``."""
MAX_RANK = 1 << 16
MAX_TIMESTEP = 1 << 16
MAX_CONFIG_NUMBER = 1 << 20
"""The largest number a ``base_configs`` entry may hold (channels, sizes, timesteps)."""
MAX_CONFIG_COUNT = 128
"""The largest layer count (``layers_per_block``, ``num_layers``, ...) a ``base_configs`` entry may hold."""
COUNT_KEYS = ("layers_per_block", "num_layers", "transformer_layers_per_block", "num_attention_heads",
              "attention_head_dim", "num_class_embeds")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _whole(value, low: int, high: int) -> int:
    """``value`` (an int, or a string of decimal digits) as an int in ``[low, high]``; ``ValueError`` otherwise."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,12}", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number from {low} to {high}")
    if not low <= value <= high:
        raise ValueError(f"expected a whole number from {low} to {high}")
    return value


def _adapter(item, index: int) -> AdapterSpec:
    """One ``adapters`` entry, each field checked (``ValueError`` names the field)."""
    if not isinstance(item, dict):
        raise ValueError(f"entry {index} is {_short(item)}, expected an object")
    for key in ("name", "component", "rank", "alpha", "targets"):
        if key not in item:
            raise ValueError(f"entry {index} has no {key!r}")
    name, component, rank, alpha, targets = (item[k] for k in ("name", "component", "rank", "alpha", "targets"))
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"entry {index} has the name {_short(name)}, expected letters, digits, _ or - (no . or /)")
    if component not in COMPONENTS:
        raise ValueError(f"entry {index} has the component {_short(component)}, expected one of {COMPONENTS}")
    try:
        rank = _whole(rank, 1, MAX_RANK)
    except ValueError as err:
        raise ValueError(f"entry {index} has the rank {_short(rank)}, {err}") from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"entry {index} has the alpha {_short(alpha)}, expected a positive number")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError(f"entry {index} has the targets {_short(targets)}, expected a non-empty list of module names")
    return AdapterSpec(name, component, rank, float(alpha), tuple(targets))


def _adapters(text: str) -> list[AdapterSpec]:
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("expected a JSON list")
    specs = [_adapter(item, i) for i, item in enumerate(items)]
    seen = [(s.name, s.component) for s in specs]
    repeated = next((k for k in seen if seen.count(k) > 1), None)
    if repeated:
        raise ValueError(f"the adapter {repeated[0]!r} on {repeated[1]} is listed twice")
    return specs


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def check_base_configs(configs, parts: tuple[str, ...]) -> None:
    """``base_configs`` must map each of ``parts`` to a config object whose numbers are finite and bounded and whose
    layer counts are small, so building the base (on the meta device) cannot run away; ``ValueError`` otherwise."""
    if not isinstance(configs, dict):
        raise ValueError(f"expected a JSON object, got {type(configs).__name__}")
    for part in parts:
        if not isinstance(configs.get(part), dict):
            raise ValueError(f"{part!r} is {_short(configs.get(part))}, expected a config object")

    def walk(value, where: str, count: bool) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            if not math.isfinite(value) or abs(value) > MAX_CONFIG_NUMBER:
                raise ValueError(f"{where} is {_short(value)}, expected a finite number of at most {MAX_CONFIG_NUMBER}")
            if count and not (0 <= value <= MAX_CONFIG_COUNT):
                raise ValueError(f"{where} is {_short(value)}, expected a count from 0 to {MAX_CONFIG_COUNT}")
            return
        if isinstance(value, (list, tuple)):
            if len(value) > 4096:
                raise ValueError(f"{where} has {len(value)} entries, expected at most 4096")
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]", count)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}", count or key in COUNT_KEYS)
            return
        raise ValueError(f"{where} is {_short(value)}, expected JSON numbers, strings, lists or objects")

    for part in parts:
        walk(configs[part], part, False)
        groups = configs[part].get("norm_num_groups")
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
            raise ValueError(f"{part}.norm_num_groups is {_short(groups)}, expected a whole number of at least 1")
        for key in ("block_out_channels", "in_channels", "out_channels", "latent_channels"):
            value = configs[part].get(key)
            items = value if isinstance(value, list) else [] if value is None else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
                raise ValueError(f"{part}.{key} is {_short(value)}, expected whole numbers of at least 1")


FIELDS_WHAT = {
    "format_version": "a whole number",
    "method": "a short name",
    "base_family": "a short name",
    "prediction_type": f"one of {CHECKPOINT_PREDICTION_TYPES}",
    "timestep": f"a whole number from 0 to {MAX_TIMESTEP}",
    "scale": f"a whole number from 1 to the limit max_scale={DEFAULT_MAX_SCALE}",
    "adapters": "a JSON list of {name, component, rank, alpha, targets}",
    "prompt_embedding": "'true' or 'false'",
    "defaults": "a JSON object of upscaling options",
    "base_configs": "a JSON object of buildable configs",
    "training_config": "a JSON object",
}


def _short_name(text: str) -> str:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", text):
        raise ValueError("expected letters, digits, _, . or -")
    return text


def _prediction_type(text: str) -> str:
    if text not in CHECKPOINT_PREDICTION_TYPES:
        raise ValueError(f"expected one of {CHECKPOINT_PREDICTION_TYPES}")
    return text


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("expected 'true' or 'false'")
    return text == "true"


def _scale(text: str) -> int:
    scale = _whole(text, 1, 1 << 30)
    if scale > DEFAULT_MAX_SCALE:
        raise ValueError(f"it is over the limit max_scale={DEFAULT_MAX_SCALE}")
    return scale


PARSERS = {
    "format_version": lambda t: _whole(t, 0, 1 << 30),
    "method": _short_name,
    "base_family": _short_name,
    "prediction_type": _prediction_type,
    "timestep": lambda t: _whole(t, 0, MAX_TIMESTEP),
    "scale": _scale,
    "adapters": _adapters,
    "prompt_embedding": _flag,
    "defaults": _json_object,
    "base_configs": _json_object,
    "training_config": _json_object,
}
REQUIRED_FIELDS = ("format_version", "method", "base_family", "prediction_type", "timestep", "scale", "adapters")


def parse_metadata(path: Path, meta: dict[str, str]) -> dict:
    """Our ``__metadata__`` checked field by field (no tensors needed); a field that does not fit gives one
    sentence naming the file, the field, its value and what was expected."""
    what = "a d3sr one-step checkpoint (.safetensors with d3sr metadata)"
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} has no d3sr metadata (format={_short(meta.get('format'))}); expected {what}.")
    parsed = {}
    for name, parse in PARSERS.items():
        if name not in meta:
            if name in REQUIRED_FIELDS:
                raise ModelFileError(f"{path} lacks the metadata field {name!r}; expected {FIELDS_WHAT[name]}.")
            continue
        try:
            parsed[name] = parse(meta[name])
        except (ValueError, TypeError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
            detail = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            raise ModelFileError(
                f"{path} has the metadata field {name!r} = {_short(meta[name])}, which does not fit ({detail}); "
                f"expected {FIELDS_WHAT[name]}."
            ) from None
    if parsed["format_version"] > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has the metadata field 'format_version' = {parsed['format_version']}, newer than the "
            f"{FORMAT_VERSION} this d3sr reads; update d3sr."
        )
    try:
        parsed["defaults"] = UpscaleOptions.from_json({**parsed.get("defaults", {}), "scale": parsed["scale"]})
    except (ValueError, TypeError) as err:
        detail = str(err).strip().rstrip(".")
        raise ModelFileError(f"{path} has the metadata field 'defaults' = {_short(meta.get('defaults'))}, which does not fit ({detail}).") from None
    if "base_configs" in parsed:
        parts = ("transformer" if parsed["base_family"] == "sd3" else "unet", "vae", "scheduler")
        try:
            check_base_configs(parsed["base_configs"], parts)
        except (ValueError, RecursionError) as err:
            raise ModelFileError(f"{path} has the metadata field 'base_configs' whose {str(err).rstrip('.')}.") from None
    return parsed


def check_tensors(path: Path | str, tensors: dict[str, torch.Tensor]) -> None:
    """Every weight must be a finite floating-point tensor; one sentence naming the first that is not."""
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{path} holds {type(value).__name__} at {key!r}; expected a tensor.")
        if not value.is_floating_point():
            raise ModelFileError(f"{path} holds the tensor {key!r} of type {value.dtype}; expected floating-point weights.")
        if not torch.isfinite(value).all():
            raise ModelFileError(f"{path} holds NaN or infinite values in the tensor {key!r}; the file is damaged.")


def _read_ours(path: Path) -> OneStepCheckpoint:
    what = "a d3sr one-step checkpoint (.safetensors with d3sr metadata)"
    parse_metadata(path, _read_metadata(require_file(path, what)))  # the header first: nothing large is read yet
    tensors, meta = read_safetensors(path, what)
    fields = parse_metadata(path, meta)
    check_tensors(path, tensors)
    checkpoint = OneStepCheckpoint(
        method=fields["method"],
        base_family=fields["base_family"],
        prediction_type=fields["prediction_type"],
        timestep=fields["timestep"],
        adapters=fields["adapters"],
        tensors={k: v for k, v in tensors.items() if not k.startswith((CONDITIONING_PREFIX, EMBEDDED_BASE_PREFIX))},
        # The embedded base and the prompt embedding run as stored, so they are made float32 (as the docs promise)
        # whatever precision the file holds them in; adapter weights are copied into float32 parameters anyway.
        conditioning={k: v.float() for k, v in _with_prefix(tensors, CONDITIONING_PREFIX).items()},
        defaults=fields["defaults"],
        source=path,
        base_configs=fields.get("base_configs"),
        base_tensors={k: v.float() for k, v in _with_prefix(tensors, EMBEDDED_BASE_PREFIX).items()},
        training_config=fields.get("training_config"),
    )
    if fields.get("prompt_embedding", False) != ("prompt_embeds" in checkpoint.conditioning):
        raise ModelFileError(f"{path} metadata says prompt_embedding={meta.get('prompt_embedding')!r} but the tensor does not agree.")
    if (checkpoint.base_configs is None) != (not checkpoint.base_tensors):
        raise ModelFileError(f"{path} has base_configs metadata and base.* weights that do not come together.")
    check_lora_ranks(checkpoint)
    return checkpoint


LORA_KEY = re.compile(r"(?P<component>[^.]+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight")


def check_lora_ranks(checkpoint: OneStepCheckpoint) -> None:
    """Every adapter's LoRA tensors must have the rank its spec declares (``lora_A`` ``(rank, in, ...)``, ``lora_B``
    ``(out, rank, ...)``), and every adapter must have some: a forged rank is refused before anything is built."""
    source = checkpoint.source or "the checkpoint"
    specs = {(s.component, s.name): s for s in checkpoint.adapters}
    found = set()
    for key, value in checkpoint.tensors.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            continue
        spec = specs.get((match["component"], match["adapter"]))
        if spec is None:
            raise ModelFileError(
                f"{source} has the LoRA weight {key!r} of an adapter {match['adapter']!r} on {match['component']} "
                "that its adapter list does not declare."
            )
        rank_dim = 0 if match["ab"] == "A" else 1
        if value.ndim < 2 or value.shape[rank_dim] != spec.rank:
            raise ModelFileError(
                f"{source} has the LoRA weight {key!r} of shape {tuple(value.shape)}, but its adapter {spec.name!r} on "
                f"{spec.component} declares rank {spec.rank} (the rank field and the tensors disagree)."
            )
        found.add((spec.component, spec.name))
    for key, spec in specs.items():
        if key not in found:
            raise ModelFileError(f"{source} declares the {spec.component} adapter {spec.name!r} but holds none of its LoRA weights.")


def read_resshift_checkpoint(obj: object, path: str | os.PathLike) -> OneStepCheckpoint:
    """An official ResShift or TAD-SR UNet ``.pth`` (already unpickled weights-only as ``obj``): ``{'state_dict': ...}``
    or a raw (EMA) state dict, keys possibly prefixed by ``module.`` / ``_orig_mod.`` (reference/methods.md 3.1), as a
    :class:`OneStepCheckpoint` of the whole UNet (``unet.<official name>``, no adapters).

    The file also holds the Swin position indices and shift masks, which the architecture fixes: each is checked
    against its computation and left out (the UNet computes its own). ``timestep`` is 0 until a config is known
    (:func:`embed_resshift_base` sets it to TAD-SR's T - 1)."""
    path = Path(path)
    what = "a ResShift or TAD-SR UNet checkpoint (.pth)"
    state = unwrap_state_dict(obj, path, what)
    tensors = {}
    for key, value in state.items():
        if not check_official_buffer(key, value, path):
            tensors["unet." + key] = value
    check_tensors(path, tensors)
    return OneStepCheckpoint(
        method="resshift",
        base_family="resshift",
        prediction_type="x_start",
        timestep=0,
        adapters=[],
        tensors=tensors,
        defaults=PRESETS["resshift"],
        source=path,
    )


def build_resshift_generator(checkpoint: OneStepCheckpoint, base: BaseModel) -> ResShiftGenerator:
    """The ResShift generator of ``checkpoint``'s UNet (loaded strictly into the base's skeleton, which it becomes)
    and ``base``'s VQ autoencoder and config."""
    source = checkpoint.source or "the checkpoint"
    foreign = sorted({k.split(".")[0] for k in checkpoint.tensors} - {"unet"})
    if foreign or checkpoint.adapters:
        what = f"{foreign[0]} weights" if foreign else "LoRA adapters"
        raise ModelFileError(f"{source} has {what}; a ResShift model is its whole UNet and nothing else.")
    state = {k[len("unet."):]: v for k, v in checkpoint.tensors.items()}
    unet = load_unet_weights(base.denoiser, state, source, with_buffers=False)
    return ResShiftGenerator(base.vae, unet, base.scheduler_config["resshift"]).eval().requires_grad_(False)


def embed_resshift_base(
    checkpoint: OneStepCheckpoint, base: str | os.PathLike | None, base_config: str | os.PathLike | None
) -> None:
    """Make a ResShift checkpoint self-contained: its VQ autoencoder (``base``, ``autoencoder_vq_f4.pth``) and config
    (``base_config``, the official YAML; default the shipped realsr x4 v1) stored with it, after checking that the
    UNet fits the config."""
    source = checkpoint.source or "the checkpoint"
    if base is None:
        raise ModelFileError(
            f"{source} is a ResShift UNet; converting it needs its VQ autoencoder (--base autoencoder_vq_f4.pth), "
            "which the one file then holds."
        )
    loaded = load_resshift_base(base, base_config)
    config = loaded.scheduler_config["resshift"]
    build_resshift_generator(checkpoint, loaded)
    checkpoint.base_configs = embedded_configs(config)
    checkpoint.base_tensors = {"vae." + k: v for k, v in loaded.vae.state_dict().items()}
    checkpoint.timestep = int(config["diffusion"]["steps"]) - 1


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


def read_osediff_pkl(path: str | os.PathLike, obj: object = None) -> OneStepCheckpoint:
    """An official OSEDiff ``.pkl`` as a :class:`OneStepCheckpoint` (3 UNet adapters, 1 VAE-encoder adapter, full conv_in);
    ``obj``, when given, is the file's already unpickled content.

    Every field is checked (types, ranks against the LoRA tensors) before anything is built."""
    path = Path(path)
    what = "an OSEDiff checkpoint (.pkl written by OSEDiff_gen.save_model)"
    obj = read_pickle(path, what) if obj is None else obj
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} holds {type(obj).__name__}, not a dict; expected {what}.")
    missing = [k for k in OSEDIFF_KEYS if k not in obj]
    if missing:
        raise ModelFileError(f"{path} lacks the key {missing[0]!r}; expected {what}.")
    ranks = {}
    for key in ("rank_unet", "rank_vae"):
        try:
            ranks[key] = _whole(obj[key], 1, MAX_RANK)
        except ValueError as err:
            raise ModelFileError(f"{path} has the field {key!r} = {_short(obj[key])}; {err}.") from None
    for key in OSEDIFF_KEYS[:4]:
        modules = obj[key]
        if not isinstance(modules, (list, tuple)) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ModelFileError(f"{path} has the field {key!r} = {_short(modules)}; expected a non-empty list of module names.")
    for key in ("state_dict_unet", "state_dict_vae"):
        state = obj[key]
        if not isinstance(state, dict):
            raise ModelFileError(f"{path} has the field {key!r} of type {type(state).__name__}; expected a dict of tensors.")
        for name, value in state.items():
            if not isinstance(name, str):
                raise ModelFileError(f"{path} has the field {key!r} with the key {_short(name)}; expected parameter names.")
            if not isinstance(value, torch.Tensor):
                raise ModelFileError(f"{path} holds a non-tensor at {key} key {name!r}; expected {what}.")
    rank_unet, rank_vae = ranks["rank_unet"], ranks["rank_vae"]

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
            tensors[f"{component}.{unwrapped_name(key)}"] = value
    check_tensors(path, tensors)
    checkpoint = OneStepCheckpoint(
        method="osediff",
        base_family="sd2",
        prediction_type="epsilon",
        timestep=999,
        adapters=adapters,
        tensors=tensors,
        defaults=PRESETS["osediff"],
        source=path,
    )
    check_lora_ranks(checkpoint)
    return checkpoint


TSDSR_TRANSFORMER_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "proj", "linear", "proj_out")
"""TSD-SR's ``target_modules``: peft's suffix rule makes them also hit ``pos_embed.proj``, the norm linears and
``proj_out``, so the loader applies the same list rather than a list of full names."""
TSDSR_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")


def read_tsdsr_lora(file: Path, component: str, rank: int | None, what: str) -> tuple[dict, int, tuple[str, ...]]:
    """``(tensors in our naming, rank, module names)`` of one TSD-SR LoRA file."""
    state, _ = read_safetensors(file, what)
    tensors, modules = {}, []
    for key, value in state.items():
        match = TSDSR_KEY.fullmatch(key)
        if match is None:
            raise ModelFileError(f"{file} has the key {key!r}; expected transformer.<module>.lora_A.weight or .lora_B.weight.")
        tensors[f"{component}.{match[1]}.lora_{match[2]}.default.weight"] = value
        if match[2] == "A":
            modules.append(match[1])
    check_tensors(file, state)
    flat = [k for k, v in state.items() if v.ndim < 2]
    if flat:
        raise ModelFileError(f"{file} has the LoRA weight {flat[0]!r} with fewer than 2 dimensions; expected a matrix.")
    if not modules:
        raise ModelFileError(f"{file} holds no lora_A weights; expected {what}.")
    ranks = sorted({state[f"transformer.{m}.lora_A.weight"].shape[0] for m in modules})
    if len(ranks) != 1:
        raise ModelFileError(f"{file} mixes LoRA ranks {ranks}; expected one rank for the whole file.")
    if rank is not None and rank != ranks[0]:
        raise ModelFileError(f"{file} holds rank-{ranks[0]} LoRA weights, but rank {rank} was given.")
    bad = [k for k, v in state.items() if ".lora_B." in k and v.shape[1] != ranks[0]]
    if bad:
        raise ModelFileError(f"{file} has the LoRA weight {bad[0]!r} of shape {tuple(state[bad[0]].shape)}; expected rank {ranks[0]} in its second dimension.")
    return tensors, ranks[0], tuple(modules)


def _read_embedding(path: Path, shape_names: str, ndim: int) -> torch.Tensor:
    """A prompt embedding ``.pt`` with a leading batch dimension of 1 added if missing."""
    tensor = read_pickle(path, f"a TSD-SR prompt embedding {shape_names}")
    if isinstance(tensor, torch.Tensor) and tensor.ndim == ndim - 1:
        tensor = tensor[None]
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or tensor.shape[0] != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ModelFileError(f"{path} holds {shape}; expected a tensor {shape_names} (the batch dimension may be missing).")
    return tensor


def read_tsdsr_dir(
    path: str | os.PathLike,
    *,
    embeddings_dir: str | os.PathLike | None = None,
    rank: int | None = None,
    rank_vae: int | None = None,
) -> OneStepCheckpoint:
    """An official TSD-SR LoRA folder as a :class:`OneStepCheckpoint`.

    ``embeddings_dir`` holds ``prompt_embeds.pt`` and ``pool_embeds.pt`` (the official ``dataset/default/``);
    by default they are looked for in ``path`` itself. ``rank``/``rank_vae`` are checked against the tensors.
    """
    path = Path(path)
    what = "a TSD-SR LoRA folder (transformer.safetensors and vae.safetensors)"
    transformer_file = require_file(path / "transformer.safetensors", what)
    vae_file = require_file(path / "vae.safetensors", what)
    transformer_tensors, rank, _ = read_tsdsr_lora(transformer_file, "transformer", rank, what)
    vae_tensors, rank_vae, vae_modules = read_tsdsr_lora(vae_file, "vae", rank_vae, what)
    embeddings = Path(embeddings_dir) if embeddings_dir else path
    missing = [n for n in ("prompt_embeds.pt", "pool_embeds.pt") if not (embeddings / n).is_file()]
    if missing:
        raise ModelFileError(
            f"{embeddings} has no {' or '.join(missing)}: TSD-SR needs its fixed prompt embeddings; put them there "
            "or give the folder that holds them (the official dataset/default/)."
        )
    conditioning = {
        "prompt_embeds": _read_embedding(embeddings / "prompt_embeds.pt", "(1, tokens, dim)", 3),
        "pooled_prompt_embeds": _read_embedding(embeddings / "pool_embeds.pt", "(1, dim)", 2),
    }
    return OneStepCheckpoint(
        method="tsdsr",
        base_family="sd3",
        prediction_type="flow",
        timestep=1000,
        adapters=[
            AdapterSpec("default", "transformer", rank, rank, TSDSR_TRANSFORMER_TARGETS),
            # The official VAE list names modules in full; the file's own keys give exactly those that exist.
            AdapterSpec("default", "vae", rank_vae, rank_vae, vae_modules),
        ],
        tensors={**transformer_tensors, **vae_tensors},
        conditioning=conditioning,
        defaults=PRESETS["tsdsr"],
        source=path,
    )


def write_tsdsr_dir(checkpoint: OneStepCheckpoint, path: str | os.PathLike) -> Path:
    """An SD3 checkpoint whose trained weights are LoRA only, as an official TSD-SR folder (the layout
    :func:`read_tsdsr_dir` reads, which TSD-SR's ``test_tsdsr.py`` loads with ``--lora_dir`` and ``--embedding_dir``).

    TSD-SR's loader assumes alpha = rank, so each ``lora_B`` is multiplied by ``alpha / rank``: the same update.
    Written to a temporary folder and renamed.
    """
    source = checkpoint.source or "the checkpoint"
    if checkpoint.base_family != "sd3" or checkpoint.prediction_type != "flow":
        raise ValueError(f"{source} is not an SD3 flow model; only those have a TSD-SR form.")
    files: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "vae": {}}
    for component, file in files.items():
        specs = [s for s in checkpoint.adapters if s.component == component]
        if len(specs) != 1:
            raise ValueError(f"{source} has {len(specs)} {component} adapters; TSD-SR's format holds exactly one.")
        spec = specs[0]
        marker = f".{spec.name}.weight"
        for key, value in checkpoint.tensors.items():
            if not key.startswith(component + "."):
                continue
            module_key = key[len(component) + 1:]
            if not module_key.endswith(marker) or not re.search(r"\.lora_[AB]\.", module_key):
                raise ValueError(f"{source} has the fully trained weight {key!r}, which TSD-SR's format cannot hold.")
            name = module_key[: -len(marker)] + ".weight"
            scale = spec.alpha / spec.rank if ".lora_B." in module_key else 1.0
            file["transformer." + name] = (value.float() * scale).contiguous()
    missing = [n for n in ("prompt_embeds", "pooled_prompt_embeds") if n not in checkpoint.conditioning]
    if missing:
        raise ValueError(f"{source} stores no {missing[0]}; TSD-SR's folder needs its prompt embeddings.")
    with atomic_output_dir(path) as tmp:
        for component, file in files.items():
            save_file(file, str(tmp / f"{component}.safetensors"))
        torch.save(checkpoint.conditioning["prompt_embeds"].float().contiguous(), tmp / "prompt_embeds.pt")
        torch.save(checkpoint.conditioning["pooled_prompt_embeds"].float().contiguous(), tmp / "pool_embeds.pt")
    return Path(path)


@dataclass(frozen=True)
class ModelHeader:
    """What a host needs to list a model, read without loading tensors."""

    family: str
    scale: int
    embeds_base: bool


def read_header(path: str | os.PathLike) -> ModelHeader:
    """The header of a checkpoint, read cheaply (no tensors): ours is read and checked field by field from its
    ``__metadata__`` (safetensors also checks the file is as long as its header says); an OSEDiff file must be a
    complete torch zip archive or a pickle; a TSD-SR folder's two ``.safetensors`` headers must read. Raises
    :class:`ModelFileError` (one sentence) for a file that would not load."""
    path = Path(path)
    if path.is_dir():
        for name in ("transformer.safetensors", "vae.safetensors"):
            _read_metadata(require_file(path / name, "a TSD-SR LoRA folder (transformer.safetensors and vae.safetensors)"))
        return ModelHeader("sd3", 4, False)
    what = "a one-step SR checkpoint (.safetensors, OSEDiff .pkl, or a TSD-SR folder)"
    require_file(path, what)
    if path.suffix == ".safetensors":
        fields = parse_metadata(path, _read_metadata(path))
        return ModelHeader(fields["base_family"], fields["scale"], "base_configs" in fields)
    if path.suffix in PICKLE_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:4] == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(path) as archive:
                    if not any(n.endswith("data.pkl") for n in archive.namelist()):
                        raise ModelFileError(f"{path} is a zip archive without data.pkl; expected {what}.")
            except (zipfile.BadZipFile, OSError) as err:
                raise ModelFileError(f"{path} is a damaged torch file ({err}); expected {what}.") from None
        elif head[:1] != b"\x80":
            raise ModelFileError(f"{path} is neither a torch zip archive nor a pickle; expected {what}.")
        return ModelHeader("sd2", 4, False)
    raise ModelFileError(f"{path} has an unknown extension; expected {what}.")


_HEADERS: dict[tuple, ModelHeader | str] = {}


def listable_models(candidates: dict[str, str | os.PathLike]) -> dict[str, tuple[str, ModelHeader]]:
    """``name -> (path, header)`` for the candidates whose header reads; each one that does not is left out with
    one log line (once per file version). Never raises: hosts call it while building their model lists."""
    listed = {}
    for name, path in candidates.items():
        try:
            stat = os.stat(path)
            key = (str(path), stat.st_mtime_ns, stat.st_size)
            if key not in _HEADERS:
                try:
                    _HEADERS[key] = read_header(path)
                except (ModelFileError, OSError, ValueError) as err:
                    _HEADERS[key] = str(err)
                    log.warning("d3sr: left out of the model list: %s", err)
        except OSError as err:
            log.warning("d3sr: left out of the model list: %s cannot be read (%s).", path, err.strerror)
            continue
        header = _HEADERS[key]
        if isinstance(header, ModelHeader):
            listed[name] = (str(path), header)
    return listed


def peek(path: str | os.PathLike) -> tuple[str, int]:
    """``(base family, trained scale)`` of a checkpoint, read without loading its tensors (a TSD-SR folder is SD3
    x4, an OSEDiff file SD 2.x x4, ours says so in its metadata). Raises :class:`ModelFileError` for a bad file."""
    header = read_header(path)
    return header.family, header.scale


def embeds_base(path: str | os.PathLike) -> bool:
    """Whether the checkpoint at ``path`` is self-contained (stores its base model), read from its metadata."""
    path = Path(path)
    return path.is_file() and path.suffix == ".safetensors" and read_header(path).embeds_base


def embedded_base(checkpoint: OneStepCheckpoint) -> BaseModel:
    """The base model stored inside a self-contained checkpoint (fp32, CPU, eval)."""
    source = checkpoint.source or Path("the checkpoint")
    if checkpoint.base_configs is None:
        raise ModelFileError(f"{source} stores no base model; give the base it was trained on.")
    builders = {"sd2": sd2_base_from_embedded, "sd3": sd3_base_from_embedded, "resshift": resshift_base_from_embedded}
    if checkpoint.base_family not in builders:
        raise ModelFileError(f"{source} embeds a {checkpoint.base_family} base; only SD 2.x- and SD3-shaped bases can be embedded.")
    parts = ("transformer" if checkpoint.base_family == "sd3" else "unet", "vae", "scheduler")
    try:
        check_base_configs(checkpoint.base_configs, parts)
        return builders[checkpoint.base_family](checkpoint.base_configs, checkpoint.base_tensors, source)
    except ModelFileError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, RuntimeError,
            AssertionError, RecursionError) as err:
        detail = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{source} has the metadata field 'base_configs' that cannot build its base ({detail}).") from None


def load_checkpoint(path: str | os.PathLike, *, embeddings_dir: str | os.PathLike | None = None) -> OneStepCheckpoint:
    """Read any supported one-step checkpoint: ours (``.safetensors``), OSEDiff (``.pkl``/``.pt``/``.pth``), or a
    TSD-SR folder (``embeddings_dir`` as in :func:`read_tsdsr_dir`)."""
    path = Path(path)
    expected = "a one-step SR checkpoint (.safetensors, OSEDiff .pkl, or a TSD-SR folder)"
    if not path.exists():
        raise ModelFileError(f"{path} does not exist; expected {expected}.")
    if path.is_dir():
        return read_tsdsr_dir(path, embeddings_dir=embeddings_dir)
    if path.suffix == ".safetensors":
        return _read_ours(path)
    if path.suffix in PICKLE_SUFFIXES:
        obj = read_pickle(path, expected)
        if is_resshift_unet_state(obj):
            return read_resshift_checkpoint(obj, path)
        return read_osediff_pkl(path, obj)
    raise ModelFileError(f"{path} has an unknown extension; expected {expected}.")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prompt_embeds: torch.Tensor | None = None,
    embeddings_dir: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
) -> Path:
    """Convert any readable checkpoint to ours; ``prompt_embeds`` ``(1, 77, D)`` is stored with it when given. A
    ResShift / TAD-SR UNet is stored with its VQ autoencoder ``base`` and config ``base_config``
    (:func:`embed_resshift_base`), so the one file runs alone."""
    checkpoint = load_checkpoint(src, embeddings_dir=embeddings_dir)
    if checkpoint.base_family == "resshift" and checkpoint.base_configs is None:
        embed_resshift_base(checkpoint, base, base_config)
    if prompt_embeds is not None:
        checkpoint.conditioning["prompt_embeds"] = prompt_embeds
    return save_checkpoint(checkpoint, dst)


def _load_component(model: torch.nn.Module, component: str, checkpoint: OneStepCheckpoint, merge_lora: bool) -> None:
    """Add the component's adapters to ``model`` and copy every checkpoint tensor of the component into it.

    The layers that change (fully replaced weights, and LoRA layers when ``merge_lora``) get their own float32 copy
    first (``borrowed.own_weights``): a base borrowed from a host is never written to, and a base stored in fp16,
    bf16 or fp8 is merged in float32 as a diffusers folder (which loads in float32) is."""
    source = checkpoint.source or "the checkpoint"
    specs = [s for s in checkpoint.adapters if s.component == component]
    lora_layers = _check_lora_fits(model, component, specs, checkpoint)
    prefix = component + "."
    given = {k[len(prefix):]: v for k, v in checkpoint.tensors.items() if k.startswith(prefix)}
    given_lora = {k for k in given if ".lora_A." in k or ".lora_B." in k}
    replaced = {k.rpartition(".")[0] for k in given if k not in given_lora and _has_module(model, k)}
    own_weights(model, replaced | (lora_layers if merge_lora else set()))
    try:
        add_adapters(model, specs)
    except ValueError as err:  # peft: no target matched
        raise ModelFileError(
            f"{source} has a {component} adapter whose targets match no module of the base model ({err})."
        ) from None
    for name, parameter in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # peft gives adapters the base layer's dtype, fp8 included
    expected_lora = lora_state_keys(model)
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
        if not value.is_floating_point():
            raise ModelFileError(f"{source} has {component} weight {key!r} of type {value.dtype}; expected floating point.")
        with torch.no_grad():
            params[target].copy_(value)


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def _check_lora_fits(model: torch.nn.Module, component: str, specs: list[AdapterSpec], checkpoint: OneStepCheckpoint) -> set[str]:
    """Before any adapter is added (which allocates ``rank x features`` per layer): every layer an adapter's targets
    name (peft's rule: the name, or a name ending in ``.target``) must have its ``lora_A`` and ``lora_B`` in the
    checkpoint with the base layer's in/out sizes and the adapter's rank. So what is allocated is what the file
    holds, and a forged rank, a rank mismatch or a foreign base is one sentence that says which. Returns the names
    of the layers the adapters change."""
    source = checkpoint.source or "the checkpoint"
    layers = {name: _in_out(m) for name, m in model.named_modules() if _in_out(m) is not None}
    changed = set()
    for spec in specs:
        matched = [n for n in layers if any(n == t or n.endswith("." + t) for t in spec.targets)]
        changed.update(matched)
        for name in matched:
            (n_in, n_out), prefix = layers[name], f"{component}.{name}"
            a = checkpoint.tensors.get(f"{prefix}.lora_A.{spec.name}.weight")
            b = checkpoint.tensors.get(f"{prefix}.lora_B.{spec.name}.weight")
            if a is None or b is None:
                missing = f"{name}.lora_{'A' if a is None else 'B'}.{spec.name}.weight"
                raise ModelFileError(f"{source} lacks the {component} LoRA weight {missing!r} that its adapter list implies.")
            if a.ndim < 2 or b.ndim < 2 or a.shape[0] != spec.rank or b.shape[1] != spec.rank:
                raise ModelFileError(
                    f"{source} has {component} LoRA weights of shapes {tuple(a.shape)} and {tuple(b.shape)} at {name!r}, "
                    f"but its adapter {spec.name!r} declares rank {spec.rank}: the rank and the tensors disagree."
                )
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise ModelFileError(
                    f"{source} has {component} LoRA weights for {name!r} of {a.shape[1]} inputs and {b.shape[0]} outputs, "
                    f"but that layer of the base model has {n_in} and {n_out}: the checkpoint was made for a different base model."
                )
    return changed


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

    The base model's denoiser and VAE are changed in place and become the generator's: load a fresh base for
    another checkpoint. ``prompt`` overrides the stored prompt embedding; without either the empty prompt is used.
    ``merge_lora`` folds the adapters into the weights, which gives the same output faster.
    """
    source = checkpoint.source or "the checkpoint"
    if checkpoint.base_family != base.family:
        made_for = FAMILIES.get(checkpoint.base_family, checkpoint.base_family)
        raise ModelFileError(f"{source} was made for base family {made_for}, but {base.source} is {FAMILIES[base.family]}.")
    if base.family == "resshift":
        return build_resshift_generator(checkpoint, base)
    config = base.scheduler_config
    if checkpoint.prediction_type != "flow" and config.get("prediction_type", "epsilon") != checkpoint.prediction_type:
        raise ModelFileError(
            f"{source} expects a base with {checkpoint.prediction_type} prediction, but {base.source} uses "
            f"{config.get('prediction_type')}."
        )
    if checkpoint.prediction_type != "flow":
        steps = config.get("num_train_timesteps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TIMESTEP + 1:
            raise ModelFileError(f"{base.source} has the scheduler field num_train_timesteps={_short(steps)}; expected a whole number from 1 to {MAX_TIMESTEP + 1}.")
        if not 0 <= checkpoint.timestep < steps:
            raise ModelFileError(
                f"{source} has the metadata field 'timestep' = {checkpoint.timestep}, outside the base's {steps} timesteps."
            )
    foreign = sorted({k.split(".")[0] for k in checkpoint.tensors} - {base.denoiser_component, "vae"})
    if foreign:
        raise ModelFileError(f"{source} has {foreign[0]} weights, but {base.source} has no {foreign[0]}.")
    _load_component(base.denoiser, base.denoiser_component, checkpoint, merge_lora)
    _load_component(base.vae, "vae", checkpoint, merge_lora)
    if prompt is not None or not checkpoint.conditioning:
        conditioning = base.encode_prompt(prompt or "")
    else:
        conditioning = checkpoint.conditioning
    for name, width in base.conditioning_widths().items():
        if name not in conditioning or conditioning[name].shape[-1] != width:
            found = tuple(conditioning[name].shape) if name in conditioning else "nothing"
            raise ModelFileError(f"{source} gives {name} of shape {found}; {base.source} expects a last dimension of {width}.")
    try:
        generator = generator_on_base(
            base, prediction_type=checkpoint.prediction_type, timestep=checkpoint.timestep, conditioning=conditioning
        )
    except (KeyError, TypeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{base.source} has a scheduler config that does not fit ({type(err).__name__}: {detail}).") from None
    if merge_lora:
        merge_adapters(base.denoiser)
        merge_adapters(base.vae)
    release(base.denoiser)  # what is still borrowed from a host is read again at each run, never kept
    release(base.vae)
    return generator.eval().requires_grad_(False)


def generator_on_base(
    base: BaseModel, *, prediction_type: str, timestep: int, conditioning: dict[str, torch.Tensor]
) -> OneStepGenerator:
    """A generator that runs ``base``'s denoiser and VAE (as they are, adapters included) in one step at
    ``timestep``, with the noise schedule and x0 clamping of the base's scheduler config."""
    config = base.scheduler_config
    flow = prediction_type == "flow"
    # DDPMScheduler clamps x0 unless its config says clip_sample=false (its default is true).
    clips = not flow and config.get("clip_sample", True)
    return OneStepGenerator(
        base.vae,
        base.denoiser,
        base.predict_fn,
        prediction_type=prediction_type,
        timestep=timestep,
        alphas_cumprod=None if flow else alphas_cumprod_from_config(config),
        clip_sample_range=float(config.get("clip_sample_range", 1.0)) if clips else None,
        latent_scaling_factor=base.vae.config.scaling_factor,
        conditioning=conditioning,
    )
