"""Reproduce the bundled default model with the trainer alone, in three runs of committed configs:

1. ``presets/default_prior.yaml`` (method ``diffusion``): a small SD 2.x-shaped base on a lossless patch
   autoencoder, its UNet trained as a diffusion prior;
2. ``presets/default_sr.yaml`` (method ``d3sr``): the one-step SR generator on that prior, with the prior as
   the discriminator's backbone, exported self-contained at every checkpoint;
3. ``presets/default_sharp.yaml`` (method ``d3sr``): that generator fine-tuned for texture (a heavier perceptual
   loss, Real-ESRGAN x4plus targets for degraded inputs), starting from stage 2's model;

then, among stage 2's final model and stage 3's checkpoints, each with every colour fix, the one that scores best
on the **validation** photos (:func:`training.evaluation.selection_key`) is the result; the held-out photos are
never looked at here.

``python -m training.default_model --photos DIR --output-dir runs/default [--install]``; ``DIR`` is the folder
``python -m training.photos`` writes (``train/`` trains, ``validation/`` selects). A stage whose result exists is
skipped and one with checkpoints is resumed, so an interrupted reproduction continues where it stopped.
``--install`` copies the result over the bundled model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from d3sr_core.checkpoints import load_checkpoint, save_checkpoint
from d3sr_core.color import COLOR_FIXES
from d3sr_core.files import atomic_output
from d3sr_core.loading import DEFAULT_MODEL, load_model
from d3sr_core.metrics import make_metric
from d3sr_core.pipeline import Upscaler

from .config import load_config, method_named_in
from .generator import portable_paths
from .evaluation import available_metrics, bicubic_upscaler, run_upscaler, score_outputs, selection_key
from .methods import METHODS
from .trainer import Trainer, complete_checkpoints

STAGES = (
    ("prior", "default_prior", "base", {}),
    ("sr", "default_sr", "model.safetensors", {"model.base": "prior"}),
    ("sharp", "default_sharp", "model.safetensors", {"model.base": "prior", "model.init_generator": "sr"}),
)
"""(output subfolder, preset, what the stage leaves in its subfolder, config keys set to earlier stages' results)."""
SELECTION_FILE = "selection.json"
SELECTED_MODEL = "model_selected.safetensors"


def train_stages(train_dir: Path, output_dir: Path, overrides: list[str] = ()) -> None:
    """Run the stages that have not finished."""
    results = {}
    for folder, preset, result, links in STAGES:
        out = output_dir / folder
        if not (out / result).exists():
            method = method_named_in(preset=preset)
            layers = [f"data.hr_dir={train_dir}", *(f"{key}={results[stage]}" for key, stage in links.items()), *overrides]
            config = load_config(preset=preset, overrides=layers, method_defaults=METHODS[method].defaults, other_sections=tuple(METHODS))
            resume = out.is_dir() and bool(complete_checkpoints(out))
            if Trainer(config, out, resume=resume).train() != "finished":
                raise SystemExit(f"stage {folder} was stopped; run the same command again to resume it.")
        results[folder] = out / result


def selection_candidates(output_dir: Path) -> dict[tuple[str, int], Path]:
    """``(stage, step) -> model``: the SR stage's final model and every kept checkpoint of the sharpening stage, so
    the sharpening is kept only where it wins on validation."""
    (sr, *_), (sharp, *_) = STAGES[1], STAGES[2]
    sr_steps = [step for step, _ in complete_checkpoints(output_dir / sr)]
    candidates = {(sr, max(sr_steps)): output_dir / sr / "model.safetensors"} if sr_steps else {}
    candidates.update(((sharp, step), folder / "model.safetensors") for step, folder in complete_checkpoints(output_dir / sharp))
    return candidates


def select_on_validation(output_dir: Path, validation_dir: Path) -> tuple[Path, dict]:
    """Score every :func:`selection_candidates` model with every colour fix on ``validation_dir`` (both kinds of
    input), pick the best pair (:func:`selection_key`) and write it as ``output_dir/model_selected.safetensors``, the
    model with that colour fix as its default; returns its path and the scores, which are also written to
    ``output_dir/selection.json``."""
    metrics = available_metrics()
    scorers = {m: make_metric(m, torch.device("cpu")) for m in metrics}
    candidates = selection_candidates(output_dir)
    if not candidates:
        raise ValueError(f"{output_dir} holds no complete checkpoint to select from.")
    with tempfile.TemporaryDirectory() as tmp:
        run_upscaler(bicubic_upscaler(), validation_dir, Path(tmp) / "bicubic")
        bicubic = score_outputs(Path(tmp) / "bicubic", validation_dir, metrics, scorers)
        scores = {}
        for (stage, step), path in candidates.items():
            loaded = load_model(path)
            upscaler = Upscaler(loaded.generator)
            for color_fix in COLOR_FIXES:
                options = replace(loaded.defaults, color_fix=color_fix)
                out = Path(tmp) / f"{stage}-{step}-{color_fix}"
                run_upscaler(lambda lq: upscaler.upscale(lq[None], options)[0], validation_dir, out)
                scores[(stage, step, color_fix)] = score_outputs(out, validation_dir, metrics, scorers)
    stage, step, color_fix = min(scores, key=lambda key: selection_key(scores[key], bicubic))
    checkpoint = load_checkpoint(candidates[(stage, step)])
    checkpoint.defaults = replace(checkpoint.defaults, color_fix=color_fix)
    selected = save_checkpoint(checkpoint, output_dir / SELECTED_MODEL)
    report = {
        "bicubic": bicubic, "selected": {"stage": stage, "step": step, "color_fix": color_fix},
        "candidates": [{"stage": st, "step": s, "color_fix": c, "scores": v} for (st, s, c), v in scores.items()],
    }
    with atomic_output(output_dir / SELECTION_FILE) as tmp_file:
        tmp_file.write_text(json.dumps(report, indent=1) + "\n")
    return selected, report


def reproduce(photos: Path, output_dir: Path, overrides: list[str] = ()) -> Path:
    """Train what is missing, then select on ``photos/validation``; returns the selected model's path."""
    train_stages(photos / "train", output_dir, overrides)
    model, _ = select_on_validation(output_dir, photos / "validation")
    return model


def install(model: Path) -> None:
    """Write ``model`` as the bundled model, its training record free of this machine's paths."""
    checkpoint = load_checkpoint(model)
    checkpoint.training_config = portable_paths(checkpoint.training_config)
    save_checkpoint(checkpoint, DEFAULT_MODEL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.default_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, help="the folder python -m training.photos wrote (train/, validation/)")
    parser.add_argument("--output-dir", required=True, help="the three runs go into prior/, sr/ and sharp/ here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every stage")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {DEFAULT_MODEL}")
    args = parser.parse_args(argv)
    model = reproduce(Path(args.photos), Path(args.output_dir), args.set)
    if args.install:
        install(model)
    print(f"default model: {model}" + (f" (installed as {DEFAULT_MODEL})" if args.install else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
