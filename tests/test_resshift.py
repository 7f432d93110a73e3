"""ResShift / TAD-SR parity on tiny models in the official layouts (reference/methods.md 3.1).

Each formula is checked against a reference written here from the paper's and the official code's definitions, not
from the code under test: the eta schedule in closed form, q_sample, the x_start -> eps conversion, one p_sample and a
whole 4-step loop (official ``p_sample_loop`` with ``space_timesteps`` respacing, noise drawn as the official sampler
draws it), the VQ autoencoder as a functional LDM encoder / decoder over the official-named state dict, and the
strict load of files written under the official key names (``tiny_resshift.py`` enumerates them).

Bound: ``PARITY = 1e-5``. The reference and the code feed the same UNet; they differ only in float32 rounding of a few
elementwise operations per step on latents of magnitude below 8 (unit roundoff 6e-8, so ~5e-7 per step), which the
tiny network amplifies by its Lipschitz constant (measured below 10) over 4 steps: a few 1e-6 at most, under 1e-5.
The bugs guarded against (a wrong eta, a step's timestep off by one, noise in the wrong order, a lost
normalisation) move latents by 1e-2 or more.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from d3sr_core.backbones.resshift import (
    read_resshift_config,
    relative_position_index,
    shifted_window_mask,
)
from d3sr_core.files import ModelFileError
from d3sr_core.residual_shift import (
    epsilon_from_x_start,
    posterior_log_variance,
    posterior_mean,
    q_sample,
    respaced_timesteps,
    schedule_from_config,
    sqrt_eta_schedule,
)
from d3sr_core.resshift_pipeline import chop_starts, reflect_pad
from tiny_resshift import official_shift_mask, write_official_files

PARITY = 1e-5
MATTERS = 1e-2


def v1_diffusion() -> dict:
    return read_resshift_config()["diffusion"]


def reference_sqrt_etas(steps, min_noise, etas_end, kappa, power) -> torch.Tensor:
    """ResShift's schedule in closed form: sqrt(eta_t) = s (e / s)^((t / (T - 1))^p), s = min(m / kappa, m)."""
    start = min(min_noise / kappa, min_noise)
    return torch.tensor([start * (etas_end / start) ** ((t / (steps - 1)) ** power) for t in range(steps)],
                        dtype=torch.float64)


def test_eta_schedule_matches_the_closed_form_and_the_realsr_v1_endpoints():
    d = v1_diffusion()
    ours = sqrt_eta_schedule(d["steps"], d["min_noise_level"], d["etas_end"], d["kappa"], d["schedule_kwargs"]["power"])
    reference = reference_sqrt_etas(15, 0.04, 0.99, 2.0, 0.3)
    assert ours.dtype == torch.float64 and ours.shape == (15,)
    assert (ours - reference).abs().max().item() < 1e-12  # both float64
    assert ours[0].item() == pytest.approx(0.02) and ours[-1].item() == pytest.approx(0.99)  # min_noise / kappa, etas_end
    assert (ours[1:] > ours[:-1]).all()
    # The journal (v3) config: 4 steps, min_noise_level 0.2 -> start 0.1.
    v3 = sqrt_eta_schedule(4, 0.2, 0.99, 2.0, 0.3)
    assert (v3 - reference_sqrt_etas(4, 0.2, 0.99, 2.0, 0.3)).abs().max().item() < 1e-12


def test_respacing_visits_the_official_space_timesteps():
    assert respaced_timesteps(15, 4) == [0, 3, 7, 11]  # TAD-SR's --infer_steps 4 of 15: t = 11, 7, 3, 0
    assert respaced_timesteps(15, 15) == list(range(15))
    assert respaced_timesteps(15, 1) == [0]
    schedule = schedule_from_config(v1_diffusion(), 4)
    full = reference_sqrt_etas(15, 0.04, 0.99, 2.0, 0.3)
    assert schedule.timesteps == (0, 3, 7, 11)
    assert torch.allclose(schedule.sqrt_etas, full[[0, 3, 7, 11]], atol=1e-12)
    # eta_{t-1} of a respaced entry is the previous visited entry's eta
    assert torch.allclose(schedule.etas_prev, torch.cat([torch.zeros(1, dtype=torch.float64), full[[0, 3, 7]] ** 2]))


def test_q_sample_and_the_x_start_to_eps_conversion_match_the_reference():
    gen = torch.Generator().manual_seed(3)
    x0, y, noise = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3))
    full = reference_sqrt_etas(15, 0.04, 0.99, 2.0, 0.3)
    for t in (0, 7, 14):
        sqrt_eta, kappa = full[t].item(), 2.0
        eta = sqrt_eta**2
        reference = x0.double() + eta * (y.double() - x0.double()) + kappa * sqrt_eta * noise.double()
        x_t = q_sample(x0, y, torch.tensor(eta, dtype=torch.float32), torch.tensor(sqrt_eta, dtype=torch.float32), kappa, noise)
        assert (x_t.double() - reference).abs().max().item() < PARITY
        # eps = (x_t - (x0 + eta (y - x0))) / (kappa sqrt(eta)), TAD-SR HSD's form of the same conversion
        eps_reference = (reference - (x0.double() + eta * (y.double() - x0.double()))) / (kappa * sqrt_eta)
        eps = epsilon_from_x_start(x_t, y, x0, torch.tensor(eta), torch.tensor(sqrt_eta), kappa)
        # dividing by kappa sqrt(eta) (0.04 at t = 0) scales x_t's rounding up by 25
        assert (eps.double() - eps_reference).abs().max().item() < PARITY / (kappa * sqrt_eta)
        assert (eps - noise).abs().max().item() < PARITY / (kappa * sqrt_eta)


def test_posterior_matches_the_reference_and_the_first_entry_returns_x_start():
    schedule = schedule_from_config(v1_diffusion())
    etas = reference_sqrt_etas(15, 0.04, 0.99, 2.0, 0.3) ** 2
    gen = torch.Generator().manual_seed(4)
    x_t, x0 = torch.randn(1, 3, 8, 8, generator=gen), torch.randn(1, 3, 8, 8, generator=gen)
    for t in (1, 7, 14):
        reference = etas[t - 1] / etas[t] * x_t.double() + (etas[t] - etas[t - 1]) / etas[t] * x0.double()
        mean = posterior_mean(x_t, x0, schedule.etas[t], schedule.etas_prev[t])
        assert (mean.double() - reference).abs().max().item() < PARITY
        variance = 4.0 * etas[t - 1] / etas[t] * (etas[t] - etas[t - 1])
        assert posterior_log_variance(schedule)[t].item() == pytest.approx(math.log(variance), rel=1e-12)
    assert torch.equal(posterior_mean(x_t, x0, schedule.etas[0], schedule.etas_prev[0]), x0)
    assert posterior_log_variance(schedule)[0] == posterior_log_variance(schedule)[1]  # the official clipping


def test_shifted_window_mask_reproduces_the_official_computation_with_its_quirks():
    for side, window in ((8, 4), (16, 4), (8, 2)):
        ours = shifted_window_mask(side, side, window, window // 2)
        assert torch.equal(ours, official_shift_mask(side, window, window // 2))
    # The quirk is real: columns never split a window, so a mask with column bands would differ.
    assert shifted_window_mask(8, 8, 4, 2).ne(0).any()
    index = relative_position_index(3)
    assert index.shape == (9, 9) and index[0, 0] == 12 and index[0, 8] == 0 and index[8, 0] == 24


def test_chop_starts_and_reflect_padding_as_officially():
    assert chop_starts(600, 512, 448) == [0, 88]
    assert chop_starts(1000, 512, 448) == [0, 448, 488]
    assert chop_starts(512, 512, 448) == [0]
    assert chop_starts(300, 256, 224) == [0, 44]
    image = torch.rand(1, 3, 40, 70)
    assert torch.equal(reflect_pad(image, 64), F.pad(image, (0, 58, 0, 24), mode="reflect"))
    tiny = reflect_pad(torch.rand(1, 3, 5, 7), 16)  # F.pad alone refuses a pad longer than the side
    assert tiny.shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# The tiny model in the official layout, and a reference of the official sampler


def _group_norm(x, state, name):
    return F.group_norm(x, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)


def _conv(x, state, name, **kwargs):
    return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], **kwargs)


def _resnet(x, state, name):
    h = _conv(F.silu(_group_norm(x, state, f"{name}.norm1")), state, f"{name}.conv1", padding=1)
    h = _conv(F.silu(_group_norm(h, state, f"{name}.norm2")), state, f"{name}.conv2", padding=1)
    shortcut = _conv(x, state, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in state else x
    return shortcut + h


def _attention(x, state, name):
    h = _group_norm(x, state, f"{name}.norm")
    q, k, v = (_conv(h, state, f"{name}.{p}") for p in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    weights = torch.softmax(q.reshape(b, c, -1).transpose(1, 2) @ k.reshape(b, c, -1) / math.sqrt(c), dim=2)
    out = (v.reshape(b, c, -1) @ weights.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + _conv(out, state, f"{name}.proj_out")


def _middle(h, state, prefix):
    h = _resnet(h, state, f"{prefix}.mid.block_1")
    return _resnet(_attention(h, state, f"{prefix}.mid.attn_1"), state, f"{prefix}.mid.block_2")


def reference_vq_encode(image, state, levels=3, blocks=1):
    """LDM ``Encoder`` + ``quant_conv`` (official ldm/modules/diffusionmodules/model.py) over the official state."""
    h = _conv(image, state, "encoder.conv_in", padding=1)
    for i in range(levels):
        for j in range(blocks):
            h = _resnet(h, state, f"encoder.down.{i}.block.{j}")
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), state, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _middle(h, state, "encoder")
    h = _conv(F.silu(_group_norm(h, state, "encoder.norm_out")), state, "encoder.conv_out", padding=1)
    return _conv(h, state, "quant_conv")


def reference_vq_decode(z, state, levels=3, blocks=1):
    """``VectorQuantizer2`` (nearest code by squared distance) + ``post_quant_conv`` + LDM ``Decoder``."""
    codes = state["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    nearest = ((flat[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1)
    quantized = codes[nearest].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    h = _conv(_conv(quantized, state, "post_quant_conv"), state, "decoder.conv_in", padding=1)
    h = _middle(h, state, "decoder")
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = _resnet(h, state, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), state, f"decoder.up.{i}.upsample.conv", padding=1)
    return _conv(F.silu(_group_norm(h, state, "decoder.norm_out")), state, "decoder.conv_out", padding=1)


def reference_p_sample_loop(unet, vq_state, lq, used, seed, kappa=2.0, sf=4):
    """The official ``p_sample_loop`` of a ``SpacedDiffusion`` keeping the trained timesteps ``used`` (ascending) of
    the 15-step realsr schedule: float64 tables, cast to float32 where they meet tensors; noise from
    ``torch.manual_seed(seed)``, ``randn_like(z_y)`` for the prior, then one ``randn_like`` per ``p_sample``.
    Returns ``(final latents, the x_0 of the last network call)``."""
    etas = (reference_sqrt_etas(15, 0.04, 0.99, kappa, 0.3) ** 2)[used]
    etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), etas[:-1]])
    variance = kappa**2 * etas_prev / etas * (etas - etas_prev)
    log_variance = torch.log(torch.cat([variance[1:2], variance[1:]])) if len(used) > 1 else torch.log(variance)
    z_y = reference_vq_encode(F.interpolate(lq, scale_factor=sf, mode="bicubic"), vq_state)
    torch.manual_seed(seed)
    x = z_y + kappa * torch.sqrt(etas[-1]).float() * torch.randn_like(z_y)
    for i in reversed(range(len(used))):
        t = torch.tensor([used[i]])
        x0 = unet(x / torch.sqrt(etas[i].float() * kappa**2 + 1), t, lq=lq)
        mean = (etas_prev[i] / etas[i]).float() * x + ((etas[i] - etas_prev[i]) / etas[i]).float() * x0
        noise = torch.randn_like(x)
        x = mean + (1.0 if i != 0 else 0.0) * torch.exp(0.5 * log_variance[i].float()) * noise
    return x, x0


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_official_files(tmp_path_factory.mktemp("resshift"))


@pytest.fixture(scope="module")
def generator(official):
    from d3sr_core.loading import load_model

    return load_model(official["unet"], official["vq"], base_config=official["config"]).generator


def test_the_vq_autoencoder_matches_the_functional_ldm_reference(generator, official):
    """In float64, where only the operation order can differ (1e-10 bounds rounding of 1e-16 through ~40 layers);
    in float32 the decoder's outputs then agree to the suite's ``ACTIVATION_REORDER``."""
    from bounds import ACTIVATION_REORDER

    vq = copy.deepcopy(generator.vae).double()
    state = {k: v.double() for k, v in official["vq_state"].items()}
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5)).double() * 2 - 1
    with torch.no_grad():
        latents = vq.encode(image).latents
        reference = reference_vq_encode(image, state)
        assert latents.shape == (1, 3, 8, 12)
        assert (latents - reference).abs().max().item() < 1e-10
        decoded = vq.decode(reference).sample
        assert (decoded - reference_vq_decode(reference, state)).abs().max().item() < 1e-10
        assert (generator.decode(reference.float()) - decoded).abs().max().item() < ACTIVATION_REORDER


@pytest.mark.parametrize("steps, used", [(4, [0, 3, 7, 11]), (1, [14])])
def test_sampling_matches_the_official_loop(generator, official, steps, used):
    """4 of 15 steps (t = 11, 7, 3, 0), and TAD-SR's one step at t = T - 1 = 14 (its x_0)."""
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        final, last_x0 = reference_p_sample_loop(generator.denoiser, official["vq_state"], lq, used, seed=12345)
        ours = generator.sample_latents(lq, steps, torch.Generator().manual_seed(12345))
    expected = final if steps > 1 else last_x0
    assert (ours - expected).abs().max().item() < PARITY
    with torch.no_grad():  # the seed matters: another seed moves the result
        other = generator.sample_latents(lq, steps, torch.Generator().manual_seed(1))
    assert (other - expected).abs().max().item() > MATTERS


def test_one_p_sample_step_matches_the_reference(generator):
    """The first step of the full 15-step chain, by hand: x_0 at t = 14 from the normalised input, posterior mean,
    plus sqrt(posterior variance) times the step's noise."""
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    etas = reference_sqrt_etas(15, 0.04, 0.99, 2.0, 0.3) ** 2
    x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    schedule = generator.schedule(15)
    with torch.no_grad():
        x0 = generator.denoiser(x_t / math.sqrt(etas[14] * 4 + 1), torch.tensor([14]), lq=lq)
        variance = 4 * etas[13] / etas[14] * (etas[14] - etas[13])
        reference = etas[13] / etas[14] * x_t.double() + (etas[14] - etas[13]) / etas[14] * x0.double()
        reference = reference + math.sqrt(variance) * noise.double()
        ours_x0 = generator.predict_x_start(x_t, 14, schedule.etas[14].float(), lq)
        ours = posterior_mean(x_t, ours_x0, schedule.etas[14], schedule.etas_prev[14])
        ours = ours + torch.exp(0.5 * posterior_log_variance(schedule)[14].float()) * noise
    assert (ours.double() - reference).abs().max().item() < PARITY


# ----------------------------------------------------------------------------------------------------------------
# Strict loading of the official files


@pytest.mark.parametrize("wrap", ["state_dict", "raw"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_official_unet_files_load_strictly_with_any_wrapper_and_prefix(tmp_path, wrap, prefix):
    from d3sr_core.loading import load_model

    files = write_official_files(tmp_path, wrap=wrap, prefix=prefix)
    unet = load_model(files["unet"], files["vq"], base_config=files["config"]).generator.denoiser
    loaded = unet.state_dict()
    assert set(loaded) == set(files["unet_state"])
    assert all(torch.equal(loaded[k], files["unet_state"][k].to(loaded[k].dtype)) for k in loaded)


def _rewrite(path, change):
    state = torch.load(path, weights_only=True)["state_dict"]
    change(state)
    torch.save({"state_dict": state}, path)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("module.out.2.bias"), "lacks the UNet weight 'out.2.bias'"),
    (lambda s: s.update({"module.extra.weight": torch.zeros(1)}), "'extra.weight'"),
    (lambda s: s.update({"module.input_blocks.0.0.weight": torch.zeros(32, 7, 3, 3)}), "input_blocks.0.0.weight"),
    (lambda s: s["module.middle_block.1.blocks.0.attn.relative_position_index"].add_(1), "relative_position_index"),
    (lambda s: s["module.input_blocks.1.1.blocks.1.attn_mask"].zero_(), "attn_mask"),
])
def test_a_unet_file_that_does_not_fit_is_refused_in_one_sentence(tmp_path, change, words):
    from d3sr_core.loading import load_model

    files = write_official_files(tmp_path)
    _rewrite(files["unet"], change)
    with pytest.raises(ModelFileError) as err:
        load_model(files["unet"], files["vq"], base_config=files["config"])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_vq_file_with_foreign_weights_and_a_config_that_does_not_fit_are_refused(tmp_path):
    from d3sr_core.loading import load_model

    files = write_official_files(tmp_path)
    vq = torch.load(files["vq"], weights_only=True)
    vq["decoder.extra.weight"] = torch.zeros(1)
    torch.save(vq, files["vq"])
    with pytest.raises(ModelFileError, match="VQ autoencoder"):
        load_model(files["unet"], files["vq"], base_config=files["config"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(files["config"].read_text().replace("predict_type: xstart", "predict_type: epsilon"))
    with pytest.raises(ModelFileError, match="predict_type"):
        read_resshift_config(bad)
    # Without --base-config the shipped realsr v1 config (ch 128, model_channels 160) does not fit the tiny files.
    with pytest.raises(ModelFileError, match="config"):
        load_model(files["unet"], files["vq"])
