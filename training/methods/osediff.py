"""OSEDiff: one-step SR distilled by variational score distillation (reference/methods.md 1.3).

Generator: the SD 2.x UNet with LoRA, a LoRA on the VAE encoder and a fully trained ``conv_in`` (OSEDiff's
trainables), one step at ``model.timestep`` (999 officially). Each step:

1. generator: ``l2_weight * MSE(x_hat, x) + lpips_weight * LPIPS(x_hat, x) + vsd_weight * VSD(z_hat)`` where VSD
   noises ``z_hat`` at ``t ~ U[vsd_t_min, vsd_t_max]`` and compares the x0 of the fake-score UNet with the x0 of the
   frozen teacher under classifier-free guidance (``model.negative_prompt`` is the unconditional side; its default
   is the official run's negative prompt, and a guidance scale that would change nothing is refused);
2. fake score (the base UNet with its own LoRA and optimizer): the standard epsilon loss on ``z_hat.detach()``
   noised at ``t ~ U[0, 999]``.

The LR latent is drawn from the VAE posterior (``osediff.vae_sample: sample``), as ``OSEDiff_gen.forward`` does with
``latent_dist.sample()``; ``mode`` takes its mean.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from d3sr_core.discriminators import sample_timesteps
from d3sr_core.losses import classifier_free_guidance, diffuse, variational_score_distillation
from d3sr_core.lora import PEFT_DEFAULT_LORA_ALPHA, AdapterSpec, add_adapters
from d3sr_core.perceptual import LPIPS

from ..generator import OSEDIFF_LORA_SUFFIXES, lora_targets
from .base import OptimizerSpec
from .one_step import GENERATOR_DEFAULTS, OneStepMethod

OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
    "lowres, over-smooth"
)
"""``--neg_prompt`` of the official OSEDiff training command (cswry/OSEDiff README, "Train for Real-ISR")."""
VAE_SAMPLE_MODES = ("sample", "mode")


def check_guidance(method: str, cfg_scale: float, conditioning: dict, null_conditioning: dict) -> None:
    """Refuse classifier-free guidance that would do nothing: ``cfg_scale != 1`` while the prompt and the negative
    prompt give the same embeddings (then ``uncond + s * (cond - uncond)`` is ``cond`` for every ``s``)."""
    if float(cfg_scale) == 1.0:
        return
    same = conditioning.keys() == null_conditioning.keys() and all(
        torch.equal(conditioning[k], null_conditioning[k]) for k in conditioning
    )
    if same:
        raise ValueError(
            f"{method}.cfg_scale is {cfg_scale} but the prompt and the negative prompt give identical embeddings, so "
            f"guidance would change nothing; give model.negative_prompt (or model.prompt_embeddings) that differs "
            f"from the prompt, or set {method}.cfg_scale: 1."
        )


def check_vae_sample(method: str, value: str) -> bool:
    """Whether ``<method>.vae_sample`` asks to sample the LR posterior; refuses anything but sample or mode."""
    if value not in VAE_SAMPLE_MODES:
        raise ValueError(f"{method}.vae_sample {value!r} is not one of {VAE_SAMPLE_MODES}.")
    return value == "sample"


class OSEDiffMethod(OneStepMethod):
    name = "osediff"
    defaults = {
        "osediff": {
            # OSEDiff never sets LoRA alpha, so peft's default 8 applies (scale 2 at rank 4).
            "generator": {**GENERATOR_DEFAULTS, "lora_rank": 4, "lora_alpha": PEFT_DEFAULT_LORA_ALPHA, "vae_encoder_lora_rank": 4,
                          "vae_encoder_lora_alpha": PEFT_DEFAULT_LORA_ALPHA, "train_conv_in": True},
            "fake_score": {"lora_rank": 4, "lora_alpha": PEFT_DEFAULT_LORA_ALPHA, "lr": 5e-5, "weight_decay": 1e-2},
            "loss": {"l2_weight": 1.0, "lpips_weight": 2.0, "vsd_weight": 1.0},
            "cfg_scale": 7.5,
            # The official run's negative prompt: with the empty default it would equal the prompt and CFG do nothing.
            "model": {"negative_prompt": OSEDIFF_NEGATIVE_PROMPT},
            "vae_sample": "sample",  # sample | mode: the LR latent from the VAE posterior, as the official training
            "vsd_t_min": 20,
            "vsd_t_max": 979,
            # LPIPS-VGG weights: "files" reads vgg16-397923af.pth and LPIPS_v0.1_vgg-a78928a0.pth (or the lpips
            # wheel's vgg.pth); "random" uses a random VGG (smoke tests only).
            "perceptual": "files",
            "perceptual_weights_dir": None,
        }
    }

    def __init__(self, config: dict):
        super().__init__(config)
        fake = self.options["fake_score"]
        self.fake_score = copy.deepcopy(self.frozen_denoiser)
        spec = AdapterSpec("fake_score", "unet", int(fake["lora_rank"]), float(fake["lora_alpha"] or fake["lora_rank"]),
                           lora_targets(self.fake_score, OSEDIFF_LORA_SUFFIXES))
        add_adapters(self.fake_score, [spec])
        self.lpips = self.perceptual(LPIPS)
        check_guidance(self.name, self.options["cfg_scale"], self.conditioning, self.null_conditioning)
        self.vae_sample = check_vae_sample(self.name, self.options["vae_sample"])

    def models(self):
        return {"generator": self.generator, "fake_score": self.fake_score}

    def optimizer_specs(self):
        gen, fake = self.options["generator"], self.options["fake_score"]
        fake_params = [p for n, p in self.fake_score.named_parameters() if ".lora_" in n]
        return [
            OptimizerSpec("generator", list(self.generator.trained_parameters().values()), gen["lr"], gen["weight_decay"]),
            OptimizerSpec("fake_score", fake_params, fake["lr"], fake["weight_decay"]),
        ]

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        self.lpips.to(accelerator.device)

    def guided_teacher_epsilon(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The frozen base UNet's epsilon at ``z_t`` ``(B, 4, h, w)`` and ``t`` ``(B,)`` under classifier-free
        guidance: ``eps(null) + cfg_scale * (eps(prompt) - eps(null))``, both halves in one batch; float32."""
        batch = z_t.shape[0]
        dtype = self.frozen_denoiser.dtype
        both = self.frozen_denoiser(
            torch.cat([z_t, z_t]).to(dtype), torch.cat([t, t]),
            torch.cat([self.null_context.expand(batch, -1, -1), self.contexts(batch)]).to(dtype),
        ).sample.float()
        uncond, cond = both.chunk(2)
        return classifier_free_guidance(uncond, cond, float(self.options["cfg_scale"]))

    def training_step(self, batch, step, generator):
        accelerator = self.accelerator
        g_model, f_model = self.prepared.models["generator"], self.prepared.models["fake_score"]
        fake_score = accelerator.unwrap_model(f_model)
        weights = self.options["loss"]
        gt = batch["gt"]
        with accelerator.accumulate(g_model, f_model):
            z_hat, x_hat = g_model(self.upsampled(batch), sample=self.vae_sample, generator=generator)
            l2 = F.mse_loss(x_hat, gt)
            lpips = self.lpips(x_hat, gt).mean()
            t = sample_timesteps(gt.shape[0], t_min=int(self.options["vsd_t_min"]), t_max=int(self.options["vsd_t_max"]),
                                 generator=generator).to(gt.device)
            noise = torch.randn(z_hat.shape, generator=generator).to(gt.device)
            with torch.no_grad():
                z_t = diffuse(z_hat.detach(), noise, self.alphas_cumprod[t])
                x0_fake = self.x0_from_epsilon(z_t, fake_score(z_t, t, self.contexts(gt.shape[0])).sample.float(), t)
                x0_teacher = self.x0_from_epsilon(z_t, self.guided_teacher_epsilon(z_t, t), t)
            vsd = variational_score_distillation(z_hat, x0_fake, x0_teacher)
            loss_g = weights["l2_weight"] * l2 + weights["lpips_weight"] * lpips + weights["vsd_weight"] * vsd
            self.update("generator", loss_g)

            # The fake score learns the generator's current distribution (epsilon loss, t over the whole range).
            t_fake = sample_timesteps(gt.shape[0], t_min=0, t_max=len(self.alphas_cumprod) - 1, generator=generator).to(gt.device)
            noise_fake = torch.randn(z_hat.shape, generator=generator).to(gt.device)
            noised = diffuse(z_hat.detach(), noise_fake, self.alphas_cumprod[t_fake])
            loss_fake = F.mse_loss(f_model(noised, t_fake, self.contexts(gt.shape[0])).sample.float(), noise_fake)
            self.update("fake_score", loss_fake)
        return {"loss_g": loss_g.item(), "l2": l2.item(), "lpips": lpips.item(), "vsd": vsd.item(), "loss_fake": loss_fake.item()}

    def named_trained_parameters(self):
        params = {f"generator.{k}": v for k, v in self.generator.trained_parameters().items()}
        params.update({f"fake_score.{n}": p for n, p in self.fake_score.named_parameters() if ".lora_" in n})
        return params
