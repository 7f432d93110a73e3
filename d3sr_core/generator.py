"""The one step: encode the upsampled low-resolution image, predict once, recover the clean latent, decode.

The formulas are small pure functions so each can be checked against the paper on its own:

* epsilon prediction (OSEDiff, D3SR; DDPM eq. 15 solved for x0):
  ``x0 = (z_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)``
* v prediction (Salimans & Ho 2022, sec. 4): ``x0 = sqrt(alpha_bar_t) * z_t - sqrt(1 - alpha_bar_t) * v``
* rectified-flow velocity (TSD-SR at sigma = 1): ``x0 = z_t - sigma * v``
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .backbones.base import PredictFn
from .borrowed import compute_dtype
from .tiled_vae import RegionSource, count_norms, count_vae_tiles, decoder_steps, encoder_steps, tiled_vae_apply
from .tiling import count_latent_tiles, gaussian_blend_predictions, gaussian_blend_rows, latent_tile_shape

ENCODER_TILE_PADDING = 32
"""Context around each VAE encoder tile, in image pixels (the official default)."""
DECODER_TILE_PADDING = 11
"""Context around each VAE decoder tile, in latent pixels (the official default)."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """``alpha_bar_t`` for t = 0..T-1 from a diffusers scheduler config, computed as ``DDPMScheduler`` does (float32).

    Returns a float32 tensor of shape ``(num_train_timesteps,)``.
    """
    steps = int(config["num_train_timesteps"])
    start, end = float(config["beta_start"]), float(config["beta_end"])
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; expected 'scaled_linear' or 'linear'.")
    return torch.cumprod(1.0 - betas, dim=0)


def flow_match_sigmas(config: dict) -> torch.Tensor:
    """The noise levels of ``FlowMatchEulerDiscreteScheduler``'s training table, highest first (float32, ``(T,)``).

    ``sigma_i = shift * s_i / (1 + (shift - 1) * s_i)`` with ``s_i = (T - i) / T`` for i = 0..T-1 (SD3: T = 1000,
    shift 3), so ``sigma_0 = 1``; the transformer sees the timestep ``T * sigma``.
    """
    steps, shift = int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0))
    plain = torch.arange(steps, 0, -1, dtype=torch.float32) / steps
    return shift * plain / (1 + (shift - 1) * plain)


def x0_from_epsilon(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Clean latent from an epsilon prediction, in the operation order of ``DDPMScheduler.step`` (bit-equal to it)."""
    beta_bar_t = 1 - alpha_bar_t
    return (z_t - beta_bar_t ** (0.5) * eps) / alpha_bar_t ** (0.5)


def x0_from_v(z_t: torch.Tensor, v: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Clean latent from a v prediction: ``sqrt(alpha_bar) * z_t - sqrt(1 - alpha_bar) * v``."""
    return alpha_bar_t ** (0.5) * z_t - (1 - alpha_bar_t) ** (0.5) * v


def x0_from_flow_velocity(z_t: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clean latent on the rectified-flow path ``z_t = (1 - sigma) x0 + sigma * noise``, whose velocity is ``noise - x0``."""
    return z_t - sigma * v


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0): ``sqrt(a') x0 + sqrt(1 - a') eps``."""
    return alpha_bar_next ** (0.5) * x0 + (1 - alpha_bar_next) ** (0.5) * eps


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """How many image pixels one latent pixel spans: 2 per down block after the first (8 for SD's VAE), or the
    patch size of a ``PatchAutoencoder``."""
    patch_size = getattr(vae.config, "patch_size", None)
    return int(patch_size) if patch_size else 2 ** (len(vae.config.block_out_channels) - 1)


def _tick(progress: Callable[[], None] | None) -> None:
    if progress is not None:
        progress()


class OneStepGenerator(torch.nn.Module):
    """A VAE and a denoiser that super-resolve in one denoiser pass.

    Args:
        vae: an ``AutoencoderKL`` (its encoder may carry LoRA adapters).
        denoiser: the UNet or transformer (may carry LoRA adapters).
        predict_fn: how the backbone calls ``denoiser``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"flow"``.
        timestep: the one timestep the denoiser sees (999 for OSEDiff, 1000 for TSD-SR).
        alphas_cumprod: ``(T,)`` float32 ``alpha_bar`` table (epsilon and v prediction only).
        clip_sample_range: clamp x0 to ``[-r, r]`` as a scheduler with ``clip_sample`` does; ``None`` for no clamp.
        latent_scaling_factor: multiplies the VAE posterior to give model latents (0.18215 for SD 2.x).
        conditioning: tensors passed to ``predict_fn`` (prompt embeddings), each with a leading batch dimension of 1.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        denoiser: torch.nn.Module,
        predict_fn: PredictFn,
        *,
        prediction_type: str,
        timestep: int,
        alphas_cumprod: torch.Tensor | None,
        clip_sample_range: float | None,
        latent_scaling_factor: float,
        conditioning: dict[str, torch.Tensor],
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}.")
        if prediction_type != "flow" and (alphas_cumprod is None or not 0 <= timestep < len(alphas_cumprod)):
            raise ValueError(f"timestep {timestep} is outside the noise schedule of the base model.")
        self.vae = vae
        self.denoiser = denoiser
        self.predict_fn = predict_fn
        self.prediction_type = prediction_type
        self.timestep = int(timestep)
        self.alphas_cumprod = alphas_cumprod
        self.clip_sample_range = clip_sample_range
        self.latent_scaling_factor = float(latent_scaling_factor)
        # Fresh copies: tensors read from a file can be unaligned views, and CPU kernels round those differently.
        self.conditioning = {k: v.detach().clone() for k, v in conditioning.items()}
        self.vae_scale_factor = vae_scale_factor(vae)
        # A transformer cuts latents into patches, so latent sides and tiles must be multiples of its patch size.
        self.patch_size = int(getattr(getattr(denoiser, "config", None), "patch_size", None) or 1)
        self.pixel_multiple = self.vae_scale_factor * self.patch_size
        max_positions = getattr(getattr(denoiser, "config", None), "pos_embed_max_size", None)
        self.max_latent_side = int(max_positions) * self.patch_size if max_positions else None

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return compute_dtype(self.denoiser)  # not always its weights' dtype: fp8 and borrowed weights are cast on use

    @property
    def vae_dtype(self) -> torch.dtype:
        return compute_dtype(self.vae)  # a weightless autoencoder works in float32

    def encode_moments(self, image: torch.Tensor) -> torch.Tensor:
        """VAE posterior moments ``(B, 2*C, H/f, W/f)`` (f = ``vae_scale_factor``, 8 for SD) (mean and log-variance) of ``image`` ``(B, 3, H, W)`` in [-1, 1]."""
        hidden = self.vae.encoder(image.to(self.vae_dtype))
        if getattr(self.vae, "quant_conv", None) is not None:
            hidden = self.vae.quant_conv(hidden)
        return hidden

    def _vae_tiles(self, half: str, height: int, width: int, tile_size: int | None) -> int:
        """How many tiles the ``half`` (``"encoder"``: image pixels, ``"decoder"``: latent pixels) cuts an
        ``height x width`` input into; 1 means it runs untiled."""
        if not tile_size or getattr(self.vae, "pointwise", False):  # pointwise: tiles would change nothing
            return 1
        padding = ENCODER_TILE_PADDING if half == "encoder" else DECODER_TILE_PADDING
        return count_vae_tiles(height, width, tile_size, padding)

    def vae_progress_steps(self, half: str, height: int, width: int, tile_size: int | None) -> int:
        """How often :meth:`encode` (``half="encoder"``) or :meth:`decode` (``"decoder"``) calls ``progress``."""
        tiles = self._vae_tiles(half, height, width, tile_size)
        steps = encoder_steps if half == "encoder" else decoder_steps
        return 1 if tiles == 1 else tiles * (count_norms(steps(self.vae)) + 1)

    def _latent_tiling(
        self, height: int, width: int, tile_size: int | None, tile_overlap: int, tile_rule: str = "side"
    ) -> tuple[tuple[int, int], int] | None:
        """``((tile_h, tile_w), overlap)`` for latents of ``height x width``, or ``None`` when they run untiled,
        by ``tile_rule`` (``area`` or ``side``, see ``tiling.latent_tile_shape``). The tile is rounded down to whole
        patches (at least one) and the overlap kept below it. A transformer whose learned positions end
        (``pos_embed_max_size`` patches) never sees a larger tile, whatever the rule, even with tiling off."""
        beyond_positions = bool(self.max_latent_side) and max(height, width) > self.max_latent_side
        if beyond_positions:
            tile_size = min(tile_size or self.max_latent_side, self.max_latent_side)
        if not tile_size:
            return None
        tile = max(self.patch_size, tile_size // self.patch_size * self.patch_size)
        shape = latent_tile_shape(height, width, tile, tile_rule)
        if shape is None and beyond_positions:
            shape = (min(tile, height), min(tile, width))
        if shape is None:
            return None
        return shape, min(tile_overlap, min(shape) - 1)

    def denoise_progress_steps(
        self, height: int, width: int, tile_size: int | None, tile_overlap: int, tile_rule: str = "side"
    ) -> int:
        """How often :meth:`denoise` calls ``progress`` for latents of ``height x width``."""
        tiling = self._latent_tiling(height, width, tile_size, tile_overlap, tile_rule)
        return count_latent_tiles(height, width, *tiling) if tiling else 1

    def encode(
        self,
        image: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        tile_store: str = "ram",
        progress: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Model latents ``(B, C, H/f, W/f)``, already multiplied by the scaling factor.

        ``sample=False`` takes the posterior mode (deterministic); ``sample=True`` draws from it with ``generator``,
        as the official OSEDiff and TSD-SR scripts do (unseeded there). ``tile_size`` (pixels) enables the tiled
        encoder (see ``tiled_vae.py``) for images larger than one tile; ``tile_store`` (``ram`` or ``disk``) is
        where its tiles wait between GroupNorm stages. ``image`` ``(B, 3, H, W)`` in [-1, 1] is a tensor or a
        ``tiled_vae.RegionSource`` that reads it region by region.
        """
        if self._vae_tiles("encoder", *image.shape[-2:], tile_size) > 1:
            steps = encoder_steps(self.vae)
            ratio = 1 / self.vae_scale_factor
            if isinstance(image, RegionSource):
                source = image
                image = RegionSource(source.shape, source.device, lambda *box: source.region(*box).to(self.vae_dtype))
            else:
                image = image.to(self.vae_dtype)
            moments = tiled_vae_apply(steps, image, tile_size, ENCODER_TILE_PADDING, ratio, progress, store=tile_store)
        else:
            if isinstance(image, RegionSource):  # one tile: the whole input is no larger than a tile
                image = image.region(0, image.shape[-2], 0, image.shape[-1])
            moments = self.encode_moments(image)
            _tick(progress)
        posterior = DiagonalGaussianDistribution(moments.float())
        latents = posterior.sample(generator=generator) if sample else posterior.mode()
        return latents * self.latent_scaling_factor

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_store: str = "ram",
        progress: Callable[[], None] | None = None,
        into: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | None:
        """Image ``(B, 3, fH, fW)`` in [-1, 1] (clamped) from model latents; ``tile_size`` (latent pixels) enables
        the tiled decoder for latents larger than one tile, whose tiles wait in ``tile_store`` (as :meth:`encode`).
        With ``into``, the image is never assembled: it goes out tile by tile as ``into(y0, x0, part)`` (see
        ``tiled_vae.tiled_vae_apply``) and ``None`` is returned."""
        unscaled = latents.to(self.vae_dtype) / self.latent_scaling_factor

        def clamped(y0: int, x0: int, part: torch.Tensor) -> None:
            into(y0, x0, part.float().clamp_(-1, 1))  # in place: at 2048 px a copy is 48 MiB more at the peak

        if self._vae_tiles("decoder", *latents.shape[-2:], tile_size) > 1:
            steps = decoder_steps(self.vae)
            image = tiled_vae_apply(steps, unscaled, tile_size, DECODER_TILE_PADDING, self.vae_scale_factor, progress,
                                    store=tile_store, into=None if into is None else clamped)
        else:
            image = self.vae.decode(unscaled).sample
            _tick(progress)
            if into is not None:
                clamped(0, 0, image)
                image = None
        return None if image is None else image.float().clamp_(-1, 1)

    def predict(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's output at the generator's timestep for latents ``(B, C, h, w)``; float32 ``(B, C, h, w)``."""
        batch = latents.shape[0]
        timestep = torch.full((batch,), self.timestep, device=latents.device, dtype=torch.long)
        if self.prediction_type == "flow":
            timestep = timestep.float()
        conditioning = {
            k: v.to(device=latents.device, dtype=self.denoiser_dtype).expand(batch, *v.shape[1:])
            for k, v in self.conditioning.items()
        }
        return self.predict_fn(self.denoiser, latents.to(self.denoiser_dtype), timestep, conditioning).float()

    def x0(self, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean latent from the denoiser's ``prediction`` at the generator's timestep."""
        if self.prediction_type == "flow":
            x0 = x0_from_flow_velocity(latents, prediction, sigma=1.0)
        else:
            alpha_bar = self.alphas_cumprod[self.timestep].to(latents.device)
            if self.prediction_type == "epsilon":
                x0 = x0_from_epsilon(latents, prediction, alpha_bar)
            else:
                x0 = x0_from_v(latents, prediction, alpha_bar)
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def denoise(
        self,
        latents: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_rule: str = "side",
        tile_batch_size: int = 1,
        progress: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """x0 from ``latents``; when ``tile_rule`` (``area`` or ``side``, see ``tiling.latent_tile_shape``) tiles
        latents of this size with ``tile_size``, the prediction is made per tile and Gaussian-blended first."""
        tiling = self._latent_tiling(*latents.shape[-2:], tile_size, tile_overlap, tile_rule)
        if tiling:
            prediction = gaussian_blend_predictions(self.predict, latents, *tiling, progress, tile_batch_size)
        else:
            prediction = self.predict(latents)
            _tick(progress)
        return self.x0(latents, prediction)

    def denoise_rows(
        self,
        read_rows: Callable[[int, int], torch.Tensor],
        shape: tuple[int, int, int, int],
        emit: Callable[[int, torch.Tensor], None],
        *,
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_rule: str = "side",
        tile_batch_size: int = 1,
        progress: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`denoise` on latents of ``shape`` ``(B, C, H, W)`` that are never whole in memory:
        ``read_rows(y0, y1)`` gives latent rows ``[y0, y1)``, and x0 leaves in row bands, ``emit(y0, x0_rows)``, in
        order (see ``tiling.gaussian_blend_rows``); equal to :meth:`denoise` bit for bit. Latents that run untiled
        (no larger than one tile) are read whole."""
        height = shape[-2]
        tiling = self._latent_tiling(*shape[-2:], tile_size, tile_overlap, tile_rule)
        if not tiling:
            emit(0, self.denoise(read_rows(0, height), tile_size=None, progress=progress))
            return

        def emit_x0(y0: int, prediction: torch.Tensor) -> None:
            emit(y0, self.x0(read_rows(y0, y0 + prediction.shape[-2]), prediction))

        gaussian_blend_rows(self.predict, read_rows, shape, *tiling, emit_x0, progress, tile_batch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Untiled one-step SR of ``image`` ``(B, 3, H, W)`` in [-1, 1] (H, W multiples of f) to the same size."""
        return self.decode(self.denoise(self.encode(image)))
