"""TAD-SR on a ResShift base, as the paper's main model is made (reference/methods.md 3.1 and 3.2; official
``trainer.py: TrainerDistillDifIR`` and ``models/gaussian_diffusion.py: training_losses_distill / training_losses_D``).

The teacher is a multi-step super-resolution model: a ResShift Swin UNet conditioned on the low-quality image, with its
VQ autoencoder and residual-shifting schedule. The student starts as a full copy of the teacher (no LoRA) and runs one
step at t = T - 1 from ``x_T = z_y + kappa sqrt(eta_T) eps``. Each training step, in the official order:

1. discriminator: the frozen teacher's encoder features (the end of every level and the middle block) of the GT latent
   and of the student's latent, both shifted to ``t_d ~ U{0..T-2}`` with the same noise, through the time-aware
   discriminator; hinge loss (the student's side detached).
2. student: ``regression_weight * MSE(z_hat, z_teacher)`` with ``z_teacher`` the teacher's DDIM result from the *same*
   ``x_T`` (all T steps unless ``tadsr.resshift.teacher_steps``); ``hsd_weight * HSD`` at ``t_h ~ U{0..2}``: the
   student's and the target's latents shifted with the same noise, the teacher's x_0 of each turned into noise by
   ResShift's x_0 -> eps formula, and the gap times the student latent; ``gan_weight * (-mean D)`` on the features of
   step 1 through the updated discriminator, whose gradient reaches the student through the frozen teacher.

The HSD and discriminator noise is Gaussian, or uniform in [0, 1) as the official ``th.rand_like`` draws it
(``tadsr.noise``). The official HSD divides the teacher's input by ``sqrt(eta_t kappa^2 + 1)`` twice (once before its
``ddim_sample``, once inside); ``tadsr.resshift.hsd_input_scaled_twice`` reproduces that, the default scales once, as
every other call of the network does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from d3sr_core.backbones.resshift import (
    check_resshift_config,
    embedded_configs,
    unet_from_config,
    vq_diffusers_config,
    vq_from_config,
)
from d3sr_core.checkpoints import OneStepCheckpoint, save_checkpoint
from d3sr_core.discriminators import TimeAwareDiscriminator
from d3sr_core.losses import gan_discriminator_loss, gan_generator_loss, high_frequency_score_distillation
from d3sr_core.options import PRESETS, UpscaleOptions
from d3sr_core.residual_shift import (
    ResShiftGenerator,
    bicubic_upsample,
    epsilon_from_x_start,
    normalized_input,
    prior_sample,
    q_sample,
    schedule_from_config,
)

from ..generator import portable_paths
from .base import OptimizerSpec, TrainingMethod, frozen_dtype

RESSHIFT_DEFAULTS = {
    "student_lr": 5e-5,  # AdamW, as the discriminator's (official train.lr)
    "student_weight_decay": 0.0,
    "teacher_steps": None,  # None: every trained step (15), the official ddim_sample_loop from t = T - 1
    "hsd_target": "teacher",  # teacher | gt: the official score_distill_target (the regression is always to the teacher)
    "hsd_t_max": 2,  # t_h ~ U{0..hsd_t_max}: the official randint(0, 3) (uniform_sampling: False)
    "disc_t_max": None,  # None: T - 2, the official randint(0, T - 1)
    "hsd_input_scaled_twice": False,  # the official HSD's double input normalisation
}
"""``tadsr.resshift``: the options of TAD-SR on a ResShift base."""
HSD_TARGETS = ("teacher", "gt")
NOISES = ("gaussian", "uniform")


def resshift_teacher(model: dict) -> ResShiftGenerator:
    """The frozen teacher: built from ``model.base_configs`` (``{unet, vae, scheduler}``: the official ``model``,
    ``autoencoder`` and ``diffusion`` params) with random weights (seed the global RNG first), or loaded from
    ``model.base`` (an official ResShift / TAD-SR ``.pth`` with its VQ ``model.autoencoder`` and official YAML
    ``model.resshift_config``, or one of our ResShift files, which holds both)."""
    configs = model.get("base_configs")
    if configs is not None:
        try:
            config = check_resshift_config({"model": configs.get("unet"), "diffusion": configs.get("scheduler"),
                                            "autoencoder": configs.get("vae")})
        except ValueError as err:
            raise ValueError(f"model.base_configs is not a ResShift config ({str(err).rstrip('.')}).") from None
        vq = vq_from_config(vq_diffusers_config(config["autoencoder"], config["diffusion"]["scale_factor"]))
        teacher = ResShiftGenerator(vq, unet_from_config(config["model"]), copy.deepcopy(config))
    else:
        from d3sr_core.loading import load_model

        if Path(model["base"]).suffix != ".safetensors" and model.get("autoencoder") is None:
            raise ValueError(f"model.base {model['base']} is a ResShift UNet; give its VQ autoencoder as model.autoencoder "
                             "(autoencoder_vq_f4.pth).")
        teacher = load_model(model["base"], model.get("autoencoder"), base_config=model.get("resshift_config")).generator
        if not isinstance(teacher, ResShiftGenerator):
            raise ValueError(f"model.base {model['base']} is not a ResShift model.")
    return teacher.eval().requires_grad_(False)


class TADSRResShiftMethod(TrainingMethod):
    """``--method tadsr`` on a ResShift base (``TADSRMethod`` hands a run to it when the base is ResShift)."""

    name = "tadsr"
    needs_lq = True

    def __init__(self, config: dict):
        self.config = config
        self.options = config[self.name]
        self.resshift = self.options["resshift"]
        model = config["model"]
        if self.options["noise"] not in NOISES:
            raise ValueError(f"tadsr.noise {self.options['noise']!r} is not one of {NOISES}.")
        if self.resshift["hsd_target"] not in HSD_TARGETS:
            raise ValueError(f"tadsr.resshift.hsd_target {self.resshift['hsd_target']!r} is not one of {HSD_TARGETS}.")
        if model.get("init_generator") is not None:
            raise ValueError("model.init_generator does not apply to a ResShift base: the student starts as a copy of model.base.")
        if config["data"].get("latent_dir") is not None:
            raise ValueError("data.latent_dir does not apply to a ResShift base: its VQ autoencoder encodes the images itself.")
        if config["train"]["gradient_checkpointing"]:
            raise ValueError("train.gradient_checkpointing is not available for the ResShift Swin UNet; set it to false.")
        self.teacher = resshift_teacher(model)
        # The official student is copy.deepcopy(teacher): the same network, every weight trained.
        self.student = copy.deepcopy(self.teacher.denoiser).train().requires_grad_(True)
        diffusion = self.teacher.config["diffusion"]
        self.steps = int(diffusion["steps"])
        full = schedule_from_config(diffusion)
        # float32 copies of the float64 tables, as the official _extract_into_tensor casts them.
        self.etas, self.sqrt_etas = full.etas.float(), full.sqrt_etas.float()
        self.kappa = float(diffusion["kappa"])
        self.hsd_t_max = self._timestep_option("hsd_t_max", self.resshift["hsd_t_max"], self.steps - 1)
        disc_t_max = self.resshift["disc_t_max"]
        self.disc_t_max = self._timestep_option("disc_t_max", self.steps - 2 if disc_t_max is None else disc_t_max, self.steps - 1)
        teacher_steps = self.resshift["teacher_steps"]
        if teacher_steps is not None and not 1 <= int(teacher_steps) <= self.steps:
            raise ValueError(f"tadsr.resshift.teacher_steps={teacher_steps} must be from 1 to the schedule's {self.steps} (or null for all).")
        self.teacher_steps = None if teacher_steps is None else int(teacher_steps)
        self._check_data(config["data"])
        self.export_defaults = self._export_defaults(model.get("inference_defaults") or {})
        lq_size = self.teacher.padding_offset
        probe = torch.zeros(1, self.teacher.config["model"]["in_channels"], lq_size, lq_size)
        with torch.no_grad():
            features = self.teacher.denoiser.encoder_features(probe, torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, lq_size, lq_size))
        disc = self.options["discriminator"]
        self.discriminator = TimeAwareDiscriminator([f.shape[1] for f in features], int(disc["embed_dim"]), int(disc["c_dim"]))

    @staticmethod
    def _timestep_option(key: str, value, highest: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= highest:
            raise ValueError(f"tadsr.resshift.{key}={value!r} must be a timestep from 0 to {highest}.")
        return value

    def _check_data(self, data: dict) -> None:
        """The LQ crop is what the UNet is conditioned on, at the latent's size: a multiple of its ``lq_size``."""
        scale, crop = int(data["scale"]), int(data["crop_size"])
        if scale != self.teacher.sf:
            raise ValueError(f"data.scale={scale}, but the ResShift model upscales x{self.teacher.sf} (its diffusion sf).")
        side = self.teacher.padding_offset * scale
        if crop % side:
            raise ValueError(f"data.crop_size={crop} must be a multiple of {side} (the ResShift lq_size "
                             f"{self.teacher.padding_offset} times the scale {scale}).")

    def _export_defaults(self, overrides: dict) -> UpscaleOptions:
        """The official inference settings (``PRESETS['resshift']``) with TAD-SR's one step, then
        ``model.inference_defaults``."""
        unknown = sorted(set(overrides) - set(UpscaleOptions.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model.inference_defaults has no option {unknown[0]!r}; see d3sr_core.options.UpscaleOptions.")
        return PRESETS["resshift"].updated(scale=self.teacher.sf, steps=1).updated(**overrides)

    def models(self):
        return {"generator": self.student, "discriminator": self.discriminator}

    def optimizer_specs(self):
        disc = self.options["discriminator"]
        return [
            OptimizerSpec("discriminator", list(self.discriminator.parameters()), disc["lr"], disc["weight_decay"]),
            OptimizerSpec("generator", list(self.student.parameters()), self.resshift["student_lr"], self.resshift["student_weight_decay"]),
        ]

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        device = accelerator.device
        self.teacher.vae.to(device)
        # A teacher only runs forward: in a mixed-precision run it is kept in that precision.
        self.teacher.denoiser.to(device, frozen_dtype(accelerator.mixed_precision))
        self.etas, self.sqrt_etas = self.etas.to(device), self.sqrt_etas.to(device)

    def _noise(self, shape, generator: torch.Generator, device) -> torch.Tensor:
        draw = torch.rand if self.options["noise"] == "uniform" else torch.randn
        return draw(shape, generator=generator).to(device)

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, 1, 1, 1)

    def shifted(self, x0: torch.Tensor, z_y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` shifted toward ``z_y`` at per-sample timesteps ``t`` (the official ``prior_sample_intermediate``)."""
        return q_sample(x0, z_y, self._at(self.etas, t), self._at(self.sqrt_etas, t), self.kappa, noise)

    def teacher_x_start(self, x_t: torch.Tensor, t: torch.Tensor, lq: torch.Tensor, scaled_twice: bool = False) -> torch.Tensor:
        """The frozen teacher's x_0 of ``x_t`` at per-sample timesteps ``t`` ``(B,)`` (float32)."""
        eta = self._at(self.etas, t)
        x_in = normalized_input(x_t, eta, self.kappa)
        if scaled_twice:
            x_in = normalized_input(x_in, eta, self.kappa)
        denoiser = self.teacher.denoiser
        dtype = next(denoiser.parameters()).dtype
        return denoiser(x_in.to(dtype), t, lq=lq.to(dtype)).float()

    def teacher_features(self, x_t: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's encoder features of ``x_t`` at ``t`` (the official ``only_fea=True`` call)."""
        denoiser = self.teacher.denoiser
        dtype = next(denoiser.parameters()).dtype
        x_in = normalized_input(x_t, self._at(self.etas, t), self.kappa)
        return [f.float() for f in denoiser.encoder_features(x_in.to(dtype), t, lq=lq.to(dtype))]

    def hsd_loss(self, z_hat: torch.Tensor, z_target: torch.Tensor, z_y: torch.Tensor, lq: torch.Tensor,
                 t_h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """HSD on the residual-shifting process: ``z_hat`` and ``z_target`` shifted to ``t_h`` with the same ``noise``,
        the teacher's x_0 of each converted to noise (``epsilon_from_x_start``), and
        ``mean(stopgrad(eps_student - eps_target) * z_hat)``."""
        eta, sqrt_eta = self._at(self.etas, t_h), self._at(self.sqrt_etas, t_h)
        twice = bool(self.resshift["hsd_input_scaled_twice"])
        with torch.no_grad():
            eps = []
            for z in (z_hat.detach(), z_target):
                x_t = self.shifted(z, z_y, t_h, noise)
                eps.append(epsilon_from_x_start(x_t, z_y, self.teacher_x_start(x_t, t_h, lq, twice), eta, sqrt_eta, self.kappa))
        return high_frequency_score_distillation(z_hat, eps[0], eps[1])

    def student_input(self, z_y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_T = z_y + kappa sqrt(eta_T) noise`` (what the student and the teacher's DDIM start from)."""
        return prior_sample(z_y, self.sqrt_etas[-1], self.kappa, noise)

    def student_latents(self, model, x_T: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The student's one step: x_0 of ``x_T`` at t = T - 1 (TAD-SR's inference)."""
        t = torch.full((x_T.shape[0],), self.steps - 1, dtype=torch.long, device=x_T.device)
        return model(normalized_input(x_T, self.etas[-1], self.kappa), t, lq=lq).float()

    def training_step(self, batch, step, generator):
        accelerator = self.accelerator
        g_model, d_model = self.prepared.models["generator"], self.prepared.models["discriminator"]
        discriminator = accelerator.unwrap_model(d_model)
        weights = self.options["loss"]
        gt, lq = batch["gt"], batch["lq"]
        batch_size, device = gt.shape[0], gt.device
        with accelerator.accumulate(g_model, d_model):
            with torch.no_grad():
                z_y = self.teacher.encode(bicubic_upsample(lq.float(), self.teacher.sf))
                z_gt = self.teacher.encode(gt)
            # x_T's noise is Gaussian, as the official torch.randn.
            x_T = self.student_input(z_y, torch.randn(z_y.shape, generator=generator).to(device))
            z_hat = self.student_latents(g_model, x_T, lq)
            with torch.no_grad():
                z_teacher = self.teacher.ddim_x_start(x_T, z_y, lq, self.teacher_steps)

            t_d = torch.randint(0, self.disc_t_max + 1, (batch_size,), generator=generator).to(device)
            noise_d = self._noise(z_hat.shape, generator, device)
            with torch.no_grad():
                real = self.teacher_features(self.shifted(z_gt, z_y, t_d, noise_d), t_d, lq)
            fake = self.teacher_features(self.shifted(z_hat, z_y, t_d, noise_d), t_d, lq)
            both = [torch.cat([r, f.detach()]) for r, f in zip(real, fake)]
            real_logits, fake_logits = d_model(both, torch.cat([t_d, t_d])).chunk(2)
            loss_d = gan_discriminator_loss(real_logits, fake_logits, "hinge")
            self.update("discriminator", loss_d)

            regression = F.mse_loss(z_hat, z_teacher)
            t_h = torch.randint(0, self.hsd_t_max + 1, (batch_size,), generator=generator).to(device)
            noise_h = self._noise(z_hat.shape, generator, device)
            z_hsd = z_teacher if self.resshift["hsd_target"] == "teacher" else z_gt
            hsd = self.hsd_loss(z_hat, z_hsd, z_y, lq, t_h, noise_h)
            # The generator's term goes through the just-updated discriminator (official order), without leaving
            # gradients on it.
            discriminator.requires_grad_(False)
            gan_g = gan_generator_loss(discriminator(fake, t_d), "hinge")
            loss_g = weights["regression_weight"] * regression + weights["hsd_weight"] * hsd + weights["gan_weight"] * gan_g
            self.update("generator", loss_g)
            discriminator.requires_grad_(True)
        return {"loss_g": loss_g.item(), "regression": regression.item(), "hsd": hsd.item(), "gan_g": gan_g.item(),
                "loss_d": loss_d.item()}

    def named_trained_parameters(self):
        params = {f"generator.{n}": p for n, p in self.student.named_parameters()}
        params.update({f"discriminator.{n}": p for n, p in self.discriminator.named_parameters()})
        # Spectral norm's power-iteration vectors change at every step: a resumed run needs them too.
        params.update({f"discriminator.{n}": b for n, b in self.discriminator.named_buffers()})
        return params

    def exported_parameters(self):
        return dict(self.student.named_parameters())

    def write_model(self, folder, training_config, trained=None):
        """``folder/model.safetensors``: the student's whole UNet with the VQ autoencoder and the ResShift config
        embedded (self-contained), one step at t = T - 1 by default."""
        trained = trained if trained is not None else self.exported_parameters()
        checkpoint = OneStepCheckpoint(
            method=self.name,
            base_family="resshift",
            prediction_type="x_start",
            timestep=self.steps - 1,
            adapters=[],
            tensors={f"unet.{k}": v.detach().float().cpu() for k, v in trained.items()},
            defaults=self.export_defaults,
            base_configs=embedded_configs(self.teacher.config),
            base_tensors={f"vae.{k}": v.detach().float().cpu() for k, v in self.teacher.vae.state_dict().items()},
            training_config=portable_paths(training_config),
        )
        return save_checkpoint(checkpoint, Path(folder) / "model.safetensors")
