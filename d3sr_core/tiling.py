"""Tiling, so that memory is bounded by the tile and not by the image.

Two kinds:

* **Latent tiles** (:func:`gaussian_blend_predictions`): the denoiser runs on overlapping latent tiles and its
  *predictions* (epsilon or velocity) are blended with a Gaussian window before the one x0 step, as the official
  OSEDiff and TSD-SR scripts do. The result differs slightly from an untiled run because each tile sees less
  context; the Gaussian weights make every border a smooth cross-fade, so no seam appears.
* **VAE tiles** (:func:`tiled_vae_apply`): the VAE encoder or decoder runs on padded, non-overlapping tiles.
  GroupNorm would otherwise normalise each tile by its own statistics and give each tile its own colour; here
  the statistics of every GroupNorm are measured once on a downscaled copy of the whole input and shared by all
  tiles, so tiles agree in colour while memory stays bounded by the tile. The padding hides the receptive-field
  border. The mid-block attention of the VAE sees one tile at a time, so the output differs slightly from an
  untiled pass.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

GAUSSIAN_VARIANCE = 0.01
"""Variance of the tile window, in units of the squared tile size (OSEDiff's ``_gaussian_weights``)."""


def gaussian_tile_weights(height: int, width: int) -> torch.Tensor:
    """The ``(height, width)`` float64 blending window of OSEDiff's latent tiling.

    ``w(y, x) = g_H(y) * g_W(x)`` with ``g_L(u) = exp(-(u - m)^2 / L^2 / (2 var)) / sqrt(2 pi var)``, ``var = 0.01``.
    As in the official code the x midpoint is ``(W - 1) / 2`` but the y midpoint is ``H / 2``; the half-pixel
    shift is kept so tiled outputs match the official ones.
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


def count_latent_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    return len(overlapping_tile_starts(height, tile, overlap)) * len(overlapping_tile_starts(width, tile, overlap))


def gaussian_blend_predictions(
    predict: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int,
    overlap: int,
    progress: Callable[[], None] | None = None,
    tile_batch_size: int = 1,
) -> torch.Tensor:
    """Run ``predict`` on overlapping tiles of ``latents`` ``(B, C, H, W)`` and blend the outputs.

    Tiles are ``min(tile, H) x min(tile, W)`` latent pixels, ``overlap`` apart; each output pixel is
    ``sum_k w_k p_k / sum_k w_k`` over the tiles ``k`` that cover it, with the window of
    :func:`gaussian_tile_weights`. ``tile_batch_size`` tiles go through ``predict`` together.
    Returns float32 ``(B, C, H, W)``.
    """
    _, _, height, width = latents.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
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


class SharedGroupNormStatistics:
    """Within this context every ``nn.GroupNorm`` under ``root`` either records its input statistics
    (``mode = "record"``) or normalises with the recorded ones instead of its own (``mode = "replay"``).

    Statistics are the per-sample, per-group mean and (biased) variance, kept in float32.
    """

    def __init__(self, root: torch.nn.Module):
        self.norms = [m for m in root.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mode = "record"

    def __enter__(self) -> "SharedGroupNormStatistics":
        for norm in self.norms:
            norm.forward = self._bound(norm)
        return self

    def __exit__(self, *exc) -> None:
        for norm in self.norms:
            del norm.forward

    def _bound(self, norm: torch.nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self._forward(norm, x)

    def _forward(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        batch, groups = x.shape[0], norm.num_groups
        grouped = x.float().reshape(batch, groups, -1)
        if self.mode == "record":
            var, mean = torch.var_mean(grouped, dim=2, unbiased=False)
            self.stats[id(norm)] = (mean, var)
        else:
            mean, var = self.stats[id(norm)]
        y = ((grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape).to(x.dtype)
        if norm.affine:
            y = y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
        return y


def _even_bounds(size: int, tile: int, unit: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` into near-equal spans of at most ``tile`` whose inner bounds are multiples of ``unit``."""
    count = math.ceil(size / tile)
    cuts = [0] + [round(i * size / count / unit) * unit for i in range(1, count)] + [size]
    return list(zip(cuts[:-1], cuts[1:]))


def count_vae_tiles(height: int, width: int, tile: int, padding: int) -> int:
    if height <= tile + 2 * padding and width <= tile + 2 * padding:
        return 1
    return math.ceil(height / tile) * math.ceil(width / tile)


def tiled_vae_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    norm_root: torch.nn.Module,
    x: torch.Tensor,
    tile: int,
    padding: int,
    ratio: float,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Apply a VAE half ``fn`` (encoder: ``ratio = 1/8``; decoder: ``ratio = 8``) to ``x`` ``(B, C, H, W)`` tile by tile.

    ``tile`` and ``padding`` are in units of ``x``. Inputs no larger than ``tile + 2 * padding`` run in one pass.
    Otherwise the GroupNorm statistics of ``norm_root`` are recorded on a copy of ``x`` downscaled (area) to fit
    one tile, then every padded tile runs with those statistics and its centre is pasted into the output.
    """
    height, width = x.shape[-2:]
    if height <= tile + 2 * padding and width <= tile + 2 * padding:
        out = fn(x)
        if progress is not None:
            progress()
        return out
    unit = max(1, round(1 / ratio))
    shrink = tile / max(height, width)
    small_size = (max(unit, round(height * shrink / unit) * unit), max(unit, round(width * shrink / unit) * unit))
    out = None
    with SharedGroupNormStatistics(norm_root) as shared:
        fn(F.interpolate(x.float(), size=small_size, mode="area").to(x.dtype))
        shared.mode = "replay"
        for y0, y1 in _even_bounds(height, tile, unit):
            for x0, x1 in _even_bounds(width, tile, unit):
                py0, py1 = max(0, y0 - padding), min(height, y1 + padding)
                px0, px1 = max(0, x0 - padding), min(width, x1 + padding)
                tile_out = fn(x[..., py0:py1, px0:px1])
                if out is None:
                    size = (round(height * ratio), round(width * ratio))
                    out = torch.empty(*tile_out.shape[:2], *size, device=tile_out.device, dtype=tile_out.dtype)
                oy, ox = round((y0 - py0) * ratio), round((x0 - px0) * ratio)
                h, w = round((y1 - y0) * ratio), round((x1 - x0) * ratio)
                out[..., round(y0 * ratio) : round(y0 * ratio) + h, round(x0 * ratio) : round(x0 * ratio) + w] = (
                    tile_out[..., oy : oy + h, ox : ox + w]
                )
                if progress is not None:
                    progress()
    return out
