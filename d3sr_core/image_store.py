"""Whole-image planes that never sit in memory as float tensors: the upsampled input, the decoded image and the
colour-fixed result of a large image, kept in a file and read and written by regions.

A float32 RGB copy of an 8000 x 6000 image takes 576 MB, and the in-memory pipeline holds several (the upsampled
input, the encoder's input, the decoded image, the colour fix's temporaries, the result). With the disk store
(``UpscaleOptions.vae_tile_store = "disk"``) each of them is a :class:`PlaneFile` instead: float32, so the pixels
are exactly those of the in-memory pipeline, in a file of the run's temporary folder (removed on any exit, see
``files.temporary_folder``), mapped only for the moment of one read or write, so resident memory holds the region
being worked on and not the image. The kernel's page cache may keep the file's pages, but it is not the process's
memory and it is handed back under pressure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class PlaneFile:
    """A float32 image ``(C, H, W)`` stored row by row (``(H, C, W)`` on disk, so a band of rows is one contiguous
    range) in ``path``; :meth:`read` and :meth:`write` move rectangular regions in and out as tensors."""

    def __init__(self, path: Path, channels: int, height: int, width: int):
        self.path, self.shape = Path(path), (channels, height, width)
        with open(self.path, "wb") as f:
            f.truncate(channels * height * width * 4)  # sparse: the disk is used as rows are written

    def _mapped(self, mode: str) -> np.memmap:
        channels, height, width = self.shape
        return np.memmap(self.path, dtype=np.float32, mode=mode, shape=(height, channels, width))

    def write(self, y0: int, x0: int, region: torch.Tensor, first_channel: int = 0) -> None:
        """Store ``region`` ``(k, h, w)`` at rows ``y0 ...``, columns ``x0 ...`` of channels ``first_channel ...``."""
        rows = region.detach().float().cpu().permute(1, 0, 2).numpy()
        mapped = self._mapped("r+")
        mapped[y0 : y0 + rows.shape[0], first_channel : first_channel + rows.shape[1], x0 : x0 + rows.shape[2]] = rows
        mapped.flush()
        del mapped  # unmapped: its pages leave the process's resident memory

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> torch.Tensor:
        """Rows ``[y0, y1)``, columns ``[x0, x1)`` as a float32 tensor ``(C, y1 - y0, x1 - x0)``."""
        mapped = self._mapped("r")
        region = torch.from_numpy(np.array(mapped[y0:y1, :, x0:x1])).permute(1, 0, 2)
        del mapped
        return region


OUTPUT_DTYPES = (torch.uint8, torch.uint16, torch.float32)
"""What a host may hand :meth:`Upscaler.upscale` as ``out``: 8-bit (an 8-bit PNG, a PIL image), 16-bit (a 16-bit
PNG) or float32 in [0, 1] (ComfyUI's IMAGE)."""


def as_output(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``pixels`` ``(..., C)`` in [0, 1] as ``dtype`` of :data:`OUTPUT_DTYPES`: clamped, and for integers rounded to
    the nearest of ``2**bits - 1`` levels, as ``image_io.to_pil`` and ``image_io.write_png`` round."""
    pixels = pixels.float().clamp(0, 1)
    if dtype == torch.float32:
        return pixels
    if dtype == torch.uint8:
        return torch.round(pixels * 255.0).to(torch.uint8)
    if dtype == torch.uint16:
        return torch.round(pixels * 65535.0).to(torch.int32).to(torch.uint16)
    raise ValueError(f"out has dtype {dtype}; expected one of {OUTPUT_DTYPES}.")
