"""Residual shifting (ResShift, Yue et al. 2023) and its one-step distillation (TAD-SR), as small pure functions in
the shape of ``generator.py``'s, and the generator that samples with them.

ResShift diffuses the high-quality latent x_0 toward the latent of the upsampled low-quality image y by shifting the
residual ``e_0 = y - x_0`` (paper eq. 1-2, official ``models/gaussian_diffusion.py``):

* ``q(x_t | x_0, y) = N(x_0 + eta_t e_0, kappa^2 eta_t I)``  (:func:`q_sample`)
* the exponential schedule of ``sqrt(eta_t)`` from ``min(min_noise_level / kappa, min_noise_level)`` to ``etas_end``
  (:func:`sqrt_eta_schedule`)
* the denoiser sees ``x_t / sqrt(eta_t kappa^2 + 1)`` and predicts x_0 (:func:`normalized_input`)
* the posterior ``q(x_{t-1} | x_t, x_0) = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x_0, kappa^2 eta_{t-1}/eta_t alpha_t I)``
  with ``alpha_t = eta_t - eta_{t-1}`` (:func:`posterior_mean`, :func:`posterior_log_variance`)
* sampling starts at ``x_T = y + kappa sqrt(eta_T) eps`` (:func:`prior_sample`)

TAD-SR's student is the same network run once at t = T - 1, taking its x_0 (reference/methods.md 3.1). Fewer steps
than the config's respace the schedule as the official ``space_timesteps`` does (:func:`respaced_timesteps`).

Tables are computed in float64 and cast to float32 where they meet tensors, as the official ``_extract_into_tensor``
does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def sqrt_eta_schedule(steps: int, min_noise_level: float, etas_end: float, kappa: float, power: float) -> torch.Tensor:
    """``sqrt(eta_t)`` for t = 0..T-1 (float64, ``(T,)``), the official ``get_named_eta_schedule('exponential')``:

    ``sqrt(eta_t) = eta_start * b^(T' u_t^p)``, with ``eta_start = min(min_noise_level / kappa, min_noise_level)``,
    ``b = exp(ln(etas_end / eta_start) / T')``, ``T' = T - 1`` and ``u_t = t / T'`` (so ``sqrt(eta_{T-1}) =
    etas_end``; ``etas_end`` bounds the square root, not eta itself).
    """
    if steps < 2:
        raise ValueError(f"steps={steps} is too few; the exponential schedule needs at least 2.")
    eta_start = min(min_noise_level / kappa, min_noise_level)
    increaser = math.exp(1 / (steps - 1) * math.log(etas_end / eta_start))
    power_timestep = torch.linspace(0, 1, steps, dtype=torch.float64) ** power * (steps - 1)
    return torch.full((steps,), increaser, dtype=torch.float64) ** power_timestep * eta_start


def respaced_timesteps(steps: int, count: int) -> list[int]:
    """The ``count`` timesteps of a ``steps``-step schedule that a respaced sampler visits, ascending (the official
    ``space_timesteps``: ``int(steps / count * i)`` for i < count; 4 of 15 gives 0, 3, 7, 11)."""
    if not 1 <= count <= steps:
        raise ValueError(f"steps={count} must be from 1 to the schedule's {steps}.")
    return sorted({int(steps / count * i) for i in range(count)})


@dataclass(frozen=True)
class ResidualShiftSchedule:
    """A (respaced) ResShift schedule.

    Attributes:
        sqrt_etas: float64 ``(S,)``, ``sqrt(eta)`` at the visited timesteps, ascending.
        timesteps: the trained timestep index the network sees at each of the S entries.
        kappa: the noise scale.
    """

    sqrt_etas: torch.Tensor
    timesteps: tuple[int, ...]
    kappa: float

    @property
    def etas(self) -> torch.Tensor:
        return self.sqrt_etas**2

    @property
    def etas_prev(self) -> torch.Tensor:
        """``eta_{t-1}`` of each entry: the previous visited entry's eta, 0 before the first (as ``SpacedDiffusion``)."""
        return torch.cat([torch.zeros(1, dtype=torch.float64), self.etas[:-1]])

    def __len__(self) -> int:
        return len(self.timesteps)


def schedule_from_config(diffusion: dict, steps: int | None = None) -> ResidualShiftSchedule:
    """The schedule of the official ``diffusion.params``, respaced to ``steps`` entries (``None``: all of them)."""
    trained = int(diffusion["steps"])
    full = sqrt_eta_schedule(trained, float(diffusion["min_noise_level"]), float(diffusion["etas_end"]),
                             float(diffusion["kappa"]), float(diffusion["schedule_kwargs"]["power"]))
    kept = respaced_timesteps(trained, steps or trained)
    return ResidualShiftSchedule(full[kept], tuple(kept), float(diffusion["kappa"]))


def _at(table: torch.Tensor, index: int, like: torch.Tensor) -> torch.Tensor:
    """One float64 table entry as a float32 scalar tensor on ``like``'s device (the official ``.float()`` cast)."""
    return table[index].float().to(like.device)


def q_sample(x0: torch.Tensor, y: torch.Tensor, eta_t, sqrt_eta_t, kappa: float, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = x_0 + eta_t (y - x_0) + kappa sqrt(eta_t) noise`` (ResShift eq. 2; official ``q_sample``, same order)."""
    return eta_t * (y - x0) + x0 + sqrt_eta_t * kappa * noise


def prior_sample(y: torch.Tensor, sqrt_eta_last, kappa: float, noise: torch.Tensor) -> torch.Tensor:
    """``x_T = y + kappa sqrt(eta_T) noise`` (official ``prior_sample``)."""
    return y + kappa * sqrt_eta_last * noise


def normalized_input(x_t: torch.Tensor, eta_t, kappa: float) -> torch.Tensor:
    """What the network sees: ``x_t / sqrt(eta_t kappa^2 + 1)`` (official ``_scale_input`` for latents, whose variance
    is near 1)."""
    return x_t / torch.sqrt(eta_t * kappa**2 + 1)


def epsilon_from_x_start(x_t: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, eta_t, sqrt_eta_t, kappa: float) -> torch.Tensor:
    """The noise implied by an x_0 prediction, ``(x_t - (1 - eta_t) x_0 - eta_t y) / (kappa sqrt(eta_t))``: eq. 2 solved
    for the noise (official ``_predict_eps_from_xstart``; TAD-SR's HSD converts with the same formula)."""
    return (x_t - (1 - eta_t) * x0 - eta_t * y) / (kappa * sqrt_eta_t)


def posterior_mean(x_t: torch.Tensor, x0: torch.Tensor, eta_t, eta_prev) -> torch.Tensor:
    """``eta_{t-1}/eta_t x_t + (eta_t - eta_{t-1})/eta_t x_0`` (ResShift eq. 7), coefficients computed in float64 and
    cast, as the official tables are."""
    coef1 = (eta_prev / eta_t).float().to(x_t.device)
    coef2 = ((eta_t - eta_prev) / eta_t).float().to(x_t.device)
    return coef1 * x_t + coef2 * x0


def posterior_log_variance(schedule: ResidualShiftSchedule) -> torch.Tensor:
    """``log(kappa^2 eta_{t-1}/eta_t alpha_t)`` per entry (float64), the first entry (variance 0) replaced by the
    second's, as the official ``posterior_log_variance_clipped`` (the first entry adds no noise)."""
    etas, prev = schedule.etas, schedule.etas_prev
    variance = schedule.kappa**2 * prev / etas * (etas - prev)
    return torch.log(torch.cat([variance[1:2], variance[1:]]) if len(variance) > 1 else variance)


def ddim_step(x_t: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, eta_t, eta_prev) -> torch.Tensor:
    """TAD-SR's deterministic ResShift step (its ``ddim_sample``): ``k x_0 + m x_t + j y`` with ``m = sqrt(eta_{t-1}
    / eta_t)``, ``k = 1 - eta_{t-1} + sqrt(eta_{t-1} eta_t) - m`` and ``j = eta_{t-1} - sqrt(eta_{t-1} eta_t)``: the
    noise implied by x_0 kept, rescaled to eta_{t-1}."""
    eta_t, eta_prev = eta_t.float().to(x_t.device), eta_prev.float().to(x_t.device)
    product, ratio = torch.sqrt(eta_prev * eta_t), torch.sqrt(eta_prev / eta_t)
    return x0 * (1 - eta_prev + product - ratio) + ratio * x_t + (eta_prev - product) * y


def bicubic_upsample(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """``F.interpolate(scale_factor=scale, mode='bicubic')`` without clamping, as ``encode_first_stage`` does."""
    return F.interpolate(lq, scale_factor=scale, mode="bicubic")


class ResShiftGenerator(torch.nn.Module):
    """The Swin UNet and the VQ autoencoder of a ResShift / TAD-SR model, sampling in ``steps`` steps.

    Args:
        vae: the VQ autoencoder (diffusers ``VQModel``; ``encode(x).latents``, ``decode(z).sample`` quantizes first).
        denoiser: the ``SwinUNet``.
        config: the ResShift config (``model``, ``diffusion``, ``autoencoder`` params).
    """

    def __init__(self, vae: torch.nn.Module, denoiser: torch.nn.Module, config: dict):
        super().__init__()
        self.vae = vae
        self.denoiser = denoiser
        self.config = config
        diffusion = config["diffusion"]
        self.trained_steps = int(diffusion["steps"])
        self.kappa = float(diffusion["kappa"])
        self.sf = int(diffusion["sf"])
        self.latent_scaling_factor = float(diffusion["scale_factor"])
        self.vae_scale_factor = 2 ** (len(config["autoencoder"]["ddconfig"]["ch_mult"]) - 1)
        self.padding_offset = int(config["model"]["lq_size"])
        """The low-quality image is reflect-padded to a multiple of this (official ``padding_offset = lq_size``)."""

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def schedule(self, steps: int | None) -> ResidualShiftSchedule:
        """The schedule ``steps`` visits: 1 is TAD-SR's one step at t = T - 1 (the full table's last entry);
        others respace the trained schedule (official ``space_timesteps``)."""
        full = schedule_from_config(self.config["diffusion"])
        if steps == 1:
            return ResidualShiftSchedule(full.sqrt_etas[-1:], full.timesteps[-1:], full.kappa)
        return schedule_from_config(self.config["diffusion"], steps)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, H/f, W/f)`` of ``image`` in [-1, 1], times the config's ``scale_factor``."""
        latents = self.vae.encode(image.to(self.vae_dtype)).latents
        return latents.float() * self.latent_scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, fH, fW)`` (not clamped) from latents; the VQ decoder quantizes them first."""
        return self.vae.decode((latents / self.latent_scaling_factor).to(self.vae_dtype)).sample.float()

    def predict_x_start(self, x_t: torch.Tensor, timestep: int, eta_t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The network's x_0 for ``x_t`` at trained timestep ``timestep`` (``eta_t`` float32 scalar), conditioned on
        ``lq`` ``(B, 3, h, w)`` in [-1, 1]."""
        t = torch.full((x_t.shape[0],), timestep, device=x_t.device, dtype=torch.long)
        x_in = normalized_input(x_t, eta_t, self.kappa)
        dtype = self.denoiser_dtype
        return self.denoiser(x_in.to(dtype), t, lq=lq.to(dtype)).float()

    def sample_latents(
        self,
        lq: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """x_0 latents for the low-quality image ``lq`` ``(B, 3, h, w)`` in [-1, 1] (h, w multiples of
        ``padding_offset``), by the official ``p_sample_loop``:

        1. ``z_y`` = latents of ``lq`` bicubic-upsampled by ``sf``; ``x_T = z_y + kappa sqrt(eta_T) eps``, eps drawn
           with ``generator`` in ``z_y``'s shape on its device (``torch.manual_seed(seed)`` then ``randn_like``);
        2. per entry, last first: x_0 from the network; ``x_{t-1}`` = posterior mean, plus ``exp(0.5 log var) eps'``
           except at the first entry; eps' is drawn at every entry, as the official ``p_sample`` draws it, so the
           random stream (and the next chop's noise) matches.

        ``steps`` = 1 is TAD-SR's one step: x_0 of the network at t = T - 1. Returns float32 latents.
        """
        schedule = self.schedule(steps or self.trained_steps)
        z_y = self.encode(bicubic_upsample(lq.float(), self.sf))
        noise = torch.randn(z_y.shape, generator=generator, device=z_y.device, dtype=z_y.dtype)
        x = prior_sample(z_y, _at(schedule.sqrt_etas, len(schedule) - 1, z_y), self.kappa, noise)
        log_variance = posterior_log_variance(schedule)
        for index in reversed(range(len(schedule))):
            x0 = self.predict_x_start(x, schedule.timesteps[index], _at(schedule.etas, index, x), lq)
            step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            # At the first entry eta_{t-1} = 0, so the mean is x_0 itself: a one-entry schedule (TAD-SR) returns it.
            x = posterior_mean(x, x0, schedule.etas[index], schedule.etas_prev[index])
            if index > 0:
                x = x + torch.exp(0.5 * _at(log_variance, index, x)) * step_noise
            if progress is not None:
                progress()
        return x

    def ddim_x_start(self, x_t: torch.Tensor, z_y: torch.Tensor, lq: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """TAD-SR's multi-step teacher result (its ``ddim_sample_loop`` from ``x_T``, what the one-step student regresses
        to): from ``x_t`` at the last entry of the ``steps``-entry schedule (``None``: all trained steps), per entry, last
        first, x_0 of the network then :func:`ddim_step` to the previous entry's eta; the first entry's step (eta_{t-1}
        = 0) returns x_0 itself. ``z_y`` is the latent of the upsampled ``lq`` ``(B, 3, h, w)``; float32 latents."""
        schedule = self.schedule(steps or self.trained_steps)
        x = x_t
        for index in reversed(range(len(schedule))):
            x0 = self.predict_x_start(x, schedule.timesteps[index], _at(schedule.etas, index, x), lq)
            x = ddim_step(x, z_y, x0, schedule.etas[index], schedule.etas_prev[index])
        return x

    def forward(self, lq: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, sf h, sf w)`` in [-1, 1] (clamped) from ``lq`` ``(B, 3, h, w)`` in [-1, 1] (sides multiples of
        ``padding_offset``): latents sampled, then decoded."""
        return self.decode(self.sample_latents(lq, steps, generator)).clamp(-1, 1)
