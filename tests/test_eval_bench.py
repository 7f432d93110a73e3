"""``d3sr eval`` against independent PSNR/SSIM computations, and ``d3sr bench`` on the tiny architecture, with and
without Winograd convolutions."""

import json
import os
import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from d3sr_cli.bench import osediff_shaped_generator
from d3sr_cli.main import main as d3sr
from d3sr_core.metrics import psnr_y, ssim_y
from d3sr_core.options import PRESETS
from d3sr_core.pipeline import Upscaler
from d3sr_core.winograd import nnpack_available


def numpy_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (H, W, 3) image in [0, 1], per pixel."""
    return (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255


def numpy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W) images in 0..255 over every valid 11x11 window with Gaussian weights (sigma 1.5),
    written out per window; the contrast-structure term is clipped at 0 as pyiqa does."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    wa, wb = sliding_window_view(a, (11, 11)), sliding_window_view(b, (11, 11))
    mu_a, mu_b = (wa * w).sum(axis=(-1, -2)), (wb * w).sum(axis=(-1, -2))
    var_a = (w * (wa - mu_a[..., None, None]) ** 2).sum(axis=(-1, -2))
    var_b = (w * (wb - mu_b[..., None, None]) ** 2).sum(axis=(-1, -2))
    cov = (w * (wa - mu_a[..., None, None]) * (wb - mu_b[..., None, None])).sum(axis=(-1, -2))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = np.maximum((2 * cov + c2) / (var_a + var_b + c2), 0)
    return float((((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)) * cs).mean())


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    gt = rng.random((36, 44, 3))
    pred = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1)
    return pred, gt


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def test_psnr_y_equals_the_formula(pair):
    pred, gt = pair
    mse = np.mean((numpy_y(pred) - numpy_y(gt)) ** 2)
    assert psnr_y(as_tensor(pred), as_tensor(gt)).item() == pytest.approx(10 * math.log10(1 / (mse + 1e-8)), abs=1e-4)
    assert psnr_y(as_tensor(gt), as_tensor(gt)).item() == pytest.approx(80.0)


def test_ssim_y_equals_a_windowed_computation(pair):
    pred, gt = pair
    expected = numpy_ssim(np.round(numpy_y(pred) * 255), np.round(numpy_y(gt) * 255))
    assert ssim_y(as_tensor(pred), as_tensor(gt)).item() == pytest.approx(expected, abs=1e-4)
    assert ssim_y(as_tensor(gt), as_tensor(gt)).item() == pytest.approx(1.0)


def save(folder, name, image):
    folder.mkdir(exist_ok=True)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / name)


def test_eval_command_reports_scores_missing_metrics_and_problems(tmp_path, pair, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    pred, gt = pair
    save(tmp_path / "pred", "a.png", pred)
    save(tmp_path / "gt", "a.png", gt)
    save(tmp_path / "pred", "b.png", pred[:20])  # wrong size
    save(tmp_path / "gt", "b.png", gt)
    save(tmp_path / "gt", "c.png", gt)  # no result
    args = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--metrics", "psnr,ssim,lpips",
            "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    assert d3sr(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    eight_bit = [np.asarray(Image.open(tmp_path / d / "a.png")).astype(np.float64) / 255 for d in ("pred", "gt")]
    assert report["images"] == 1
    assert report["means"]["psnr"] == pytest.approx(psnr_y(as_tensor(eight_bit[0]), as_tensor(eight_bit[1])).item(), abs=1e-4)
    assert "lpips" in report["missing"] and "lpips" not in report["means"]
    assert any("b.png: size 44x20 differs" in p for p in report["problems"])
    assert any("c: no result" in p for p in report["problems"])
    table = (tmp_path / "r.md").read_text()
    assert "PSNR ↑" in table and "Not computed: lpips" in table
    assert "differs from the ground truth" in capsys.readouterr().err


def test_eval_refuses_unknown_metrics_and_empty_pairs(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    assert d3sr(["eval", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"), "--metrics", "vibes"]) == 2
    assert "metric 'vibes' is not one of" in capsys.readouterr().err
    assert d3sr(["eval", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")]) == 2
    assert "share a file name" in capsys.readouterr().err


def test_bench_tiny_writes_json_and_plot(tmp_path, capsys):
    args = ["bench", "--arch", "tiny", "--sizes", "16", "24", "--repeats", "1", "--device", "cpu",
            "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
    assert d3sr(args) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert {r["path"] for r in report["results"]} == {"reference", "ours"}
    assert [r["input_size"] for r in report["ratios"]] == [16, 24]
    assert all(r["speedup"] > 0 and r["memory_ratio"] >= 0 for r in report["ratios"])
    assert all(r["median_seconds"] > 0 and len(r["seconds"]) == 1 for r in report["results"])
    assert Image.open(tmp_path / "b.png").size == (900, 380)
    assert all(set(r["stage_peak_mib"]) == {"encode", "denoise", "decode"} for r in report["results"])
    assert [(g["path"], g["input_size"], g["versus_input_size"]) for g in report["memory_growth"]] == [
        ("reference", 24, 16), ("ours", 24, 16)]
    out = capsys.readouterr().out
    assert "as fast" in out and "peak memory at 24px" in out


def test_bench_runs_our_path_with_its_own_tiles_and_disk_store(tmp_path):
    args = ["bench", "--arch", "tiny", "--sizes", "64", "--repeats", "1", "--warmup", "0", "--device", "cpu",
            "--tiles", "16", "64", "8", "--vae-tile-store", "disk", "--no-winograd", "--json", str(tmp_path / "b.json")]
    assert d3sr(args) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    ours = report["ours_options"]
    assert (ours["tile_size"], ours["vae_encoder_tile_size"], ours["vae_decoder_tile_size"]) == (16, 64, 8)
    assert ours["vae_tile_store"] == "disk" and report["winograd"] is False


@pytest.mark.skipif(not nnpack_available(), reason="this torch build has no NNPACK")
def test_winograd_path_gives_the_default_image_with_the_same_progress(monkeypatch):
    nnpack_runs = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a, **k: nnpack_runs.append(1) or real(*a, **k))
    generator = osediff_shaped_generator("tiny", merge=True)
    # 32 px -> 128 px, decoded in tiles of 8 latents and denoised in latent tiles of 8, so tiling runs too.
    options = PRESETS["osediff"].updated(min_process_side=0, vae_decoder_tile_size=8, tile_size=8, tile_overlap=2)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results, steps = {}, {}
    for winograd in (False, True):
        upscaler = Upscaler(generator, device="cpu", dtype="fp32", winograd=winograd)
        steps[winograd] = []
        results[winograd] = upscaler.upscale(image, options, lambda done, total: steps[winograd].append((done, total)))
        assert bool(nnpack_runs) == winograd
    assert results[True].shape == (1, 3, 128, 128)
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=1e-4)
    assert steps[True] == steps[False] and steps[True][-1][0] == steps[True][-1][1] > 3


def test_winograd_refuses_other_devices_and_precisions():
    generator = osediff_shaped_generator("tiny", merge=True)
    with pytest.raises(ValueError, match="CPU convolutions only; device is cuda"):
        Upscaler(generator, device="cuda", dtype="fp32", winograd=True)
    with pytest.raises(ValueError, match="float32 only; dtype is 'bf16'"):
        Upscaler(generator, device="cpu", dtype="bf16", winograd=True)


@pytest.mark.skipif(not nnpack_available(), reason="this torch build has no NNPACK")
def test_bench_records_winograd(tmp_path):
    args = ["bench", "--arch", "tiny", "--sizes", "16", "--repeats", "1", "--warmup", "0", "--device", "cpu",
            "--winograd", "--json", str(tmp_path / "b.json")]
    assert d3sr(args) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["winograd"] is True and len(report["results"]) == 2


def test_fixed_mmap_threshold_hands_freed_blocks_back(tmp_path):
    """In a fresh process: after a 16 MiB block is freed, glibc's dynamic threshold keeps the next 8 MiB blocks in
    its heap; with the threshold fixed they are mapped and unmapped, so resident memory falls back after each."""
    import subprocess
    import sys

    child = (
        "import ctypes, sys; from d3sr_core.memory import fix_mmap_threshold\n"
        "fixed = sys.argv[1] == 'fixed' and fix_mmap_threshold()\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1])\n"
        "libc.free(libc.malloc(16 << 20))\n"
        "start = rss(); blocks = [libc.malloc(8 << 20) for _ in range(16)]\n"
        "for b in blocks: ctypes.memset(b, 1, 8 << 20)\n"
        "for b in blocks[::2]: libc.free(b)\n"
        "print(rss() - start)\n"
    )
    pages = {mode: int(subprocess.run([sys.executable, "-c", child, mode], capture_output=True, text=True, check=True).stdout)
             for mode in ("fixed", "dynamic")}
    eight_mib_pages = (8 << 20) // 4096
    assert pages["fixed"] <= 8.5 * eight_mib_pages  # the 8 blocks still held
    assert pages["dynamic"] >= 15 * eight_mib_pages  # freed blocks stay resident in the heap


def test_nested_cuda_peaks_keep_the_outer_peak(monkeypatch):
    """A stage's measure resets the CUDA allocator's peak; the whole run's measure must still see the earlier peak
    (simulated allocator: 100 MiB held, a 900 MiB peak before the stage, 300 MiB inside it)."""
    from d3sr_cli.bench import PeakMemory

    state = {"allocated": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    device = torch.device("cuda")
    with PeakMemory(device) as whole:
        state["peak"] = 900
        with PeakMemory(device, release_freed=False) as stage:
            state["peak"] = 300
    assert stage.peak_bytes == 200 and whole.peak_bytes == 800


def test_folder_output_replaces_the_old_folder_with_the_usual_mode(tmp_path):
    from d3sr_core.files import atomic_output_dir

    target = tmp_path / "model_tsdsr"
    for text in ("old", "new"):
        with atomic_output_dir(target) as tmp:
            (tmp / "file.txt").write_text(text)
    assert (target / "file.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model_tsdsr"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "file.txt").write_text("broken")
            raise RuntimeError("interrupted")
    assert (target / "file.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model_tsdsr"]


def test_bench_checks_both_paths_compute_the_same_image_before_timing(monkeypatch):
    from d3sr_cli import bench

    lines = []
    report = bench.run_bench("tiny", [16], 4, 1, torch.device("cpu"), "auto", warmup=0, progress=lines.append)
    assert report["reference_dtype"] == "fp32" and "official test_osediff.py settings" in report["reference_is"]
    (check,) = report["agreement"]
    assert check["ok"] and 0 < check["max_abs"] <= bench.AGREEMENT_BOUNDS["fp32"]["max_abs"]
    assert lines[0].startswith("16px: the paths agree")
    cpu = report["cpu"]  # a speed claim names the CPU it ran on, and what auto computes in there
    assert cpu["name"] and set(cpu["flags"]) <= set(bench.CPU_FLAGS) and cpu["dtype_auto"] == "fp32"  # conftest: D3SR_CPU_BF16=0
    # A bound nothing meets: the bench refuses before any time is taken or printed.
    monkeypatch.setitem(bench.AGREEMENT_BOUNDS, "fp32", {"max_abs": 0.0})
    lines.clear()
    with pytest.raises(bench.BenchMismatch, match="differs from the reference's by .* no time is reported"):
        bench.run_bench("tiny", [16], 4, 1, torch.device("cpu"), "auto", warmup=0, progress=lines.append)
    assert lines == []


def test_bench_reference_runs_the_official_default_precision():
    from d3sr_cli.bench import agreement, reference_dtype

    assert reference_dtype(torch.device("cuda")) == "fp16" and reference_dtype(torch.device("cpu")) == "fp32"
    a = torch.zeros(1, 3, 4, 4)
    assert agreement(a, a + 0.01, half=True)["ok"]  # 40 dB
    assert not agreement(a, a + 0.1, half=True)["ok"]  # 20 dB
    assert not agreement(a, a + 0.01, half=False)["ok"]
