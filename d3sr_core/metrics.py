"""Image-quality metrics with the papers' protocol (the official OSEDiff / TSD-SR ``test_metrics.py``).

PSNR and SSIM are computed here, on the Y channel of BT.601 YCbCr exactly as pyiqa's ``psnr`` / ``ssim`` with
``test_y_channel=True, color_space='ycbcr'`` compute them. The learned metrics run through pyiqa and only when
their weight files are already on disk: nothing is downloaded, and a metric whose files are missing is reported
as missing together with the files it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BT601_Y = (65.481, 128.553, 24.966)
"""Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for RGB in [0, 1] (ITU-R BT.601, as pyiqa's rgb2ycbcr)."""


def y_channel(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``(B, 1, H, W)`` in [16/255, 235/255] of ``rgb`` ``(B, 3, H, W)`` in [0, 1]."""
    weights = torch.tensor(BT601_Y, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return ((rgb * weights).sum(dim=1, keepdim=True) + 16) / 255


def psnr_y(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """PSNR in dB on the Y channel, per image: ``10 log10(1 / (mean((Y_p - Y_t)^2) + eps))``; inputs in [0, 1]."""
    mse = ((y_channel(pred.double()) - y_channel(target.double())) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / (mse + eps))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """MATLAB's ``fspecial('gaussian', size, sigma)``: ``(size, size)`` float64, summing to 1."""
    half = (size - 1) / 2
    y, x = np.ogrid[-half : half + 1, -half : half + 1]
    window = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    window[window < np.finfo(window.dtype).eps * window.max()] = 0
    return torch.from_numpy(window / window.sum())


def ssim_y(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) on the Y channel quantised to 0..255, per image; inputs ``(B, 3, H, W)`` in [0, 1].

    11x11 Gaussian window (sigma 1.5) over valid positions, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, the
    contrast-structure term clipped at 0, as pyiqa computes it.
    """
    x, y = (torch.round(y_channel(t.double()) * 255) for t in (pred, target))
    window = gaussian_window().to(x)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t):
        return F.conv2d(t, window)

    mu_x, mu_y = blur(x), blur(y)
    sigma_x = blur(x * x) - mu_x**2
    sigma_y = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    contrast_structure = torch.relu((2 * sigma_xy + c2) / (sigma_x + sigma_y + c2))
    return (((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * contrast_structure).mean(dim=(1, 2, 3))


FULL_REFERENCE = {"psnr": psnr_y, "ssim": ssim_y}

PYIQA_METRICS = {
    # metric: (pyiqa name, files it needs under $TORCH_HOME/hub, needs a reference image)
    "lpips": ("lpips", ["checkpoints/alexnet-owt-7be5be79.pth", "pyiqa/LPIPS_v0.1_alex-df73285e.pth"], True),
    "dists": ("dists", ["checkpoints/vgg16-397923af.pth", "pyiqa/DISTS_weights-f5e65c96.pth"], True),
    "niqe": ("niqe", ["pyiqa/niqe_modelparameters.mat"], False),
    "musiq": ("musiq", ["pyiqa/musiq_koniq_ckpt-e95806b9.pth"], False),
    "maniqa": ("maniqa-pipal", ["pyiqa/ckpt_koniq10k.pt"], False),
    "clipiqa": ("clipiqa", ["clip/RN50.pt"], False),
}
FID_FILES = ["pyiqa/pt_inception-2015-12-05-6726825d.pth"]
"""FID compares the two folders as distributions, not image pairs."""
STLPIPS_FILE = "stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth"
ALL_METRICS = ("psnr", "ssim", *PYIQA_METRICS, "stlpips", "fid")
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "stlpips"}


def torch_hub_dir() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub"


def missing_requirements(metric: str) -> list[str]:
    """What ``metric`` lacks to run offline (a package, or weight files with their full paths); empty when ready."""
    if metric in FULL_REFERENCE:
        return []
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        return ["the pyiqa package (pip install pyiqa)"]
    if metric == "stlpips":
        return [] if stlpips_weights() else ["the stlpips-pytorch package, which ships its networks (pip install stlpips-pytorch)"]
    hub = torch_hub_dir()
    files = FID_FILES if metric == "fid" else PYIQA_METRICS[metric][1]
    return [str(hub / f) for f in files if not (hub / f).is_file()]


def stlpips_weights() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / STLPIPS_FILE
    return path if path.is_file() else None


def make_metric(metric: str, device: torch.device):
    """A function ``(pred, target) -> (B,)`` scores for ``metric`` (target ignored by no-reference metrics)."""
    if metric in FULL_REFERENCE:
        return FULL_REFERENCE[metric]
    import pyiqa

    if metric == "stlpips":
        model = pyiqa.create_metric("stlpips", device=device, pretrained_model_path=str(stlpips_weights()))
        return lambda pred, target: model(pred, target).flatten()
    name, _, full_reference = PYIQA_METRICS[metric]
    model = pyiqa.create_metric(name, device=device)
    if full_reference:
        return lambda pred, target: model(pred, target).flatten()
    return lambda pred, target: model(pred).flatten()


def folder_fid(pred_dir: str | os.PathLike, target_dir: str | os.PathLike, device: torch.device) -> float:
    """FID between the images of two folders (pyiqa's, with the Inception weights already on disk)."""
    import pyiqa

    return float(pyiqa.create_metric("fid", device=device)(str(pred_dir), str(target_dir)))
