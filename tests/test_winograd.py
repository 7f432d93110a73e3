"""NNPACK's Winograd convolutions against PyTorch's own, and which calls they take over."""

import pytest
import torch
import torch.nn.functional as F

from d3sr_core import winograd
from d3sr_core.winograd import MIN_IN_CHANNELS, MIN_SIDE, WinogradConvolutions, nnpack_available, strip_rows

pytestmark = pytest.mark.skipif(not nnpack_available(), reason="this torch build has no NNPACK")


@pytest.fixture
def nnpack_calls(monkeypatch):
    """The argument shapes of every NNPACK convolution run while the test runs."""
    calls = []
    real = torch._nnpack_spatial_convolution

    def counting(x, weight, *args, **kwargs):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counting)
    return calls


@pytest.mark.parametrize("padding, with_bias", [(1, True), (1, False), (0, True), ((1, 2), True)])
def test_eligible_convolutions_run_winograd_and_equal_the_direct_ones(nnpack_calls, padding, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, MIN_IN_CHANNELS, MIN_SIDE, MIN_SIDE + 8, generator=gen)
    weight = torch.randn(48, MIN_IN_CHANNELS, 3, 3, generator=gen) / 17
    bias = torch.randn(48, generator=gen) if with_bias else None
    expected = F.conv2d(x, weight, bias, padding=padding)
    with torch.no_grad(), WinogradConvolutions():
        result = F.conv2d(x, weight, bias, padding=padding)
    assert nnpack_calls == [(tuple(x.shape), tuple(weight.shape))]
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_convolution_modules_and_channels_last_inputs_are_routed(nnpack_calls):
    conv = torch.nn.Conv2d(MIN_IN_CHANNELS, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, MIN_IN_CHANNELS, MIN_SIDE, MIN_SIDE).contiguous(memory_format=torch.channels_last)
    with WinogradConvolutions():
        result = conv(x)
    assert len(nnpack_calls) == 1
    torch.testing.assert_close(result, conv(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("padding", [0, 1, 2, (1, 0)])
def test_maps_larger_than_the_workspace_are_computed_in_strips(nnpack_calls, monkeypatch, padding):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, MIN_IN_CHANNELS, MIN_SIDE + 7, MIN_SIDE, generator=gen)
    weight = torch.randn(24, MIN_IN_CHANNELS, 3, 3, generator=gen) / 17
    bias = torch.randn(24, generator=gen)
    out_width = MIN_SIDE + 2 * (padding if isinstance(padding, int) else padding[1]) - 2
    monkeypatch.setattr(winograd, "WORKSPACE_BYTES", (MIN_IN_CHANNELS + 24) * (out_width // 6 + 1) * 64 * 4 * 2)
    assert strip_rows(MIN_IN_CHANNELS, 24, out_width) == 12
    expected = F.conv2d(x, weight, bias, padding=padding)
    with torch.no_grad(), WinogradConvolutions():
        result = F.conv2d(x, weight, bias, padding=padding)
    assert len(nnpack_calls) == -(-expected.shape[-2] // 12) > 1
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(
    "case",
    [
        "small map", "filters beyond the workspace", "few channels", "stride 2", "1x1 kernel", "dilated", "groups",
        "padding 'same'", "float64", "needs grad",
    ],
)
def test_other_convolutions_keep_pytorch_kernels_bit_for_bit(nnpack_calls, monkeypatch, case):
    channels, side, kernel = MIN_IN_CHANNELS, MIN_SIDE, 3
    kwargs, dtype = {"padding": 1}, torch.float32
    if case == "small map":
        side = MIN_SIDE - 1
    elif case == "few channels":
        channels = MIN_IN_CHANNELS - 1
    elif case == "filters beyond the workspace":
        monkeypatch.setattr(winograd, "WORKSPACE_BYTES", 8 * channels * 64 * 4 - 1)
    elif case == "stride 2":
        kwargs["stride"] = 2
    elif case == "1x1 kernel":
        kernel, kwargs = 1, {}
    elif case == "dilated":
        kwargs["dilation"] = 2
    elif case == "groups":
        kwargs["groups"] = 2
    elif case == "padding 'same'":
        kwargs["padding"] = "same"
    elif case == "float64":
        dtype = torch.float64
    x = torch.randn(1, channels, side, side, dtype=dtype, requires_grad=case == "needs grad")
    in_per_group = channels // kwargs.get("groups", 1)
    weight = torch.randn(8, in_per_group, kernel, kernel, dtype=dtype)
    expected = F.conv2d(x, weight, **kwargs)
    with WinogradConvolutions():
        result = F.conv2d(x, weight, **kwargs)
    assert nnpack_calls == []
    assert torch.equal(result, expected)


@pytest.fixture
def fresh_nnpack_state(monkeypatch):
    """The module's process-wide NNPACK state, restored after the test (a failure must not leak into others)."""
    monkeypatch.setattr(winograd, "_nnpack_failed", False)
    monkeypatch.setattr(winograd, "_pool_threads", winograd._pool_threads)


def _eligible_conv():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, MIN_IN_CHANNELS, MIN_SIDE, MIN_SIDE, generator=gen)
    weight = torch.randn(16, MIN_IN_CHANNELS, 3, 3, generator=gen) / 17
    return x, weight


def test_a_failing_nnpack_call_falls_back_to_the_default_kernel_for_the_rest_of_the_process(
    fresh_nnpack_state, monkeypatch, caplog
):
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed\nmore detail")

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", broken)
    x, weight = _eligible_conv()
    expected = F.conv2d(x, weight, padding=1)
    with caplog.at_level("WARNING", logger="d3sr_core.winograd"), torch.no_grad(), WinogradConvolutions():
        first = F.conv2d(x, weight, padding=1)
        second = F.conv2d(x, weight, padding=1)
    assert torch.equal(first, expected) and torch.equal(second, expected)  # the default kernel, bit for bit
    assert attempts == [1]  # NNPACK is not tried again
    warnings = [r for r in caplog.records if r.name == "d3sr_core.winograd"]
    assert len(warnings) == 1 and "PyTorch's own kernels run instead" in warnings[0].getMessage()
    assert "more detail" not in warnings[0].getMessage()  # one line


def test_nnpack_runs_only_while_the_host_thread_count_equals_its_pool(fresh_nnpack_state, nnpack_calls):
    x, weight = _eligible_conv()
    threads = torch.get_num_threads()
    expected = F.conv2d(x, weight, padding=1)
    with torch.no_grad(), WinogradConvolutions():
        F.conv2d(x, weight, padding=1)
        assert winograd._pool_threads == threads and len(nnpack_calls) == 1
        # A pool sized for another count (the host changed torch.set_num_threads since): PyTorch's kernel runs.
        winograd._pool_threads = threads + 1
        assert torch.equal(F.conv2d(x, weight, padding=1), expected)
        assert len(nnpack_calls) == 1
        winograd._pool_threads = threads
        F.conv2d(x, weight, padding=1)
    assert len(nnpack_calls) == 2
