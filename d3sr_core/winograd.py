"""Winograd convolutions on the CPU, through the NNPACK library that PyTorch's x86-64 and ARM builds bundle.

Winograd's minimal filtering algorithm F(6x6, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016, sec. 4) computes a 6x6 block of a 3x3 convolution from an 8x8 input tile with 64 instead of
324 multiplications per channel pair; the input, filter and output transforms add memory traffic, so it pays off on
large feature maps only. On 2 AVX2 cores NNPACK runs 3x3 convolutions of 64 px and more 2-3x faster than oneDNN's
direct method, is about even at 32 px and slower at 16 px (benchmarks/README.md). The results differ by rounding
only: about 1e-5 of the output's magnitude per convolution.

PyTorch never picks NNPACK for a batch below 16, so :class:`WinogradConvolutions` routes the eligible calls of
``torch.nn.functional.conv2d`` to ``torch._nnpack_spatial_convolution`` itself while it is active.

NNPACK transforms the whole input and output of a call into 8x8 tiles in one workspace, which PyTorch keeps for the
life of the process (0.46 GiB for 128 channels at 512 x 512, 6.6 GiB for a default VAE decoder tile of 1,968
pixels). Maps are therefore cut into strips of rows whose transforms fit in :data:`WORKSPACE_BYTES`, and
convolutions whose transformed filters alone would not fit keep PyTorch's kernels.

Two things keep Winograd from ever breaking an upscale:

* An NNPACK call that fails (an unsupported CPU feature, a workspace it cannot allocate) is answered by PyTorch's
  own kernel instead, and every later call of the process goes there too, with one warning in the log.
* PyTorch sizes NNPACK's thread pool once, at its first NNPACK convolution, from ``torch.get_num_threads()`` at that
  moment (``aten/src/ATen/native/NNPACK.cpp``, ``nnpack_threadpool``), and never resizes it. A host that later
  changes its thread count (``torch.set_num_threads``) would get NNPACK running on the old count; so whenever the
  count at call time differs from the pool's, the call runs PyTorch's kernel, which follows the host's count.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_SIDE = 64
"""Smallest height and width of an input feature map for which Winograd clearly beats oneDNN on 2 AVX2 cores
(2.4x at 64 px, 1.0-1.3x at 32 px, slower at 16 px)."""
MIN_IN_CHANNELS = 32
"""Fewest input channels for which it does: the transforms cost as much as a thin convolution (RGB in) saves."""
WORKSPACE_BYTES = 64 * 2**20
"""Most memory one NNPACK call may take for its transformed input and output tiles, and separately for its
transformed filters (8 x 8 floats per filter: 64 MiB for 512 -> 512 channels)."""
TILE_FLOATS = 8 * 8
"""Floats of one transformed tile of one channel: F(6x6, 3x3) reads 8x8 input pixels per 6x6 output pixels."""


_log = logging.getLogger(__name__)

_nnpack_failed = False
"""Set for the rest of the process by the first NNPACK call that raises."""
_pool_threads: int | None = None
"""``torch.get_num_threads()`` at this process's first NNPACK call: the size of NNPACK's thread pool."""


def nnpack_usable() -> bool:
    """Whether NNPACK may run now: no NNPACK call has failed in this process, and its thread pool (sized at the first
    call) has as many threads as the host currently allows (``torch.get_num_threads()``)."""
    return not _nnpack_failed and (_pool_threads is None or _pool_threads == torch.get_num_threads())


def nnpack_available() -> bool:
    """Whether this torch build has NNPACK on this CPU. Also initialises NNPACK, which its convolution needs first."""
    return torch._nnpack_available()


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def winograd_eligible(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether ``conv2d(x, weight, ...)`` with ``x`` ``(B, C, H, W)`` is a float32 CPU 3x3 convolution that
    NNPACK's Winograd path computes and that is large enough to gain from it."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.ndim == 4
        and weight.shape[-2:] == (3, 3)
        and groups == 1
        and _pair(stride) == (1, 1)
        and _pair(dilation) == (1, 1)
        and not isinstance(padding, str)
        and all(0 <= p < 3 for p in _pair(padding))  # NNPACK pads by less than the kernel only
        and min(x.shape[-2:]) >= MIN_SIDE
        and x.shape[1] >= MIN_IN_CHANNELS
        and weight.shape[0] * weight.shape[1] * TILE_FLOATS * 4 <= WORKSPACE_BYTES
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


class WinogradConvolutions(TorchFunctionMode):
    """Inside ``with WinogradConvolutions():``, every eligible :func:`torch.nn.functional.conv2d` (see
    :func:`winograd_eligible`) runs NNPACK's Winograd algorithm; all other calls run as usual.

    For inference: convolutions that would need a gradient keep PyTorch's own kernels. Raises ``RuntimeError`` on
    entry when this torch build has no NNPACK.
    """

    def __enter__(self):
        if not nnpack_available():
            raise RuntimeError("Winograd convolutions need NNPACK, which this torch build or CPU does not provide.")
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _conv2d_arguments(*args, **kwargs)
            if nnpack_usable() and winograd_eligible(x, weight, stride, padding, dilation, groups):
                try:
                    return winograd_conv2d(x, weight, bias, _pair(padding))
                except RuntimeError as error:
                    _give_up_on_nnpack(error)
        return func(*args, **kwargs)


def _give_up_on_nnpack(error: RuntimeError) -> None:
    global _nnpack_failed
    _nnpack_failed = True
    _log.warning("NNPACK's Winograd convolution failed (%s); PyTorch's own kernels run instead for the rest of this process.",
                 str(error).splitlines()[0] if str(error) else type(error).__name__)


def strip_rows(in_channels: int, out_channels: int, out_width: int) -> int:
    """Output rows per NNPACK call: whole 6-row Winograd tiles, as many as keep the transformed input and output
    tiles (``TILE_FLOATS`` floats per tile and channel) within :data:`WORKSPACE_BYTES`; at least one tile row."""
    bytes_per_tile_row = (in_channels + out_channels) * math.ceil(out_width / 6) * TILE_FLOATS * 4
    return 6 * max(1, WORKSPACE_BYTES // bytes_per_tile_row)


def winograd_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]
) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=padding)`` for ``x`` ``(B, C, H, W)`` float32 and a 3x3 ``weight``
    ``(C_out, C, 3, 3)``, by NNPACK in strips of :func:`strip_rows` output rows; returns ``(B, C_out, H', W')``.

    Output row r reads padded input rows r..r+2, that is input rows r - pad .. r + 2 - pad, so each strip takes
    its rows plus a 2-row halo and is zero-padded only where it meets the top or bottom of the map.
    """
    global _pool_threads
    if _pool_threads is None:
        _pool_threads = torch.get_num_threads()  # PyTorch creates NNPACK's pool now, with this many threads
    pad_h, pad_w = padding
    height, width = x.shape[-2:]
    out_height, out_width = height + 2 * pad_h - 2, width + 2 * pad_w - 2
    rows = strip_rows(x.shape[1], weight.shape[0], out_width)
    weight = weight.contiguous()
    if out_height <= rows:
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, [pad_h, pad_w])
    out = x.new_empty(x.shape[0], weight.shape[0], out_height, out_width)
    for top in range(0, out_height, rows):
        bottom = min(out_height, top + rows)
        first, last = top - pad_h, bottom + 2 - pad_h
        strip = F.pad(x[..., max(0, first) : min(height, last), :], (0, 0, max(0, -first), max(0, last - height)))
        out[..., top:bottom, :] = torch._nnpack_spatial_convolution(strip.contiguous(), weight, bias, [0, pad_w])
    return out


def _conv2d_arguments(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The arguments of a ``conv2d`` call in its signature's order, however they were passed."""
    return input, weight, bias, stride, padding, dilation, groups
