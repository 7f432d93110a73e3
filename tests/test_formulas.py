"""The one-step formulas against hand-computed float64 values and against diffusers' own scheduler."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from d3sr_core.backbones.sd2 import SHIPPED_CONFIG_DIR
from d3sr_core.generator import alphas_cumprod_from_config, x0_from_epsilon, x0_from_flow_velocity, x0_from_v
from d3sr_core.options import UpscaleOptions

SD21 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def test_alpha_bar_999_of_sd21_matches_the_hand_value():
    # methods.md 1.1: alpha_bar_999 ~ 0.00466, sqrt = 0.0683, sqrt(1 - alpha_bar) = 0.99767.
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    alpha_bar = math.prod(1 - b for b in betas)
    ours = alphas_cumprod_from_config(SD21)[999].item()
    assert ours == pytest.approx(alpha_bar, rel=1e-5)
    assert math.sqrt(ours) == pytest.approx(0.0683, abs=1e-4)
    assert math.sqrt(1 - ours) == pytest.approx(0.99767, abs=1e-5)


def test_x0_from_epsilon_small_case():
    z, eps, ab = torch.tensor([0.3, -1.2]), torch.tensor([0.5, 2.0]), torch.tensor(0.25)
    # (z - sqrt(0.75) eps) / 0.5
    expected = [(0.3 - math.sqrt(0.75) * 0.5) / 0.5, (-1.2 - math.sqrt(0.75) * 2.0) / 0.5]
    assert x0_from_epsilon(z, eps, ab).tolist() == pytest.approx(expected, rel=1e-6)


def test_x0_from_epsilon_is_bit_equal_to_ddpm_step_at_999():
    """OSEDiff calls DDPMScheduler.step(eps, 999, z) after set_timesteps(1), which (in the diffusers it pins) makes
    the previous timestep -1, whose alpha_bar is 1, so the step returns x0. Current diffusers gets there through
    a one-element custom schedule."""
    with open(SHIPPED_CONFIG_DIR / "scheduler.json") as f:
        import json

        config = json.load(f)
    scheduler = DDPMScheduler.from_config(config)
    scheduler.set_timesteps(timesteps=[999])
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    stepped = scheduler.step(eps, 999, z, generator=torch.Generator().manual_seed(1)).prev_sample
    ours = x0_from_epsilon(z, eps, alphas_cumprod_from_config(config)[999])
    # step adds variance noise of std 1e-10 at t > 0; nothing else differs.
    assert (stepped - ours).abs().max().item() < 1e-8
    assert torch.equal(alphas_cumprod_from_config(config), scheduler.alphas_cumprod)


def test_x0_from_v_inverts_the_forward_process(device):
    gen = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(3, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    ab = torch.tensor(0.3, dtype=torch.float64, device=device)
    z_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # Salimans & Ho, sec. 4
    assert torch.allclose(x0_from_v(z_t, v, ab), x0)
    assert torch.allclose(x0_from_epsilon(z_t, noise, ab), x0)


def test_x0_from_flow_velocity_inverts_the_flow_path(device):
    x0 = torch.tensor([0.2, -0.7], dtype=torch.float64, device=device)
    noise = torch.tensor([1.1, 0.4], dtype=torch.float64, device=device)
    for sigma in (1.0, 0.35):
        z = (1 - sigma) * x0 + sigma * noise
        assert torch.allclose(x0_from_flow_velocity(z, noise - x0, sigma), x0)


def test_options_refuse_bad_values_with_one_sentence():
    with pytest.raises(ValueError, match=r"color_fix='sepia' is not allowed; expected one of"):
        UpscaleOptions(color_fix="sepia")
    with pytest.raises(ValueError, match="tile_overlap"):
        UpscaleOptions(tile_size=16, tile_overlap=16)
