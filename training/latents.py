"""Precompute the VAE latents of training images, so a run does not encode its HR images at every step.

``python -m training.latents --base BASE --data DIR --out LATENTS`` writes ``LATENTS/<image stem>.safetensors``
holding ``latent`` ``(C, H / f, W / f)`` (the posterior mean times the scaling factor, as the generator's encoder
gives it, with the GroupNorm-exact tiled VAE for large images) and ``vae_scale_factor`` ``f`` in its metadata; set
``data.latent_dir`` to ``LATENTS`` in the run. The base must be the run's base (its VAE makes the latents).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import generator_on_base
from d3sr_core.files import atomic_output
from d3sr_core.image_io import list_images, read_image

VAE_TILE = 1024


def write_latents(base_path: str, data_dir: Path, out_dir: Path) -> int:
    """Encode every image of ``data_dir`` into ``out_dir``; returns how many were written."""
    base = load_base(base_path, load_text_encoder=False)
    prediction = base.scheduler_config.get("prediction_type", "epsilon")
    generator = generator_on_base(base, prediction_type=prediction, timestep=0, conditioning={})
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_images([data_dir])
    for path in tqdm(files, desc="latents", unit="image"):
        image = read_image(path).pixels
        image = (image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3])[None] * 2 - 1
        with torch.no_grad():
            latent = generator.encode(image, tile_size=VAE_TILE)[0]
        with atomic_output(out_dir / f"{path.stem}.safetensors") as tmp:
            save_file({"latent": latent.contiguous()}, str(tmp), metadata={"vae_scale_factor": str(generator.vae_scale_factor)})
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.latents", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the run's base model (diffusers folder or single file)")
    parser.add_argument("--data", required=True, help="the folder of HR training images")
    parser.add_argument("--out", required=True, help="folder for the latent files (data.latent_dir)")
    args = parser.parse_args(argv)
    count = write_latents(args.base, Path(args.data), Path(args.out))
    print(f"{count} latents in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
