"""D3SR: teacher-free one-step SR trained against a diffusion discriminator (reference/methods.md section 4).

Generator: SD 2.x UNet with LoRA, one step from the LR latent at ``model.timestep``:
``z_hat = (z_L - sqrt(1 - alpha_bar_T) eps(z_L, T)) / sqrt(alpha_bar_T)``.
Discriminator: the down and mid blocks of a pretrained diffusion UNet with LoRA and an MLP patch head, fed
``F(z, t)`` of real and generated latents at timesteps drawn per sample.
Generator loss: ``mse_weight * MSE(x_hat, x) + ea_dists_weight * EA-DISTS(x_hat, x) + gan_weight * L_G``, plus
our optional ``l1_weight * |x_hat - x|`` and ``lpips_weight * ST-LPIPS-VGG(x_hat, x)`` (a learned perceptual distance
that needs no ImageNet VGG, for runs where DISTS's weights are not on disk).

The paper leaves most numbers open (no code or weights were released); each is an option below, and the
defaults are choices, not the authors' values: LoRA rank 16 on OSEDiff's UNet layers, a discriminator on a copy
of the generator's base (the DFOSD variant; the paper uses SDXL), timesteps uniform on [0, 999], non-saturating
loss, lambda_EA-DISTS = 1, lambda_GAN = 0.1, AdamW lr 5e-5 for both (as reported by a summary, unverified).
"""

from __future__ import annotations

import torch

from d3sr_core.backbones import load_base
from d3sr_core.discriminators import DiffusionDiscriminator, sample_timesteps
from d3sr_core.losses import diffuse, ea_dists, gan_discriminator_loss, gan_generator_loss
from d3sr_core.lora import adapters_disabled
from d3sr_core.perceptual import DISTS

from .base import OptimizerSpec
from .one_step import GENERATOR_DEFAULTS, OneStepMethod, shift_tolerant_lpips_vgg


class D3SRMethod(OneStepMethod):
    name = "d3sr"
    defaults = {
        "d3sr": {
            # The paper's figure keeps the VAE encoder frozen (vae_encoder_lora_rank 0).
            "generator": dict(GENERATOR_DEFAULTS),
            "discriminator": {
                "backbone": None,  # an SD 2.x base path; None: a copy of the generator's base
                "lora_rank": 16,
                "head_hidden_channels": 256,
                "head_hidden_layers": 2,
                "lr": 5e-5,
                "weight_decay": 1e-2,
                "t_min": 0,
                "t_max": 999,
                "timestep_distribution": "uniform",  # uniform | logit_normal
                "loss": "non_saturating",  # non_saturating | hinge
            },
            "loss": {
                "mse_weight": 1.0,
                "ea_dists_weight": 1.0,
                "gan_weight": 0.1,
                "edge_channels": "gray",  # gray (OSDFace) | rgb
                "edge_weight": 1.0,
                "l1_weight": 0.0,
                "lpips_weight": 0.0,  # ST-LPIPS on its VGG (pyiqa + the stlpips-pytorch wheel)
            },
            # DISTS weights: "files" reads vgg16-397923af.pth and the DISTS alpha/beta from perceptual_weights_dir,
            # $TORCH_HOME/hub/checkpoints or pyiqa's cache; "random" uses a random VGG (smoke tests only).
            "perceptual": "files",
            "perceptual_weights_dir": None,
        }
    }

    def __init__(self, config: dict):
        super().__init__(config)
        self.loss_opts = self.options["loss"]
        self.disc_opts = disc_opts = self.options["discriminator"]
        if disc_opts["backbone"] is None:
            disc_unet = self.frozen_denoiser
        else:
            disc_unet = load_base(disc_opts["backbone"], load_text_encoder=False).denoiser
        latent_channels = self.training_base.base.vae.config.latent_channels
        width = self.context.shape[-1]
        if disc_unet.config.in_channels != latent_channels or disc_unet.config.cross_attention_dim != width:
            raise ValueError(
                f"d3sr.discriminator.backbone takes {disc_unet.config.in_channels}-channel latents and "
                f"{disc_unet.config.cross_attention_dim}-wide text, but the generator makes {latent_channels}-channel "
                f"latents with {width}-wide text: use a backbone of the same latent space."
            )
        if config["train"]["gradient_checkpointing"]:
            disc_unet.enable_gradient_checkpointing()
        self.discriminator = DiffusionDiscriminator(
            disc_unet,
            lora_rank=int(disc_opts["lora_rank"]),
            head_hidden_channels=int(disc_opts["head_hidden_channels"]),
            head_hidden_layers=int(disc_opts["head_hidden_layers"]),
        )
        self.frozen_denoiser = None  # its blocks now belong to the discriminator
        self.dists = self.perceptual(DISTS) if float(self.loss_opts["ea_dists_weight"]) else None
        self.lpips = shift_tolerant_lpips_vgg() if float(self.loss_opts["lpips_weight"]) else None

    def models(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizer_specs(self) -> list[OptimizerSpec]:
        gen, disc = self.config["d3sr"]["generator"], self.disc_opts
        return [
            OptimizerSpec("generator", list(self.generator.trained_parameters().values()), gen["lr"], gen["weight_decay"]),
            OptimizerSpec("discriminator", self.discriminator.trainable_parameters(), disc["lr"], disc["weight_decay"]),
        ]

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        for network in (self.dists, self.lpips):
            if network is not None:
                network.to(accelerator.device)

    def _noised(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F(latents, t), t)`` with ``t`` drawn per sample from the configured distribution."""
        opts = self.disc_opts
        t = sample_timesteps(
            latents.shape[0], t_min=int(opts["t_min"]), t_max=int(opts["t_max"]),
            distribution=opts["timestep_distribution"], generator=generator,
        ).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        return diffuse(latents, noise, self.alphas_cumprod[t]), t

    def training_step(self, batch, step, generator):
        accelerator = self.accelerator
        g_model, d_model = self.prepared.models["generator"], self.prepared.models["discriminator"]
        generator_module = accelerator.unwrap_model(g_model)
        discriminator = accelerator.unwrap_model(d_model)
        weights, kind = self.loss_opts, self.disc_opts["loss"]
        gt, lq_up = batch["gt"], self.upsampled(batch)
        with accelerator.accumulate(g_model, d_model):
            z_real = batch.get("gt_latent")
            if z_real is None:
                with torch.no_grad(), adapters_disabled(generator_module.generator.vae):
                    z_real = generator_module.generator.encode(gt)
            z_hat, x_hat = g_model(lq_up)
            mse = torch.nn.functional.mse_loss(x_hat, gt)
            zero = x_hat.new_zeros(())
            ea = zero if self.dists is None else ea_dists(
                self.dists, (x_hat + 1) / 2, (gt + 1) / 2,
                edge_channels=weights["edge_channels"], edge_weight=weights["edge_weight"],
            )
            l1 = (x_hat - gt).abs().mean()
            lpips = zero if self.lpips is None else self.lpips((x_hat + 1) / 2, (gt + 1) / 2).mean()
            # The generator's adversarial term goes through the unwrapped discriminator with its weights frozen:
            # its gradient must reach the generator only, and no distributed gradient sync may start for D.
            discriminator.set_trainable(False)
            noised_fake, t_fake = self._noised(z_hat, generator)
            gan_g = gan_generator_loss(discriminator(noised_fake, t_fake, self.contexts(z_hat.shape[0])), kind)
            loss_g = (
                weights["mse_weight"] * mse + weights["l1_weight"] * l1 + weights["ea_dists_weight"] * ea
                + weights["lpips_weight"] * lpips + weights["gan_weight"] * gan_g
            )
            self.update("generator", loss_g)
            discriminator.set_trainable(True)

            # Real and generated latents in one forward pass (one distributed gradient sync).
            both, t = self._noised(torch.cat([z_real, z_hat.detach()]), generator)
            logits = d_model(both, t, self.contexts(both.shape[0]))
            real_logits, fake_logits = logits.chunk(2)
            loss_d = gan_discriminator_loss(real_logits, fake_logits, kind)
            self.update("discriminator", loss_d)
        return {
            "loss_g": loss_g.item(), "mse": mse.item(), "l1": l1.item(), "ea_dists": ea.item(), "lpips": lpips.item(), "gan_g": gan_g.item(),
            "loss_d": loss_d.item(), "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item(),
        }

    def named_trained_parameters(self):
        params = {f"generator.{k}": v for k, v in self.generator.trained_parameters().items()}
        trainable = {id(p) for p in self.discriminator.trainable_parameters()}
        params.update({f"discriminator.{n}": p for n, p in self.discriminator.named_parameters() if id(p) in trainable})
        return params
