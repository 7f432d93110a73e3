"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps on the CPU with tiny models, as CI runs them, so the
script is known to work before a GPU is ever lent to it; and the parts the dry run does not reach (each step as its
own process with a time limit, the GPU plan's command lines)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d3sr_cli.main import build_parser
from training.config import parse_override

REPO = Path(__file__).resolve().parents[1]
STEPS = ["tests", "bench_fp32", "bench_4k", "train_d3sr", "train_osediff", "train_tadsr", "train_tsdsr"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_runs_every_step_and_writes_its_json_and_table(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("D3SR_TEST_DEVICE", None)  # the dry run's test step sets cpu itself
    # The limit only turns a hang into a failure: the run takes about 20 CPU seconds, one to three minutes of wall time
    # on a loaded two-core machine (the JSON records both per step).
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert report["dry_run"] and [s["step"] for s in report["steps"]] == STEPS
    assert all(s["rc"] == 0 and s["in_process"] for s in report["steps"])
    steps = {s["step"]: s for s in report["steps"]}
    # The test step ran a subset: the tests that take the device fixture, and they passed.
    tail = steps["tests"]["log_tail"]
    assert " passed" in tail and "deselected" in tail and "failed" not in tail and "error" not in tail
    bench = steps["bench_fp32"]["report"]
    assert all(a["ok"] for a in bench["agreement"]) and {r["output_size"] for r in bench["results"]} == {64, 128}
    assert {r["output_size"] for r in steps["bench_4k"]["report"]["results"]} == {256}
    # Every training run got as far as its exported model.
    assert all("trained 1 steps; model:" in steps[f"train_{m}"]["log_tail"] for m in ("d3sr", "osediff", "tadsr", "tsdsr"))
    table = (tmp_path / "gpu_check_dry.md").read_text()
    assert all(f"| {step} | 0 |" in table for step in STEPS)
    # A wrong argument is refused in one sentence.
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fast"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr


def test_a_step_as_its_own_process_records_its_exit_status_log_and_time_limit(tmp_path):
    gpu_check = _gpu_check()
    said = gpu_check.Step("said", ["python", "-c", "import os, sys; print(os.environ['MARK']); sys.exit(3)"], None, 60,
                          {"MARK": "from the step's env"})
    entry = gpu_check.run_step(said, tmp_path, in_process=False)
    assert not entry["in_process"] and entry["rc"] == 3 and "from the step's env" in entry["log_tail"]
    slow = gpu_check.Step("slow", ["python", "-c", "import time; time.sleep(30)"], None, 1)
    entry = gpu_check.run_step(slow, tmp_path, in_process=False)
    assert entry["rc"] == 124 and entry["seconds"] < 20 and "ran past 1 s" in entry["log_tail"]


def test_the_gpu_plan_runs_the_same_steps_with_commands_d3sr_accepts(tmp_path):
    gpu_check = _gpu_check()
    dry, gpu = gpu_check.plan(True, tmp_path), gpu_check.plan(False, tmp_path)
    assert [s.label for s in dry] == STEPS
    assert [s.label for s in gpu] == ["tests", "bench_bf16", "bench_fp16", *STEPS[2:]]
    assert gpu[0].argv[-1] == "tests" and gpu[0].env == {"D3SR_TEST_DEVICE": "cuda"}
    parser = build_parser()
    for steps, device, precision in ((dry, "cpu", "no"), (gpu, "cuda", "bf16")):
        for step in steps[1:]:
            args = parser.parse_args(step.argv[1:])  # argparse exits on a command d3sr would refuse
            assert getattr(args, "device", device) == device
            overrides = [parse_override(value) for value in getattr(args, "set", [])]
            if step.label.startswith("train_"):
                # A string, as the config requires: a bare `no` is YAML's false and was refused once.
                assert {"train": {"mixed_precision": precision}} in overrides
    assert [s.argv[s.argv.index("--sizes") + 1:s.argv.index("--repeats")] for s in gpu[1:4]] == [["128", "512"]] * 2 + [["1024"]]
