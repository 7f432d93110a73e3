"""``plain_cnn``: the yardstick the default model must beat, a small plain SR network trained by the same trainer.

The network (EDSR-like, Lim et al. 2017, without its scaling tricks): a 3x3 convolution to ``channels`` features,
``blocks`` residual blocks (conv, ReLU, conv) at the LR resolution, a 3x3 convolution to ``3 * scale^2`` channels
and a pixel shuffle, added to the bicubic enlargement of the input. Loss: ``l1_weight * |x_hat - x| +
lpips_weight * ST-LPIPS-VGG(x_hat, x)``, the default model's reconstruction terms without its diffusion prior
and discriminator, so a comparison at equal steps shows what those add.

The result is ``model.safetensors`` (the network's weights, its options in the metadata); :func:`load_plain_cnn`
reads it back as an upscaler for ``benchmarks/default_model.py``. Hosts do not load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from d3sr_core.files import atomic_output

from .base import OptimizerSpec, TrainingMethod
from .one_step import shift_tolerant_lpips_vgg

METADATA_KEY = "d3sr_plain_cnn"


class PlainSRNetwork(nn.Module):
    """``(B, 3, h, w)`` in [-1, 1] -> ``(B, 3, scale h, scale w)`` in [-1, 1] (not clamped while training)."""

    def __init__(self, scale: int = 4, blocks: int = 8, channels: int = 48):
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))
            for _ in range(blocks)
        )
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # starts as the bicubic enlargement
        nn.init.zeros_(self.tail.bias)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        features = self.head(lq)
        for block in self.body:
            features = features + block(features)
        skip = F.interpolate(lq, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return skip + F.pixel_shuffle(self.tail(features), self.scale)


class PlainCNNMethod(TrainingMethod):
    name = "plain_cnn"
    defaults = {"plain_cnn": {"blocks": 8, "channels": 48, "lr": 2e-4, "weight_decay": 0.0, "l1_weight": 1.0, "lpips_weight": 0.3}}

    def __init__(self, config: dict):
        self.config = config
        self.options = options = config["plain_cnn"]
        self.network = PlainSRNetwork(int(config["data"]["scale"]), int(options["blocks"]), int(options["channels"]))
        self.lpips = shift_tolerant_lpips_vgg() if float(options["lpips_weight"]) else None

    def models(self):
        return {"network": self.network}

    def optimizer_specs(self):
        return [OptimizerSpec("network", list(self.network.parameters()), self.options["lr"], self.options["weight_decay"])]

    def bind(self, prepared, accelerator, max_grad_norm):
        super().bind(prepared, accelerator, max_grad_norm)
        if self.lpips is not None:
            self.lpips.to(accelerator.device)

    def training_step(self, batch, step, generator):
        model = self.prepared.models["network"]
        gt = batch["gt"]
        with self.accelerator.accumulate(model):
            x_hat = model(batch["lq"])
            l1 = (x_hat - gt).abs().mean()
            lpips = x_hat.new_zeros(()) if self.lpips is None else self.lpips(((x_hat + 1) / 2).clamp(0, 1), (gt + 1) / 2).mean()
            loss = self.options["l1_weight"] * l1 + self.options["lpips_weight"] * lpips
            self.update("network", loss)
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lpips.item()}

    def exported_parameters(self):
        return dict(self.network.named_parameters())

    def named_trained_parameters(self):
        return self.exported_parameters()

    def write_model(self, folder, training_config, trained=None):
        tensors = trained if trained is not None else self.exported_parameters()
        options = {"scale": self.network.scale, "blocks": int(self.options["blocks"]), "channels": int(self.options["channels"])}
        path = Path(folder) / "model.safetensors"
        with atomic_output(path) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={METADATA_KEY: json.dumps(options)})
        return path


def load_plain_cnn(path: str | Path):
    """An upscaler ``(3, h, w)`` in [0, 1] -> ``(3, 4h, 4w)`` in [0, 1] from a ``plain_cnn`` run's model file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} was not written by the plain_cnn method (no {METADATA_KEY} metadata).")
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    network = PlainSRNetwork(**json.loads(metadata[METADATA_KEY]))
    network.load_state_dict(state)
    network.eval()
    return lambda lq: ((network(lq[None] * 2 - 1)[0] + 1) / 2).clamp(0, 1)
