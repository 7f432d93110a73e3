"""The distillation losses (OSEDiff VSD, TAD-SR HSD and time-aware discriminator, TSD-SR TSD + DASM) against
references written here from the formulas in reference/methods.md."""

import pytest
import torch

from d3sr_core.discriminators import TimeAwareDiscriminator, unet_encoder_features
from d3sr_core.losses import (
    classifier_free_guidance,
    dasm_sigmas,
    gradient_as_loss,
    high_frequency_score_distillation,
    target_score_distillation,
    variational_score_distillation,
)
from tiny_models import tiny_unet


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_vsd_gradient_is_the_normalised_x0_difference():
    z_hat = _randn(2, 4, 3, 3, seed=0).requires_grad_(True)
    x0_fake, x0_teacher = _randn(2, 4, 3, 3, seed=1), _randn(2, 4, 3, 3, seed=2)
    loss = variational_score_distillation(z_hat, x0_fake, x0_teacher)
    loss.backward()
    n = z_hat.numel()
    for b in range(2):
        z, t = z_hat.detach()[b].flatten(), x0_teacher[b].flatten()
        w = sum(abs(float(z[i]) - float(t[i])) for i in range(36)) / 36
        expected = 2 * (x0_fake[b] - x0_teacher[b]) / w / n
        torch.testing.assert_close(z_hat.grad[b], expected)
    # The value: MSE(z, z - grad) = mean(grad^2).
    grad = torch.stack([(x0_fake[b] - x0_teacher[b]) / (z_hat[b].detach() - x0_teacher[b]).abs().mean() for b in range(2)])
    torch.testing.assert_close(loss.detach(), (grad**2).mean())


def test_hsd_gradient_is_the_teacher_score_gap():
    z_hat = _randn(2, 4, 3, 3, seed=3).requires_grad_(True)
    eps_s, eps_t = _randn(2, 4, 3, 3, seed=4), _randn(2, 4, 3, 3, seed=5)
    loss = high_frequency_score_distillation(z_hat, eps_s, eps_t)
    torch.testing.assert_close(loss, ((eps_s - eps_t) * z_hat).sum() / z_hat.numel())
    loss.backward()
    torch.testing.assert_close(z_hat.grad, (eps_s - eps_t) / z_hat.numel())


def test_cfg_and_gradient_as_loss():
    u, c = _randn(3, seed=6), _randn(3, seed=7)
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    z = _randn(2, 3, seed=8).requires_grad_(True)
    grad = _randn(2, 3, seed=9)
    gradient_as_loss(z, grad, 0.5).backward()
    torch.testing.assert_close(z.grad, 2 * 0.5 * grad / 6)


def test_dasm_sigmas_follow_the_official_index_rule():
    sigmas = torch.linspace(1.0, 0.0, 1000, dtype=torch.float64)
    out = dasm_sigmas(sigmas, start=100, steps=4, stride=50, bias=-10)
    # linspace(100, 290, 5) = 100, 147.5, 195, 242.5, 290 -> floor
    torch.testing.assert_close(out, sigmas[[100, 147, 195, 242, 290]])
    near_end = dasm_sigmas(sigmas, start=900, steps=4, stride=50, bias=25)
    assert near_end[-1] == sigmas[999] and len(near_end) == 5


def test_tsd_with_dasm_matches_an_explicit_euler_trajectory():
    gen = torch.Generator().manual_seed(10)
    a_t, a_f = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(4, 4, generator=gen, dtype=torch.float64)

    def teacher(z, sigma):  # a linear "velocity" that depends on sigma, so every step matters
        return torch.einsum("ij,bjk->bik", a_t, z) * (1 + sigma)

    def fake(z, sigma):
        return torch.einsum("ij,bjk->bik", a_f, z) * (2 - sigma)

    z_hat_t, z_t = _randn(1, 4, 5, seed=11), _randn(1, 4, 5, seed=12)
    sigmas = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.3], dtype=torch.float64)
    weights = [1.0, 0.3, 0.3, 0.3]
    grad = target_score_distillation(z_hat_t, z_t, sigmas, weights, teacher, fake, vsd_weight=0.7)

    g_vsd, g_tsm, zf, zr = 0, 0, z_hat_t.clone(), z_t.clone()
    for k in range(4):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        tf, ff, tr = teacher(zf, s), fake(zf, s), teacher(zr, s)
        g_vsd = g_vsd + weights[k] * s * s * (tf - ff)
        g_tsm = g_tsm + weights[k] * s * s * (tf - tr)
        zf, zr = zf - (s - s_next) * ff, zr - (s - s_next) * tr
    torch.testing.assert_close(grad, 0.7 * g_vsd + 0.3 * g_tsm)

    # Without DASM (one step) it is plain TSD at the first level.
    single = target_score_distillation(z_hat_t, z_t, sigmas[:2], [1.0], teacher, fake, vsd_weight=0.7)
    s = 0.9
    expected = s * s * (0.7 * (teacher(z_hat_t, s) - fake(z_hat_t, s)) + 0.3 * (teacher(z_hat_t, s) - teacher(z_t, s)))
    torch.testing.assert_close(single, expected)
    with pytest.raises(ValueError, match="noise levels"):
        target_score_distillation(z_hat_t, z_t, sigmas, [1.0], teacher, fake)


def test_time_aware_discriminator_reads_every_encoder_level_and_depends_on_time():
    unet = tiny_unet(seed=3).requires_grad_(False)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.zeros(2, 1, 32)
    features = unet_encoder_features(unet, latents, torch.tensor([5, 5]), context)
    assert [tuple(f.shape[1:]) for f in features] == [(32, 8, 8), (64, 8, 8), (64, 8, 8)]
    torch.manual_seed(0)
    disc = TimeAwareDiscriminator([f.shape[1] for f in features], embed_dim=32, c_dim=16)
    for head in disc.heads:  # the official zero init makes every input look alike; test with a trained-looking head
        torch.nn.init.normal_(head.proj.weight, std=0.1)
    logits = disc(features, torch.tensor([5, 5]))
    assert logits.shape == (2, 64 + 64 + 64)
    assert not torch.allclose(logits, disc(features, torch.tensor([900, 900])))
    # Gradients reach the student's latents through the frozen teacher.
    student = latents.clone().requires_grad_(True)
    (-disc(unet_encoder_features(unet, student, torch.tensor([5, 5]), context), torch.tensor([5, 5])).mean()).backward()
    assert student.grad.abs().sum() > 0 and not any(p.grad is not None for p in unet.parameters())
    # Spectral norm keeps each head's 1x1 block at unit spectral norm.
    weight = disc.heads[0].block[0].weight.flatten(1)
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=0.05)
