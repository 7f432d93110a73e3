"""Latent tiling: the Gaussian window, tile placement, the tiled-vs-untiled difference, and seams."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import d3sr_core.tiling as tiling
from d3sr_core.generator import OneStepGenerator, alphas_cumprod_from_config
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler
from tiny_models import random_image, tiny_vae

SD21 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def test_gaussian_weights_hand_values():
    w = tiling.gaussian_tile_weights(4, 3)
    # x: midpoint (3-1)/2 = 1; y: midpoint 4/2 = 2 (the official asymmetry); var 0.01.
    def g(u, mid, length):
        return math.exp(-((u - mid) ** 2) / (length * length) / 0.02) / math.sqrt(2 * math.pi * 0.01)

    expected = np.array([[g(y, 2, 4) * g(x, 1, 3) for x in range(3)] for y in range(4)])
    assert np.allclose(w.numpy(), expected, rtol=1e-12)
    assert w.argmax().item() == 2 * 3 + 1


@pytest.mark.parametrize(
    "size, tile, overlap, starts",
    [(10, 16, 4, [0]), (16, 16, 4, [0]), (20, 8, 2, [0, 6, 12]), (40, 16, 4, [0, 12, 24]), (17, 8, 0, [0, 8, 9])],
)
def test_tile_starts_cover_and_snap_to_the_end(size, tile, overlap, starts):
    assert tiling.overlapping_tile_starts(size, tile, overlap) == starts


ALPHA_BAR_999 = alphas_cumprod_from_config(SD21)[999].item()
IDENTITY_GAIN = (1 - math.sqrt(ALPHA_BAR_999)) / math.sqrt(1 - ALPHA_BAR_999)
"""eps = IDENTITY_GAIN * z makes the one step return x0 = z exactly."""


class LocalDenoiser(torch.nn.Module):
    """``eps = IDENTITY_GAIN * box5x5(z)`` with zero padding: on smooth latents x0 is close to z, each output sees
    2 latent pixels around it, and the pixels at a tile's edge see zeros instead of their neighbours, a strong
    artefact (x0 off by several times z there) that the blending must hide."""

    radius = 2

    def __init__(self):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.full((4, 1, 5, 5), IDENTITY_GAIN / 25))

    def forward(self, latents):
        return F.conv2d(latents, self.kernel, padding=2, groups=4)


def local_generator() -> OneStepGenerator:
    return OneStepGenerator(
        tiny_vae(),
        LocalDenoiser().requires_grad_(False),
        lambda denoiser, z, t, cond: denoiser(z),
        prediction_type="epsilon",
        timestep=999,
        alphas_cumprod=alphas_cumprod_from_config(SD21),
        clip_sample_range=None,
        latent_scaling_factor=0.18215,
        conditioning={},
    )


def test_blend_is_exact_away_from_tile_edges_and_convex_near_them():
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 12, 40)
    denoiser = LocalDenoiser()
    untiled = denoiser(latents)
    tiled = tiling.gaussian_blend_predictions(denoiser, latents, 16, 4, tile_batch_size=2)
    starts = tiling.overlapping_tile_starts(40, 16, 4)
    near_edge = torch.zeros(40, dtype=torch.bool)
    worst = torch.zeros(40)
    for s in starts:
        tile_error = (denoiser(latents[..., s : s + 16]) - untiled[..., s : s + 16]).abs().amax(dim=(0, 1, 2))
        worst[s : s + 16] = torch.maximum(worst[s : s + 16], tile_error)
        for edge in (s, s + 16):
            if 0 < edge < 40:
                near_edge[max(0, edge - LocalDenoiser.radius) : edge + LocalDenoiser.radius] = True
    error = (tiled - untiled).abs().amax(dim=(0, 1, 2))
    # Where every covering tile sees the whole 5x5 neighbourhood, each tile predicts exactly the untiled value.
    assert error[~near_edge].max().item() < 1e-6
    # Elsewhere the result is a convex combination of the tiles' predictions.
    assert (error <= worst + 1e-6).all()
    assert error[near_edge].max().item() > 0


def column_gradient(image: torch.Tensor) -> torch.Tensor:
    """Mean absolute step between neighbouring columns: ``(W - 1,)``; entry ``c`` is the step from ``c`` to ``c + 1``."""
    return (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))


def border_and_elsewhere(gradient: torch.Tensor, edges: list[int], reach: int) -> tuple[float, float]:
    """Mean column gradient within ``reach`` columns of the tile edges, and everywhere else."""
    near = torch.zeros_like(gradient, dtype=torch.bool)
    for e in edges:
        near[max(0, e - reach) : e + reach] = True
    return gradient[near].mean().item(), gradient[~near].mean().item()


def inner_tile_edges(size: int, tile: int, overlap: int) -> list[int]:
    starts = tiling.overlapping_tile_starts(size, tile, overlap)
    return sorted({s for s in starts if s > 0} | {s + tile for s in starts if s + tile < size})


OPTIONS = dict(scale=1, min_process_side=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0, color_fix="none")


def test_three_tiles_wide_close_to_untiled():
    image = random_image(96, 256, seed=4)  # latents 12 x 32: tiles of 16 with overlap 8 start at 0, 8, 16
    upscaler = Upscaler(local_generator(), dtype="fp32")
    untiled = upscaler.upscale(image, UpscaleOptions(tile_size=0, **OPTIONS))
    tiled = upscaler.upscale(image, UpscaleOptions(tile_size=16, tile_overlap=8, **OPTIONS))
    # Why this bound: a tile's prediction is wrong only within 2 latent pixels of its inner edges (x0 off by up to
    # ~5 z there). At those pixels its Gaussian weight is at most exp(-(6.5/16)^2 / 0.02) = 2.6e-4 while the
    # neighbouring tile, whose centre is 6 pixels away, weighs at least exp(-(1.5/16)^2 / 0.02) = 0.64, so x0 moves
    # by under 1e-3 of the edge error. Measured: mean 3e-6, max 5e-5 (image range [0, 1]).
    difference = (tiled - untiled).abs()
    assert difference.mean().item() < 1e-4
    assert difference.max().item() < 1e-3


@pytest.mark.parametrize("window, seams", [("gaussian", False), ("flat", True)])
def test_no_seams_at_tile_borders(monkeypatch, window, seams):
    """The x0 of smooth latents three tiles wide: its gradient across tile borders is no higher than elsewhere.
    The flat window (plain averaging of overlaps) is the control that shows the check can fail."""
    if window == "flat":
        monkeypatch.setattr(tiling, "gaussian_tile_weights", lambda h, w: torch.ones(h, w, dtype=torch.float64))
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(32.0), indexing="ij")
    phases = torch.tensor([0.0, 1.0, 2.0, 3.0])[:, None, None]
    latents = torch.sin(2 * math.pi * (cols / 80 + rows / 60) + phases)[None]  # smooth: x0 stays close to z
    x0 = local_generator().denoise(latents, tile_size=16, tile_overlap=8)
    # Rows and columns within 2 of the image's own border see zero padding in every run; leave them out.
    gradient = column_gradient(x0[..., 2:-2, :])[2:-2]
    edges = [e - 2 for e in inner_tile_edges(32, 16, 8)]
    at_border, elsewhere = border_and_elsewhere(gradient, edges, reach=2)
    if seams:
        assert at_border > 2 * elsewhere
    else:
        assert at_border <= elsewhere
