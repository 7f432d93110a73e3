"""``d3sr upscale`` under ``accelerate launch`` with 2 gloo CPU processes: the same images as one process, a bad
file reported while the others are done, a SIGKILL of the whole launch resumed with no image done twice, and the
manifest; plus the restart rules (staged, damaged, changed settings) and batching, in-process."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3sr_cli.folder_run import MANIFEST, PART_PREFIX, STAGING
from d3sr_cli.main import main
from d3sr_core.checkpoints import convert_checkpoint, load_checkpoint, save_checkpoint
from d3sr_core.image_io import write_png
from tiny_models import random_image, write_osediff_pkl

REPO = Path(__file__).resolve().parents[1]
RECORD_FIELDS = {"input", "output", "size", "seconds", "error", "input_size", "rank", "run", "started", "finished",
                 "settings", "input_bytes", "input_mtime_ns"}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo processes, POSIX signals, /proc")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_base_dir):
    """A tiny OSEDiff-shaped model in our format that upscales x2 at the input's own size (the method's 512 px
    processing side would cost seconds per image here), and the tiny base it needs."""
    folder = tmp_path_factory.mktemp("folder_run_model")
    write_osediff_pkl(folder / "osediff.pkl")
    checkpoint = load_checkpoint(convert_checkpoint(folder / "osediff.pkl", folder / "converted.safetensors"))
    defaults = checkpoint.defaults.updated(scale=2, min_process_side=0)
    save_checkpoint(dataclasses.replace(checkpoint, defaults=defaults), folder / "tiny.safetensors")
    return folder / "tiny.safetensors", tiny_base_dir


def write_inputs(folder: Path, count: int, bad: str | None = None) -> Path:
    """``count`` small images of two sizes (so shards and batches meet both), and optionally one corrupt file."""
    for i in range(count):
        height, width = (24, 32) if i % 3 else (32, 24)
        write_png(folder / f"img{i:02d}.png", random_image(height, width, seed=i)[0])
    if bad:
        (folder / bad).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 4)
    return folder


def start(processes: int, inputs: Path, out: Path, tiny, *extra: str) -> subprocess.Popen:
    """``d3sr upscale`` in a new session (so a SIGKILL can take the whole launch, as a scheduler does)."""
    model, base = tiny
    upscale = ["-m", "d3sr_cli.main", "upscale", str(inputs), "-o", str(out), "--model", str(model), "--base", str(base), *extra]
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [sys.executable, *(launcher if processes > 1 else []), *upscale]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err


def manifest(out: Path) -> list[dict]:
    lines = (out / MANIFEST).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert set(record) == RECORD_FIELDS, record
    return records


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("d3sr: error:")]


def test_two_processes_equal_one_and_a_bad_file_is_reported_while_the_others_are_done(tiny, tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in", 5, bad="broken.png")
    model, base = tiny
    two = start(2, inputs, tmp_path / "two", tiny)
    # One process here, while the launch starts: this process has its imports done, and the launch's processes
    # run single-threaded as this one does now.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc1 = main(["upscale", str(inputs), "-o", str(tmp_path / "one"), "--model", str(model), "--base", str(base)])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    rc2, out2, err2 = finish(two)
    for rc, out, err in ((rc1, captured.out, captured.err), (rc2, out2, err2)):
        assert rc == 1, err[-3000:]  # one image failed: the run says so
        errors = error_lines(err)
        assert len(errors) == 1 and "broken.png is not a readable image" in errors[0], err[-3000:]
        # No traceback of ours (the launcher reports a process that exits with 1 by a ChildFailedError of its own).
        assert "d3sr_cli/" not in err and "d3sr_core/" not in err, err[-3000:]
        assert "5 upscaled, 0 already done, 1 failed" in out
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == [f"img{i:02d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == names
    for name in names:
        assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)), name
    assert pixels(tmp_path / "two" / "img01.png").shape == (48, 64, 3)  # 24x32 x2
    for folder, ranks in ((tmp_path / "one", {0}), (tmp_path / "two", {0, 1})):
        records = manifest(folder)
        assert sorted(Path(r["input"]).name for r in records) == ["broken.png", *names]
        assert {r["rank"] for r in records} == ranks  # two processes: both took a share
        assert len({r["run"] for r in records}) == 1
        for r in records:
            broken = Path(r["input"]).name == "broken.png"
            assert (r["error"] is not None) == broken and (r["size"] is None) == broken
            if not broken:
                assert r["size"] == [2 * r["input_size"][0], 2 * r["input_size"][1]] and r["seconds"] >= 0
        assert not list(folder.glob(f"{PART_PREFIX}*")) and not (folder / STAGING).exists()


def test_a_sigkilled_launch_resumes_with_no_image_done_twice(tiny, tmp_path):
    count = 12
    inputs = write_inputs(tmp_path / "in", count)
    out = tmp_path / "out"
    proc = start(2, inputs, out, tiny)
    deadline = time.monotonic() + 240
    while not list(out.glob("img*.png")):  # the first image committed: the run is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()  # SIGKILL of the launcher
    proc.communicate()
    # torchrun starts its workers in sessions of their own; they must not go on without their launcher.
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their launcher"
        time.sleep(0.05)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("img*.png")}
    killed = [json.loads(line) for part in out.glob(f"{PART_PREFIX}*.jsonl") for line in part.read_text().splitlines()]
    assert 0 < len(before) < count, "the kill should land mid-run"
    assert not (out / MANIFEST).exists()  # never merged: the parts are all there is
    # Every committed output has its record (the record is written before the rename that commits).
    assert set(before) <= {Path(r["output"]).name for r in killed}

    rc, stdout, err = finish(start(2, inputs, out, tiny))
    assert rc == 0, err[-3000:]
    records = manifest(out)
    done = [Path(r["output"]).name for r in records if r["error"] is None]
    assert sorted(done) == [f"img{i:02d}.png" for i in range(count)]  # each image exactly once: none done twice
    assert f"{count - len(done_before(killed))} upscaled, {len(done_before(killed))} already done" in stdout
    first_run = {r["run"] for r in killed}
    assert len(first_run) == 1 and len({r["run"] for r in records}) == 2
    for name, stat in before.items():  # what the killed run finished was left as it was ...
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stat, name
    resumed = [r for r in records if r["run"] not in first_run]
    assert {Path(r["output"]).name for r in resumed}.isdisjoint(before)  # ... and only the rest was done now
    assert min(r["started"] for r in resumed) > max(r["finished"] for r in killed)
    assert not list(out.glob(f"{PART_PREFIX}*")) and not (out / STAGING).exists()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent (a container's PID 1 may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def done_before(killed: list[dict]) -> set[str]:
    return {Path(r["output"]).name for r in killed if r["error"] is None}


def test_restart_rules_batching_and_refusals_in_one_process(tiny, tmp_path, capsys, monkeypatch):
    model, base = tiny
    inputs = write_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"

    def run(*extra, folder=out):
        return main(["upscale", str(inputs), "-o", str(folder), "--model", str(model), "--base", str(base),
                     "--device", "cpu", *extra])

    assert run() == 0
    assert len(manifest(out)) == 3
    # A kill between a record and its rename leaves the finished image staged: the restart commits it as it is.
    (out / STAGING).mkdir()
    os.replace(out / "img01.png", out / STAGING / "img01.png")
    staged = (out / STAGING / "img01.png").stat().st_ino
    # A damaged result (here: truncated) is not valid, so it is done again.
    damaged = (out / "img02.png").read_bytes()
    (out / "img02.png").write_bytes(damaged[:-30])
    capsys.readouterr()
    assert run() == 0
    assert "1 upscaled, 2 already done, 0 failed" in capsys.readouterr().out
    records = manifest(out)
    assert [Path(r["output"]).name for r in records[3:]] == ["img02.png"]
    assert (out / "img01.png").stat().st_ino == staged and not (out / STAGING).exists()
    assert (out / "img02.png").read_bytes() == damaged  # deterministic: the same file again
    # Nothing left to do: no image is touched.
    assert run() == 0 and len(manifest(out)) == 4
    # Other settings change the pixels: every image is done again.
    assert run("--color-fix", "none") == 0 and len(manifest(out)) == 7

    # Batches of same-size images equal one at a time up to rounding.
    assert run("--color-fix", "none", "--batch-size", "3", folder=tmp_path / "batched") == 0
    for name in ("img00.png", "img01.png", "img02.png"):
        diff = np.abs(pixels(out / name).astype(int) - pixels(tmp_path / "batched" / name).astype(int))
        assert diff.max() <= 1, name
    capsys.readouterr()
    assert run("--batch-size", "2", "--vae-sample", "sample", "--seed", "1", folder=tmp_path / "x") == 2
    assert "--vae-sample sample" in capsys.readouterr().err

    # A launch of several processes without accelerate installed, or with one device named for all: one sentence.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert run(folder=tmp_path / "y") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'd3sr[train]'" in err
    monkeypatch.delitem(sys.modules, "accelerate")
    assert main(["upscale", str(inputs), "-o", str(tmp_path / "z"), "--model", str(model), "--device", "cuda:1"]) == 2
    assert "each process takes its own GPU" in capsys.readouterr().err
