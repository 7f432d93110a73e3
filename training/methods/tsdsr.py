"""TSD-SR: one-step SR on SD3 distilled by target score distillation (reference/methods.md 2.3).

Generator: the SD3 transformer with LoRA (TSD-SR's targets) and a LoRA on the VAE encoder, one step at sigma = 1
(``x0 = z_L - v``). One frozen copy of the base serves two roles through two adapters: the teacher (base + the
optional teacher LoRA, ``tsdsr.teacher_lora``, a TSD-SR ``teacher.safetensors``) and the fake score (base + its
own attention-only LoRA "reg", trained by its own optimizer at its own learning rate). Each step:

1. generator: ``lpips_weight * LPIPS(x_hat, x) + latent_mse_weight * MSE(z_hat, z_H) + tsd_weight * TSD`` where TSD
   noises ``z_hat`` and the HR latent ``z_H`` with the same noise at one level drawn from the flow-matching table
   (index in ``[t_index_min, t_index_max]``), takes the classifier-free-guided velocities of teacher and fake score
   (the negative prompt is the unconditional side), optionally along DASM's Euler trajectory, and becomes
   ``0.5 * MSE(z_hat, stopgrad(z_hat - grad))`` (d3sr_core.losses.target_score_distillation);
2. fake score: ``0.5 * mean(w * (x0_pred - z_hat)^2)`` on ``z_hat.detach()`` noised at a level drawn per sample,
   ``x0_pred = z_t - sigma * v_reg`` and ``w = sigmoid(n)``, ``n ~ N(0, 1)`` (the official "logit_normal" weight),
   drawn per sample.

As in the official ``train.py``: the LR latent is drawn from the VAE posterior (``tsdsr.vae_sample: sample``), the
perceptual loss is LPIPS on AlexNet (pyiqa's ``lpips``), and a guidance scale that would change nothing (the prompt's
and the negative prompt's embeddings equal) is refused.

Where this differs from the official run: teacher and fake score see the run's one prompt embedding
(``model.prompt_embeddings``), not per-image captions (DAPE tags or LLaVA captions), and the fake score's noise
level and weight are drawn per sample rather than once per batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from d3sr_core.backbones.sd3 import predict_transformer
from d3sr_core.checkpoints import read_tsdsr_lora
from d3sr_core.discriminators import sample_timesteps
from d3sr_core.generator import flow_match_sigmas
from d3sr_core.losses import (
    classifier_free_guidance,
    dasm_sigmas,
    fake_score_flow_loss,
    flow_diffuse,
    gradient_as_loss,
    target_score_distillation,
)
from d3sr_core.lora import AdapterSpec, adapter_selected, adapters_disabled, add_adapters
from d3sr_core.perceptual import LPIPSAlex

from ..generator import lora_targets
from .base import OptimizerSpec
from .one_step import GENERATOR_DEFAULTS, OneStepMethod
from .osediff import check_guidance, check_vae_sample

FAKE_SCORE_LORA_SUFFIXES = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
"""The fake score's ("reg") targets in TSD-SR's ``train.py``: the joint-attention projections only."""
TSD_LOSS_WEIGHT = 0.5
"""TSD-SR's ``tsd_loss = 0.5 * MSE(z_hat, (z_hat - grad).detach())``."""
FAKE_SCORE = "reg"
TEACHER = "teacher"


class TSDSRMethod(OneStepMethod):
    name = "tsdsr"
    families = ("sd3",)
    default_timestep = 1000
    defaults = {
        "tsdsr": {
            "generator": {**GENERATOR_DEFAULTS, "lora_rank": 64, "vae_encoder_lora_rank": 64, "lr": 5e-6, "weight_decay": 1e-4},
            "fake_score": {"lora_rank": 64, "lora_alpha": None, "lr": 1e-6, "weight_decay": 1e-4},
            # TSD-SR's teacher LoRA (teacher.safetensors, keys transformer.<module>.lora_A.weight, alpha = rank);
            # None: the base itself is the teacher.
            "teacher_lora": None,
            "loss": {"lpips_weight": 1.0, "latent_mse_weight": 1.0, "tsd_weight": 1.0},
            "vsd_weight": 0.7,  # lambda: the VSD share of the TSD gradient, the rest is target score matching
            "cfg_scale": 7.5,
            "t_index_min": 50,  # indices into the flow-matching table, highest noise first
            "t_index_max": 949,
            # DASM (distribution-aware sampling): `steps` Euler steps from the drawn index toward lower noise,
            # `stride` indices apart, the end moved by an integer drawn from [-random_bias, random_bias); the
            # released train.sh leaves it off.
            "dasm": {"enabled": False, "steps": 4, "stride": 50, "random_bias": 25, "weights": [1.0, 0.3, 0.3, 0.3]},
            "vae_sample": "sample",  # sample | mode: the LR latent from the VAE posterior, as the official training
            # LPIPS-Alex weights (pyiqa's lpips, TSD-SR's loss): "files" reads alexnet-owt-7be5be79.pth and
            # LPIPS_v0.1_alex-df73285e.pth (or the lpips wheel's alex.pth); "random": a random AlexNet (smoke tests).
            "perceptual": "files",
            "perceptual_weights_dir": None,
        }
    }

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options
        dasm = opts["dasm"]
        if dasm["enabled"] and len(dasm["weights"]) != int(dasm["steps"]):
            raise ValueError(f"tsdsr.dasm.weights has {len(dasm['weights'])} entries; tsdsr.dasm.steps is {dasm['steps']}.")
        self.sigmas = flow_match_sigmas(self.training_base.base.scheduler_config)
        self.num_train_timesteps = len(self.sigmas)
        if not 0 <= int(opts["t_index_min"]) <= int(opts["t_index_max"]) < len(self.sigmas):
            raise ValueError(f"tsdsr.t_index_min/t_index_max must satisfy 0 <= min <= max < {len(self.sigmas)}.")
        # The teacher and the fake score share one frozen copy of the base; the generator's own copy is apart.
        self.score_model, self.frozen_denoiser = self.frozen_denoiser, None
        self.teacher_adapter = None
        if opts["teacher_lora"]:
            self.teacher_adapter = TEACHER
            self._add_teacher(Path(opts["teacher_lora"]))
        fake = opts["fake_score"]
        spec = AdapterSpec(FAKE_SCORE, "transformer", int(fake["lora_rank"]), float(fake["lora_alpha"] or fake["lora_rank"]),
                           lora_targets(self.score_model, FAKE_SCORE_LORA_SUFFIXES))
        add_adapters(self.score_model, [spec])
        self.lpips = self.perceptual(LPIPSAlex)
        check_guidance(self.name, opts["cfg_scale"], self.conditioning, self.null_conditioning)
        self.vae_sample = check_vae_sample(self.name, opts["vae_sample"])

    def _add_teacher(self, path: Path) -> None:
        """Add TSD-SR's teacher LoRA to the shared copy, frozen."""
        tensors, rank, modules = read_tsdsr_lora(path, "transformer", None, "a TSD-SR teacher LoRA (teacher.safetensors)")
        add_adapters(self.score_model, [AdapterSpec(TEACHER, "transformer", rank, float(rank), modules)])
        params = dict(self.score_model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                name = key[len("transformer."):].replace(".default.", f".{TEACHER}.")
                if name not in params or params[name].shape != value.shape:
                    raise ValueError(f"{path} has {key!r}, which does not fit the base transformer.")
                params[name].copy_(value)
        for name, p in params.items():
            if f".{TEACHER}." in name:
                p.requires_grad_(False)

    def models(self):
        return {"generator": self.generator, "fake_score": self.score_model}

    def optimizer_specs(self):
        gen, fake = self.options["generator"], self.options["fake_score"]
        return [
            OptimizerSpec("generator", list(self.generator.trained_parameters().values()), gen["lr"], gen["weight_decay"]),
            OptimizerSpec("fake_score", list(self._fake_score_parameters().values()), fake["lr"], fake["weight_decay"]),
        ]

    def _fake_score_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.score_model.named_parameters() if f".{FAKE_SCORE}." in n}

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        self.lpips.to(accelerator.device)
        self.sigmas = self.sigmas.to(accelerator.device)

    def _conditioning(self, batch: int, null: bool = False) -> dict[str, torch.Tensor]:
        source = self.null_conditioning if null else self.conditioning
        return {k: v.expand(batch, *v.shape[1:]) for k, v in source.items()}

    def guided_velocity(self, adapter: str | None, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The shared copy's velocity with ``adapter`` alone active (``None``: the base), under classifier-free
        guidance; ``latents`` ``(B, C, h, w)`` at the noise level ``sigma`` (a 0-d tensor); float32."""
        model = self.accelerator.unwrap_model(self.prepared.models["fake_score"])
        batch = latents.shape[0]
        uncond, cond = self._conditioning(batch, null=True), self._conditioning(batch)
        conditioning = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        timestep = (sigma * self.num_train_timesteps).expand(2 * batch).float()
        with adapter_selected(model, adapter):
            both = predict_transformer(model, torch.cat([latents, latents]), timestep, conditioning).float()
        return classifier_free_guidance(*both.chunk(2), float(self.options["cfg_scale"]))

    def _tsd_levels(self, generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
        """The noise levels of one TSD evaluation (DASM's trajectory, or one level) and their weights."""
        opts, dasm = self.options, self.options["dasm"]
        start = int(sample_timesteps(1, t_min=int(opts["t_index_min"]), t_max=int(opts["t_index_max"]), generator=generator))
        if not dasm["enabled"]:
            return dasm_sigmas(self.sigmas, start, steps=1, stride=0), [1.0]
        jitter = int(dasm["random_bias"])
        bias = int(torch.randint(-jitter, jitter, (1,), generator=generator)) if jitter else 0
        levels = dasm_sigmas(self.sigmas, start, steps=int(dasm["steps"]), stride=int(dasm["stride"]), bias=bias)
        return levels, [float(w) for w in dasm["weights"]]

    def training_step(self, batch, step, generator):
        accelerator = self.accelerator
        g_model, f_model = self.prepared.models["generator"], self.prepared.models["fake_score"]
        score_model = accelerator.unwrap_model(f_model)
        opts, weights = self.options, self.options["loss"]
        gt = batch["gt"]
        size = gt.shape[0]
        with accelerator.accumulate(g_model, f_model):
            z_real = batch.get("gt_latent")
            if z_real is None:
                generator_module = accelerator.unwrap_model(g_model)
                with torch.no_grad(), adapters_disabled(generator_module.generator.vae):
                    z_real = generator_module.generator.encode(gt)
            z_hat, x_hat = g_model(self.upsampled(batch), sample=self.vae_sample, generator=generator)
            lpips = self.lpips(x_hat, gt).mean()
            latent_mse = F.mse_loss(z_hat, z_real)
            levels, level_weights = self._tsd_levels(generator)
            noise = torch.randn(z_hat.shape, generator=generator).to(gt.device)
            grad = target_score_distillation(
                flow_diffuse(z_hat.detach(), noise, levels[0]), flow_diffuse(z_real, noise, levels[0]), levels, level_weights,
                teacher=lambda z, sigma: self.guided_velocity(self.teacher_adapter, z, sigma),
                fake=lambda z, sigma: self.guided_velocity(FAKE_SCORE, z, sigma),
                vsd_weight=float(opts["vsd_weight"]),
            )
            tsd = gradient_as_loss(z_hat, grad, weight=TSD_LOSS_WEIGHT)
            loss_g = weights["lpips_weight"] * lpips + weights["latent_mse_weight"] * latent_mse + weights["tsd_weight"] * tsd
            self.update("generator", loss_g)

            # The fake score learns the generator's current distribution (x0 loss, logit-normal weight).
            index = sample_timesteps(size, t_min=int(opts["t_index_min"]), t_max=int(opts["t_index_max"]), generator=generator)
            sigma = self.sigmas[index.to(gt.device)]
            noise_fake = torch.randn(z_hat.shape, generator=generator).to(gt.device)
            weight = torch.sigmoid(torch.randn(size, generator=generator)).to(gt.device)
            target = z_hat.detach()
            noised = flow_diffuse(target, noise_fake, sigma)
            with adapter_selected(score_model, FAKE_SCORE):
                velocity = predict_transformer(f_model, noised, sigma * self.num_train_timesteps, self._conditioning(size)).float()
            loss_fake = fake_score_flow_loss(velocity, noised, sigma, target, weight)
            self.update("fake_score", loss_fake)
        return {
            "loss_g": loss_g.item(), "lpips": lpips.item(), "latent_mse": latent_mse.item(), "tsd": tsd.item(),
            "loss_fake": loss_fake.item(), "sigma": float(levels[0]),
        }

    def named_trained_parameters(self):
        params = {f"generator.{k}": v for k, v in self.generator.trained_parameters().items()}
        params.update({f"fake_score.{n}": p for n, p in self._fake_score_parameters().items()})
        return params
