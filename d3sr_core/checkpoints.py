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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .backbones import BaseModel
from .backbones.base import FAMILIES
from .backbones.sd2 import sd2_base_from_embedded
from .backbones.sd3 import sd3_base_from_embedded
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
COMPONENTS = ("unet", "transformer", "vae")
CONDITIONING_PREFIX = "conditioning."
EMBEDDED_BASE_PREFIX = "base."


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
            adapters=adapters_from_json(meta["adapters"]),
            tensors={k: v for k, v in tensors.items() if not k.startswith((CONDITIONING_PREFIX, EMBEDDED_BASE_PREFIX))},
            conditioning=_with_prefix(tensors, CONDITIONING_PREFIX),
            defaults=UpscaleOptions.from_json({**json.loads(meta.get("defaults", "{}")), "scale": int(meta["scale"])}),
            source=path,
            base_configs=json.loads(meta["base_configs"]) if "base_configs" in meta else None,
            base_tensors=_with_prefix(tensors, EMBEDDED_BASE_PREFIX),
            training_config=json.loads(meta["training_config"]) if "training_config" in meta else None,
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
    if (checkpoint.base_configs is None) != (not checkpoint.base_tensors):
        raise ModelFileError(f"{path} has base_configs metadata and base.* weights that do not come together.")
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
        adapters=adapters,
        tensors=tensors,
        defaults=PRESETS["osediff"],
        source=path,
    )


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
    ranks = sorted({state[f"transformer.{m}.lora_A.weight"].shape[0] for m in modules})
    if len(ranks) != 1:
        raise ModelFileError(f"{file} mixes LoRA ranks {ranks}; expected one rank for the whole file.")
    if rank is not None and rank != ranks[0]:
        raise ModelFileError(f"{file} holds rank-{ranks[0]} LoRA weights, but rank {rank} was given.")
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


def peek(path: str | os.PathLike) -> tuple[str, int]:
    """``(base family, trained scale)`` of a checkpoint, read without loading its tensors (a TSD-SR folder is SD3
    x4, an OSEDiff file SD 2.x x4, ours says so in its metadata)."""
    path = Path(path)
    if path.is_dir():
        return "sd3", 4
    if path.suffix == ".safetensors":
        meta = _read_metadata(path)
        return meta.get("base_family", "unknown"), int(meta.get("scale", 4))
    return "sd2", 4


def embeds_base(path: str | os.PathLike) -> bool:
    """Whether the checkpoint at ``path`` is self-contained (stores its base model), read from its metadata."""
    path = Path(path)
    return path.is_file() and path.suffix == ".safetensors" and "base_configs" in _read_metadata(path)


def embedded_base(checkpoint: OneStepCheckpoint) -> BaseModel:
    """The base model stored inside a self-contained checkpoint (fp32, CPU, eval)."""
    source = checkpoint.source or Path("the checkpoint")
    if checkpoint.base_configs is None:
        raise ModelFileError(f"{source} stores no base model; give the base it was trained on.")
    builders = {"sd2": sd2_base_from_embedded, "sd3": sd3_base_from_embedded}
    if checkpoint.base_family not in builders:
        raise ModelFileError(f"{source} embeds a {checkpoint.base_family} base; only SD 2.x- and SD3-shaped bases can be embedded.")
    return builders[checkpoint.base_family](checkpoint.base_configs, checkpoint.base_tensors, source)


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
        return read_osediff_pkl(path)
    raise ModelFileError(f"{path} has an unknown extension; expected {expected}.")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prompt_embeds: torch.Tensor | None = None,
    embeddings_dir: str | os.PathLike | None = None,
) -> Path:
    """Convert any readable checkpoint to ours; ``prompt_embeds`` ``(1, 77, D)`` is stored with it when given."""
    checkpoint = load_checkpoint(src, embeddings_dir=embeddings_dir)
    if prompt_embeds is not None:
        checkpoint.conditioning["prompt_embeds"] = prompt_embeds
    return save_checkpoint(checkpoint, dst)


def _load_component(model: torch.nn.Module, component: str, checkpoint: OneStepCheckpoint) -> None:
    """Add the component's adapters to ``model`` and copy every checkpoint tensor of the component into it."""
    source = checkpoint.source or "the checkpoint"
    specs = [s for s in checkpoint.adapters if s.component == component]
    try:
        add_adapters(model, specs)
    except ValueError as err:  # peft: no target matched
        raise ModelFileError(
            f"{source} has a {component} adapter whose targets match no module of the base model ({err})."
        ) from None
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

    The base model's denoiser and VAE are changed in place and become the generator's: load a fresh base for
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
    foreign = sorted({k.split(".")[0] for k in checkpoint.tensors} - {base.denoiser_component, "vae"})
    if foreign:
        raise ModelFileError(f"{source} has {foreign[0]} weights, but {base.source} has no {foreign[0]}.")
    _load_component(base.denoiser, base.denoiser_component, checkpoint)
    _load_component(base.vae, "vae", checkpoint)
    if prompt is not None or not checkpoint.conditioning:
        conditioning = base.encode_prompt(prompt or "")
    else:
        conditioning = checkpoint.conditioning
    for name, width in base.conditioning_widths().items():
        if name not in conditioning or conditioning[name].shape[-1] != width:
            found = tuple(conditioning[name].shape) if name in conditioning else "nothing"
            raise ModelFileError(f"{source} gives {name} of shape {found}; {base.source} expects a last dimension of {width}.")
    generator = generator_on_base(
        base, prediction_type=checkpoint.prediction_type, timestep=checkpoint.timestep, conditioning=conditioning
    )
    if merge_lora:
        merge_adapters(base.denoiser)
        merge_adapters(base.vae)
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
