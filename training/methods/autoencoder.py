"""``autoencoder``: train the ``AutoencoderKL`` of a base built from configs (a small VAE of our own).

Loss (Rombach et al. 2022, sec. 3 and appendix G, without the patch GAN): ``l1_weight * |x_rec - x|`` +
``mse_weight * (x_rec - x)^2`` + ``kl_weight * KL(q(z|x) || N(0, I))``, the KL summed over latent elements.
The model is written as a diffusers base folder (the UNet as built, untrained) whose VAE ``scaling_factor`` is
``1 / std`` of the latents of the training images, as LDM sets it, so a diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from d3sr_core.generator import vae_scale_factor

from ..base_folder import write_base_folder
from ..data import SRPairDataset
from ..generator import build_training_base, check_crop_size
from .base import OptimizerSpec, TrainingMethod

INITIAL_LOG_VARIANCE = -8.0
LATENT_STD_IMAGES = 16
"""Training crops (the first of the seeded stream) that measure the latent standard deviation."""


class AutoencoderTrainingModel(nn.Module):
    """``forward(x, noise) -> (x_rec, kl)``: encode ``x`` ``(B, 3, H, W)`` in [-1, 1], draw the latent with the given
    standard-normal ``noise`` (so randomness comes from the step's generator), decode; ``kl`` is ``(B,)``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z).sample, posterior.kl()


class AutoencoderMethod(TrainingMethod):
    name = "autoencoder"
    needs_lq = False
    defaults = {"autoencoder": {"lr": 4e-4, "weight_decay": 0.0, "l1_weight": 1.0, "mse_weight": 0.0, "kl_weight": 1e-6}}

    def __init__(self, config: dict):
        if config["model"]["base_configs"] is None:
            raise ValueError("the autoencoder method trains a VAE from model.base_configs; set them (see presets/default_vae.yaml).")
        self.config = config
        self.options = config["autoencoder"]
        training_base = build_training_base(config["model"])
        self.unet = training_base.base.denoiser
        self.scheduler_config = training_base.base.scheduler_config
        vae = training_base.base.vae
        check_crop_size(config["data"], vae, paired=False)
        # A fresh posterior has std ~ 1, which buries the mean in noise; the reconstruction then learns slowly.
        # Start the log-variance low (std ~ 0.02) and let the KL term move it.
        quant = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
        with torch.no_grad():
            quant.bias[vae.config.latent_channels:] = INITIAL_LOG_VARIANCE
        self.model = AutoencoderTrainingModel(vae.train().requires_grad_(True))

    def models(self):
        return {"vae": self.model}

    def optimizer_specs(self):
        params = list(self.model.vae.parameters())
        return [OptimizerSpec("vae", params, self.options["lr"], self.options["weight_decay"])]

    def training_step(self, batch, step, generator):
        model = self.prepared.models["vae"]
        x = batch["gt"]
        vae = self.accelerator.unwrap_model(model).vae
        factor = vae_scale_factor(vae)
        shape = (x.shape[0], vae.config.latent_channels, x.shape[-2] // factor, x.shape[-1] // factor)
        noise = torch.randn(shape, generator=generator).to(x.device)
        with self.accelerator.accumulate(model):
            x_rec, kl = model(x, noise)
            l1, mse = (x_rec - x).abs().mean(), F.mse_loss(x_rec, x)
            o = self.options
            loss = o["l1_weight"] * l1 + o["mse_weight"] * mse + o["kl_weight"] * kl.mean()
            self.update("vae", loss)
        psnr = 10 * torch.log10(4 / mse.detach().clamp_min(1e-10))  # images span [-1, 1]: peak-to-peak 2
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.mean().item(), "psnr": psnr.item()}

    def exported_parameters(self):
        return {f"vae.{n}": p for n, p in self.model.vae.named_parameters()}

    def named_trained_parameters(self):
        return self.exported_parameters()

    @torch.no_grad()
    def latent_std(self, vae: nn.Module) -> float:
        """Standard deviation of the posterior means of the first training crops."""
        data = self.config["data"]
        dataset = SRPairDataset(data["hr_dir"], crop_size=int(data["crop_size"]), scale=int(data["scale"]),
                                seed=int(self.config["seed"]), flip=False, make_lq=False)
        device = next(vae.parameters()).device
        images = torch.stack([dataset[i]["gt"] for i in range(LATENT_STD_IMAGES)]).to(device)
        return vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist.mean.float().std().item()

    def write_model(self, folder, training_config, trained=None):
        vae = copy.deepcopy(self.accelerator.unwrap_model(self.prepared.models["vae"]).vae).eval().float()
        if trained is not None:
            with torch.no_grad():
                for name, p in vae.named_parameters():
                    p.copy_(trained[f"vae.{name}"])
        vae.register_to_config(scaling_factor=1.0 / self.latent_std(vae))
        return write_base_folder(folder / "base", self.unet, vae, self.scheduler_config)
