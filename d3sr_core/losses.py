"""Training losses of the one-step SR methods, as small pure tensor functions.

D3SR (reference/methods.md section 4):

* the forward diffusion that noises real and generated latents for the discriminator,
  ``F(z, t) = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps`` (DDPM eq. 4);
* the GAN losses: non-saturating (Goodfellow et al. 2014, the paper's form
  ``L_D = -E log D(F(z, t)) - E log(1 - D(F(z_hat, t)))``, ``L_G = -E log D(F(z_hat, t))``) with ``D`` a logit,
  so ``log D = -softplus(-logit)`` and ``log(1 - D) = -softplus(logit)``; or hinge (Lim & Ye 2017);
* EA-DISTS ``= DISTS(x_hat, x) + DISTS(S(x_hat), S(x))`` with ``S`` the Sobel gradient magnitude.

Distillation (a frozen teacher diffusion model gives the generator a gradient in latent space):

* OSEDiff's variational score distillation (VSD), x0-space and normalised;
* TAD-SR's high-frequency score distillation (HSD);
* TSD-SR's target score distillation (TSD) with the distribution-aware sampling module (DASM), on the
  rectified-flow path ``z_sigma = sigma * noise + (1 - sigma) * x0``.

Score-distillation gradients become losses as ``MSE(z_hat, stopgrad(z_hat - grad))`` (:func:`gradient_as_loss`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

GAN_LOSSES = ("non_saturating", "hinge")
EDGE_CHANNELS = ("gray", "rgb")

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
"""Horizontal-gradient Sobel kernel; the vertical one is its transpose."""
SOBEL_EPS = 1e-6
"""Added under the square root of the edge magnitude, whose gradient is infinite at zero."""


def diffuse(z0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """``F(z0, t) = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise`` (DDPM eq. 4).

    ``z0``, ``noise``: latents ``(B, C, h, w)``; ``alpha_bar_t``: ``(B,)`` cumulative alpha products in (0, 1].
    """
    a = alpha_bar_t.to(z0.dtype).view(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise



def flow_diffuse(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The rectified-flow forward process ``z_sigma = sigma * noise + (1 - sigma) * x0`` (SD3, TSD-SR).

    ``x0``, ``noise``: latents ``(B, C, h, w)``; ``sigma``: a number or ``(B,)`` levels in [0, 1] (1 = pure noise).
    """
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return sigma * noise + (1 - sigma) * x0

def sobel_edge_map(image: torch.Tensor, channels: str = "gray") -> torch.Tensor:
    """Sobel gradient magnitude ``sqrt(gx^2 + gy^2 + 1e-6)`` of ``image`` ``(B, 3, H, W)``, same size (zero padding 1).

    ``channels="gray"`` (OSDFace's EA-DISTS, the D3SR authors' lab): one map of the channel mean, ``(B, 1, H, W)``;
    ``"rgb"``: one map per channel, ``(B, 3, H, W)``.
    """
    if channels not in EDGE_CHANNELS:
        raise ValueError(f"channels {channels!r} is not one of {EDGE_CHANNELS}.")
    planes = image.mean(dim=1, keepdim=True) if channels == "gray" else image
    count = planes.shape[1]
    kx = SOBEL_X.to(image)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(count, 1, 1, 1)  # (2 * count, 1, 3, 3)
    grads = F.conv2d(planes.repeat_interleave(2, dim=1), kernels, padding=1, groups=2 * count)
    gx, gy = grads[:, 0::2], grads[:, 1::2]
    return torch.sqrt(gx**2 + gy**2 + SOBEL_EPS)


def ea_dists(
    dists: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_hat: torch.Tensor,
    x: torch.Tensor,
    *,
    edge_channels: str = "gray",
    edge_weight: float = 1.0,
) -> torch.Tensor:
    """Edge-aware DISTS (D3SR): ``DISTS(x_hat, x) + edge_weight * DISTS(S(x_hat), S(x))``, averaged over the batch.

    ``dists(a, b)`` takes ``(B, 3, H, W)`` images in [0, 1] and returns ``(B,)``; ``x_hat``, ``x`` are
    ``(B, 3, H, W)`` in [0, 1]. A one-channel edge map is repeated to three channels for the VGG, which is how a
    grey image is shown to it. The D3SR paper does not say which Sobel variant it uses; the default follows
    OSDFace (grey, sum of the two terms).
    """
    edges_hat = sobel_edge_map(x_hat, edge_channels)
    edges = sobel_edge_map(x, edge_channels)
    if edges.shape[1] == 1:
        edges_hat, edges = edges_hat.expand(-1, 3, -1, -1), edges.expand(-1, 3, -1, -1)
    return (dists(x_hat, x) + edge_weight * dists(edges_hat, edges)).mean()


def _check_gan_loss(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss {kind!r} is not one of {GAN_LOSSES}.")


def gan_generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The generator's adversarial loss from discriminator logits on generated samples (any shape; mean).

    non-saturating: ``-E log sigmoid(l) = E softplus(-l)``; hinge: ``-E l``.
    """
    _check_gan_loss(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The discriminator's loss from its logits on real and on (detached) generated samples.

    non-saturating: ``E softplus(-l_real) + E softplus(l_fake)`` (= ``-E log D(real) - E log(1 - D(fake))``);
    hinge: ``E relu(1 - l_real) + E relu(1 + l_fake)``.
    """
    _check_gan_loss(kind)
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` (Ho & Salimans 2022, eq. 6); works on epsilon or velocity predictions."""
    return uncond + scale * (cond - uncond)


def variational_score_distillation(z_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """OSEDiff's VSD loss (``distribution_matching_loss``, reference/methods.md 1.3), in x0 space.

    ``z_hat``: the generator's latents ``(B, C, h, w)`` (with gradient); ``x0_fake``, ``x0_teacher``: the clean
    latents the fake-score model and the (guided) teacher recover from the same noised ``z_hat``. The gradient is
    ``(x0_fake - x0_teacher) / w`` with ``w = mean |z_hat - x0_teacher|`` per sample, and the loss
    ``MSE(z_hat, stopgrad(z_hat - grad))``, whose gradient with respect to ``z_hat`` is ``2 * grad / numel``.
    The sign (fake minus teacher) is the official code's.
    """
    w = (z_hat.detach() - x0_teacher).abs().mean(dim=tuple(range(1, z_hat.dim())), keepdim=True)
    return gradient_as_loss(z_hat, torch.nan_to_num((x0_fake - x0_teacher) / w), weight=1.0)


def high_frequency_score_distillation(
    z_hat: torch.Tensor, eps_at_student: torch.Tensor, eps_at_target: torch.Tensor
) -> torch.Tensor:
    """TAD-SR's HSD loss (reference/methods.md 3.2): ``mean(stopgrad(eps(z_t^s) - eps(z_t^*)) * z_hat)``.

    ``eps_at_student`` and ``eps_at_target`` are the frozen teacher's predictions on the student latent and on the
    target latent (the teacher's multi-step output or the ground truth), both noised with the *same* noise at
    the same small timestep: their difference is the score gap with the shared low frequencies cancelled.
    """
    return ((eps_at_student - eps_at_target).detach() * z_hat).mean()


def dasm_sigmas(sigmas: torch.Tensor, start: int, steps: int, stride: int, bias: int = 0) -> torch.Tensor:
    """The ``steps + 1`` noise levels of TSD-SR's distribution-aware sampling (reference/methods.md 2.3).

    ``sigmas``: the scheduler's levels, highest noise first (index 0); ``start``: the drawn index. The indices are
    ``linspace(start, min(start + stride * steps + bias, last), steps + 1)`` rounded down, so the trajectory runs
    from ``sigmas[start]`` toward lower noise.
    """
    end = min(start + stride * steps + bias, len(sigmas) - 1)
    indices = torch.linspace(start, end, steps + 1).long()
    return sigmas[indices]


def target_score_distillation(
    z_hat_t: torch.Tensor,
    z_t: torch.Tensor,
    sigmas: torch.Tensor,
    weights: list[float],
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fake: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    vsd_weight: float = 0.7,
) -> torch.Tensor:
    """TSD-SR's target score distillation gradient, with DASM when ``len(weights) > 1`` (reference/methods.md 2.3).

    ``z_hat_t`` and ``z_t``: the generated and the HR latents noised with the same noise at ``sigmas[0]``;
    ``teacher(z, sigma)`` and ``fake(z, sigma)``: (guided) velocity predictions. For each step ``k``::

        grad_vsd += w_k sigma_k^2 (v_teacher(z_hat_t) - v_fake(z_hat_t))
        grad_tsm += w_k sigma_k^2 (v_teacher(z_hat_t) - v_teacher(z_t))
        z_hat_t  -= (sigma_k - sigma_{k+1}) v_fake(z_hat_t);  z_t -= (sigma_k - sigma_{k+1}) v_teacher(z_t)

    and the result is ``vsd_weight * grad_vsd + (1 - vsd_weight) * grad_tsm`` (no gradient; NaNs zeroed). One
    weight is plain TSD at ``sigmas[0]``.
    """
    if len(sigmas) != len(weights) + 1:
        raise ValueError(f"{len(weights)} DASM weights need {len(weights) + 1} noise levels, got {len(sigmas)}.")
    grad_vsd = torch.zeros_like(z_hat_t)
    grad_tsm = torch.zeros_like(z_hat_t)
    with torch.no_grad():
        for k, w in enumerate(weights):
            sigma, next_sigma = sigmas[k], sigmas[k + 1]
            v_teacher_fake = teacher(z_hat_t, sigma)
            v_fake_fake = fake(z_hat_t, sigma)
            v_teacher_real = teacher(z_t, sigma)
            grad_vsd += w * sigma**2 * (v_teacher_fake - v_fake_fake)
            grad_tsm += w * sigma**2 * (v_teacher_fake - v_teacher_real)
            z_hat_t = z_hat_t - (sigma - next_sigma) * v_fake_fake
            z_t = z_t - (sigma - next_sigma) * v_teacher_real
    return torch.nan_to_num(vsd_weight * grad_vsd + (1 - vsd_weight) * grad_tsm)


def fake_score_flow_loss(
    velocity: torch.Tensor, noised: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """TSD-SR's fake-score loss (reference/methods.md 2.3): ``0.5 * mean(w * (z_t - sigma * v - target)^2)``.

    ``velocity``: the fake score's prediction at ``noised`` = ``flow_diffuse(target, noise, sigma)``, all
    ``(B, C, h, w)``; ``sigma``, ``weight``: ``(B,)`` (``weight = sigmoid(n)``, ``n ~ N(0, 1)`` officially).
    """
    per_sample = (-1,) + (1,) * (noised.dim() - 1)
    x0_pred = noised - sigma.view(per_sample) * velocity
    return 0.5 * (weight.view(per_sample) * (x0_pred - target) ** 2).mean()


def gradient_as_loss(z_hat: torch.Tensor, grad: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """``weight * MSE(z_hat, stopgrad(z_hat - grad))``: a scalar whose gradient with respect to ``z_hat`` is
    ``2 * weight * grad / numel`` (how TSD-SR turns its gradient into a loss, with weight 0.5)."""
    return weight * F.mse_loss(z_hat, (z_hat - grad).detach())
