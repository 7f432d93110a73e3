"""TAD-SR on SD backbones: high-frequency score distillation, regression, and a time-aware discriminator on the
frozen teacher's encoder features (reference/methods.md 3.2 and 3.3). On a ResShift base, ``--method tadsr`` is the
paper's own setting, with the multi-step SR model as teacher (``tadsr_resshift.py``).

The teacher on SD is the frozen base diffusion UNet, an unconditioned prior. Each step:

1. generator: ``regression_weight * MSE(z_hat, z_target)`` + ``hsd_weight * HSD`` + ``gan_weight * (-mean D(fake))``.
   The target is the GT latent (``target: gt``) or the teacher's own multi-step result (``target: teacher``: DDIM
   from the LR latent noised to ``teacher_start``, ``teacher_steps`` steps; TAD-SR regresses to its multi-step
   teacher's output). HSD noises the student and the target latents with the *same* noise at a small timestep and
   takes the teacher's score gap; the noise is Gaussian, or uniform in [0, 1) as the official code draws it.
2. discriminator: hinge loss on the teacher's features of noised real (GT) and generated latents at
   ``t ~ U[disc_t_min, disc_t_max]``, FiLM-modulated by ``t``; the generator's term flows through the frozen teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d3sr_core.discriminators import TimeAwareDiscriminator, sample_timesteps, unet_encoder_features
from d3sr_core.generator import ddim_step
from d3sr_core.losses import diffuse, gan_discriminator_loss, gan_generator_loss, high_frequency_score_distillation
from d3sr_core.lora import adapters_disabled

from ..generator import is_resshift_base
from .base import OptimizerSpec
from .one_step import GENERATOR_DEFAULTS, OneStepMethod
from .tadsr_resshift import RESSHIFT_DEFAULTS, TADSRResShiftMethod

TARGETS = ("gt", "teacher")
NOISES = ("gaussian", "uniform")


class TADSRMethod(OneStepMethod):
    name = "tadsr"
    defaults = {
        "tadsr": {
            "generator": dict(GENERATOR_DEFAULTS),
            "discriminator": {"embed_dim": 160, "c_dim": 64, "lr": 5e-5, "weight_decay": 0.0, "disc_t_min": 0, "disc_t_max": 900},
            "loss": {"regression_weight": 1.0, "hsd_weight": 1.0, "gan_weight": 0.02},
            "target": "gt",  # gt | teacher
            "teacher_start": 500,
            "teacher_steps": 15,
            "hsd_t_min": 20,
            "hsd_t_max": 200,
            "noise": "gaussian",  # gaussian | uniform (the official rand_like)
            # On a ResShift base (tadsr_resshift.py) the teacher is the ResShift model itself and the student its full
            # copy; these options apply there, and generator, target, teacher_*, hsd_t_* and disc_t_* above do not.
            "resshift": dict(RESSHIFT_DEFAULTS),
        }
    }

    def __new__(cls, config: dict | None = None):
        # One --method, two bases: a ResShift base (an SR teacher of its own) is trained by TADSRResShiftMethod.
        # (``config`` is None when copy or pickle recreate an instance.)
        if cls is TADSRMethod and config is not None and is_resshift_base(config["model"]):
            return TADSRResShiftMethod(config)
        return super().__new__(cls)

    def __init__(self, config: dict):
        super().__init__(config)
        if self.options["target"] not in TARGETS:
            raise ValueError(f"tadsr.target {self.options['target']!r} is not one of {TARGETS}.")
        if self.options["noise"] not in NOISES:
            raise ValueError(f"tadsr.noise {self.options['noise']!r} is not one of {NOISES}.")
        probe = torch.zeros(1, self.frozen_denoiser.config.in_channels, 16, 16)
        with torch.no_grad():
            channels = [f.shape[1] for f in unet_encoder_features(self.frozen_denoiser, probe, torch.zeros(1, dtype=torch.long), self.context)]
        disc = self.options["discriminator"]
        self.discriminator = TimeAwareDiscriminator(channels, int(disc["embed_dim"]), int(disc["c_dim"]))

    def models(self):
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizer_specs(self):
        gen, disc = self.options["generator"], self.options["discriminator"]
        return [
            OptimizerSpec("generator", list(self.generator.trained_parameters().values()), gen["lr"], gen["weight_decay"]),
            OptimizerSpec("discriminator", list(self.discriminator.parameters()), disc["lr"], disc["weight_decay"]),
        ]

    def _noise(self, shape, generator: torch.Generator, device) -> torch.Tensor:
        draw = torch.rand if self.options["noise"] == "uniform" else torch.randn
        return draw(shape, generator=generator).to(device)

    @torch.no_grad()
    def teacher_target(self, z_lq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The teacher's DDIM result (eta 0) from the LR latent noised to ``teacher_start``."""
        start, steps = int(self.options["teacher_start"]), int(self.options["teacher_steps"])
        timesteps = torch.linspace(start, 0, steps + 1).round().long().to(z_lq.device)
        z = diffuse(z_lq, self._noise(z_lq.shape, generator, z_lq.device), self.alphas_cumprod[timesteps[:1]].expand(z_lq.shape[0]))
        for t, t_next in zip(timesteps[:-1], timesteps[1:]):
            t_batch = t.expand(z.shape[0])
            eps = self.teacher_epsilon(z, t_batch)
            x0 = self.x0_from_epsilon(z, eps, t_batch)
            z = ddim_step(x0, eps, self.alphas_cumprod[t_next])
        return x0

    def _features(self, latents: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        return unet_encoder_features(self.frozen_denoiser, latents, t, self.contexts(latents.shape[0]))

    def training_step(self, batch, step, generator):
        accelerator = self.accelerator
        g_model, d_model = self.prepared.models["generator"], self.prepared.models["discriminator"]
        generator_module = accelerator.unwrap_model(g_model)
        discriminator = accelerator.unwrap_model(d_model)
        weights = self.options["loss"]
        gt, lq_up = batch["gt"], self.upsampled(batch)
        batch_size, device = gt.shape[0], gt.device
        with accelerator.accumulate(g_model, d_model):
            with torch.no_grad(), adapters_disabled(generator_module.generator.vae):
                z_gt = batch["gt_latent"] if "gt_latent" in batch else generator_module.generator.encode(gt)
                z_target = z_gt if self.options["target"] == "gt" else self.teacher_target(generator_module.generator.encode(lq_up), generator)
            z_hat, _ = g_model(lq_up)
            regression = F.mse_loss(z_hat, z_target)

            t_h = sample_timesteps(batch_size, t_min=int(self.options["hsd_t_min"]), t_max=int(self.options["hsd_t_max"]),
                                   generator=generator).to(device)
            noise = self._noise(z_hat.shape, generator, device)
            with torch.no_grad():
                eps_student = self.teacher_epsilon(diffuse(z_hat.detach(), noise, self.alphas_cumprod[t_h]), t_h)
                eps_target = self.teacher_epsilon(diffuse(z_target, noise, self.alphas_cumprod[t_h]), t_h)
            hsd = high_frequency_score_distillation(z_hat, eps_student, eps_target)

            disc = self.options["discriminator"]
            t_d = sample_timesteps(batch_size, t_min=int(disc["disc_t_min"]), t_max=int(disc["disc_t_max"]), generator=generator).to(device)
            noise_d = self._noise(z_hat.shape, generator, device)
            discriminator.requires_grad_(False)
            fake_for_g = discriminator(self._features(diffuse(z_hat, noise_d, self.alphas_cumprod[t_d]), t_d), t_d)
            gan_g = gan_generator_loss(fake_for_g, "hinge")
            loss_g = weights["regression_weight"] * regression + weights["hsd_weight"] * hsd + weights["gan_weight"] * gan_g
            self.update("generator", loss_g)
            discriminator.requires_grad_(True)

            with torch.no_grad():
                both = diffuse(torch.cat([z_gt, z_hat.detach()]), torch.cat([noise_d, noise_d]), self.alphas_cumprod[torch.cat([t_d, t_d])])
                features = self._features(both, torch.cat([t_d, t_d]))
            real_logits, fake_logits = d_model(features, torch.cat([t_d, t_d])).chunk(2)
            loss_d = gan_discriminator_loss(real_logits, fake_logits, "hinge")
            self.update("discriminator", loss_d)
        return {"loss_g": loss_g.item(), "regression": regression.item(), "hsd": hsd.item(), "gan_g": gan_g.item(),
                "loss_d": loss_d.item()}

    def named_trained_parameters(self):
        params = {f"generator.{k}": v for k, v in self.generator.trained_parameters().items()}
        params.update({f"discriminator.{n}": p for n, p in self.discriminator.named_parameters()})
        # Spectral norm's power-iteration vectors change at every step: a resumed run needs them too.
        params.update({f"discriminator.{n}": b for n, b in self.discriminator.named_buffers()})
        return params
