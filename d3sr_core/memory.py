"""Host memory: how much RAM is free, which VAE tile store keeps a run within it, and handing memory back after a
run, a Cancel or an error. Used by every host (ComfyUI, A1111/Forge, the command line) the same way.

glibc serves large blocks with ``mmap`` and returns them when freed, but after the first large free it raises its
threshold (up to 32 MiB) and serves later blocks of that size from its heap, which it seldom hands back: a tiled
run that allocates and frees tile-sized tensors then keeps growing in resident memory although what it holds
stays bounded by one tile (tiny model, decoder stage at 2048 px from 42-latent tiles: 662 MiB resident against
89 MiB with a fixed threshold; 512 px untiled: 203 against 80 MiB). A fixed threshold costs about 2 % of speed
(full SD 2.1 decoder at 512 px: 25.0 s against 25.5 s); only the ``d3sr`` process sets it
(:func:`fix_mmap_threshold`), never a host whose process is its own, where :func:`release_freed_memory` after each
run does the handing back instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import traceback
from typing import Iterator

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number (glibc's malloc.h); setting it also turns the dynamic threshold off."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial threshold, kept for the life of the process."""
RAM_STORE_SHARE = 0.5
"""The ``ram`` tile store is chosen only while its estimate stays below this share of the free RAM."""


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to tune
        return None


def fix_mmap_threshold() -> bool:
    """Serve every block of 128 KiB or more with ``mmap`` from now on, so freed tensors leave resident memory.
    Returns whether glibc took the setting."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Collect garbage and hand memory that was freed but kept by the allocator back to the system
    (``malloc_trim``), so that what a run, a Cancel or an error left behind leaves resident memory."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def available_ram() -> int | None:
    """Bytes this process may still take: the kernel's ``MemAvailable``, lowered to what the cgroup's memory limit
    leaves; ``None`` where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as current:
            text = limit.read().strip()
            if text != "max":
                found.append(max(0, int(text) - int(current.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


WHOLE_IMAGE_COPIES = 8
"""float32 RGB copies of the processed image the in-memory path holds at its peak (the upsampled input, the
encoder's input, the decoded image, the colour fix's temporaries, the result); a pointwise autoencoder adds its
latents, the blended prediction and x0, each as large as the image."""
POINTWISE_LATENT_COPIES = 3


def ram_store_bytes(vae, height: int, width: int) -> int:
    """What the in-memory path (``ram`` store) holds at most for an ``height x width`` image (padded processing
    size): :data:`WHOLE_IMAGE_COPIES` float32 RGB images, plus, for a tiled VAE, every tile's activations of the
    full-resolution stage, where the VAE's first (encoder) and last (decoder) blocks have ``block_out_channels[0]``
    channels, as float32 input and output of the stage plus the half-resolution stage's share (about half as much
    again; lower resolutions hold more channels on 4x fewer pixels, so this one bounds them), or for a pointwise
    autoencoder (``PatchAutoencoder``, never tiled) :data:`POINTWISE_LATENT_COPIES` image-sized latents."""
    image = 4 * 3 * height * width
    if getattr(vae, "pointwise", False):
        return (WHOLE_IMAGE_COPIES + POINTWISE_LATENT_COPIES) * image
    channels = int(vae.config.block_out_channels[0])
    return WHOLE_IMAGE_COPIES * image + int(3 * 4 * channels * height * width)


def choose_tile_store(vae, height: int, width: int, free_bytes: int | None = None) -> str:
    """``disk`` when the in-memory path (:func:`ram_store_bytes`) would take more than ``RAM_STORE_SHARE`` of the
    free RAM (``free_bytes``, else :func:`available_ram`), else ``ram``. Both give the same pixels (AdaIN up to
    float32 rounding of its statistics); ``disk`` keeps every whole-image tensor and tile activation in a
    temporary folder, so memory is bounded by the tiles and a band of rows, at the cost of writing them there."""
    free = available_ram() if free_bytes is None else free_bytes
    if free is None:
        return "ram"
    return "disk" if ram_store_bytes(vae, height, width) > RAM_STORE_SHARE * free else "ram"


@contextlib.contextmanager
def released_after_run() -> Iterator[None]:
    """Around one upscale in a host's process: if it ends in an exception (Cancel, an error), the finished frames
    the traceback still references drop their tensors (a host that keeps the exception would otherwise keep them),
    and in every case freed memory goes back to the system."""
    try:
        yield
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        release_freed_memory()


def free_memory(device) -> int | None:
    """Bytes free on ``device``: :func:`available_ram` on the CPU, the driver's count on CUDA, ``None`` elsewhere."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return available_ram()
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None
