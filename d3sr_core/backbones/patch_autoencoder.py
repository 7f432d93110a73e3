"""A lossless "autoencoder" for pixel-space diffusion with patching: the latent of an image is its patches, moved
into channels (space-to-depth), as Simple Diffusion does to run a diffusion UNet on pixels at a lower resolution
(Hoogeboom et al. 2023, sec. 3.3, "downsampling with an invertible linear transform").

Encoding ``(B, C, H, W)`` in [-1, 1] gives ``(B, C * p^2, H / p, W / p)`` with ``z[:, c * p^2 + i * p + j, y, x] =
image[:, c, p * y + i, p * x + j]`` (``torch.nn.functional.pixel_unshuffle``); decoding is its exact inverse. It
reconstructs every image exactly, so it never caps quality, costs nothing at output resolution and has no weights;
the one-step generator then does all the work in latent space, at 1/p of the output resolution.

It answers the part of ``AutoencoderKL``'s interface the generator uses: ``encoder(image)`` gives posterior moments
(the mean, and a log-variance of ``LOG_VARIANCE``, which ``DiagonalGaussianDistribution`` clamps to a standard
deviation of 3e-7, so sampling equals the mode to float precision), ``decode(latents).sample``, ``quant_conv``
(none) and ``config.latent_channels`` / ``scaling_factor`` / ``patch_size``. Each latent pixel depends on its own
patch alone (``pointwise``), so tiling it would change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

LOG_VARIANCE = -30.0


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class PatchEncoder(torch.nn.Module):
    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Posterior moments ``(B, 2 C p^2, H / p, W / p)``: the patches, then a constant log-variance."""
        mean = F.pixel_unshuffle(image, self.patch_size)
        return torch.cat([mean, torch.full_like(mean, LOG_VARIANCE)], dim=1)


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Space-to-depth by ``patch_size`` (see the module doc). ``scaling_factor`` multiplies the patches into model
    latents, as ``AutoencoderKL``'s does (photos in [-1, 1] have a standard deviation near 0.5).

    ``autoencoder_type`` names the class in a config, so a base's configs say which autoencoder to build.
    """

    pointwise = True

    @register_to_config
    def __init__(self, in_channels: int = 3, patch_size: int = 4, scaling_factor: float = 1.0, autoencoder_type: str = "patch"):
        super().__init__()
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or not 1 <= patch_size <= 16:
            raise ValueError(f"patch_size {patch_size!r} must be an int from 1 to 16.")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or not 1 <= in_channels <= 4:
            raise ValueError(f"in_channels {in_channels!r} must be an int from 1 to 4.")
        self.encoder = PatchEncoder(patch_size)
        self.quant_conv = None
        self.register_to_config(latent_channels=in_channels * patch_size**2)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # no weights to ask; it computes in whatever it is given

    def encode(self, image: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        """``latent_dist``: the (zero-variance) posterior of ``image`` ``(B, C, H, W)``, as ``AutoencoderKL.encode``."""
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(self.encoder(image)))

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput:
        """Image ``(B, C, pH, pW)`` from unscaled latents ``(B, C p^2, H, W)``."""
        return DecoderOutput(F.pixel_shuffle(latents, self.config.patch_size))


def is_patch_autoencoder_config(config: dict) -> bool:
    return config.get("autoencoder_type") == "patch"


def autoencoder_from_config(config: dict) -> torch.nn.Module:
    """A ``PatchAutoencoder`` when ``config`` says ``autoencoder_type: patch``, else diffusers' ``AutoencoderKL``."""
    if is_patch_autoencoder_config(config):
        keys = {k: v for k, v in config.items() if k in ("in_channels", "patch_size", "scaling_factor")}
        return PatchAutoencoder(**keys)
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)
