"""``d3sr eval``: metrics of a folder of results against a folder of ground truths, paired by file name."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from d3sr_core.image_io import ImageFileError, list_images, read_image
from d3sr_core.metrics import ALL_METRICS, LOWER_IS_BETTER, folder_fid, make_metric, missing_requirements


MIN_SIDE = {"ssim": 11}
"""The smallest image side a metric is defined on (SSIM's 11x11 window); others are found out by trying."""


def _by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    """``stem -> file``; a stem held by several files (``a.png`` and ``a.jpg``) is reported and left out."""
    found: dict[str, list[Path]] = {}
    for path in list_images([folder]):
        found.setdefault(path.stem, []).append(path)
    for stem, paths in sorted(found.items()):
        if len(paths) > 1:
            problems.append(f"{stem}: {len(paths)} files in {folder} share this name ({', '.join(p.name for p in paths)}); none was scored")
    return {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}


def pair_images(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``(pairs, problems)``: results and ground truths with the same stem; unpaired names and names several files
    share become problems."""
    problems: list[str] = []
    preds, gts = _by_stem(pred_dir, problems), _by_stem(gt_dir, problems)
    shared = {p.split(":")[0] for p in problems}
    problems += [f"{name}: no ground truth in {gt_dir}" for name in sorted(preds.keys() - gts.keys() - shared)]
    problems += [f"{name}: no result in {pred_dir}" for name in sorted(gts.keys() - preds.keys() - shared)]
    return [(preds[n], gts[n]) for n in sorted(preds.keys() & gts.keys())], problems


def rgb(path: Path) -> torch.Tensor:
    """``(1, 3, H, W)`` in [0, 1]: gray is repeated, alpha dropped."""
    pixels = read_image(path).pixels
    return (pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels[:3])[None]


def evaluate(pred_dir: Path, gt_dir: Path, metrics: list[str], device: torch.device) -> dict:
    """Per-image and mean scores of ``metrics``; metrics that cannot run offline are listed with what they need.

    ``images`` counts the images that got at least one score; an image too small for a metric is a problem (one
    sentence) and is left out of that metric's mean."""
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"metric {unknown[0]!r} is not one of {', '.join(ALL_METRICS)}.")
    pairs, problems = pair_images(pred_dir, gt_dir)
    if not pairs:
        raise ValueError(f"no images in {pred_dir} and {gt_dir} share a file name.")
    missing = {m: missing_requirements(m) for m in metrics if missing_requirements(m)}
    runnable = [m for m in metrics if m not in missing and m != "fid"]
    scorers = {m: make_metric(m, device) for m in runnable}
    per_image = {}
    for pred_path, gt_path in tqdm(pairs, desc="eval", unit="image"):
        try:
            pred, gt = rgb(pred_path), rgb(gt_path)
        except ImageFileError as err:
            problems.append(str(err))
            continue
        if pred.shape != gt.shape:
            problems.append(f"{pred_path.name}: size {pred.shape[-1]}x{pred.shape[-2]} differs from the ground truth's {gt.shape[-1]}x{gt.shape[-2]}")
            continue
        scores = {}
        for m, f in scorers.items():
            size = f"{pred.shape[-1]}x{pred.shape[-2]}"
            if min(pred.shape[-2:]) < MIN_SIDE.get(m, 1):
                problems.append(f"{pred_path.name}: {size} is too small for {m} (it needs {MIN_SIDE[m]} px a side)")
                continue
            try:
                with torch.no_grad():
                    value = float(f(pred.to(device), gt.to(device))[0])
            except (RuntimeError, ValueError, IndexError, AssertionError) as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                problems.append(f"{pred_path.name}: {size} is too small or otherwise unfit for {m} ({detail})")
                continue
            scores[m] = value
        if scores:
            per_image[pred_path.stem] = scores
    means = {}
    for m in runnable:
        values = [v[m] for v in per_image.values() if m in v]
        if values:
            means[m] = statistics.fmean(values)
    if "fid" in metrics and "fid" not in missing:
        means["fid"] = folder_fid(pred_dir, gt_dir, device)
    return {
        "pred": str(pred_dir), "gt": str(gt_dir), "images": len(per_image), "means": means,
        "lower_is_better": sorted(set(means) & (LOWER_IS_BETTER | {"fid"})), "missing": missing,
        "problems": problems, "per_image": per_image,
    }


def markdown(report: dict) -> str:
    """The means as a one-row Markdown table, arrows showing which way is better."""
    names = list(report["means"])
    header = "| images | " + " | ".join(f"{n.upper()} {'↓' if n in report['lower_is_better'] else '↑'}" for n in names) + " |"
    rule = "|---|" + "---|" * len(names)
    row = f"| {report['images']} | " + " | ".join(f"{report['means'][n]:.4f}" for n in names) + " |"
    lines = [header, rule, row]
    lines += [f"\nNot computed: {m} (needs {', '.join(need)})" for m, need in report["missing"].items()]
    return "\n".join(lines) + "\n"
