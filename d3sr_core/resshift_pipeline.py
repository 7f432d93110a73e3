"""ResShift's own pre-processing around :class:`residual_shift.ResShiftGenerator`: reflect padding of the low-quality
image to a multiple of ``lq_size`` (64) and chopping into overlapping patches (official ``sampler.py`` and
``utils/util_image.py: ImageSpliterTh``). The chopping is the official alternative to our latent tiling: each patch
is sampled on its own and the results are averaged where patches overlap, so patch seams can show, as officially.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .options import UpscaleOptions
from .residual_shift import ResShiftGenerator

OFFICIAL_CHOP_STRIDES = {512: 448, 256: 224, 64: 48}
"""``inference_resshift.py``'s stride for each ``--chop_size`` it offers (x4)."""


def chop_stride(size: int) -> int:
    """The official stride for ``size``, or 7/8 of it for sizes the official script does not offer."""
    return OFFICIAL_CHOP_STRIDES.get(size, size * 7 // 8)


def chop_starts(length: int, size: int, stride: int) -> list[int]:
    """Patch starts along one side (``ImageSpliterTh.extract_starts``): ``0, stride, 2 stride, ...`` with any patch
    that would run past the end moved back to end there, repeats dropped; one patch when the side fits."""
    if length <= size:
        return [0]
    starts = [min(start, length - size) for start in range(0, length, stride)]
    return list(dict.fromkeys(starts))


def count_chops(height: int, width: int, size: int) -> int:
    """How many patches an ``height x width`` input runs in (1 when chopping is off or the input fits)."""
    if not size or (height <= size and width <= size):
        return 1
    stride = chop_stride(size)
    return len(chop_starts(height, size, stride)) * len(chop_starts(width, size, stride))


def reflect_pad(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """``image`` ``(B, C, h, w)`` padded at the bottom and right to multiples of ``multiple`` by reflection
    (``F.pad(mode='reflect')``, as officially). A side shorter than its padding, which ``F.pad`` refuses, is
    reflected again and again, as a mirror-tiled plane."""
    while True:
        pad_h, pad_w = -image.shape[-2] % multiple, -image.shape[-1] % multiple
        if not pad_h and not pad_w:
            return image
        step_h, step_w = min(pad_h, image.shape[-2] - 1), min(pad_w, image.shape[-1] - 1)
        if step_h <= 0 and pad_h or step_w <= 0 and pad_w:  # a side of one pixel has nothing to mirror
            return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        image = F.pad(image, (0, step_w, 0, step_h), mode="reflect")


def residual_shift_steps(generator: ResShiftGenerator, height: int, width: int, options: UpscaleOptions) -> int:
    """Progress steps (network calls) for one ``height x width`` input."""
    steps = options.steps or generator.trained_steps
    return count_chops(height, width, options.chop_size) * steps


def super_resolve(
    generator: ResShiftGenerator,
    lq: torch.Tensor,
    options: UpscaleOptions,
    device: torch.device,
    tick: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``(B, 3, sf h, sf w)`` in [0, 1] from ``lq`` ``(B, 3, h, w)`` in [0, 1], image by image: each image's noise
    comes from a generator seeded with ``options.seed`` (unseeded when ``None``), its patches in row-major order
    drawing from it in turn, as the official sampler's one seeding at start does for its first image."""
    sf, offset = generator.sf, generator.padding_offset
    results = []
    for index in range(lq.shape[0]):
        image = lq[index : index + 1].to(device).float() * 2 - 1
        seeded = torch.Generator(device).manual_seed(options.seed) if options.seed is not None else None
        height, width = image.shape[-2:]
        size = options.chop_size
        if count_chops(height, width, size) == 1:
            result = _one_patch(generator, image, offset, sf, options.steps, seeded, tick)
        else:
            stride = chop_stride(size)
            total = torch.zeros(1, 3, height * sf, width * sf, device=device)
            count = torch.zeros(1, 1, height * sf, width * sf, device=device)
            for top in chop_starts(height, size, stride):
                for left in chop_starts(width, size, stride):
                    patch = image[..., top : top + size, left : left + size]
                    out = _one_patch(generator, patch, offset, sf, options.steps, seeded, tick)
                    total[..., top * sf : top * sf + out.shape[-2], left * sf : left * sf + out.shape[-1]] += out
                    count[..., top * sf : top * sf + out.shape[-2], left * sf : left * sf + out.shape[-1]] += 1
            result = total / count
        if not torch.isfinite(result).all():
            raise ValueError("the model produced NaN or infinite values; try dtype fp32 or bf16.")
        results.append((result + 1) / 2)
    return torch.cat(results).float()


def _one_patch(generator, patch, offset, sf, steps, seeded, tick) -> torch.Tensor:
    """One patch in [-1, 1]: padded, sampled, decoded, cropped back to ``sf`` x its size, clamped (official
    ``sample_func``)."""
    height, width = patch.shape[-2:]
    padded = reflect_pad(patch, offset)
    with torch.no_grad():
        out = generator.decode(generator.sample_latents(padded, steps, seeded, tick))
    return out[..., : height * sf, : width * sf].clamp(-1, 1)


def residual_shift_result(
    generator: ResShiftGenerator,
    rgb: torch.Tensor,
    process_size: tuple[int, int],
    options: UpscaleOptions,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> torch.Tensor:
    """What ``Upscaler`` runs for a ResShift model: :func:`super_resolve` of ``rgb`` ``(B, 3, h, w)`` in [0, 1],
    resized to ``process_size`` when that is not ``sf`` x the input (a ``scale`` other than the model's), with
    ``progress(done, total)`` after every network call."""
    total, done = rgb.shape[0] * residual_shift_steps(generator, *rgb.shape[-2:], options), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    result = super_resolve(generator, rgb, options, device, tick)
    if tuple(result.shape[-2:]) != tuple(process_size):
        result = F.interpolate(result, size=process_size, mode="bicubic", align_corners=False, antialias=True)
    return result.clamp(0, 1)
