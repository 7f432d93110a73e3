"""OSEDiff and TSD-SR training where they follow the official runs: the negative prompt of OSEDiff's training
command, refused guidance that would do nothing, the teacher guided between two different embeddings, the LR
latent drawn from the VAE posterior, and TSD-SR's LPIPS on AlexNet."""

from pathlib import Path

import pytest
import torch

from d3sr_core.perceptual import LPIPSAlex
from tiny_models import tiny_preset_config, write_hr_photos
from training.config import load_config
from training.methods import METHODS
from training.methods.osediff import OSEDIFF_NEGATIVE_PROMPT, OSEDiffMethod, check_guidance


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    return write_hr_photos(tmp_path_factory.mktemp("hr"), 1, (64, 64), seed=2)


@pytest.fixture(scope="module")
def osediff(hr_dir) -> OSEDiffMethod:
    torch.manual_seed(0)
    return OSEDiffMethod(tiny_preset_config("osediff", hr_dir))


def test_osediff_defaults_carry_the_official_negative_prompt_and_sample_the_posterior():
    config = load_config(overrides=["method=osediff"], method_defaults=METHODS["osediff"].defaults, other_sections=tuple(METHODS))
    assert config["model"]["negative_prompt"] == OSEDIFF_NEGATIVE_PROMPT
    assert OSEDIFF_NEGATIVE_PROMPT.startswith("painting, oil painting, illustration") and OSEDIFF_NEGATIVE_PROMPT.endswith("over-smooth")
    assert config["osediff"]["cfg_scale"] == 7.5 and config["osediff"]["vae_sample"] == "sample"
    assert "model" not in config["osediff"]
    # A run's own setting still wins over the method's default.
    mine = load_config(overrides=["method=osediff", "model.negative_prompt=blurry"],
                       method_defaults=METHODS["osediff"].defaults, other_sections=tuple(METHODS))
    assert mine["model"]["negative_prompt"] == "blurry"
    # Other methods keep the plain default.
    d3sr = load_config(overrides=["method=d3sr"], method_defaults=METHODS["d3sr"].defaults, other_sections=tuple(METHODS))
    assert d3sr["model"]["negative_prompt"] == ""
    tsdsr = load_config(overrides=["method=tsdsr"], method_defaults=METHODS["tsdsr"].defaults, other_sections=tuple(METHODS))
    assert tsdsr["tsdsr"]["vae_sample"] == "sample"


@pytest.mark.parametrize("method", ["osediff", "tsdsr"])
def test_guidance_that_would_change_nothing_is_refused_in_one_sentence(hr_dir, method):
    # The tiny base has no text encoder: prompt and negative prompt are the same zero embeddings.
    with pytest.raises(ValueError) as err:
        METHODS[method](tiny_preset_config(method, hr_dir, f"{method}.cfg_scale=7.5"))
    message = str(err.value)
    assert message.startswith(f"{method}.cfg_scale is 7.5 but the prompt and the negative prompt give identical embeddings")
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message


def test_check_guidance_accepts_different_embeddings_and_a_scale_of_one():
    cond = {"prompt_embeds": torch.ones(1, 2, 3)}
    check_guidance("osediff", 7.5, cond, {"prompt_embeds": torch.zeros(1, 2, 3)})
    check_guidance("osediff", 1.0, cond, {"prompt_embeds": torch.ones(1, 2, 3)})
    with pytest.raises(ValueError):
        check_guidance("osediff", 2.0, cond, {"prompt_embeds": torch.ones(1, 2, 3)})


def test_guided_teacher_with_two_different_embeddings_equals_cfg_by_hand(osediff, monkeypatch):
    g = torch.Generator().manual_seed(5)
    width = osediff.frozen_denoiser.config.cross_attention_dim
    prompt, negative = torch.randn(1, 3, width, generator=g), torch.randn(1, 3, width, generator=g)
    monkeypatch.setattr(osediff, "conditioning", {"prompt_embeds": prompt})
    monkeypatch.setattr(osediff, "null_conditioning", {"prompt_embeds": negative})
    monkeypatch.setitem(osediff.options, "cfg_scale", 7.5)
    z_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        guided = osediff.guided_teacher_epsilon(z_t, t)
        # By hand: two separate UNet calls, the guidance formula in float64.
        unet = osediff.frozen_denoiser
        eps_c = unet(z_t, t, prompt.expand(2, -1, -1)).sample.double()
        eps_u = unet(z_t, t, negative.expand(2, -1, -1)).sample.double()
    expected = eps_u + 7.5 * (eps_c - eps_u)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the two embeddings give two predictions
    torch.testing.assert_close(guided.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert (guided.double() - eps_c).abs().max() > 1e-2  # guidance moved the prediction


def test_the_lr_latent_is_drawn_from_the_posterior_with_the_step_generator(osediff):
    assert osediff.vae_sample is True
    module = osediff.generator
    g = torch.Generator().manual_seed(7)
    lq = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z_hat, _ = module(lq, sample=True, generator=torch.Generator().manual_seed(9))
        z_again, _ = module(lq, sample=True, generator=torch.Generator().manual_seed(9))
        z_mode, _ = module(lq)
        # By hand: mean + exp(logvar / 2) * noise, the log-variance clamped to [-30, 20] (LDM's posterior).
        mean, logvar = module.generator.encode_moments(lq).float().chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9))
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * module.generator.latent_scaling_factor
        expected = module.generator.x0(latents, module.generator.predict(latents))
    torch.testing.assert_close(z_hat, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(z_hat, z_again)
    assert (z_hat - z_mode).abs().max() > 1e-4


def test_tsdsr_trains_with_lpips_on_alexnet(hr_dir):
    method = METHODS["tsdsr"](tiny_preset_config("tsdsr", hr_dir))
    assert type(method.lpips) is LPIPSAlex and method.vae_sample is True
