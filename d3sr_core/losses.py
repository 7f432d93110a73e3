"""Training losses of the one-step SR methods, as small pure tensor functions.

D3SR (reference/methods.md section 4):

* the forward diffusion that noises real and generated latents for the discriminator,
  ``F(z, t) = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps`` (DDPM eq. 4);
* the GAN losses: non-saturating (Goodfellow et al. 2014, the paper's form
  ``L_D = -E log D(F(z, t)) - E log(1 - D(F(z_hat, t)))``, ``L_G = -E log D(F(z_hat, t))``) with ``D`` a logit,
  so ``log D = -softplus(-logit)`` and ``log(1 - D) = -softplus(logit)``; or hinge (Lim & Ye 2017);
* EA-DISTS ``= DISTS(x_hat, x) + DISTS(S(x_hat), S(x))`` with ``S`` the Sobel gradient magnitude.
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
