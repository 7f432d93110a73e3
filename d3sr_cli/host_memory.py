"""glibc allocator settings for the ``d3sr`` process (never for a host such as ComfyUI, whose process is its own).

glibc serves large blocks with ``mmap`` and returns them when freed, but after the first large free it raises its
threshold (up to 32 MiB) and serves later blocks of that size from its heap, which it seldom hands back: a tiled
run that allocates and frees tile-sized tensors then keeps growing in resident memory although what it holds
stays bounded by one tile (tiny model, decoder stage at 2048 px from 42-latent tiles: 662 MiB resident against
89 MiB with a fixed threshold; 512 px untiled: 203 against 80 MiB). A fixed threshold costs about 2 % of speed
(full SD 2.1 decoder at 512 px: 25.0 s against 25.5 s).
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number (glibc's malloc.h); setting it also turns the dynamic threshold off."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial threshold, kept for the life of the process."""


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
    """Hand memory that was freed but kept by the allocator back to the system (``malloc_trim``), so that a run's
    resident-set growth is not hidden by what an earlier, larger run left behind."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
