"""Real-ESRGAN degradation: the kernels against their formulas in float64, the JPEG simulation
against PIL's libjpeg, the noise statistics, and the pipeline's shapes, range and determinism."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training.degradation import (
    KERNEL_KINDS,
    DegradationConfig,
    blur,
    circular_lowpass_kernel,
    dct_matrix,
    gaussian_noise,
    jpeg_compress,
    jpeg_quant_tables,
    mixed_kernel,
    poisson_noise,
    real_esrgan_degrade,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # The degradation runs inside DataLoader workers, which torch runs single-threaded; on small
    # images OpenMP's thread hand-offs cost more than the work (100x on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _psnr(a, b) -> float:
    return 10 * math.log10(1.0 / float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()))


def _natural_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(3, h, w) float64 on 1/255 steps: smooth colour gradients, a sharp-edged rectangle, grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([
        0.5 + 0.35 * np.sin(2.0 * xx + 1.0) * np.cos(1.5 * yy),
        0.3 + 0.5 * xx * yy + 0.1 * np.sin(9 * xx),
        0.6 - 0.4 * yy + 0.05 * np.sin(25 * (xx + yy)),
    ])
    img[:, h // 3: h // 2, w // 4: w // 2] += 0.25
    img += 0.04 * rng.standard_normal((1, h, w)) + 0.01 * rng.standard_normal((3, h, w))
    return (np.clip(img, 0, 1) * 255).round() / 255


def _smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0].clamp(0, 1)


# ----------------------------------------------------------------------------- pipeline


def test_same_seed_is_bit_identical_and_other_seeds_differ():
    hr = _smooth_image(64, 64)
    cfg = DegradationConfig()
    outs = [real_esrgan_degrade(hr, cfg, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("hw", [(67, 45), (64, 64), (9, 13), (4, 5)])
def test_output_shape_range_and_255_steps(hw):
    h, w = hw
    hr = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    for seed in range(12):  # several seeds so up/down resizes, both noises and both final orders occur
        lq = real_esrgan_degrade(hr, DegradationConfig(), torch.Generator().manual_seed(seed))
        assert lq.shape == (3, h // 4, w // 4) and lq.dtype == torch.float32
        assert lq.min() >= 0 and lq.max() <= 1
        assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-4)


def test_degrade_rejects_bad_input_in_one_sentence():
    cfg, gen = DegradationConfig(), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="at least 4 pixels"):
        real_esrgan_degrade(torch.rand(3, 3, 16), cfg, gen)
    with pytest.raises(ValueError, match="NaN"):
        real_esrgan_degrade(torch.full((3, 8, 8), float("nan")), cfg, gen)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        real_esrgan_degrade(torch.rand(4, 8, 8), cfg, gen)


def test_config_from_dict_turns_lists_into_tuples_and_rejects_unknown_keys():
    cfg = DegradationConfig.from_dict({"scale": 2, "noise_range": [1, 10]})
    assert cfg.scale == 2 and cfg.noise_range == (1, 10)
    with pytest.raises(ValueError) as err:
        DegradationConfig.from_dict({"noise_rnage": [1, 10]})
    message = str(err.value)
    assert "'noise_rnage'" in message and "noise_range" in message and message.count(".") == 1


# ----------------------------------------------------------------------------- kernels


def _reference_kernel(kind, size, sx, sy, theta, beta):
    """Real-ESRGAN's kernels in numpy float64, written from the formulas, normalised to sum 1."""
    if kind in ("iso", "generalized_iso", "plateau_iso"):
        sy, theta = sx, 0.0
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv = np.linalg.inv(rot @ np.diag([sx**2, sy**2]) @ rot.T)
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            p = np.array([j - size // 2, i - size // 2], dtype=np.float64)  # (x: column, y: row)
            q = p @ inv @ p
            if kind in ("iso", "aniso"):
                out[i, j] = math.exp(-0.5 * q)
            elif kind.startswith("generalized"):
                out[i, j] = math.exp(-0.5 * q**beta)
            else:
                out[i, j] = 1.0 / (1.0 + q**beta)
    return out / out.sum()


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_mixed_kernel_matches_formula_and_sums_to_one(kind):
    for size, sx, sy, theta, beta in [(7, 0.6, 2.5, 0.7, 0.6), (21, 2.9, 1.1, -2.3, 3.5), (13, 1.5, 0.3, 1.9, 1.4)]:
        k = mixed_kernel(kind, size, sx, sy, theta, beta)
        assert k.shape == (size, size) and k.dtype == torch.float32
        assert k.double().sum().item() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(k.double().numpy(), _reference_kernel(kind, size, sx, sy, theta, beta),
                                   rtol=1e-5, atol=1e-8)


def test_iso_kernels_ignore_sigma_y_and_rotation():
    ignored = mixed_kernel("plateau_iso", 9, 1.3, sigma_y=2.0, rotation=1.0, beta=1.5)
    assert torch.equal(ignored, mixed_kernel("plateau_iso", 9, 1.3, beta=1.5))


def _bessel_j1(x: float) -> float:
    # Bessel's integral J1(x) = 1/(2π) ∫_0^{2π} cos(τ - x sin τ) dτ; the trapezoid rule on a periodic
    # integrand converges exponentially, so 512 nodes are exact to float64 for x below ~100.
    tau = np.linspace(0.0, 2 * math.pi, 512, endpoint=False)
    return float(np.mean(np.cos(tau - x * np.sin(tau))))


@pytest.mark.parametrize("cutoff,size", [(math.pi, 7), (math.pi / 3, 13), (math.pi / 5, 21)])
def test_circular_lowpass_kernel_matches_jinc_and_sums_to_one(cutoff, size):
    ref = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            r = math.hypot(i - size // 2, j - size // 2)
            ref[i, j] = cutoff**2 / (4 * math.pi) if r == 0 else cutoff * _bessel_j1(cutoff * r) / (2 * math.pi * r)
    k = circular_lowpass_kernel(cutoff, size)
    assert k.double().sum().item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(k.double().numpy(), ref / ref.sum(), rtol=1e-5, atol=1e-7)


def test_blur_keeps_shape_and_a_flat_image_even_when_tiny():
    for h, w in [(32, 20), (3, 2)]:  # (3, 2) is too small to reflect 10 pixels: replicate padding
        flat = torch.full((3, h, w), 0.25)
        out = blur(flat, mixed_kernel("aniso", 21, 3.0, 1.0, 0.5))
        assert out.shape == (3, h, w) and torch.allclose(out, flat, atol=1e-6)


# ----------------------------------------------------------------------------- JPEG


def test_dct_matrix_is_orthonormal_and_round_trips():
    d = dct_matrix(8).double()
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-6)
    block = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) * 255 - 128
    d32 = dct_matrix(8)
    assert torch.allclose(d32.T @ (d32 @ block @ d32.T) @ d32, block, atol=1e-5 * 255)
    # Row 0 is the DC basis: the DC coefficient of a block is 8 * its mean, as JPEG's FDCT gives.
    assert (d32 @ block @ d32.T)[0, 0].item() == pytest.approx(8 * block.mean().item(), rel=1e-5)


def test_quant_tables_follow_libjpeg_scaling():
    luma50, chroma50 = jpeg_quant_tables(50)
    assert luma50[0].tolist() == [16, 11, 10, 16, 24, 40, 51, 61] and chroma50[3, 3] == 99
    assert torch.all(jpeg_quant_tables(100)[0] == 1)
    assert jpeg_quant_tables(10)[0][0, 0] == 80  # s = 5000 // 10 = 500: floor((16 * 500 + 50) / 100)
    assert jpeg_quant_tables(1)[1].max() == 255  # clamped for baseline JPEG


def test_jpeg_quality_orders_the_error():
    img = _smooth_image(64, 80)
    high, low = _psnr(jpeg_compress(img, 95), img), _psnr(jpeg_compress(img, 10), img)
    assert high > 35 and low < high - 5
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(img, 0)


@pytest.mark.parametrize("hw", [(96, 128), (61, 77)])
@pytest.mark.parametrize("quality", [10, 50, 95])
def test_jpeg_matches_pil_libjpeg(hw, quality):
    # Measured (PIL 4:2:0, q = 10, 50, 95): PSNR to the source within 0.22 dB of PIL's, and ours vs
    # PIL's decode >= 43.8 dB (libjpeg's integer DCT and uint8 steps are the rest). Bound 42 dB:
    # transposed tables (DiffJPEG's) fall to 34 dB, nearest chroma upsampling to 40.8 dB.
    img = _natural_image(*hw)
    buf = io.BytesIO()
    Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(
        buf, format="JPEG", quality=quality, subsampling=2)
    pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1) / 255.0
    ours = jpeg_compress(torch.tensor(img, dtype=torch.float32), quality).double().numpy()
    assert abs(_psnr(ours, img) - _psnr(pil, img)) < 0.5
    assert _psnr(ours, pil) > 42


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_std_and_gray_noise():
    flat = torch.full((3, 128, 128), 0.5)
    gen = torch.Generator().manual_seed(0)
    noise = gaussian_noise(flat, 20.0, False, gen)
    assert noise.std().item() == pytest.approx(20 / 255, rel=0.02) and abs(noise.mean().item()) < 1e-3
    assert not torch.equal(noise[0], noise[1])
    gray = gaussian_noise(flat, 20.0, True, gen)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert gray.std().item() == pytest.approx(20 / 255, rel=0.03)


def test_poisson_noise_variance_and_gray_noise():
    # 0.5 rounded to 128/255 is the only value, so vals = 1: Var = img / vals * scale².
    flat = torch.full((3, 128, 128), 0.5)
    gen = torch.Generator().manual_seed(0)
    noise = poisson_noise(flat, 0.5, False, gen)
    assert noise.var().item() == pytest.approx(128 / 255 * 0.25, rel=0.05)
    gray = poisson_noise(flat, 0.5, True, gen)
    assert torch.equal(gray[0], gray[2]) and gray.abs().sum() > 0
