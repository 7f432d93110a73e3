"""Reproduce the bundled default model with the trainer alone, in three runs of committed configs:

1. ``presets/default_vae.yaml`` (method ``autoencoder``): a small SD 2.x-shaped base, its VAE trained;
2. ``presets/default_prior.yaml`` (method ``diffusion``): its UNet trained as a latent diffusion prior;
3. ``presets/default_sr.yaml`` (method ``d3sr``): the one-step SR generator on that prior, with the prior as
   the discriminator's backbone, exported self-contained.

``python -m training.default_model --photos DIR --output-dir runs/default [--install]``; ``DIR`` is the training
folder ``python -m training.photos`` writes. A stage whose result exists is skipped and one with checkpoints is
resumed, so an interrupted reproduction continues where it stopped. ``--install`` copies the result over the
bundled model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from d3sr_core.files import atomic_output
from d3sr_core.loading import DEFAULT_MODEL

from .config import load_config, method_named_in
from .methods import METHODS
from .trainer import Trainer, complete_checkpoints

STAGES = (("vae", "default_vae", "base"), ("prior", "default_prior", "base"), ("sr", "default_sr", "model.safetensors"))
"""(output subfolder, preset, what the stage leaves in its subfolder)."""


def reproduce(photos: Path, output_dir: Path, overrides: list[str] = ()) -> Path:
    """Run the stages that have not finished; returns the final model's path."""
    previous = None
    for folder, preset, result in STAGES:
        out = output_dir / folder
        if not (out / result).exists():
            method = method_named_in(preset=preset)
            layers = [f"data.hr_dir={photos}", *([f"model.base={previous}"] if previous else []), *overrides]
            config = load_config(preset=preset, overrides=layers, method_defaults=METHODS[method].defaults, other_sections=tuple(METHODS))
            resume = out.is_dir() and bool(complete_checkpoints(out))
            if Trainer(config, out, resume=resume).train() != "finished":
                raise SystemExit(f"stage {folder} was stopped; run the same command again to resume it.")
        previous = out / result
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.default_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, help="folder of training photos (python -m training.photos DEST -> DEST/train)")
    parser.add_argument("--output-dir", required=True, help="the three runs go into vae/, prior/ and sr/ here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every stage")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {DEFAULT_MODEL}")
    args = parser.parse_args(argv)
    model = reproduce(Path(args.photos), Path(args.output_dir), args.set)
    if args.install:
        DEFAULT_MODEL.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(DEFAULT_MODEL) as tmp:
            shutil.copyfile(model, tmp)
    print(f"default model: {model}" + (f" (installed as {DEFAULT_MODEL})" if args.install else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
