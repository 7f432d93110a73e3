"""CPU arithmetic modes. What ``dtype="auto"`` means on a CPU: bf16 where the CPU multiplies bf16 natively
(AVX512-BF16, AMX), fp32 with the Winograd convolutions elsewhere, and fp32 whenever ``D3SR_CPU_BF16=0`` (which
conftest.py sets for the suite). And subnormals flushed to zero while a model runs, the caller's mode restored."""

import torch

from d3sr_core.loading import DEFAULT_MODEL, load_model
from d3sr_core.pipeline import CPU_BF16_VARIABLE, Upscaler, denormals_flushed, resolve_dtypes
from tiny_models import random_image

CPU = torch.device("cpu")
BF16_AGREEMENT_DB = 30.0
"""The bench's bound for a bf16 path against fp32 (benchmarks/README.md): bf16 keeps 8 significant bits, a relative
rounding of 2^-9 per operation, so images agree to the eye, not to the last bit; 30 dB PSNR is an RMS difference of
3 % of the range."""


def _cpu_reports(monkeypatch, bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.delenv(CPU_BF16_VARIABLE, raising=False)
    _cpu_reports(monkeypatch, bf16=True)
    assert resolve_dtypes("auto", CPU) == (torch.bfloat16, torch.bfloat16)
    _cpu_reports(monkeypatch, bf16=False, amx=True)
    assert resolve_dtypes("auto", CPU) == (torch.bfloat16, torch.bfloat16)
    _cpu_reports(monkeypatch, bf16=False)
    assert resolve_dtypes("auto", CPU) == (torch.float32, torch.float32)
    assert resolve_dtypes("fp32", CPU) == (torch.float32, torch.float32)
    _cpu_reports(monkeypatch, bf16=True)
    monkeypatch.setenv(CPU_BF16_VARIABLE, "0")
    assert resolve_dtypes("auto", CPU) == (torch.float32, torch.float32)
    assert resolve_dtypes("bf16", CPU) == (torch.bfloat16, torch.bfloat16)


def test_the_bf16_path_takes_no_winograd_and_agrees_with_fp32(monkeypatch):
    monkeypatch.delenv(CPU_BF16_VARIABLE, raising=False)
    _cpu_reports(monkeypatch, bf16=True)
    image = random_image(20, 28, seed=5)
    outputs = {}
    for dtype in ("auto", "fp32"):
        loaded = load_model(DEFAULT_MODEL)
        upscaler = Upscaler(loaded.generator, dtype=dtype)
        assert upscaler.generator.denoiser.dtype == (torch.bfloat16 if dtype == "auto" else torch.float32)
        assert not upscaler.winograd or dtype == "fp32"
        outputs[dtype] = upscaler.upscale(image, loaded.defaults).float()
    assert outputs["auto"].shape == (1, 3, 80, 112)
    psnr = -10 * torch.log10(((outputs["auto"] - outputs["fp32"]) ** 2).mean())
    assert psnr >= BF16_AGREEMENT_DB, f"bf16 and fp32 differ by {psnr:.1f} dB"


def _subnormals_survive() -> bool:
    return (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_subnormals_are_flushed_while_a_model_runs_and_the_callers_mode_comes_back(monkeypatch):
    if not torch.set_flush_denormal(False):
        return  # not an x86 CPU: PyTorch cannot flush here, and nothing is slow
    assert _subnormals_survive()
    seen = []
    loaded = load_model(DEFAULT_MODEL)
    upscaler = Upscaler(loaded.generator, dtype="fp32")
    original = upscaler.generator.predict
    monkeypatch.setattr(upscaler.generator, "predict", lambda *a, **k: seen.append(_subnormals_survive()) or original(*a, **k))
    upscaler.upscale(random_image(12, 12, seed=1), loaded.defaults)
    assert seen and not any(seen) and _subnormals_survive()
    torch.set_flush_denormal(True)
    try:
        with denormals_flushed():
            assert not _subnormals_survive()
        assert not _subnormals_survive()  # a caller that flushes keeps flushing
    finally:
        torch.set_flush_denormal(False)
