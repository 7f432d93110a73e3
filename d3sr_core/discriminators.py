"""Discriminators that judge latents through a pretrained diffusion model.

TAD-SR (reference/methods.md 3.2): a *time-aware* discriminator reads the frozen teacher UNet's encoder features
of noised latents at several depths, modulates each with the timestep (FiLM), and scores every position with
a spectral-norm head; hinge loss.

D3SR (reference/methods.md section 4; DFOSD figure): the down blocks and the mid block of a pretrained diffusion
UNet, tuned with LoRA, followed by a randomly initialised MLP that gives one real/fake logit per latent patch.
It sees *noised* latents ``F(z, t)`` of real and generated images at timesteps ``t`` drawn per sample, so it
judges the sample at every noise level the diffusion prior knows.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from torch.nn.utils import spectral_norm

from .lora import AdapterSpec, add_adapters

TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")

DISCRIMINATOR_LORA_SUFFIXES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
)
"""Layers of the down and mid blocks that get LoRA: attention, feed-forward and ResNet convolutions."""


def sample_timesteps(
    batch: int,
    *,
    t_min: int,
    t_max: int,
    distribution: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(batch,)`` int64 timesteps in ``[t_min, t_max]``.

    ``uniform``: every integer equally likely. ``logit_normal``: ``t_min + sigmoid(n) * (t_max - t_min)``
    rounded, ``n ~ N(0, 1)``, which favours the middle of the range (Esser et al. 2024, sec. 3.1).
    """
    if distribution not in TIMESTEP_DISTRIBUTIONS:
        raise ValueError(f"timestep distribution {distribution!r} is not one of {TIMESTEP_DISTRIBUTIONS}.")
    if not 0 <= t_min <= t_max:
        raise ValueError(f"timestep range [{t_min}, {t_max}] is empty or negative; expected 0 <= t_min <= t_max.")
    if distribution == "uniform":
        t = torch.randint(t_min, t_max + 1, (batch,), generator=generator)
    else:
        u = torch.sigmoid(torch.randn(batch, generator=generator))
        t = (t_min + u * (t_max - t_min)).round().long()
    return t.to(device)


def unet_encoder_features(
    unet: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> list[torch.Tensor]:
    """The outputs of every down block and of the mid block of a ``UNet2DConditionModel`` (or of any module with
    its ``conv_in``, ``time_proj``, ``time_embedding``, ``down_blocks`` and ``mid_block``) for noised ``latents``
    ``(B, C, h, w)`` at ``timesteps`` ``(B,)``; the up blocks are never run."""
    dtype = unet.conv_in.weight.dtype
    temb = unet.time_embedding(unet.time_proj(timesteps).to(dtype))
    hidden = unet.conv_in(latents.to(dtype))
    context = encoder_hidden_states.to(dtype)
    features = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=temb, encoder_hidden_states=context)
        else:
            hidden, _ = block(hidden_states=hidden, temb=temb)
        features.append(hidden)
    if getattr(unet.mid_block, "has_cross_attention", False):
        features.append(unet.mid_block(hidden, temb, encoder_hidden_states=context))
    else:
        features.append(unet.mid_block(hidden, temb))
    return features


def discriminator_lora_targets(unet: nn.Module) -> tuple[str, ...]:
    """Full names of the LoRA-tuned layers of ``unet``'s down and mid blocks (exact names, so peft matches only them)."""
    names = []
    for name, module in unet.named_modules():
        inside = name.startswith("down_blocks.") or name.startswith("mid_block.")
        if inside and isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(DISCRIMINATOR_LORA_SUFFIXES):
            names.append(name)
    return tuple(names)


class PatchHead(nn.Module):
    """A per-position MLP (1x1 convolutions): ``(B, C, h, w)`` features -> ``(B, 1, h, w)`` logits."""

    def __init__(self, in_channels: int, hidden_channels: int, hidden_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(hidden_layers):
            layers += [nn.Conv2d(width, hidden_channels, 1), nn.SiLU()]
            width = hidden_channels
        layers.append(nn.Conv2d(width, 1, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class DiffusionDiscriminator(nn.Module):
    """D3SR's discriminator: a pretrained UNet's encoder half (LoRA-tuned) and an MLP patch head.

    Args:
        unet: a ``UNet2DConditionModel`` to take the blocks from (they are moved into this module; pass a copy
            when the UNet is used elsewhere). SDXL-style added conditioning is not supported.
        lora_rank, lora_alpha: the LoRA adapter ``"discriminator"`` on the down and mid blocks; rank 0 trains none
            of the backbone (head only).
        head_hidden_channels, head_hidden_layers: the patch head's width and depth.

    The backbone's own weights stay frozen; the LoRA weights and the head are what train.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        head_hidden_channels: int = 256,
        head_hidden_layers: int = 2,
    ):
        super().__init__()
        config = unet.config
        if config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
            raise ValueError(
                "the discriminator backbone needs added or class conditioning (an SDXL-style UNet); "
                "expected an SD 1.x/2.x-style UNet2DConditionModel."
            )
        self.config = {"in_channels": config.in_channels, "cross_attention_dim": config.cross_attention_dim}
        targets = discriminator_lora_targets(unet) if lora_rank else ()
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        self.requires_grad_(False)
        self.adapter = None
        if targets:
            self.adapter = AdapterSpec("discriminator", "discriminator", lora_rank, float(lora_alpha or lora_rank), targets)
            add_adapters(self, [self.adapter])
        self.head = PatchHead(config.block_out_channels[-1], head_hidden_channels, head_hidden_layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".lora_" in name or name.startswith("head.")]

    def set_trainable(self, trainable: bool) -> None:
        """Switch the gradients of the LoRA and head parameters (the frozen backbone stays frozen)."""
        for p in self.trainable_parameters():
            p.requires_grad_(trainable)

    def features(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Mid-block features ``(B, C_mid, h / 2^k, w / 2^k)`` of noised ``latents`` ``(B, C, h, w)`` at ``timesteps`` ``(B,)``."""
        return unet_encoder_features(self, latents, timesteps, encoder_hidden_states)[-1]

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B, 1, h / 2^k, w / 2^k)`` (real > 0) for noised latents at ``timesteps``."""
        return self.head(self.features(latents, timesteps, encoder_hidden_states).float())


def _groups(channels: int, most: int = 32) -> int:
    return math.gcd(channels, most)


class TimeAwareHead(nn.Module):
    """One feature level of TAD-SR's discriminator: GroupNorm, FiLM from the timestep embedding
    (``h * (1 + scale) + shift``), SiLU, a zero-initialised 3x3 convolution to ``c_dim``, then per position a
    spectral-norm 1x1 block and a residual spectral-norm kernel-9 block (LeakyReLU 0.2) and a logit."""

    def __init__(self, channels: int, embed_dim: int, c_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * channels))
        self.proj = nn.Conv2d(channels, c_dim, 3, padding=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.block = nn.Sequential(spectral_norm(nn.Conv1d(c_dim, c_dim, 1)), nn.LeakyReLU(0.2))
        self.residual = nn.Sequential(
            spectral_norm(nn.Conv1d(c_dim, c_dim, 9, padding=4)), nn.GroupNorm(_groups(c_dim, 4), c_dim), nn.LeakyReLU(0.2)
        )
        self.logit = spectral_norm(nn.Conv1d(c_dim, 1, 1))

    def forward(self, features: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(temb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = torch.nn.functional.silu(self.norm(features) * (1 + scale) + shift)
        tokens = self.proj(h).flatten(2)  # (B, c_dim, h * w)
        tokens = self.block(tokens)
        return self.logit(tokens + self.residual(tokens)).flatten(1)  # (B, h * w)


class TimeAwareDiscriminator(nn.Module):
    """TAD-SR's discriminator over a frozen teacher's encoder features (``unet_encoder_features``).

    Args:
        feature_channels: channels of each feature level it reads (e.g. every down block's and the mid block's).
        embed_dim: width of the sinusoidal timestep embedding (160 in the official ResShift model).
        c_dim: width of the heads (64 officially).

    ``forward(features, timesteps)`` returns the logits of every position of every level, ``(B, N)``.
    """

    def __init__(self, feature_channels: list[int], embed_dim: int = 160, c_dim: int = 64):
        super().__init__()
        self.embed_dim = embed_dim
        self.heads = nn.ModuleList(TimeAwareHead(c, embed_dim, c_dim) for c in feature_channels)

    def forward(self, features: list[torch.Tensor], timesteps: torch.Tensor) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"the discriminator reads {len(self.heads)} feature levels, got {len(features)}.")
        temb = get_timestep_embedding(timesteps, self.embed_dim).to(features[0].device)
        # UNet blocks can hand out channels-last views; torch 2.13's CPU GroupNorm backward crashes on those.
        return torch.cat([head(f.float().contiguous(), temb) for head, f in zip(self.heads, features)], dim=1)
