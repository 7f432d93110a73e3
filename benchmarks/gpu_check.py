"""The GPU check of issue 17, behind ``benchmarks/gpu_check.sh`` (see there for what it runs and writes).

Each step is one command line. On a GPU every step runs as its own process with a time limit, so one step's CUDA
state, memory or hang cannot spoil the next. The dry run (``--dry-run``, CPU, tiny models, CI) runs the same command
lines inside this one process (``d3sr ...`` through ``d3sr_cli.main.main``, ``python -m pytest ...`` through
``pytest.main``): every fresh process spends about 8 CPU seconds importing torch, diffusers, peft and accelerate
before it does anything, which made the dry run on a loaded two-core CI machine 8 minutes of mostly imports.
tests/test_gpu_check.py runs the subprocess path on its own and parses every command of the GPU plan.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("d3sr", "osediff", "tadsr", "tsdsr")
USAGE = "expected --dry-run or --out DIR"


@dataclass
class Step:
    """One command of the check: ``argv`` (``d3sr ...`` or ``python -m pytest ...``), the JSON report it writes
    (if any), its time limit in seconds and extra environment variables."""

    label: str
    argv: list[str]
    report: Path | None
    limit: int
    env: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str]) -> tuple[bool, Path]:
    """``(dry_run, out_dir)``; raises ``ValueError`` in one sentence on anything else."""
    dry, out = False, REPO / "benchmarks"
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--dry-run":
            dry = True
        elif arg == "--out" and rest:
            out = Path(rest.pop(0))
        elif arg == "--out":
            raise ValueError(f"--out needs a folder; {USAGE}.")
        else:
            raise ValueError(f"unknown argument {arg}; {USAGE}.")
    return dry, out


def plan(dry: bool, work: Path) -> list[Step]:
    """The steps in order. The dry run shrinks sizes, repeats and steps, never the list of steps."""
    photos = work / "photos"
    if dry:
        # fp32: half precision on the CPU runs emulated, minutes for what takes seconds in fp32. The tests are the
        # ones that take the `device` fixture (conftest.py marks them `device`): the GPU run's device plumbing, on
        # the CPU. One timed repeat and crops of 32 px: the dry run checks that each step works, not its numbers.
        device, arch, sizes, big, dtypes, big_dtype, precision = "cpu", "tiny", ["16", "32"], "64", ["fp32"], "fp32", "no"
        # bf16 and the 512 x 733 untiled upscale are left to the GPU run: emulated bf16 and a full-size image are
        # most of this subset's CPU time and test nothing about the device plumbing that the rest do not.
        tests = ["-p", "no:cacheprovider", "-m", "device", "-k", "not bf16 and not processed_larger",
                 "tests/test_pipeline.py", "tests/test_formulas.py", "tests/test_tiling.py"]
        repeats, warmup, train_steps, train_extra = "1", "0", "1", ["--set", "data.crop_size=32"]
    else:
        # bf16 and fp16 at 512 and 2048 px out against the fp16 reference; peak memory at 4096 px out.
        device, arch, sizes, big, dtypes, big_dtype, precision = "cuda", "sd21", ["128", "512"], "1024", ["bf16", "fp16"], "bf16", "bf16"
        tests = ["tests"]
        repeats, warmup, train_steps, train_extra = "3", "1", "2", []
    steps = [Step("tests", ["python", "-m", "pytest", "-q", "-x", *tests], None, 300, {"D3SR_TEST_DEVICE": device})]
    for dtype in dtypes:
        report = work / f"bench_{dtype}.json"
        steps.append(Step(f"bench_{dtype}", ["d3sr", "bench", "--arch", arch, "--sizes", *sizes, "--repeats", repeats,
                                             "--warmup", warmup, "--device", device, "--dtype", dtype, "--json", str(report)],
                          report, 150))
    report = work / "bench_4k.json"
    steps.append(Step("bench_4k", ["d3sr", "bench", "--arch", arch, "--sizes", big, "--repeats", "1", "--warmup", "0",
                                   "--device", device, "--dtype", big_dtype, "--json", str(report)], report, 120))
    for method in METHODS:
        # The value is quoted for YAML: a bare `no` would be read as the boolean false.
        steps.append(Step(f"train_{method}", ["d3sr", "train", "--method", method, "--preset", "tiny", "--data", str(photos),
                                              "--max-steps", train_steps, "--output-dir", str(work / f"train_{method}"),
                                              "--set", f'train.mixed_precision="{precision}"', "--set", "train.batch_size=1",
                                              "--set", f"train.checkpoint_every={train_steps}", *train_extra], None, 90))
    return steps


def write_photos(folder: Path) -> None:
    """Four smooth random 128 px training photos (numpy and PIL only)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        big = np.kron(rng.random((6, 6, 3)), np.ones((22, 22, 1)))[:128, :128]
        Image.fromarray((big * 255).astype(np.uint8)).save(folder / f"img{i}.png")


class StepTimedOut(BaseException):
    """Raised by SIGALRM inside an in-process step; a BaseException so that no ``except Exception`` swallows it."""


@contextlib.contextmanager
def output_to(log: Path):
    """Send this process's stdout and stderr, at the file-descriptor level (so C libraries and handlers that kept
    the old ``sys.stderr`` are caught too), to ``log`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def in_process_command(argv: list[str]):
    """The function that runs ``argv`` in this process, or None: ``d3sr_cli.main.main`` for ``d3sr ...``,
    ``pytest.main`` for ``python -m pytest ...``."""
    if argv[0] == "d3sr":
        from d3sr_cli.main import main

        return lambda: main(argv[1:])
    if argv[:3] == ["python", "-m", "pytest"]:
        import pytest

        return lambda: pytest.main(argv[3:])
    return None


def run_in_process(step: Step, log: Path) -> int:
    """The command in this process with ``step.env`` set; 124 when the time limit passes (checked between Python
    bytecodes, so a long single kernel finishes first)."""
    command = in_process_command(step.argv)

    def expire(signum, frame):
        raise StepTimedOut

    saved_env = {name: os.environ.get(name) for name in step.env}
    os.environ.update(step.env)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(step.limit)
    try:
        with output_to(log):
            try:
                return int(command() or 0)
            except SystemExit as exit_:  # argparse's refusals
                return exit_.code if isinstance(exit_.code, int) else 2
            except StepTimedOut:
                print(f"gpu_check: {step.label} ran past {step.limit} s.", file=sys.stderr)
                return 124
            except Exception:  # noqa: BLE001 - any crash of a step is that step's failure, recorded with its traceback
                traceback.print_exc()
                return 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_subprocess(step: Step, log: Path) -> int:
    """The command as its own process (``d3sr`` as ``python -m d3sr_cli.main``, ``python`` as this interpreter);
    124 past the time limit."""
    argv = {"d3sr": [sys.executable, "-m", "d3sr_cli.main"], "python": [sys.executable]}.get(step.argv[0], step.argv[:1]) + step.argv[1:]
    with open(log, "wb") as f:
        try:
            return subprocess.run(argv, cwd=REPO, env={**os.environ, **step.env}, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=step.limit).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ngpu_check: {step.label} ran past {step.limit} s.\n".encode())
            return 124


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (load-independent, unlike wall time)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_step(step: Step, work: Path, in_process: bool) -> dict:
    """Runs ``step``; its entry: command, exit status, wall and CPU seconds, report, the log's last 2000 chars."""
    log = work / f"{step.label}.log"
    print(f"== {step.label}: {' '.join(step.argv)}", flush=True)
    start, cpu = time.time(), cpu_seconds()
    in_process = in_process and in_process_command(step.argv) is not None
    rc = (run_in_process if in_process else run_subprocess)(step, log)
    entry = {"step": step.label, "command": " ".join(step.argv), "in_process": in_process, "rc": rc,
             "seconds": round(time.time() - start, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1)}
    if step.report is not None:
        try:
            entry["report"] = json.loads(step.report.read_text())
        except (OSError, ValueError):
            entry["report"] = None
    entry["log_tail"] = log.read_text(errors="replace")[-2000:]
    print("\n".join(entry["log_tail"].splitlines()[-5:]), flush=True)
    return entry


def bench_cell(report: dict) -> str:
    """One table cell: per size, both paths' median time and peak memory, and the speed-up."""
    parts = []
    for r in report.get("ratios", []):
        ref, ours = (next(x for x in report["results"] if x["path"] == path and x["input_size"] == r["input_size"])
                     for path in ("reference", "ours"))
        parts.append(f"{ref['output_size']} px: reference ({report['reference_dtype']}) {ref['median_seconds'] * 1000:.0f} ms / "
                     f"{ref['peak_mib']:.0f} MiB, ours ({report['dtype']}) {ours['median_seconds'] * 1000:.0f} ms / "
                     f"{ours['peak_mib']:.0f} MiB, {r['speedup']:.2f}x")
    return "; ".join(parts)


def write_summary(steps: list[dict], out: Path, dry: bool) -> list[str]:
    """``gpu_check[_dry].json`` (every step in full) and ``.md`` (one table row per step) in ``out``."""
    import torch

    device = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    name = "gpu_check_dry" if dry else "gpu_check"
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "torch": torch.__version__,
               "python": platform.python_version(), "dry_run": dry, "steps": steps}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    lines = [f"GPU check on {device}, torch {torch.__version__}, {summary['date']}", "",
             "| step | exit | seconds | CPU seconds | result |", "|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['cpu_seconds']} | {bench_cell(s.get('report') or {})} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str]) -> int:
    try:
        dry, out = parse_args(argv)
    except ValueError as err:
        print(f"gpu_check.sh: {err}", file=sys.stderr)
        return 2
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check.sh: no CUDA GPU is visible to torch; run with --dry-run on a CPU.", file=sys.stderr)
            return 1
    out = out.resolve()  # relative to where this started (gpu_check.sh starts in the repository root)
    os.chdir(REPO)  # the test step names its files from the repository root
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_photos(work / "photos")
        steps = [run_step(step, work, in_process=dry) for step in plan(dry, work)]
    lines = write_summary(steps, out, dry)
    print("\n".join(lines))
    return 1 if any(s["rc"] != 0 for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
