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
    bands = []
    gaussian_blend_rows(
        predict, lambda y0, y1: latents[..., y0:y1, :], tuple(latents.shape), tile, overlap,
        lambda y0, rows: bands.append(rows), progress, tile_batch_size,
    )
    return torch.cat(bands, dim=-2)


def gaussian_blend_rows(
    predict: Callable[[torch.Tensor], torch.Tensor],
    read_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int, int, int],
    tile: int | tuple[int, int],
    overlap: int,
    emit: Callable[[int, torch.Tensor], None],
    progress: Callable[[], None] | None = None,
    tile_batch_size: int = 1,
) -> None:
    """:func:`gaussian_blend_predictions` on latents of ``shape`` ``(B, C, H, W)`` that are never whole in memory:
    ``read_rows(y0, y1)`` gives latent rows ``[y0, y1)`` ``(B, C, y1 - y0, W)``, and the blended prediction leaves
    in row bands, ``emit(y0, rows)`` with ``rows`` float32 ``(B, C', r, W)``, in order, as soon as no later tile
    covers them. Tiles run in the same order and every pixel sums the same terms in the same order, so the bands
    equal the whole result bit for bit; memory holds the rows of one or two tile rows, not the image."""
    batch, _, height, width = shape
    tile_h, tile_w = _tile_pair(tile)
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    rows = overlapping_tile_starts(height, tile_h, overlap)
    cols = overlapping_tile_starts(width, tile_w, overlap)
    window = None
    positions = [(y, x) for y in rows for x in cols]
    band_start, blended, weight_sum = 0, None, None  # the rows [band_start, band_start + len) not yet emitted
    source_start, source = 0, None  # latent rows read for the current tile row(s)
    for first in range(0, len(positions), tile_batch_size):
        chunk = positions[first : first + tile_batch_size]
        top, bottom = chunk[0][0], chunk[-1][0] + tile_h
        if source is None or top < source_start or bottom > source_start + source.shape[-2]:
            source_start, source = top, read_rows(top, bottom)
        tiles = torch.cat([source[..., y - source_start : y - source_start + tile_h, x : x + tile_w] for y, x in chunk])
        outputs = predict(tiles).float().split(batch)
        if window is None:
            window = gaussian_tile_weights(tile_h, tile_w).to(device=outputs[0].device, dtype=torch.float32)
        for (y, x), out in zip(chunk, outputs):
            if blended is None:
                blended = torch.zeros(batch, out.shape[1], 0, width, device=out.device)
                weight_sum = torch.zeros(0, width, device=out.device)
            missing = y + tile_h - (band_start + blended.shape[-2])
            if missing > 0:
                blended = torch.cat([blended, blended.new_zeros(*blended.shape[:2], missing, width)], dim=-2)
                weight_sum = torch.cat([weight_sum, weight_sum.new_zeros(missing, width)])
            blended[..., y - band_start : y - band_start + tile_h, x : x + tile_w] += out * window
            weight_sum[y - band_start : y - band_start + tile_h, x : x + tile_w] += window
            if progress is not None:
                progress()
        following = first + len(chunk)
        done_to = positions[following][0] if following < len(positions) else height  # no later tile covers these
        if done_to > band_start:
            emit(band_start, blended[..., : done_to - band_start, :] / weight_sum[: done_to - band_start])
            blended, weight_sum = blended[..., done_to - band_start :, :].clone(), weight_sum[done_to - band_start :].clone()
            band_start = done_to
