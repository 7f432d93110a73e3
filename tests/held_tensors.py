"""What a run left behind: the live tensors of an image's size, for the Cancel and error tests of every host."""

import gc

import torch


def image_sized_tensors(sizes: set[tuple[int, int]]) -> list[torch.Tensor]:
    """Live tensors whose last two dimensions ``(..., H, W)`` or the two before the last ``(..., H, W, C)`` are one
    of ``sizes``, after a garbage collection."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.ndim >= 3
            and ({tuple(o.shape[-2:]), tuple(o.shape[-3:-1])} & sizes)]
