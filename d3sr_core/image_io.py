"""Image files to float tensors and back, for the hosts that read files (the command line, the A1111 API).

Tensors are ``(C, H, W)`` float32 in [0, 1] with C = 1 (gray), 3 (RGB) or 4 (RGBA; gray+alpha becomes RGBA).
16-bit PNGs are read and written at full precision (PIL cannot hold 16-bit RGB, so pypng does it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import png
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import atomic_output
from .image_store import as_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageFileError(ValueError):
    """An image file cannot be used. The message is one sentence."""


@dataclass(frozen=True)
class LoadedImage:
    pixels: torch.Tensor
    """``(C, H, W)`` float32 in [0, 1]."""
    bit_depth: int
    """8 or 16: the precision to write the result with."""


def _png_header(path: Path) -> tuple[int, int, int] | None:
    """``(width, height, bit depth)`` from a PNG's IHDR chunk, or ``None`` for another kind of file."""
    with open(path, "rb") as f:
        head = f.read(25)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 25:
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24]


def _read_png16(path: Path) -> LoadedImage:
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    if width * height > Image.MAX_IMAGE_PIXELS * 2:
        raise ImageFileError(f"{path} has {width}x{height} pixels, more than this reader accepts ({Image.MAX_IMAGE_PIXELS * 2}).")
    planes = info["planes"]
    data = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    # asDirect rescales to the significant bits an sBIT chunk declares; info["bitdepth"] says how many remain.
    pixels = torch.from_numpy(data.astype(np.float32) / (2 ** info["bitdepth"] - 1)).permute(2, 0, 1)
    if planes == 2:
        pixels = torch.cat([pixels[:1].expand(3, -1, -1), pixels[1:]])
    return LoadedImage(pixels.contiguous(), 16)


def _checked_header(path: Path) -> tuple[int, int, int] | None:
    """The PNG header of ``path`` (``None`` for other formats), after refusing a missing, empty or pixel-less file."""
    if not path.is_file():
        raise ImageFileError(f"{path} does not exist or is not a file; expected an image.")
    if path.stat().st_size == 0:
        raise ImageFileError(f"{path} is empty (0 bytes); expected an image.")
    header = _png_header(path)
    if header is not None and (header[0] == 0 or header[1] == 0):
        raise ImageFileError(f"{path} has no pixels ({header[0]}x{header[1]}).")
    return header


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file; EXIF orientation is applied. Raises :class:`ImageFileError` with one sentence."""
    path = Path(path)
    header = _checked_header(path)
    try:
        if header is not None and header[2] == 16:
            loaded = _read_png16(path)
        else:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                loaded = from_pil(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, png.Error, Image.DecompressionBombError) as err:
        if isinstance(err, ImageFileError):
            if str(path) in str(err):
                raise
            raise ImageFileError(f"{path}: {err}") from None
        raise ImageFileError(f"{path} is not a readable image ({type(err).__name__}: {err}).") from None
    if loaded.pixels.shape[1] == 0 or loaded.pixels.shape[2] == 0:
        raise ImageFileError(f"{path} has no pixels ({loaded.pixels.shape[2]}x{loaded.pixels.shape[1]}).")
    return loaded


def from_pil(im: Image.Image) -> LoadedImage:
    """PIL image of any common mode to a :class:`LoadedImage`."""
    if im.width == 0 or im.height == 0:
        raise ImageFileError(f"the image has no pixels ({im.width}x{im.height}).")
    if im.mode.startswith("I;16"):
        data = np.asarray(im, dtype=np.float32) / 65535.0
        return LoadedImage(torch.from_numpy(data)[None].clamp(0, 1), 16)
    if im.mode in ("I", "F"):
        raise ImageFileError(f"the image has 32-bit {im.mode!r} pixels; expected 8- or 16-bit gray, RGB or RGBA.")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "LA" or im.mode == "PA":
        im = im.convert("RGBA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")
    data = np.asarray(im, dtype=np.float32) / 255.0
    pixels = torch.from_numpy(data)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return LoadedImage(pixels.contiguous(), 8)


def _check_pixels(pixels: torch.Tensor) -> None:
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3, 4):
        raise ValueError(f"pixels must be (C, H, W) with C in 1, 3, 4; got {tuple(pixels.shape)}.")


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """``pixels`` ``(C, H, W)`` in [0, 1], C in {1, 3, 4}, as an 8-bit L, RGB or RGBA PIL image."""
    _check_pixels(pixels)
    return pil_from_levels(as_output(pixels.detach().permute(1, 2, 0), torch.uint8))


def pil_from_levels(levels: torch.Tensor) -> Image.Image:
    """An 8-bit image ``(H, W, C)`` (``torch.uint8``, C in {1, 3, 4}, as ``Upscaler.upscale`` fills ``out``) as an
    L, RGB or RGBA PIL image, without a float copy."""
    data = levels.cpu().numpy()
    return Image.fromarray(data[..., 0] if data.shape[2] == 1 else data)


def output_levels(height: int, width: int, channels: int, bit_depth: int = 8) -> torch.Tensor:
    """An empty result buffer ``(1, H, W, C)`` of 8- or 16-bit levels for ``Upscaler.upscale(..., out=)``: a
    third (8-bit) or half (16-bit) of a float32 image, and what :func:`write_png_levels` writes as it is."""
    return torch.empty(1, height, width, channels, dtype=torch.uint16 if bit_depth == 16 else torch.uint8)


def write_png(path: str | os.PathLike, pixels: torch.Tensor, bit_depth: int = 8) -> Path:
    """Write ``pixels`` ``(C, H, W)`` in [0, 1] as an 8- or 16-bit PNG, through a temporary name."""
    _check_pixels(pixels)
    levels = as_output(pixels.detach().permute(1, 2, 0), torch.uint16 if bit_depth == 16 else torch.uint8)
    return write_png_levels(path, levels)


def write_png_levels(path: str | os.PathLike, levels: torch.Tensor) -> Path:
    """Write ``levels`` ``(H, W, C)``, ``torch.uint8`` or ``torch.uint16`` (8- or 16-bit PNG), C in {1, 3, 4},
    through a temporary name."""
    path = Path(path)
    if levels.ndim != 3 or levels.shape[2] not in (1, 3, 4) or levels.dtype not in (torch.uint8, torch.uint16):
        raise ValueError(f"levels must be (H, W, C) uint8 or uint16 with C in 1, 3, 4; got {tuple(levels.shape)} {levels.dtype}.")
    with atomic_output(path) as tmp:
        if levels.dtype == torch.uint16:
            height, width, planes = levels.shape
            data = levels.cpu().numpy().reshape(height, width * planes)
            writer = png.Writer(width, height, greyscale=planes == 1, alpha=planes == 4, bitdepth=16)
            with open(tmp, "wb") as f:
                writer.write(f, data)
        else:
            pil_from_levels(levels).save(tmp, format="PNG")
    return path


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus the image files (by extension, sorted) inside given folders."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found


def check_image(path: str | os.PathLike) -> None:
    """Make sure :func:`read_image` will read ``path``, without keeping its pixels: the header is read, a PNG's
    chunks are checked against their CRCs, other formats are decoded (JPEG at 1/8 size, which still reads every
    byte). Raises :class:`ImageFileError` with one sentence naming the file."""
    path = Path(path)
    header = _checked_header(path)
    try:
        with Image.open(path) as im:
            if im.width == 0 or im.height == 0:
                raise ImageFileError(f"{path} has no pixels ({im.width}x{im.height}).")
            if im.mode in ("I", "F") and header is None:
                raise ImageFileError(f"{path} has 32-bit {im.mode!r} pixels; expected 8- or 16-bit gray, RGB or RGBA.")
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except ImageFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ImageFileError(f"{path} is not a readable image ({type(err).__name__}: {err}).") from None


def verified_images(paths: list[Path], *, skip_bad: bool = False, hint: str = "") -> list[Path]:
    """``paths`` after :func:`check_image` on each: the first bad one raises :class:`ImageFileError` (its sentence,
    then ``hint``), or with ``skip_bad`` every bad one is left out with one log line."""
    good = []
    for path in paths:
        try:
            check_image(path)
        except ImageFileError as err:
            if not skip_bad:
                raise ImageFileError(f"{str(err).rstrip('.')}{'; ' + hint if hint else ''}.") from None
            logging.getLogger("d3sr").warning("d3sr: left out: %s", err)
            continue
        good.append(path)
    return good
