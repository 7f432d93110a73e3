"""Latent tiling: the Gaussian window, tile placement, the tiled-vs-untiled difference, and seams."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import d3sr_core.tiling as tiling
from bounds import RELATIVE_REORDER
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


def test_three_tiles_wide_close_to_untiled(device):
    image = random_image(96, 256, seed=4)  # latents 12 x 32: tiles of 16 with overlap 8 start at 0, 8, 16
    upscaler = Upscaler(local_generator(), dtype="fp32", device=device)
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


# The official tiling rule (OSEDiff_test.forward, TSD-SR's tile_sample), against a loop written the way those
# scripts write it: grid counts from a while loop, offsets row * tile - overlap * row, the last row and column
# snapped to the end, square Gaussian weights, predictions averaged by the weights.


def official_latent_blend(predict, latents: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    _, _, h, w = latents.shape
    if h * w <= tile * tile:
        return predict(latents).double()
    tile = min(tile, min(h, w))
    var = 0.01
    x_probs = [math.exp(-(x - (tile - 1) / 2) ** 2 / (tile * tile) / (2 * var)) / math.sqrt(2 * math.pi * var) for x in range(tile)]
    y_probs = [math.exp(-(y - tile / 2) ** 2 / (tile * tile) / (2 * var)) / math.sqrt(2 * math.pi * var) for y in range(tile)]
    weights = torch.tensor(np.outer(y_probs, x_probs))
    grid_x, cur = 0, 0
    while cur < w:
        cur = max(grid_x * tile - overlap * grid_x, 0) + tile
        grid_x += 1
    grid_y, cur = 0, 0
    while cur < h:
        cur = max(grid_y * tile - overlap * grid_y, 0) + tile
        grid_y += 1
    total = torch.zeros(latents.shape, dtype=torch.float64)
    contributors = torch.zeros(latents.shape, dtype=torch.float64)
    for gx in range(grid_x):
        for gy in range(grid_y):
            ofs_x = w - tile if gx == grid_x - 1 else max(gx * tile - overlap * gx, 0)
            ofs_y = h - tile if gy == grid_y - 1 else max(gy * tile - overlap * gy, 0)
            window = (slice(None), slice(None), slice(ofs_y, ofs_y + tile), slice(ofs_x, ofs_x + tile))
            total[window] += predict(latents[window]).double() * weights
            contributors[window] += weights
    return total / contributors


@pytest.mark.parametrize(
    "height, width, tile, area, side",
    [
        (64, 128, 96, None, (64, 96)),  # a 512 x 1024 output: untiled officially, tiled by the side rule
        (48, 100, 64, (48, 48), (48, 64)),  # TSD-SR's 48 x 100 latents: square tiles of the short side
        (100, 48, 64, (48, 48), (64, 48)),
        (96, 96, 96, None, None),
        (97, 96, 96, (96, 96), (96, 96)),
        (200, 300, 96, (96, 96), (96, 96)),
    ],
)
def test_tile_rules_decide_when_to_tile_and_the_tile_shape(height, width, tile, area, side):
    assert tiling.latent_tile_shape(height, width, tile, "area") == area
    assert tiling.latent_tile_shape(height, width, tile, "side") == side
    with pytest.raises(ValueError, match="tile rule 'square' is not one of"):
        tiling.latent_tile_shape(height, width, tile, "square")


@pytest.mark.parametrize("height, width, tile, overlap", [(12, 25, 8, 2), (25, 12, 8, 2), (9, 40, 16, 4), (8, 8, 8, 2), (6, 11, 8, 2)])
def test_area_rule_equals_the_official_loop_on_non_square_latents(height, width, tile, overlap):
    torch.manual_seed(height * 100 + width)
    latents = torch.randn(1, 4, height, width)
    generator = local_generator()
    official = official_latent_blend(generator.denoiser, latents, tile, overlap)
    x0 = generator.denoise(latents, tile_size=tile, tile_overlap=overlap, tile_rule="area")
    expected = generator.x0(latents, official.float())
    torch.testing.assert_close(x0, expected, rtol=0, atol=RELATIVE_REORDER * expected.abs().max().item())
    # The check can fail: the side rule tiles these latents otherwise (rectangular tiles, or tiles at all).
    if tiling.latent_tile_shape(height, width, tile, "side") != tiling.latent_tile_shape(height, width, tile, "area"):
        side = generator.denoise(latents, tile_size=tile, tile_overlap=overlap, tile_rule="side")
        assert (side - expected).abs().max() > 1e-3


def test_presets_tile_as_the_official_scripts_and_a_512_by_1024_output_runs_untiled():
    from d3sr_core.options import PRESETS

    generator = local_generator()
    osediff, tsdsr = PRESETS["osediff"], PRESETS["tsdsr"]
    assert (osediff.tile_rule, tsdsr.tile_rule, UpscaleOptions().tile_rule) == ("area", "area", "side")
    # 512 x 1024 px is 64 x 128 latents: 8192 <= 96^2 = 9216, so one denoiser call with OSEDiff's tile of 96.
    assert generator.denoise_progress_steps(64, 128, osediff.tile_size, osediff.tile_overlap, osediff.tile_rule) == 1
    assert generator.denoise_progress_steps(64, 128, osediff.tile_size, osediff.tile_overlap, "side") == 2
    # 48 x 100 TSD-SR latents: 48 x 48 tiles at stride 40 -> starts 0, 40, 52 across, one row.
    assert generator._latent_tiling(48, 100, tsdsr.tile_size, tsdsr.tile_overlap, tsdsr.tile_rule) == ((48, 48), 8)
    assert generator.denoise_progress_steps(48, 100, tsdsr.tile_size, tsdsr.tile_overlap, tsdsr.tile_rule) == 3


def test_tsdsr_preset_runs_the_vae_untiled_and_falls_back_to_tiles_when_memory_runs_out():
    from d3sr_core.options import PRESETS, halved_tiles

    tsdsr = PRESETS["tsdsr"]
    assert (tsdsr.vae_encoder_tile_size, tsdsr.vae_decoder_tile_size) == (0, 0)  # test_tsdsr.py: --is_use_tile False
    retry = halved_tiles(tsdsr)
    assert retry.vae_encoder_tile_size > 0 and retry.vae_decoder_tile_size > 0
