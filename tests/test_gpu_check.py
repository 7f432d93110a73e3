"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps on the CPU with tiny models, as CI runs them, so the
script is known to work before a GPU is ever lent to it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["tests", "bench_fp32", "bench_4k", "train_d3sr", "train_osediff", "train_tadsr", "train_tsdsr"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("d3sr") is None, reason="needs bash and the d3sr command")
def test_gpu_check_dry_run_runs_every_step_and_writes_its_json_and_table(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert report["dry_run"] and [s["step"] for s in report["steps"]] == STEPS
    assert all(s["rc"] == 0 for s in report["steps"])
    bench = next(s for s in report["steps"] if s["step"] == "bench_fp32")["report"]
    assert all(a["ok"] for a in bench["agreement"]) and {r["output_size"] for r in bench["results"]} == {64, 128}
    table = (tmp_path / "gpu_check_dry.md").read_text()
    assert all(f"| {step} | 0 |" in table for step in STEPS)
    # A wrong argument is refused in one sentence.
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fast"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
