"""ResShift bases (Yue et al., NeurIPS 2023, "ResShift: Efficient Diffusion Model for Image Super-resolution by
Residual Shifting"): the lq-conditioned Swin UNet (``UNetModelSwin``), the VQ-f4 autoencoder and the residual-shifting
diffusion that TAD-SR distils (reference/methods.md 3.1).

The module and parameter names follow the official ``models/unet.py`` and ``models/swin_transformer.py``, so the
released state dicts (``resshift_realsrx4_s15_v1.pth``, a TAD-SR ``{'state_dict': ...}``) load strictly. The VQ-f4
autoencoder (``autoencoder_vq_f4.pth``, LDM key layout) is diffusers' ``VQModel``, its keys converted on load.

A checkpoint holds neither architecture nor schedule, so a config does: the official YAML (its ``model``,
``diffusion`` and ``autoencoder`` sections, as ``--base-config``), or the shipped realsr x4 v1 config
(``configs/resshift_realsr_x4/v1.json``, the same sections and values as the official
``realsr_swinunet_realesrgan256.yaml``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import PICKLE_SUFFIXES, ModelFileError, read_pickle, read_safetensors, require_file
from .base import BaseModel

SHIPPED_CONFIG = Path(__file__).parent / "configs" / "resshift_realsr_x4" / "v1.json"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""What ``DistributedDataParallel`` and ``torch.compile`` put before every key; the official ``reload_model`` adds
or strips both."""
UNET_PROBE_KEY = "input_blocks.0.0.weight"
VQ_PROBE_KEY = "quantize.embedding.weight"


# ---------------------------------------------------------------------------------------------------------------
# The lq-conditioned Swin UNet (official models/unet.py: UNetModelSwin)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups computed in float32 whatever the input's dtype (the official ``normalization``)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Its weights are cast with the rest of a half-precision UNet (bf16 on a CPU, fp16 on a GPU; the official
        # keeps them in float32): they join the float32 computation as float32.
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of timestep indices ``(B,)``, cosines first then sines (the official
    ``basic_ops.timestep_embedding``): ``freq_i = exp(-ln(max_period) * i / (dim // 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    """Residual block with timestep FiLM (``use_scale_shift_norm``: ``norm(h) * (1 + scale) + shift``) or addition."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def relative_position_index(window: int) -> torch.Tensor:
    """``(window^2, window^2)`` int64: for tokens i, j of a window (row-major), the row of the bias table that holds
    their relative offset, ``(dy + window - 1) * (2 window - 1) + (dx + window - 1)`` (Swin, Liu et al. 2021, 3.2)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    offset = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return offset[..., 0] * (2 * window - 1) + offset[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * windows, window, window, C)``, windows in row-major order."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: ``(B * windows, window, window, C)`` -> ``(B, C, H, W)``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, height, width)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """The additive attention mask ``(windows, window^2, window^2)`` (0 or -100) of shifted-window attention, as the
    official ``SwinTransformerBlock.calculate_mask`` computes it, quirks included, so released weights see what they
    were trained with:

    * it labels a ``(1, 1, H, W)`` tensor with ``mask[:, h, w, :]``, so the row slices land on the singleton channel
      dimension (only the last, ``-shift:``, is non-empty there) and the column slices on the rows: the three regions
      are the row bands ``[0, H - window)``, ``[H - window, H - shift)``, ``[H - shift, H)``, and columns never differ;
    * it permutes the partitioned labels ``(windows, window, window, 1)`` by ``(0, 2, 3, 1)`` before flattening, so the
      mask's token order is column-major while the attention's is row-major.

    ``mask[n, i, j] = -100`` where tokens i and j of window n carry different labels (``label_j - label_i != 0``).
    """
    labels = torch.zeros(height, width)
    labels[height - window:height - shift] = 1
    labels[height - shift:] = 2
    windows = window_partition(labels[None, None], window)  # (n, window, window, 1)
    flat = windows.permute(0, 2, 3, 1).reshape(-1, window * window)
    difference = flat[:, None, :] - flat[:, :, None]
    return torch.where(difference != 0, -100.0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, with Swin's learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(B * windows, N, C)``; ``mask`` ``(windows, N, N)`` additive, or ``None``."""
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, -1).permute(2, 0, 1).to(q.dtype)  # (heads, N, N)
        if mask is None:
            additive = bias[None]
        else:
            windows = mask.shape[0]
            additive = (bias[None, None] + mask[None, :, None].to(q.dtype)).expand(batch // windows, -1, -1, -1, -1)
            additive = additive.reshape(batch, self.num_heads, tokens, tokens)
        # softmax(q k^T / sqrt(d) + bias + mask) v, the official order of operations up to rounding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and an MLP, each pre-normed with GroupNorm and residual, on ``(B, C, H, W)``.

    A block built for a resolution no larger than its window attends over the whole map, unshifted (official rule).
    The mask for the resolution it was built for is a buffer (``attn_mask``, in the official state dicts); other
    resolutions get theirs computed per call.
    """

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        self.window, self.shift, self.resolution = window, shift, resolution
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = GroupNorm32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = x.shape
        shortcut = x
        x = self.norm1(x)
        mask = None
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(2, 3))
            if (height, width) == (self.resolution, self.resolution):
                mask = self.attn_mask
            else:
                mask = shifted_window_mask(height, width, self.window, self.shift).to(x.device)
        windows = window_partition(x, self.window).reshape(-1, self.window**2, channels)
        attended = self.attn(windows, mask).view(-1, self.window, self.window, channels)
        x = window_reverse(attended, self.window, height, width)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(2, 3))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchProjection(nn.Module):
    """A 1x1 convolution (the official ``PatchEmbed`` / ``PatchUnEmbed`` with patch size 1 and no patch norm)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BasicLayer(nn.Module):
    """``depth`` Swin blocks, every second one shifted by half a window, between 1x1 projections to and from
    ``embed_dim`` channels."""

    def __init__(self, in_channels: int, embed_dim: int, num_heads: int, window: int, depth: int, resolution: int,
                 mlp_ratio: float):
        super().__init__()
        self.patch_embed = PatchProjection(in_channels, embed_dim)
        self.patch_unembed = PatchProjection(embed_dim, in_channels)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(embed_dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to the residual blocks among its layers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


UNET_FIELDS = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
               "channel_mult", "num_head_channels", "use_scale_shift_norm", "swin_depth", "swin_embed_dim",
               "window_size", "mlp_ratio", "lq_size")


class SwinUNet(nn.Module):
    """ResShift's ``UNetModelSwin``: a UNet whose input is the noisy latent concatenated with the low-quality image
    ``lq`` (same size), with Swin layers after the first residual block of each level in ``attention_resolutions``
    and in the middle. It predicts ``x_start`` (for ResShift's schedule; see ``residual_shift.py``).

    Arguments are the official ``model.params`` (``UNET_FIELDS``); ``num_heads = swin_embed_dim // num_head_channels``.
    Only the super-resolution layout is built: ``cond_lq`` with ``lq_size == image_size`` (no feature extractor),
    ``resblock_updown`` off, ``patch_norm`` off, as in every released realsr config.
    """

    def __init__(self, *, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks, attention_resolutions, channel_mult, num_head_channels: int,
                 use_scale_shift_norm: bool, swin_depth: int, swin_embed_dim: int, window_size: int,
                 mlp_ratio: float, lq_size: int):
        super().__init__()
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        self.model_channels = model_channels
        self.config = {"image_size": image_size, "in_channels": in_channels, "out_channels": out_channels}
        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        heads = swin_embed_dim // num_head_channels

        def swin(channels: int, resolution: int) -> BasicLayer:
            return BasicLayer(channels, swin_embed_dim, heads, window_size, swin_depth, resolution, mlp_ratio)

        ch = model_channels * channel_mult[0]
        first = ch
        lq_channels = 3
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels + lq_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        resolution = image_size
        for level, mult in enumerate(channel_mult):
            for block in range(num_res_blocks[level]):
                layers = [ResBlock(ch, time_dim, model_channels * mult, use_scale_shift_norm)]
                ch = model_channels * mult
                if resolution in attention_resolutions and block == 0:
                    layers.append(swin(ch, resolution))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, ch, use_scale_shift_norm), swin(ch, resolution), ResBlock(ch, time_dim, ch, use_scale_shift_norm)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_dim, model_channels * mult, use_scale_shift_norm)]
                ch = model_channels * mult
                if resolution in attention_resolutions and block == 0:
                    layers.append(swin(ch, resolution))
                if level and block == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(first, out_channels, 3, padding=1))
        self.encoder_depth = len(self.input_blocks)
        # The input block that ends each level (its downsampling, or the last level's last residual block): the
        # official only_fea's hs[3], hs[6], hs[9], hs[11] for channel_mult [1, 2, 2, 4] with 2 blocks per level.
        ends, index = [], 0
        for level in range(len(channel_mult)):
            index += num_res_blocks[level] + (level != len(channel_mult) - 1)
            ends.append(index)
        self.level_ends = tuple(ends)

    def _encode(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor):
        """The encoder's pass: ``(timestep embedding, every input block's output, the middle block's output)``."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        h = torch.cat([x, lq.to(x.dtype)], dim=1)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        return emb, skips, self.middle_block(h, emb)

    def encoder_features(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> list[torch.Tensor]:
        """What TAD-SR's time-aware discriminator reads (the official ``forward(..., only_fea=True)``): the output of
        the input block that ends each level (:attr:`level_ends`), then the middle block's. Arguments as
        :meth:`forward`."""
        _, skips, middle = self._encode(x, timesteps, lq)
        return [skips[i] for i in self.level_ends] + [middle]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, h, w)`` (already divided by ``sqrt(eta_t kappa^2 + 1)``), ``timesteps`` ``(B,)`` indices into
        the trained schedule, ``lq`` ``(B, 3, h, w)`` in [-1, 1]; returns the x_start prediction ``(B, C, h, w)``."""
        emb, skips, h = self._encode(x, timesteps, lq)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------------------------------------------
# Configs


def _resolve_interpolations(node, root: dict, depth: int = 0):
    """OmegaConf's ``${a.b.c}`` references (the official YAMLs use them, e.g. ``out_channels:
    ${autoencoder.params.embed_dim}``) replaced by the values they name."""
    if depth > 16:
        raise ValueError("the config's ${...} references nest too deeply")
    if isinstance(node, dict):
        return {k: _resolve_interpolations(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_interpolations(v, root, depth) for v in node]
    if isinstance(node, str):
        match = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", node.strip())
        if match:
            value = root
            for part in match[1].split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"the reference {node!r} names nothing in the config")
                value = value[part]
            return _resolve_interpolations(value, root, depth + 1)
    return node


DIFFUSION_FIELDS = ("sf", "schedule_name", "schedule_kwargs", "etas_end", "steps", "min_noise_level", "kappa",
                    "predict_type", "scale_factor", "normalize_input", "latent_flag")


def _number(section: dict, key: str, where: str, *, low: float, high: float, whole: bool = False):
    value = section.get(key)
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not low <= value <= high:
        what = "a whole number" if whole else "a number"
        raise ValueError(f"{where}.{key} is {value!r}, expected {what} from {low} to {high}")
    return value


def check_resshift_config(config: dict) -> dict:
    """``{"model": ..., "diffusion": ..., "autoencoder": ...}`` (each the official section's ``params``) checked
    field by field; ``ValueError`` names the first field that does not fit."""
    if not isinstance(config, dict):
        raise ValueError(f"expected a mapping with model, diffusion and autoencoder sections, got {type(config).__name__}")
    for part in ("model", "diffusion", "autoencoder"):
        if not isinstance(config.get(part), dict):
            raise ValueError(f"the {part} section is missing or not a mapping")
    model, diffusion, autoencoder = config["model"], config["diffusion"], config["autoencoder"]
    missing = [k for k in UNET_FIELDS if k not in model]
    if missing:
        raise ValueError(f"model.params lacks {missing[0]!r}")
    for key in ("image_size", "model_channels", "swin_embed_dim", "num_head_channels", "lq_size"):
        _number(model, key, "model.params", low=1, high=4096, whole=True)
    for key in ("in_channels", "out_channels"):
        _number(model, key, "model.params", low=1, high=64, whole=True)
    _number(model, "swin_depth", "model.params", low=1, high=32, whole=True)
    _number(model, "window_size", "model.params", low=1, high=64, whole=True)
    _number(model, "mlp_ratio", "model.params", low=0.1, high=64)
    mults = model["channel_mult"]
    if not isinstance(mults, list) or not 1 <= len(mults) <= 8 or not all(isinstance(m, int) and 1 <= m <= 64 for m in mults):
        raise ValueError(f"model.params.channel_mult is {mults!r}, expected a list of 1 to 8 whole numbers")
    blocks = model["num_res_blocks"]
    blocks = [blocks] * len(mults) if isinstance(blocks, int) and not isinstance(blocks, bool) else blocks
    if not isinstance(blocks, list) or len(blocks) != len(mults) or not all(isinstance(b, int) and 0 <= b <= 16 for b in blocks):
        raise ValueError(f"model.params.num_res_blocks is {model['num_res_blocks']!r}, expected one count (0 to 16) per level")
    if not isinstance(model["attention_resolutions"], list):
        raise ValueError("model.params.attention_resolutions must be a list of resolutions")
    if model["swin_embed_dim"] % model["num_head_channels"]:
        raise ValueError("model.params.swin_embed_dim must be a multiple of num_head_channels")
    if any(model["model_channels"] * m % 32 for m in mults) or model["swin_embed_dim"] % 32:
        raise ValueError("model.params channel counts must be multiples of 32 (GroupNorm of 32 groups)")
    if model["lq_size"] != model["image_size"] or not model.get("cond_lq", True) or model.get("cond_mask", False):
        raise ValueError("model.params must describe the super-resolution layout (cond_lq, lq_size == image_size, no mask)")
    if model.get("resblock_updown", False) or model.get("patch_norm", False):
        raise ValueError("model.params.resblock_updown and patch_norm must be off, as in the released realsr configs")
    if diffusion.get("schedule_name") != "exponential":
        raise ValueError(f"diffusion.params.schedule_name is {diffusion.get('schedule_name')!r}, expected 'exponential'")
    if diffusion.get("predict_type") != "xstart":
        raise ValueError(f"diffusion.params.predict_type is {diffusion.get('predict_type')!r}, expected 'xstart'")
    if not diffusion.get("normalize_input", False) or not diffusion.get("latent_flag", False):
        raise ValueError("diffusion.params.normalize_input and latent_flag must be true (latent ResShift)")
    if diffusion.get("timestep_respacing") is not None:
        raise ValueError("diffusion.params.timestep_respacing must be empty; ask for fewer steps with --steps instead")
    _number(diffusion, "steps", "diffusion.params", low=2, high=1000, whole=True)
    _number(diffusion, "sf", "diffusion.params", low=1, high=16, whole=True)
    _number(diffusion, "kappa", "diffusion.params", low=1e-6, high=1e3)
    _number(diffusion, "min_noise_level", "diffusion.params", low=1e-6, high=1.0)
    _number(diffusion, "etas_end", "diffusion.params", low=1e-6, high=1.0)
    _number(diffusion, "scale_factor", "diffusion.params", low=1e-6, high=1e3)
    if not isinstance(diffusion.get("schedule_kwargs"), dict):
        raise ValueError("diffusion.params.schedule_kwargs must hold the power of the exponential schedule")
    _number(diffusion["schedule_kwargs"], "power", "diffusion.params.schedule_kwargs", low=1e-3, high=100)
    dd = autoencoder.get("ddconfig")
    if not isinstance(dd, dict):
        raise ValueError("autoencoder.params.ddconfig is missing")
    for key in ("ch", "z_channels", "out_ch", "in_channels"):
        _number(dd, key, "autoencoder.params.ddconfig", low=1, high=4096, whole=True)
    _number(dd, "num_res_blocks", "autoencoder.params.ddconfig", low=1, high=16, whole=True)
    if not isinstance(dd.get("ch_mult"), list) or not 1 <= len(dd["ch_mult"]) <= 6:
        raise ValueError("autoencoder.params.ddconfig.ch_mult must be a list of 1 to 6 multipliers")
    if dd.get("attn_resolutions"):
        raise ValueError("autoencoder.params.ddconfig.attn_resolutions must be empty, as in the VQ-f4 config")
    if dd.get("double_z", False):
        raise ValueError("autoencoder.params.ddconfig.double_z must be false for a VQ autoencoder")
    _number(autoencoder, "n_embed", "autoencoder.params", low=1, high=1 << 20, whole=True)
    _number(autoencoder, "embed_dim", "autoencoder.params", low=1, high=64, whole=True)
    if autoencoder["embed_dim"] != model["in_channels"] or model["out_channels"] != model["in_channels"]:
        raise ValueError("model.params in_channels and out_channels must equal autoencoder.params.embed_dim")
    return config


def _sections(raw: dict) -> dict:
    """The ``params`` of the official ``model``, ``diffusion`` and ``autoencoder`` sections."""
    sections = {}
    for part in ("model", "diffusion", "autoencoder"):
        section = raw.get(part) if isinstance(raw, dict) else None
        params = section.get("params") if isinstance(section, dict) else None
        if not isinstance(params, dict):
            raise ValueError(f"it has no {part}.params section")
        sections[part] = params
    return sections


def read_resshift_config(path: str | os.PathLike | None = None) -> dict:
    """The ``model``, ``diffusion`` and ``autoencoder`` params of an official ResShift YAML config (or JSON of the same
    shape) at ``path``, or of the shipped realsr x4 v1 config when ``path`` is ``None``; checked by
    :func:`check_resshift_config`. ``ModelFileError`` in one sentence when the file does not fit."""
    source = Path(path) if path is not None else SHIPPED_CONFIG
    what = "an official ResShift YAML config (with model, diffusion and autoencoder sections)"
    require_file(source, what)
    errors: tuple = (OSError, ValueError, TypeError, RecursionError)  # JSON errors are ValueErrors
    if source.suffix == ".json":
        parse = json.loads
    else:
        try:
            import yaml
        except ImportError:
            raise ModelFileError(f"{source} is YAML, and reading it needs PyYAML: pip install pyyaml.") from None
        parse, errors = yaml.safe_load, errors + (yaml.YAMLError,)
    try:
        raw = parse(source.read_text(encoding="utf-8"))
        return check_resshift_config(_sections(_resolve_interpolations(raw, raw)))
    except errors as err:
        detail = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{source} does not fit ({detail}); expected {what}.") from None


def unet_from_config(model: dict) -> SwinUNet:
    return SwinUNet(**{k: model[k] for k in UNET_FIELDS})


# ---------------------------------------------------------------------------------------------------------------
# The VQ-f4 autoencoder (official ldm/models/autoencoder.py: VQModelTorch) as diffusers' VQModel


def vq_diffusers_config(autoencoder: dict, scale_factor: float) -> dict:
    """diffusers ``VQModel`` config for the official ``autoencoder.params`` (``ddconfig``, ``n_embed``, ``embed_dim``)."""
    dd = autoencoder["ddconfig"]
    levels = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "num_vq_embeddings": autoencoder["n_embed"],
        "vq_embed_dim": autoencoder["embed_dim"],
        "norm_num_groups": 32,
        "scaling_factor": scale_factor,
        "sample_size": dd.get("resolution", 256),
    }


def vq_from_config(config: dict):
    from diffusers import VQModel

    return VQModel.from_config(config)


def vq_state_from_ldm(state: dict[str, torch.Tensor], config: dict, source) -> dict[str, torch.Tensor]:
    """The official (LDM layout) VQ state dict in diffusers' ``VQModel`` names. Every key maps to exactly one name,
    so a key that maps to nothing is a key the architecture does not have."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if VQ_PROBE_KEY not in state:
        raise ModelFileError(f"{source} has no {VQ_PROBE_KEY!r}; expected the VQ-f4 autoencoder (autoencoder_vq_f4.pth).")
    converted = convert_ldm_vae_checkpoint(state, config)
    converted["quantize.embedding.weight"] = state[VQ_PROBE_KEY]
    if len(converted) != len(state):
        raise ModelFileError(
            f"{source} holds {len(state) - len(converted)} weights that the VQ autoencoder of this config does not have "
            "(expected autoencoder_vq_f4.pth and its config)."
        )
    return converted


def strip_wrapper_prefixes(state: dict) -> dict:
    """Keys without the ``module.`` / ``_orig_mod.`` prefixes that ``DistributedDataParallel`` and ``torch.compile``
    add (the official ``util_net.reload_model`` accepts both)."""
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        name = name.replace("._orig_mod.", ".")
        out[name] = value
    return out


def unwrap_state_dict(obj, source, what: str) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from what an official ``.pth`` holds: ``{'state_dict': ...}`` (training
    snapshots) or the raw (EMA) state dict, with wrapper prefixes stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelFileError(f"{source} does not hold a state dict of tensors; expected {what}.")
    return strip_wrapper_prefixes(obj)


OFFICIAL_BUFFER_SUFFIXES = (".relative_position_index", ".attn_mask")


def check_official_buffer(key: str, value: torch.Tensor, source) -> bool:
    """Whether ``key`` names one of the buffers an official state dict holds (Swin position indices, shift masks);
    when it does, its value must be what the architecture computes (``ModelFileError`` otherwise)."""
    if not key.endswith(OFFICIAL_BUFFER_SUFFIXES):
        return False
    if key.endswith(".relative_position_index"):
        window = math.isqrt(value.shape[0]) if value.ndim == 2 else 0
        expected = relative_position_index(window) if window else None
    else:
        window = math.isqrt(value.shape[-1]) if value.ndim == 3 else 0
        side = math.isqrt(value.shape[0]) * window
        expected = shifted_window_mask(side, side, window, window // 2) if window > 1 and side else None
    if expected is None or value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
        raise ModelFileError(f"{source} has the buffer {key!r} of shape {tuple(value.shape)}, which is not what a "
                             "ResShift Swin layer computes; expected an official ResShift or TAD-SR UNet.")
    return True


def is_resshift_unet_state(obj) -> bool:
    """Whether an unpickled object is a ResShift / TAD-SR UNet checkpoint (raw or wrapped, any prefixes)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return False
    keys = strip_wrapper_prefixes({k: None for k in obj if isinstance(k, str)})
    return UNET_PROBE_KEY in keys and "middle_block.1.patch_embed.proj.weight" in keys


def read_vq_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The VQ autoencoder's state dict (LDM names) from ``autoencoder_vq_f4.pth`` (weights-only) or a
    ``.safetensors`` copy of it."""
    path = Path(path)
    what = "the ResShift VQ-f4 autoencoder (autoencoder_vq_f4.pth)"
    if path.suffix == ".safetensors":
        state = read_safetensors(path, what)[0]
    elif path.suffix in PICKLE_SUFFIXES:
        state = read_pickle(path, what)
    else:
        raise ModelFileError(f"{path} has an unknown extension; expected {what}.")
    return unwrap_state_dict(state, path, what)


def is_vq_autoencoder_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that holds a ResShift VQ autoencoder (read with the weights-only unpickler)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in PICKLE_SUFFIXES + (".safetensors",):
        return False
    try:
        return VQ_PROBE_KEY in read_vq_state(path)
    except ModelFileError:
        return False


def load_unet_weights(unet: SwinUNet, state: dict[str, torch.Tensor], source, *, with_buffers: bool) -> SwinUNet:
    """``unet`` (built on the meta device or not) given ``state``'s tensors, strictly: the keys must be exactly the
    module's parameters, plus its persistent buffers when ``with_buffers`` (official files hold
    ``relative_position_index`` and ``attn_mask``; ours hold parameters only, the buffers being fixed by the config)."""
    expected = dict(unet.named_parameters())
    if with_buffers:
        expected.update({k: v for k, v in unet.state_dict(keep_vars=True).items() if k not in expected})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelFileError(f"{source} lacks the UNet weight {missing[0]!r} that the ResShift config implies "
                             f"({len(missing)} missing): pass the config it was trained with (--base-config).")
    if unexpected:
        raise ModelFileError(f"{source} has the weight {unexpected[0]!r}, which the UNet of this ResShift config does not have.")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ModelFileError(f"{source} has the UNet weight {key!r} of shape {tuple(state[key].shape)}, but the ResShift "
                                 f"config gives {tuple(value.shape)}: pass the config it was trained with (--base-config).")
    if any(p.is_meta for p in unet.parameters()):
        unet.to_empty(device="cpu")
        _refill_buffers(unet)
    params = dict(unet.named_parameters())
    buffers = dict(unet.named_buffers())
    with torch.no_grad():
        for key in expected:
            target = params.get(key, buffers.get(key))
            target.copy_(state[key].to(target.dtype))
    return unet


def _refill_buffers(unet: SwinUNet) -> None:
    """After ``to_empty``: the position indices and shift masks, computed again from the blocks' settings."""
    for module in unet.modules():
        if isinstance(module, WindowAttention):
            module.relative_position_index = relative_position_index(module.window)
        if isinstance(module, SwinTransformerBlock) and module.attn_mask is not None:
            module.attn_mask = shifted_window_mask(module.resolution, module.resolution, module.window, module.shift)


def build_unet(model_config: dict, state: dict[str, torch.Tensor], source, *, with_buffers: bool) -> SwinUNet:
    """The UNet of ``model_config`` with ``state``'s weights (no random initialisation)."""
    with torch.device("meta"):
        unet = unet_from_config(model_config)
    return load_unet_weights(unet, state, source, with_buffers=with_buffers)


def build_vq(autoencoder_config: dict, scale_factor: float, state: dict[str, torch.Tensor], source, *, ldm_names: bool):
    """The VQ autoencoder with ``state``'s weights: official LDM names (``ldm_names``) or diffusers names (ours)."""
    from .base import build_with_weights

    config = vq_diffusers_config(autoencoder_config, scale_factor)
    if ldm_names:
        state = vq_state_from_ldm(state, config, source)
    return build_with_weights(lambda: vq_from_config(config), state, Path(str(source)), "VQ autoencoder")


def resshift_base(vq, config: dict, source: Path) -> BaseModel:
    """A ResShift base: the VQ autoencoder and the config. The UNet is the checkpoint's (a ResShift model is a whole
    UNet, no adapters), so the denoiser stays a weightless meta-device skeleton until the generator is built."""
    with torch.device("meta"):
        unet = unet_from_config(config["model"])
    return BaseModel(
        family="resshift",
        denoiser=unet.eval().requires_grad_(False),
        vae=vq.eval().requires_grad_(False),
        predict_fn=predict_swin_unet,
        scheduler_config={"prediction_type": "x_start", "num_train_timesteps": config["diffusion"]["steps"],
                          "resshift": config},
        source=source,
    )


def predict_swin_unet(unet: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
    return unet(latents, timestep, lq=conditioning["lq"])


def load_resshift_base(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> BaseModel:
    """The VQ-f4 autoencoder at ``path`` (``autoencoder_vq_f4.pth``) with the ResShift config at ``config_path``
    (official YAML; default: the shipped realsr x4 v1)."""
    path = Path(path)
    config = read_resshift_config(config_path)
    scale = config["diffusion"]["scale_factor"]
    vq = build_vq(config["autoencoder"], scale, read_vq_state(path), path, ldm_names=True)
    return resshift_base(vq, config, path)


def resshift_base_from_embedded(configs: dict, state: dict[str, torch.Tensor], source: Path) -> BaseModel:
    """A ResShift base stored in one of our files: ``configs`` ``{"unet": model params, "vae": autoencoder params,
    "scheduler": diffusion params}``, ``state`` the VQ weights as ``vae.<diffusers name>``."""
    from .base import embedded_part_state

    try:
        config = check_resshift_config({"model": configs.get("unet"), "diffusion": configs.get("scheduler"),
                                        "autoencoder": configs.get("vae")})
    except ValueError as err:
        raise ModelFileError(f"{source} embeds a ResShift config that does not fit ({str(err).rstrip('.')}).") from None
    scale = config["diffusion"]["scale_factor"]
    vq = build_vq(config["autoencoder"], scale, embedded_part_state(state, "vae"), source, ldm_names=False)
    return resshift_base(vq, config, source)


def embedded_configs(config: dict) -> dict:
    """The ResShift config in our files' ``base_configs`` shape."""
    return {"unet": config["model"], "vae": config["autoencoder"], "scheduler": config["diffusion"]}
