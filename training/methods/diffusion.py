"""``diffusion``: train the UNet of a base as a latent diffusion model (the prior a discriminator or a one-step
generator starts from), on the latents of its frozen VAE.

DDPM's simple loss (Ho et al. 2020, eq. 14): ``E_{t, eps} || eps - eps_theta(sqrt(alpha_bar_t) z0 +
sqrt(1 - alpha_bar_t) eps, t) ||^2`` with ``t`` uniform on ``[t_min, t_max]`` and ``z0`` the scaled posterior mean.
The conditioning is the base's empty prompt (one zero token when it has no text encoder). The result is written
as a diffusers base folder with the trained UNet and the same VAE.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from d3sr_core.discriminators import sample_timesteps
from d3sr_core.generator import alphas_cumprod_from_config
from d3sr_core.losses import diffuse

from ..base_folder import write_base_folder
from ..generator import build_training_base, check_crop_size
from .base import OptimizerSpec, TrainingMethod


class DiffusionMethod(TrainingMethod):
    name = "diffusion"
    needs_lq = False
    defaults = {"diffusion": {"lr": 2e-4, "weight_decay": 0.0, "t_min": 0, "t_max": 999}}

    def __init__(self, config: dict):
        self.config = config
        self.options = config["diffusion"]
        training_base = build_training_base(config["model"])
        base = training_base.base
        check_crop_size(config["data"], base.vae, paired=False)
        if base.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("the diffusion method trains epsilon prediction; the base's scheduler config says otherwise.")
        self.vae, self.scheduler_config = base.vae, base.scheduler_config
        self.unet = base.denoiser.train().requires_grad_(True)
        self.context = training_base.conditioning["prompt_embeds"]
        self.alphas_cumprod = alphas_cumprod_from_config(base.scheduler_config)

    def models(self):
        return {"unet": self.unet}

    def optimizer_specs(self):
        return [OptimizerSpec("unet", list(self.unet.parameters()), self.options["lr"], self.options["weight_decay"])]

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        self.vae.to(accelerator.device)
        self.context = self.context.to(accelerator.device)
        self.alphas_cumprod = self.alphas_cumprod.to(accelerator.device)

    def training_step(self, batch, step, generator):
        unet = self.prepared.models["unet"]
        vae = self.vae
        x = batch["gt"]
        with torch.no_grad():
            z0 = vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
        t = sample_timesteps(x.shape[0], t_min=int(self.options["t_min"]), t_max=int(self.options["t_max"]),
                             generator=generator).to(x.device)
        noise = torch.randn(z0.shape, generator=generator).to(x.device)
        with self.accelerator.accumulate(unet):
            prediction = unet(diffuse(z0, noise, self.alphas_cumprod[t]), t, self.context.expand(x.shape[0], -1, -1)).sample
            loss = F.mse_loss(prediction.float(), noise)
            self.update("unet", loss)
        return {"loss": loss.item()}

    def exported_parameters(self):
        return {f"unet.{n}": p for n, p in self.unet.named_parameters()}

    def named_trained_parameters(self):
        return self.exported_parameters()

    def write_model(self, folder, training_config, trained=None):
        unet = copy.deepcopy(self.accelerator.unwrap_model(self.prepared.models["unet"])).eval().float()
        if trained is not None:
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    p.copy_(trained[f"unet.{name}"])
        return write_base_folder(folder / "base", unet, self.vae, self.scheduler_config)
