"""Step time and peak memory of every one-step training method on the tiny presets (tiny; tiny-resshift for TAD-SR on
ResShift), each in its own process.

``python benchmarks/methods_tiny.py HR_DIR [--steps 12] [--batch-size 2]`` prints a Markdown table: median seconds
per step after two warm-up steps, and the process's peak resident memory (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, statistics, sys, time, torch
from training.config import load_config
from training.methods import METHODS
from training.trainer import Trainer
method, hr_dir, out, steps, batch, preset = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
config = load_config(preset=preset, overrides=[f"method={method}", f"data.hr_dir={hr_dir}", f"train.batch_size={batch}",
                     "data.num_workers=0"], method_defaults=METHODS[method].defaults, other_sections=tuple(METHODS))
trainer = Trainer(config, out)
data = iter(trainer._dataloader())
times = []
for step in range(steps):
    batch_ = next(data)
    start = time.perf_counter()
    trainer.method.training_step(batch_, step, torch.Generator().manual_seed(step))
    times.append(time.perf_counter() - start)
trained = sum(p.numel() for p in trainer.method.named_trained_parameters().values())
print(json.dumps({"method": method, "seconds_per_step": statistics.median(times[2:]), "trained_parameters": trained,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

NEEDS = {
    # row: (method, preset, teacher, fake score, discriminator)
    "d3sr": ("d3sr", "tiny", "none", "no", "diffusion UNet (down + mid blocks, LoRA) + MLP patch head"),
    "osediff": ("osediff", "tiny", "frozen base UNet, CFG", "base UNet + LoRA, own optimizer", "no"),
    "tadsr": ("tadsr", "tiny", "frozen base UNet (HSD, features)", "no", "time-aware heads on the teacher's features"),
    "tsdsr": ("tsdsr", "tiny", "frozen SD3 transformer (+ teacher LoRA), CFG", "the same frozen copy + attention LoRA, own optimizer", "no"),
    "tadsr (ResShift)": ("tadsr", "tiny-resshift", "frozen ResShift model, 15-step DDIM (regression, HSD, features)",
                         "no", "time-aware heads on the teacher's features"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hr_dir")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    rows = ["| method | teacher | fake score | discriminator | trained parameters | s / step | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|"]
    for row, (method, preset, teacher, fake, disc) in NEEDS.items():
        with tempfile.TemporaryDirectory() as out:
            result = subprocess.run([sys.executable, "-c", CHILD, method, args.hr_dir, out, str(args.steps), str(args.batch_size), preset],
                                    check=True, capture_output=True, text=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(f"| {row} | {teacher} | {fake} | {disc} | {r['trained_parameters']:,} | "
                    f"{r['seconds_per_step']:.3f} | {r['peak_rss_mib']:.0f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
