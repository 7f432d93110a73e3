"""What every one-step SR method shares: the trainable generator on its base, its options, the frozen copy of
the base denoiser that teachers, fake scores and discriminators start from, perceptual distances, and the export."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from d3sr_core.generator import x0_from_epsilon
from d3sr_core.perceptual import DISTS, LPIPS

from ..generator import TrainableGenerator, TrainingBase, build_training_base, check_crop_size, inference_defaults
from .base import TrainingMethod, frozen_dtype

PERCEPTUAL_SOURCES = ("files", "random")
SHIFT_TOLERANT_LPIPS_FILE = "stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth"


def shift_tolerant_lpips_vgg() -> torch.nn.Module:
    """ST-LPIPS on its anti-aliased VGG16 (Ghildyal & Liu 2022), the one learned perceptual network a registry ships
    whole (the ``stlpips-pytorch`` wheel; reference/offline.md 1), through pyiqa, frozen: ``(x, y)`` ``(B, 3, H, W)``
    in [0, 1] -> ``(B,)`` distances. The default model is scored with ST-LPIPS on AlexNet, a different network."""
    import importlib.util

    spec = importlib.util.find_spec("stlpips_pytorch")
    weights = None
    if spec is not None and spec.submodule_search_locations:
        weights = Path(list(spec.submodule_search_locations)[0]).parent / SHIFT_TOLERANT_LPIPS_FILE
    if weights is None or not weights.is_file() or importlib.util.find_spec("pyiqa") is None:
        raise ValueError("the ST-LPIPS-VGG loss (lpips_weight > 0) needs the pyiqa and stlpips-pytorch packages (pip install -e '.[metrics]').")
    import pyiqa

    model = pyiqa.create_metric("stlpips-vgg", as_loss=True, pretrained_model_path=str(weights), device="cpu")
    return model.eval().requires_grad_(False)

GENERATOR_DEFAULTS = {
    "lora_rank": 16,
    "lora_alpha": None,  # None: alpha = rank (scale 1)
    "vae_encoder_lora_rank": 0,
    "vae_encoder_lora_alpha": None,
    "train_conv_in": False,
    "lr": 5e-5,
    "weight_decay": 1e-2,
}


class OneStepMethod(TrainingMethod):
    """Builds ``self.generator`` from ``config[name]["generator"]`` and keeps a frozen copy of the base denoiser
    (``self.frozen_denoiser``, taken before the generator's adapters are added) for teachers and discriminators.

    ``families``: the bases the method trains on; ``default_timestep``: the generator's timestep when
    ``model.timestep`` is not set (999 for SD 2.x as OSEDiff; 1000, sigma = 1, for SD3 as TSD-SR).
    """

    families: tuple[str, ...] = ("sd2",)
    default_timestep: int = 999

    def __init__(self, config: dict):
        self.config = config
        self.options = config[self.name]
        if self.options.get("perceptual", "files") not in PERCEPTUAL_SOURCES:
            raise ValueError(f"{self.name}.perceptual {self.options['perceptual']!r} is not one of {PERCEPTUAL_SOURCES}.")
        self.training_base: TrainingBase = build_training_base(config["model"], self.families)
        self.frozen_denoiser = copy.deepcopy(self.training_base.base.denoiser).eval().requires_grad_(False)
        gen = self.options["generator"]
        if config["train"]["gradient_checkpointing"]:
            self.training_base.base.denoiser.enable_gradient_checkpointing()
        self.generator = TrainableGenerator(
            self.training_base,
            timestep=int(config["model"]["timestep"] if config["model"]["timestep"] is not None else self.default_timestep),
            lora_rank=int(gen["lora_rank"]),
            lora_alpha=gen["lora_alpha"],
            vae_encoder_lora_rank=int(gen["vae_encoder_lora_rank"]),
            vae_encoder_lora_alpha=gen["vae_encoder_lora_alpha"],
            train_conv_in=bool(gen["train_conv_in"]),
        )
        if config["model"]["init_generator"] is not None:
            self.generator.start_from_(config["model"]["init_generator"])
        check_crop_size(config["data"], self.training_base.base.vae)
        inference_defaults(config["model"], int(config["data"]["scale"]))  # refuse bad options before training
        self.conditioning = self.training_base.conditioning
        self.null_conditioning = self.training_base.null_conditioning
        self.alphas_cumprod = self.generator.generator.alphas_cumprod

    def perceptual(self, kind: type[DISTS] | type[LPIPS]):
        """DISTS or LPIPS from local weight files (``<method>.perceptual_weights_dir`` and torch's caches), or
        with a random VGG when ``<method>.perceptual`` is ``random``."""
        if self.options["perceptual"] == "random":
            return kind(seed=int(self.config["seed"]))
        weights_dir = self.options["perceptual_weights_dir"]
        return kind.from_files([weights_dir] if weights_dir else None)

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        self.conditioning = {k: v.to(accelerator.device) for k, v in self.conditioning.items()}
        self.null_conditioning = {k: v.to(accelerator.device) for k, v in self.null_conditioning.items()}
        if self.alphas_cumprod is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(accelerator.device)
        if self.frozen_denoiser is not None:
            # A teacher only runs forward: in a mixed-precision run it is kept in that precision.
            self.frozen_denoiser.to(accelerator.device, frozen_dtype(accelerator.mixed_precision))

    @staticmethod
    def upsampled(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The LQ image bicubic-upsampled to the GT size, as ``torch_bicubic`` inference does, in [-1, 1]."""
        return F.interpolate(batch["lq"], size=batch["gt"].shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)

    @property
    def context(self) -> torch.Tensor:
        """The prompt embedding ``(1, tokens, width)`` every UNet call is conditioned on."""
        return self.conditioning["prompt_embeds"]

    @property
    def null_context(self) -> torch.Tensor:
        """The negative prompt's embedding: the unconditional side of classifier-free guidance."""
        return self.null_conditioning["prompt_embeds"]

    def contexts(self, batch_size: int) -> torch.Tensor:
        return self.context.expand(batch_size, -1, -1)

    def teacher_epsilon(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The frozen base UNet's epsilon prediction (float32)."""
        dtype = self.frozen_denoiser.dtype
        return self.frozen_denoiser(latents.to(dtype), timesteps, self.contexts(latents.shape[0]).to(dtype)).sample.float()

    def x0_from_epsilon(self, z_t: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return x0_from_epsilon(z_t, eps, self.alphas_cumprod[timesteps].view(-1, 1, 1, 1))

    def exported_parameters(self):
        return self.generator.trained_parameters()

    def write_model(self, folder, training_config, trained=None):
        trained = trained if trained is not None else self.generator.trained_parameters()
        return self.generator.write_exports(folder, self.name, trained, training_config)
