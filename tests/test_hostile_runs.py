"""Hostile runs: training with bad images, changed configs on --resume, two runs in one folder, damaged
checkpoints, a full disk, malformed YAML; the command line under SIGINT, SIGTERM and SIGKILL (temporary tile
folders and half-written files removed or swept); d3sr eval with nothing to score, shared stems, tiny images;
ComfyUI's base_path confinement. Every case ends in a result or one line, never a traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from d3sr_cli.main import main as d3sr
from d3sr_core import files as files_module
from d3sr_core.files import FolderLock, FolderLockedError, atomic_output, sweep_stale_temporaries, temporary_folder
from d3sr_core.image_io import ImageFileError, check_image, verified_images
from d3sr_core.tiled_vae import TILE_FOLDER_PREFIX
from test_hostile_models import micro_checkpoint
from d3sr_core.checkpoints import save_checkpoint
from tiny_models import tiny_preset_config, write_hr_photos
from training.trainer import Trainer, TrainingError, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]


def one_line(text: str) -> None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert "Traceback" not in text, text[-2000:]
    assert lines, "no message"


def last_error(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("d3sr: ")]
    assert errors, text[-2000:]
    return errors[-1]


# ---- images verified when the data opens -------------------------------------------------------------------------

@pytest.fixture
def hr_dir(tmp_path) -> Path:
    return write_hr_photos(tmp_path / "hr", 3, (48, 48), seed=0)


def bad_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    cases = {name: folder / name for name in ("empty.png", "text.png", "truncated.png", "truncated.jpg", "float.tif", "crc.png")}
    cases["empty.png"].write_bytes(b"")
    cases["text.png"].write_text("hello")
    good.save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    cases["truncated.png"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[40] ^= 0xFF  # inside the image data: the chunk's CRC no longer matches
    cases["crc.png"].write_bytes(bytes(flipped))
    good.save(folder / "whole.jpg", quality=90)
    jpeg = (folder / "whole.jpg").read_bytes()
    cases["truncated.jpg"].write_bytes(jpeg[: len(jpeg) // 2])
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(cases["float.tif"])
    (folder / "whole.png").unlink()
    (folder / "whole.jpg").unlink()
    return cases


def test_every_bad_image_is_named_by_check_image(tmp_path):
    for name, path in bad_images(tmp_path / "bad").items():
        with pytest.raises(ImageFileError) as caught:
            check_image(path)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message, (name, message)


def test_a_bad_training_image_stops_the_run_before_step_1_or_is_skipped(hr_dir, tmp_path):
    (hr_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "run"
    config = tiny_preset_config("d3sr", hr_dir, "train.max_steps=1", "data.num_workers=0")
    trainer = Trainer(config, out)
    with pytest.raises(ImageFileError, match=r"broken\.png.*data\.skip_bad_images"):
        trainer.train()
    assert not complete_checkpoints(out)
    trainer.release()
    skipping = tiny_preset_config("d3sr", hr_dir, "train.max_steps=1", "data.num_workers=0", "data.skip_bad_images=true")
    assert Trainer(skipping, tmp_path / "skip").train() == "finished"
    assert verified_images(sorted(hr_dir.glob("*.png")), skip_bad=True) == sorted(p for p in hr_dir.glob("*.png") if p.name != "broken.png")


# ---- --resume with another config, two runs, damaged checkpoints, a full disk ------------------------------------

@pytest.fixture
def two_checkpoints(hr_dir, tmp_path):
    """A tiny run of 2 steps with a checkpoint at each."""
    out = tmp_path / "run"
    config = tiny_preset_config("d3sr", hr_dir, "train.max_steps=2", "train.checkpoint_every=1", "data.num_workers=0")
    trainer = Trainer(config, out)
    assert trainer.train() == "finished"
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2]
    return hr_dir, out


def resume(hr_dir, out, *overrides):
    config = tiny_preset_config("d3sr", hr_dir, "train.max_steps=2", "train.checkpoint_every=1", "data.num_workers=0", *overrides)
    return Trainer(config, out, resume=True)


def test_resume_refuses_changes_that_would_mix_two_runs_and_applies_and_records_the_others(two_checkpoints, capsys):
    hr_dir, out = two_checkpoints
    for overrides, keys in (
        (["seed=7"], ["seed"]),
        (["data.crop_size=32", "d3sr.generator.lr=0.5"], ["d3sr.generator.lr", "data.crop_size"]),
        (["d3sr.generator.lora_rank=2"], ["d3sr.generator.lora_rank"]),
        (["method=osediff"], ["method"]),
    ):
        with pytest.raises(TrainingError) as caught:
            resume(hr_dir, out, *overrides)
        message = str(caught.value)
        assert "\n" not in message and "--resume cannot change" in message
        for key in keys:
            assert key in message, message
    resumed = resume(hr_dir, out, "train.max_steps=3", "train.log_every=1")
    assert resumed.start_step == 2 and "train.max_steps changed from 2 to 3" in capsys.readouterr().out
    assert resumed.train() == "finished"
    history = yaml.safe_load((out / "logs" / "resumes.yaml").read_text())
    assert history[-1]["step"] == 2 and history[-1]["changes"]["train.max_steps"] == {"from": 2, "to": 3}
    assert yaml.safe_load((out / "checkpoint-3" / "config.yaml").read_text())["train"]["max_steps"] == 3


def test_a_second_run_in_a_locked_output_folder_is_refused_in_one_sentence(two_checkpoints):
    hr_dir, out = two_checkpoints
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from d3sr_core.files import FolderLock; "
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=r"is in use by process \d+; wait for it to end or choose another --output-dir"):
            resume(hr_dir, out)
    finally:
        holder.kill()
        holder.wait()
    assert resume(hr_dir, out).start_step == 2  # the lock died with its process


@pytest.mark.parametrize("damage", ["optimizer_garbage", "optimizer_truncated", "trainable_empty", "trainable_no_tensors",
                                    "state_json", "config_yaml"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(two_checkpoints, capsys, damage):
    from safetensors.torch import save_file

    hr_dir, out = two_checkpoints
    newest = out / "checkpoint-2"
    if damage == "optimizer_garbage":
        (newest / "optimizer.bin").write_bytes(b"PK\x03\x04" + os.urandom(200))
    elif damage == "optimizer_truncated":
        data = (newest / "optimizer.bin").read_bytes()
        (newest / "optimizer.bin").write_bytes(data[: len(data) // 2])
    elif damage == "trainable_empty":
        (newest / "trainable.safetensors").write_bytes(b"")
    elif damage == "trainable_no_tensors":
        save_file({}, str(newest / "trainable.safetensors"))
    elif damage == "state_json":
        (newest / "training_state.json").write_text("{not json")
    else:
        (newest / "config.yaml").write_text("a: [")
    resumed = resume(hr_dir, out)
    assert resumed.start_step == 1
    printed = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged" in printed and "falling back to the previous complete one" in printed


def test_every_checkpoint_damaged_is_one_sentence(two_checkpoints):
    hr_dir, out = two_checkpoints
    for folder in out.glob("checkpoint-*"):
        (folder / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(TrainingError, match="every checkpoint in .* is damaged"):
        resume(hr_dir, out)


def test_a_full_disk_while_writing_a_checkpoint_leaves_no_partial(two_checkpoints, monkeypatch):
    hr_dir, out = two_checkpoints
    resumed = resume(hr_dir, out, "train.max_steps=3")

    def full(path):
        (Path(path) / "optimizer.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resumed.accelerator, "save_state", full)
    with pytest.raises(TrainingError, match=r"checkpoint-3 could not be written .*No space left on device.*--resume"):
        resumed.save(3)
    assert not list(out.glob("*.partial")) and [s for s, _ in complete_checkpoints(out)] == [1, 2]


def test_malformed_yaml_in_config_and_set_is_one_line(hr_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    for extra in (["--config", str(bad)], ["--set", "train.max_steps=[1"], ["--set", "train={"], ["--config", str(tmp_path / "none.yaml")]):
        assert d3sr(["train", "--preset", "tiny", "--data", str(hr_dir), "--output-dir", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        one_line(err)
        assert last_error(err).startswith("d3sr: error: ") and ("YAML" in err or "does not exist" in err), err


# ---- the command line under signals ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_upscale(tmp_path_factory):
    """A micro model and an image that the VAE takes in several tiles."""
    root = tmp_path_factory.mktemp("signals")
    model = save_checkpoint(micro_checkpoint(), root / "micro.safetensors")
    Image.fromarray((np.random.default_rng(0).random((384, 384, 3)) * 255).astype(np.uint8)).save(root / "big.png")
    return root, model


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_sigint_and_sigterm_end_in_one_line_and_remove_the_tile_folder(slow_upscale, tmp_path, monkeypatch, capsys, sig, code, words):
    """The signal arrives while the VAE's tiles wait on disk (sent by the process to itself, at the first tile)."""
    import tempfile

    from d3sr_core import tiled_vae

    if sys.platform == "win32":
        pytest.skip("POSIX signals")
    root, model = slow_upscale
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_put, seen = tiled_vae._Store.put, []

    def put_then_signal(self, name, tensor):
        parked = real_put(self, name, tensor)
        if not seen:
            seen.extend(tmp.glob(f"{TILE_FOLDER_PREFIX}*"))
            os.kill(os.getpid(), sig)
        return parked

    monkeypatch.setattr(tiled_vae._Store, "put", put_then_signal)
    # A shell starts background jobs with SIGINT ignored, and Python then installs no handler: give it Python's own.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code_returned = d3sr(["upscale", str(root / "big.png"), "-o", str(out), "--model", str(model), "--vae-tile-store",
                              "disk", "--vae-tile-size", "64", "--tile-size", "16", "--tile-overlap", "4", "--no-winograd"])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code_returned == code, err[-2000:]
    assert seen and "Traceback" not in err and last_error(err) == f"d3sr: {words}; nothing half-written was left."
    assert not list(tmp.glob(f"{TILE_FOLDER_PREFIX}*"))
    # A run that wrote nothing removes the output folder it made; one that holds it leaves only its lock.
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]
    assert signal.getsignal(signal.SIGTERM) is not None


def test_sigkill_leftovers_are_swept_on_the_next_start(tmp_path, monkeypatch):
    if sys.platform == "win32":
        pytest.skip("POSIX signals")
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    # A tile folder and a 0-byte .tmp of a PNG write, both of a process killed half-way.
    killed = subprocess.Popen([sys.executable, "-c", "import sys, time; from d3sr_core.files import atomic_output, temporary_folder\n"
                               "with temporary_folder(sys.argv[3], sys.argv[2]) as folder, atomic_output(sys.argv[1]) as tmp:\n"
                               "    (folder / 'tile.bin').write_bytes(bytes(1000)); print(folder, tmp, flush=True); time.sleep(60)",
                               str(out / "big.png"), str(tmp), TILE_FOLDER_PREFIX], cwd=REPO, stdout=subprocess.PIPE, text=True)
    left_folder, dead_tmp = map(Path, killed.stdout.readline().split())
    killed.kill()
    killed.wait()
    assert left_folder.is_dir() and dead_tmp.exists() and dead_tmp.stat().st_size == 0
    with atomic_output(out / "other.png") as live_tmp, temporary_folder(TILE_FOLDER_PREFIX, tmp) as live_folder:
        assert sweep_stale_temporaries(TILE_FOLDER_PREFIX, tmp) == []  # too fresh: its owner may be about to lock it
        monkeypatch.setattr(files_module, "STALE_AFTER_S", 0.0)
        assert sweep_stale_temporaries(TILE_FOLDER_PREFIX, tmp) == [left_folder]  # the live one is locked: kept
        assert sweep_stale_temporaries(".big.", out, file_suffix=".png.tmp") == [dead_tmp]
        assert sweep_stale_temporaries(".other.", out, file_suffix=".png.tmp") == []
        assert live_tmp.exists() and live_folder.is_dir()
    assert not list(out.glob(".*.tmp")) and not list(tmp.iterdir())


def test_folder_lock_is_per_process(tmp_path):
    with FolderLock(tmp_path / "x") as lock:
        assert FolderLock(tmp_path / "x").acquire()  # the same process may take it again
        code = subprocess.run([sys.executable, "-c", "import sys; from d3sr_core.files import FolderLock\n"
                               "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(type(e).__name__)",
                               str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
        assert code.stdout.strip() == FolderLockedError.__name__
        assert lock


def test_upscale_options_and_output_folder_are_checked_before_the_model_loads(slow_upscale, tmp_path, capsys, monkeypatch):
    import d3sr_core.loading as loading

    root, model = slow_upscale
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (["--scale", "100000"], "max_scale"),
        (["--scale", "20"], "max_scale=16"),
        (["--max-output-pixels", "0"], "max_output_pixels"),
        (["--tile-size", "3"], "tile_size"),
    ]
    for extra, words in cases:
        assert d3sr(["upscale", str(root / "big.png"), "-o", str(tmp_path / "o"), "--model", str(model), *extra]) == 2
        err = capsys.readouterr().err
        one_line(err)
        assert words in last_error(err), err
    if os.geteuid() != 0:  # root writes anywhere
        assert d3sr(["upscale", str(root / "big.png"), "-o", str(locked / "sub"), "--model", str(model)]) == 2
        assert "cannot be created" in capsys.readouterr().err


def test_an_image_over_the_output_limit_is_one_line_and_writes_nothing(slow_upscale, tmp_path, capsys):
    root, model = slow_upscale
    out = tmp_path / "o"
    assert d3sr(["upscale", str(root / "big.png"), "-o", str(out), "--model", str(model), "--max-output-pixels", "10000"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "over the limit max_output_pixels=10000" in last_error(err)
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp"))


# ---- d3sr eval ---------------------------------------------------------------------------------------------------

def test_eval_fails_when_nothing_was_scored_reports_shared_stems_and_tiny_images(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    tiny = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    tiny.save(pred / "a.png")
    tiny.save(gt / "a.png")
    assert d3sr(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "ssim"]) == 1
    err = capsys.readouterr().err
    assert "a.png: 8x8 is too small for ssim (it needs 11 px a side)" in err and "was scored" in last_error(err)
    assert "Traceback" not in err
    assert d3sr(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim"]) == 0  # psnr scores it
    big = Image.fromarray(np.full((16, 16, 3), 90, np.uint8))
    big.save(pred / "b.png")
    big.save(pred / "b.jpg")
    big.save(gt / "b.png")
    assert d3sr(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr"]) == 0
    err = capsys.readouterr().err
    assert f"b: 2 files in {pred} share this name (b.jpg, b.png); none was scored" in err
    (pred / "a.png").write_bytes(b"")
    assert d3sr(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr"]) == 1
    err = capsys.readouterr().err
    assert "is empty" in err and "Traceback" not in err


# ---- ComfyUI base_path confinement -------------------------------------------------------------------------------

def test_comfyui_base_path_stays_inside_models_diffusers(tmp_path, monkeypatch):
    import importlib
    import types

    root = tmp_path / "diffusers"
    (root / "real").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda name: [str(root)]
    folder_paths.get_full_path_or_raise = lambda kind, name: (_ for _ in ()).throw(FileNotFoundError(name))
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.delitem(sys.modules, "nodes.model_folder", raising=False)
    spec = importlib.util.spec_from_file_location("hostile_model_folder", REPO / "nodes" / "model_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.base_path("diffusers/real") == str(root / "real")
    for name in ("diffusers/../secret", "diffusers/../../x", "diffusers/real/../../secret", "diffusers/" + str(tmp_path / "secret"),
                 "diffusers/", "diffusers/.."):
        with pytest.raises(FileNotFoundError):
            module.base_path(name)


# ---- ComfyUI: a model list that survives bad files, limits from the server's environment -------------------------

@pytest.fixture
def comfy_pack(tmp_path, monkeypatch):
    """The pack imported over the stand-in ComfyUI, with models/d3sr holding one good and six bad files."""
    import importlib.util

    from test_hostile_models import bad_model_folder

    root = tmp_path / "models"
    micro = save_checkpoint(micro_checkpoint(), tmp_path / "micro.safetensors")
    bad_model_folder(root / "d3sr", micro)
    (root / "checkpoints").mkdir()
    monkeypatch.setenv("D3SR_TEST_MODELS_DIR", str(root))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "comfy_stub"))
    forget = lambda: [sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in ("folder_paths", "comfy", "comfy_api", "d3sr_hostile_pack")]  # noqa: E731
    forget()
    spec = importlib.util.spec_from_file_location("d3sr_hostile_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["d3sr_hostile_pack"] = module
    spec.loader.exec_module(module)
    yield module
    forget()


def test_comfyui_lists_only_readable_models_and_takes_limits_from_the_environment(comfy_pack, monkeypatch):
    from d3sr_core.options import LimitError

    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    options = {i.id: i for i in nodes["D3SRModelLoader"].define_schema().inputs}["model_name"].options
    assert "good.safetensors" in options
    assert not [o for o in options if o.split(".")[0] in ("truncated", "bad_scale", "empty", "text", "zip_cut", "no_meta")]
    loaded = nodes["D3SRModelLoader"].execute("good.safetensors", None, "fp32").args[0]
    image = torch.rand(1, 8, 8, 3)
    inputs = dict(scale=2, tile_size=-1, tile_overlap=-1, vae_tile_size=-1, color_fix="method default", vae_sample="mode", seed=0)
    assert nodes["D3SRUpscale"].execute(loaded, image, **inputs).args[0].shape == (1, 16, 16, 3)
    monkeypatch.setenv("D3SR_MAX_OUTPUT_PIXELS", "100")
    with pytest.raises(LimitError, match="max_output_pixels=100"):
        nodes["D3SRUpscale"].execute(loaded, image, **inputs)
    monkeypatch.setenv("D3SR_MAX_OUTPUT_PIXELS", "lots")
    with pytest.raises(ValueError, match="D3SR_MAX_OUTPUT_PIXELS='lots' is not a whole number"):
        nodes["D3SRUpscale"].execute(loaded, image, **inputs)
    monkeypatch.setenv("D3SR_MAX_OUTPUT_PIXELS", "256")
    assert nodes["D3SRUpscale"].execute(loaded, image, **inputs).args[0].shape == (1, 16, 16, 3)
