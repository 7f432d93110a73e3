"""Latent tiling, so that the denoiser's memory is bounded by the tile and not by the image.

The denoiser runs on overlapping latent tiles and its *predictions* (epsilon or velocity) are blended with a
Gaussian window before the one x0 step, as the official OSEDiff and TSD-SR scripts do. The result differs
slightly from an untiled run because each tile sees less context; the Gaussian weights make every border a
smooth cross-fade, so no seam appears. The VAE has its own tiling in ``tiled_vae.py``.

When to tile and the tile's shape follow one of two rules (:data:`TILE_RULES`, see :func:`latent_tile_shape`):
``area``, the official scripts' rule (``OSEDiff_test.forward``, TSD-SR's ``tile_sample``), and ``side``, this
project's rule for the models without an official script (D3SR, TAD-SR on SD, the bundled model), which keeps
the denoiser's input within ``tile x tile`` whatever the image's shape.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

TILE_RULES = ("area", "side")
"""``area``: untiled while ``h * w <= tile^2``, else square tiles (the official OSEDiff and TSD-SR scripts);
``side``: untiled while ``max(h, w) <= tile``, else tiles of ``min(tile, h) x min(tile, w)``."""

GAUSSIAN_VARIANCE = 0.01
"""Variance of the tile window, in units of the squared tile size (OSEDiff's ``_gaussian_weights``)."""


def gaussian_tile_weights(height: int, width: int) -> torch.Tensor:
    """The ``(height, width)`` float64 blending window of OSEDiff's latent tiling.

    ``w(y, x) = g_H(y) * g_W(x)`` with ``g_L(u) = exp(-(u - m)^2 / L^2 / (2 var)) / sqrt(2 pi var)``, ``var = 0.01``.
    As in the official code the x midpoint is ``(W - 1) / 2`` but the y midpoint is ``H / 2``; the half-pixel
    shift is kept so that, with the ``area`` rule (square tiles), tiled outputs match the official ones.
    """

    def profile(length: int, midpoint: float) -> np.ndarray:
        u = np.arange(length, dtype=np.float64)
        var = GAUSSIAN_VARIANCE
        return np.exp(-((u - midpoint) ** 2) / (length * length) / (2 * var)) / np.sqrt(2 * np.pi * var)

    return torch.from_numpy(np.outer(profile(height, height / 2), profile(width, (width - 1) / 2)))


def overlapping_tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with stride ``tile - overlap``; the last
    tile is snapped to the end, as OSEDiff does."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be at least 0 and smaller than the tile size {tile}.")
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return [i * stride for i in range(count - 1)] + [size - tile]


def latent_tile_shape(height: int, width: int, tile: int, rule: str) -> tuple[int, int] | None:
    """``(tile_h, tile_w)`` of the latent tiles of ``height x width`` latents, or ``None`` when they run untiled.

    ``area`` (the official scripts): untiled while ``height * width <= tile^2``, so a 64 x 128 latent (512 x 1024
    px) runs whole with tile 96; otherwise square tiles of ``min(tile, min(height, width))``, so 48 x 100 latents
    get 48 x 48 tiles with tile 64. ``side``: untiled while ``max(height, width) <= tile``, otherwise
    ``min(tile, height) x min(tile, width)`` tiles; no tile is ever larger than ``tile x tile``.
    """
    if rule == "area":
        if height * width <= tile * tile:
            return None
        side = min(tile, height, width)
        return side, side
    if rule == "side":
        if max(height, width) <= tile:
            return None
        return min(tile, height), min(tile, width)
    raise ValueError(f"tile rule {rule!r} is not one of {TILE_RULES}.")


def _tile_pair(tile: int | tuple[int, int]) -> tuple[int, int]:
    return (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))


def count_latent_tiles(height: int, width: int, tile: int | tuple[int, int], overlap: int) -> int:
    """How many tiles of ``tile`` (a side, or ``(tile_h, tile_w)``) cover ``height x width``."""
    tile_h, tile_w = _tile_pair(tile)
    return len(overlapping_tile_starts(height, tile_h, overlap)) * len(overlapping_tile_starts(width, tile_w, overlap))


def gaussian_blend_predictions(
    predict: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int | tuple[int, int],
    overlap: int,
    progress: Callable[[], None] | None = None,
    tile_batch_size: int = 1,
) -> torch.Tensor:
    """Run ``predict`` on overlapping tiles of ``latents`` ``(B, C, H, W)`` and blend the outputs.

    Tiles are ``tile`` (``(tile_h, tile_w)``, see :func:`latent_tile_shape`; a single side ``t`` means
    ``min(t, H) x min(t, W)``) latent pixels, ``overlap`` apart; each output pixel is
    ``sum_k w_k p_k / sum_k w_k`` over the tiles ``k`` that cover it, with the window of
    :func:`gaussian_tile_weights`. ``tile_batch_size`` tiles go through ``predict`` together.
    Returns float32 ``(B, C, H, W)``.
    """
    _, _, height, width = latents.shape
    tile_h, tile_w = _tile_pair(tile)
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    rows = overlapping_tile_starts(height, tile_h, overlap)
    cols = overlapping_tile_starts(width, tile_w, overlap)
    window = gaussian_tile_weights(tile_h, tile_w).to(device=latents.device, dtype=torch.float32)
    blended = None
    weight_sum = torch.zeros(height, width, device=latents.device, dtype=torch.float32)
    positions = [(y, x) for y in rows for x in cols]
    for first in range(0, len(positions), tile_batch_size):
        chunk = positions[first : first + tile_batch_size]
        tiles = torch.cat([latents[..., y : y + tile_h, x : x + tile_w] for y, x in chunk])
        outputs = predict(tiles).float().split(latents.shape[0])
        for (y, x), out in zip(chunk, outputs):
            if blended is None:
                blended = torch.zeros(latents.shape[0], out.shape[1], height, width, device=latents.device)
            blended[..., y : y + tile_h, x : x + tile_w] += out * window
            weight_sum[y : y + tile_h, x : x + tile_w] += window
            if progress is not None:
                progress()
    return blended / weight_sum
