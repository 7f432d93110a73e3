"""Scoring upscalers on the evaluation sets ``python -m training.photos`` writes (``validation/``, ``heldout/``).

Each set holds ``hr/`` and two kinds of input, ``lr_clean/`` and ``lr_degraded/``; an upscaler is a function from
one LQ image ``(3, h, w)`` in [0, 1] to ``(3, 4h, 4w)`` in [0, 1]. Scores are the means over the set's photos of
PSNR-Y and SSIM-Y (``d3sr_core.metrics``, the papers' protocol) and, when pyiqa and stlpips-pytorch are installed,
ST-LPIPS on AlexNet, as ``d3sr eval`` computes them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from d3sr_core.image_io import list_images, read_image, write_png
from d3sr_core.metrics import make_metric, missing_requirements

KINDS = ("clean", "degraded")
METRICS = ("psnr", "ssim", "stlpips")

Upscale = Callable[[torch.Tensor], torch.Tensor]


def available_metrics() -> list[str]:
    """The :data:`METRICS` this environment can compute (ST-LPIPS needs the ``[metrics]`` extra)."""
    return [m for m in METRICS if not missing_requirements(m)]


def run_upscaler(upscale: Upscale, split_dir: Path, out_dir: Path) -> dict[str, float]:
    """Upscale every input of both kinds into ``out_dir/<kind>/``; returns the mean seconds per image by kind."""
    seconds = {}
    for kind in KINDS:
        files = list_images([split_dir / f"lr_{kind}"])
        if not files:
            raise ValueError(f"{split_dir / f'lr_{kind}'} holds no images; write the set with python -m training.photos.")
        start = time.perf_counter()
        for path in files:
            with torch.no_grad():
                write_png(out_dir / kind / f"{path.stem}.png", upscale(read_image(path).pixels[:3]))
        seconds[kind] = (time.perf_counter() - start) / len(files)
    return seconds


def score_outputs(out_dir: Path, split_dir: Path, metrics: list[str], scorers: dict | None = None) -> dict[str, dict[str, float]]:
    """``{kind: {metric: mean}}`` of the images in ``out_dir/<kind>/`` against ``split_dir/hr/`` (by file name).
    ``scorers``: already built metric functions to reuse (built here when absent)."""
    scorers = scorers if scorers is not None else {m: make_metric(m, torch.device("cpu")) for m in metrics}
    table = {}
    for kind in KINDS:
        sums = dict.fromkeys(metrics, 0.0)
        files = list_images([out_dir / kind])
        for path in files:
            pred = read_image(path).pixels[:3][None]
            target = read_image(split_dir / "hr" / path.name).pixels[:3][None]
            if pred.shape != target.shape:
                raise ValueError(f"{path} is {tuple(pred.shape[-2:])}, but its ground truth is {tuple(target.shape[-2:])}.")
            with torch.no_grad():
                for metric in metrics:
                    sums[metric] += float(scorers[metric](pred, target).mean())
        table[kind] = {m: sums[m] / max(len(files), 1) for m in metrics}
    return table


def bicubic_upscaler(scale: int = 4) -> Upscale:
    """PIL's bicubic enlargement on the 8-bit image, the baseline every SR paper reports."""
    from PIL import Image

    from d3sr_core.image_io import from_pil, to_pil

    def upscale(lq: torch.Tensor) -> torch.Tensor:
        image = to_pil(lq)
        return from_pil(image.resize((image.width * scale, image.height * scale), Image.BICUBIC)).pixels

    return upscale


def passes_fidelity(scores: dict[str, dict[str, float]], bicubic: dict[str, dict[str, float]]) -> bool:
    """Whether PSNR-Y is at least bicubic's on both kinds of input (the default model's first target)."""
    return all(scores[k]["psnr"] >= bicubic[k]["psnr"] for k in KINDS)


def selection_key(scores: dict[str, dict[str, float]], bicubic: dict[str, dict[str, float]]) -> tuple:
    """How checkpoints are ranked on the validation set (smaller is better): first those at least as faithful as
    bicubic on both kinds, among them the lowest mean ST-LPIPS (PSNR-Y margin when ST-LPIPS is unavailable);
    then the others by their worst PSNR-Y margin over bicubic."""
    margin = min(scores[k]["psnr"] - bicubic[k]["psnr"] for k in KINDS)
    if not passes_fidelity(scores, bicubic):
        return (1, -margin)
    if all("stlpips" in scores[k] for k in KINDS):
        return (0, sum(scores[k]["stlpips"] for k in KINDS) / len(KINDS))
    return (0, -margin)
