"""A GroupNorm-aware tiled VAE: the ``AutoencoderKL`` encoder or decoder on tiles, with the exact statistics of
the whole image in every GroupNorm.

Tiling a VAE naively gives every tile its own GroupNorm statistics, hence its own colour. Here all tiles advance
in lockstep through the network, cut at each GroupNorm (as the "Tiled VAE" of multidiffusion-upscaler, which
OSEDiff uses, does): every tile runs up to the next GroupNorm, reports the mean and variance of the part of its
activation that it owns (its core, without padding), the per-tile parts are combined into the statistics of the
whole feature map, and every tile continues with those. Between steps a tile's activations are parked: in host
memory (``store="ram"``; on an accelerator device memory is then bounded by one tile, host memory holds the image)
or in a temporary folder (``store="disk"``, under ``TMPDIR``: put it on a real disk, a RAM-backed tmpfs saves
nothing), so that the activations in memory are bounded by one tile at any image size and the result stays exact;
the input and the output remain whole-image tensors. The price is writing and reading every stage's activations
once.

What still differs from an untiled pass: each tile sees only ``padding`` pixels of context, and the VAE's
mid-block self-attention attends within a tile. Padding of 32 image pixels (encoder) and 11 latent pixels
(decoder) are the official defaults.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .borrowed import materialized
from .files import sweep_stale_temporaries, temporary_folder

TILE_FOLDER_PREFIX = "d3sr-vae-tiles-"
_swept = False

Step = tuple[str, object]
"""``("call", fn)``: x = fn(x); ``("save", None)``: keep x as the residual; ``("add", (shortcut, scale))``:
x = (shortcut(residual) + x) / scale; ``("norm", group_norm)``: normalise x with whole-image statistics."""


def _resnet_steps(block: torch.nn.Module) -> list[Step]:
    if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
        raise ValueError("the tiled VAE supports VAE resnet blocks only (no time embedding, no resampling inside).")
    return [
        ("save", None),
        ("norm", block.norm1),
        ("call", block.nonlinearity),
        ("call", block.conv1),
        ("norm", block.norm2),
        ("call", block.nonlinearity),
        ("call", block.dropout),
        ("call", block.conv2),
        ("add", (block.conv_shortcut, block.output_scale_factor)),
    ]


def _attention_core(attn: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Self-attention of a diffusers ``Attention`` block over the pixels of one tile, without its norm and residual."""

    def run(x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.reshape(batch, channels, height * width).transpose(1, 2)
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = q.shape[-1] // attn.heads
        q, k, v = (t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(1, 2).reshape(batch, channels, height, width)

    return run


def _attention_steps(attn: torch.nn.Module) -> list[Step]:
    if attn.spatial_norm is not None or not attn.residual_connection or attn.group_norm is None:
        raise ValueError("the tiled VAE supports VAE attention blocks only (group norm, residual connection).")
    return [
        ("save", None),
        ("norm", attn.group_norm),
        ("call", _attention_core(attn)),
        ("add", (None, attn.rescale_output_factor)),
    ]


def _mid_steps(mid: torch.nn.Module) -> list[Step]:
    steps = _resnet_steps(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            steps += _attention_steps(attn)
        steps += _resnet_steps(resnet)
    return steps


def encoder_steps(vae: torch.nn.Module) -> list[Step]:
    """The encoder of an ``AutoencoderKL`` (plus ``quant_conv``) as steps; input image, output posterior moments."""
    enc = vae.encoder
    steps: list[Step] = [("call", enc.conv_in)]
    for block in enc.down_blocks:
        for resnet in block.resnets:
            steps += _resnet_steps(resnet)
        for down in block.downsamplers or []:
            steps.append(("call", down))
    steps += _mid_steps(enc.mid_block)
    steps += [("norm", enc.conv_norm_out), ("call", enc.conv_act), ("call", enc.conv_out)]
    if getattr(vae, "quant_conv", None) is not None:
        steps.append(("call", vae.quant_conv))
    return steps


def decoder_steps(vae: torch.nn.Module) -> list[Step]:
    """The decoder of an ``AutoencoderKL`` (after ``post_quant_conv``) as steps; input unscaled latents, output image."""
    dec = vae.decoder
    steps: list[Step] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        steps.append(("call", vae.post_quant_conv))
    steps.append(("call", dec.conv_in))
    steps += _mid_steps(dec.mid_block)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            steps += _resnet_steps(resnet)
        for up in block.upsamplers or []:
            steps.append(("call", up))
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        raise ValueError("the tiled VAE supports decoders whose output norm is a GroupNorm.")
    steps += [("norm", dec.conv_norm_out), ("call", dec.conv_act), ("call", dec.conv_out)]
    return steps


def group_norm_with_stats(norm: torch.nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed with given per-sample, per-group ``mean`` and biased ``var`` ``(B, G)``."""
    grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
    y = ((grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape).to(x.dtype)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        with materialized(norm):  # weights kept in fp8 or borrowed from a host are handed over for this use
            y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return y


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-group ``(mean, biased variance)`` of ``x`` ``(B, C, ...)``, each ``(B, G)`` float32."""
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=2, unbiased=False)
    return mean, var


def combine_moments(parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a union from ``(count, mean, var)`` of its disjoint parts (Chan et al., 1979)."""
    total = sum(n for n, _, _ in parts)
    mean = sum(n * m for n, m, _ in parts) / total
    var = sum(n * (v + (m - mean) ** 2) for n, m, v in parts) / total
    return mean, var


def count_norms(steps: list[Step]) -> int:
    return sum(kind == "norm" for kind, _ in steps)


def tile_bounds(size: int, tile: int, unit: int) -> list[tuple[int, int]]:
    """``[0, size)`` split into ``ceil(size / tile)`` near-equal spans whose inner bounds are multiples of ``unit``."""
    count = math.ceil(size / tile)
    cuts = [0] + [round(i * size / count / unit) * unit for i in range(1, count)] + [size]
    return list(zip(cuts[:-1], cuts[1:]))


def count_vae_tiles(height: int, width: int, tile: int, padding: int) -> int:
    """How many tiles :func:`tiled_vae_apply` cuts an ``height x width`` input into (1: it runs untiled)."""
    if height <= tile + 2 * padding and width <= tile + 2 * padding:
        return 1
    return math.ceil(height / tile) * math.ceil(width / tile)


TILE_STORES = ("ram", "disk")


class RegionSource:
    """An input of :func:`tiled_vae_apply` read region by region: ``shape`` ``(B, C, H, W)``, ``device``, and
    ``region(y0, y1, x0, x1)``, the tensor ``(B, C, y1 - y0, x1 - x0)`` on ``device``."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, region: Callable[[int, int, int, int], torch.Tensor]):
        self.shape, self.device, self.region = tuple(shape), torch.device(device), region


@dataclass
class _Tile:
    region: tuple[int, int, int, int]
    """Padded input region ``(y0, y1, x0, x1)``."""
    core: tuple[int, int, int, int]
    """The part this tile owns, in its own input coordinates."""
    x: object = None
    """The parked activation (``None`` before the first stage: the input region itself)."""
    residual: object = None


@dataclass
class _OnDisk:
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Store:
    """Parks tensors between lockstep stages: on the CPU, or as raw bytes in ``folder`` (bit-exact, any dtype)."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def put(self, name: str, tensor: torch.Tensor):
        if self.folder is None:
            return tensor.to("cpu")
        path = self.folder / f"{name}.bin"
        tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)
        return _OnDisk(path, tuple(tensor.shape), tensor.dtype)

    def take(self, parked, device: torch.device) -> torch.Tensor:
        if not isinstance(parked, _OnDisk):
            return parked.to(device)
        raw = torch.from_numpy(np.fromfile(parked.path, dtype=np.uint8))
        return raw.view(parked.dtype).reshape(parked.shape).to(device)


@contextmanager
def _store(kind: str) -> Iterator[_Store]:
    if kind not in TILE_STORES:
        raise ValueError(f"store {kind!r} is not one of {TILE_STORES}.")
    if kind == "ram":
        yield _Store(None)
        return
    with scratch_folder() as folder:
        yield _Store(folder)


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary folder for what waits on disk during one run (tiles, whole-image planes), under ``TMPDIR``;
    locked while it lives and removed on leaving, also on an exception. The first one of a process removes those
    a killed process left behind."""
    global _swept
    if not _swept:
        sweep_stale_temporaries(TILE_FOLDER_PREFIX)
        _swept = True
    with temporary_folder(TILE_FOLDER_PREFIX) as folder:
        yield folder


def _core_of(x: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """The owned part of an activation ``x`` of ``tile``, at the activation's own resolution."""
    in_h, in_w = tile.region[1] - tile.region[0], tile.region[3] - tile.region[2]
    ry, rx = x.shape[-2] / in_h, x.shape[-1] / in_w
    y0, y1, x0, x1 = tile.core
    return x[..., round(y0 * ry) : round(y1 * ry), round(x0 * rx) : round(x1 * rx)]


def _run(steps: list[Step], tile: _Tile, x: torch.Tensor) -> torch.Tensor:
    for kind, arg in steps:
        if kind == "call":
            x = arg(x)
        elif kind == "save":
            tile.residual = x
        else:
            shortcut, scale = arg
            residual = tile.residual if shortcut is None else shortcut(tile.residual)
            x = (residual + x) / scale
            tile.residual = None
    return x


def tiled_vae_apply(
    steps: list[Step],
    x: torch.Tensor,
    tile: int,
    padding: int,
    ratio: float,
    progress: Callable[[], None] | None = None,
    store: str = "ram",
    into: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Run ``steps`` (from :func:`encoder_steps` or :func:`decoder_steps`) on ``x`` ``(B, C, H, W)`` tile by tile.

    ``x`` is a tensor, or a :class:`RegionSource` that reads the input region by region (so a whole-image input
    need not be in memory). ``tile`` and ``padding`` are in units of ``x``; ``ratio`` is output size / input size
    (1/8 for the SD encoder, 8 for the decoder). ``store`` is where tiles wait between stages (``ram`` or ``disk``,
    see the module doc). ``progress`` is called once per tile per GroupNorm stage (``count_vae_tiles *
    (count_norms(steps) + 1)`` calls in all). The output is returned whole, or, with ``into``, handed over tile by
    tile as ``into(y0, x0, part)`` (``part`` ``(B, C', h, w)`` at output rows ``y0 ...``, columns ``x0 ...``; the
    parts tile the output exactly once) and ``None`` is returned.
    """
    height, width = x.shape[-2:]
    unit = max(1, round(1 / ratio))
    tiles = []
    for y0, y1 in tile_bounds(height, tile, unit):
        for x0, x1 in tile_bounds(width, tile, unit):
            py0, py1 = max(0, y0 - padding), min(height, y1 + padding)
            px0, px1 = max(0, x0 - padding), min(width, x1 + padding)
            tiles.append(_Tile((py0, py1, px0, px1), (y0 - py0, y1 - py0, x0 - px0, x1 - px0)))
    segments: list[list[Step]] = [[]]
    norms: list[torch.nn.GroupNorm] = []
    for kind, arg in steps:
        if kind == "norm":
            norms.append(arg)
            segments.append([])
        else:
            segments[-1].append((kind, arg))
    with _store(store) as parking:
        stats = None
        for index, segment in enumerate(segments):
            following = norms[index] if index < len(norms) else None
            parts = []
            for number, t in enumerate(tiles):
                if t.x is None:
                    py0, py1, px0, px1 = t.region
                    h = x.region(py0, py1, px0, px1) if isinstance(x, RegionSource) else x[..., py0:py1, px0:px1]
                else:
                    h = parking.take(t.x, x.device)
                if t.residual is not None:
                    t.residual = parking.take(t.residual, x.device)
                if index > 0:
                    h = group_norm_with_stats(norms[index - 1], h, *stats)
                h = _run(segment, t, h)
                if following is not None:
                    core = _core_of(h, t)
                    parts.append((core[0].numel(), *group_moments(core, following.num_groups)))
                t.x = parking.put(f"{number}.x", h)
                if t.residual is not None:
                    t.residual = parking.put(f"{number}.residual", t.residual)
                del h
                if progress is not None:
                    progress()
            if following is not None:
                stats = combine_moments(parts)
        out = None
        for t in tiles:
            h = parking.take(t.x, x.device)
            py0, _, px0, _ = t.region
            y0, y1, x0, x1 = t.core
            oy, ox = round((py0 + y0) * ratio), round((px0 + x0) * ratio)
            size_y, size_x = round((y1 - y0) * ratio), round((x1 - x0) * ratio)
            part = h[..., round(y0 * ratio) : round(y0 * ratio) + size_y, round(x0 * ratio) : round(x0 * ratio) + size_x]
            if into is not None:
                into(oy, ox, part)
                continue
            if out is None:
                out = torch.empty(*h.shape[:2], round(height * ratio), round(width * ratio), dtype=h.dtype, device=x.device)
            out[..., oy : oy + size_y, ox : ox + size_x] = part
    return out
