"""What the hosts' tile widgets mean, in one place: ComfyUI, A1111/Forge and the command line all read a tile value
of -1 as "the model's default" and 0 as "off", and all pick the VAE tile store the same way."""

from __future__ import annotations

from .memory import choose_tile_store
from .options import UpscaleOptions, vae_tile_sizes

DEFAULT = -1
"""A tile value that keeps the model's default (what its method's official script uses, or what it was trained with)."""
OFF = 0
"""A tile value that turns that tiling off (the whole image at once)."""
OVERLAP_SHARE = 3
"""With a tile size chosen and the overlap left at its default, the overlap is at most tile / 3 (OSEDiff's own
96 / 32), so a small tile never fails on an overlap the user never typed."""


def _tile_value(name: str, value: int | None) -> int | None:
    """``None`` for :data:`DEFAULT` (and ``None``), else the value; below -1 is refused in one sentence."""
    if value is None or value == DEFAULT:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < OFF:
        raise ValueError(f"{name}={value!r} is not allowed; expected -1 (the model's default), 0 (off) or a tile size.")
    return value


def host_options(
    defaults: UpscaleOptions,
    vae_scale_factor: int = 8,
    *,
    tile_size: int | None = DEFAULT,
    tile_overlap: int | None = DEFAULT,
    vae_tile_size: int | None = DEFAULT,
    vae_tile_store: str | None = None,
    **changes,
) -> UpscaleOptions:
    """``defaults`` (a model's) with a host's choices: tile values as :data:`DEFAULT` / :data:`OFF` / a size (latent
    pixels for ``tile_size`` and ``tile_overlap``, image pixels for ``vae_tile_size``); ``vae_tile_store`` ``None``
    leaves the store to :func:`memory.choose_tile_store` per image (see :func:`with_tile_store`); other ``changes``
    (``scale``, ``color_fix``, ...) as :meth:`UpscaleOptions.updated` takes them (``None`` keeps the default).
    ``vae_scale_factor`` (the generator's) turns ``vae_tile_size`` into the decoder's latent tile."""
    size = _tile_value("tile_size", tile_size)
    overlap = _tile_value("tile_overlap", tile_overlap)
    if size and overlap is None:
        overlap = min(defaults.tile_overlap, size // OVERLAP_SHARE)
    return defaults.updated(
        tile_size=size,
        tile_overlap=overlap,
        **vae_tile_sizes(_tile_value("vae_tile_size", vae_tile_size), vae_scale_factor),
        vae_tile_store=vae_tile_store,
        **changes,
    )


def with_tile_store(options: UpscaleOptions, vae, height: int, width: int, free_bytes: int | None = None) -> UpscaleOptions:
    """``options`` with the VAE tile store that keeps an ``height x width`` input (processed at ``scale`` x, or
    larger as ``min_process_side`` asks) within the free RAM: ``disk`` when the ``ram`` store would take more than
    half of it (:func:`memory.choose_tile_store`). Untiled VAEs keep the whole image in memory whatever the store."""
    from .pipeline import processing_size

    ph, pw = processing_size(height, width, options)
    return options.updated(vae_tile_store=choose_tile_store(vae, ph, pw, free_bytes))


def known_tile_defaults() -> dict[str, UpscaleOptions]:
    """Name -> defaults of what a host lists, for its tooltips: the bundled models (read from their metadata, no
    tensors) and the official OSEDiff and TSD-SR methods."""
    import json

    from safetensors import safe_open

    from .loading import bundled_models
    from .options import PRESETS

    found = {}
    for name, path in bundled_models().items():
        try:
            with safe_open(str(path), "pt") as f:
                found[name] = UpscaleOptions.from_json(json.loads((f.metadata() or {}).get("defaults", "{}")))
        except (OSError, ValueError, TypeError):  # a damaged install: the tooltip leaves it out, the loader says why
            continue
    return {**found, "OSEDiff": PRESETS["osediff"], "TSD-SR": PRESETS["tsdsr"]}


def describe_defaults(field: str, unit: str = "") -> str:
    """``"d3sr-small-x4 32, OSEDiff 96, TSD-SR 64"`` for ``field`` of :func:`known_tile_defaults`."""
    return ", ".join(f"{name} {getattr(options, field)}{unit}" for name, options in known_tile_defaults().items())
