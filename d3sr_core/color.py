"""Colour fixes: give the super-resolved image the colours of its (upsampled) low-resolution source.

Both follow StableSR's ``wavelet_color_fix.py``, which OSEDiff and TSD-SR reuse. Images are float tensors
``(B, 3, H, W)``; the result is clamped to [0, 1] as the official code does on its way back to PIL.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

COLOR_FIXES = ("wavelet", "adain", "none")
WAVELET_LEVELS = 5
WAVELET_HALO = 2**WAVELET_LEVELS - 1
"""How far (pixels) the wavelet fix reaches: the blurs' radii 1 + 2 + ... + 2^(levels-1). A band of rows computed
with this many rows of real context on each side equals the same rows of the whole image's fix."""
ADAIN_EPS = 1e-5


def channel_mean_std(image: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and ``sqrt(unbiased variance + eps)``, each ``(B, C, 1, 1)`` (variance 0 for a
    single pixel, whose unbiased variance is undefined)."""
    flat = image.reshape(*image.shape[:2], -1)
    std = (flat.var(dim=2, correction=1 if flat.shape[2] > 1 else 0) + eps).sqrt()
    return flat.mean(dim=2)[..., None, None], std[..., None, None]


def streamed_channel_mean_std(bands: Iterable[torch.Tensor], eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`channel_mean_std` of an image that arrives in parts ``(B, C, h, w)`` (row bands, tiles: any split
    that covers every pixel once), summed in float64 so the split does not matter beyond float32 rounding of the
    result. Returns float32 ``(B, C, 1, 1)`` each."""
    count, total, squares = 0, 0.0, 0.0
    for band in bands:
        flat = band.double().reshape(*band.shape[:2], -1)
        count, total, squares = count + flat.shape[2], total + flat.sum(dim=2), squares + flat.square().sum(dim=2)
    mean = total / count
    variance = (squares - count * mean.square()).clamp(min=0) / max(count - 1, 1)
    return mean.float()[..., None, None], (variance + eps).sqrt().float()[..., None, None]


def adain_with_stats(
    content: torch.Tensor, content_stats: tuple[torch.Tensor, torch.Tensor], source_stats: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Adaptive instance normalisation with given per-channel ``(mean, std)`` of the whole content and source:
    ``(content - mu_c) / sigma_c * sigma_s + mu_s``, clamped to [0, 1]; ``content`` may be any part of the image."""
    (content_mean, content_std), (source_mean, source_std) = content_stats, source_stats
    return ((content - content_mean) / content_std * source_std + source_mean).clamp(0, 1)


def adain_color_fix(content: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Adaptive instance normalisation: ``(content - mu_c) / sigma_c * sigma_s + mu_s`` per channel, clamped to [0, 1]."""
    return adain_with_stats(content, channel_mean_std(content), channel_mean_std(source))


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """One "a trous" level: the 3x3 kernel [[1,2,1],[2,4,2],[1,2,1]]/16 with dilation ``radius``, replicate padding."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device)
    kernel = (kernel / 16).expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` with ``image = high + low``; ``low`` is the image blurred at radii 1, 2, ..., 2^(levels-1)."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = wavelet_blur(image, 2**level)
        high = high + (image - low)
        image = low
    return high, image


def wavelet_color_fix(content: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """High frequencies of ``content`` plus low frequencies of ``source``, clamped to [0, 1]."""
    content_high, _ = wavelet_decomposition(content)
    _, source_low = wavelet_decomposition(source)
    return (content_high + source_low).clamp(0, 1)


def apply_color_fix(method: str, content: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Colour-fix ``content`` ``(B, 3, H, W)`` in [0, 1] toward ``source`` of the same shape with ``method``."""
    if method == "wavelet":
        return wavelet_color_fix(content, source)
    if method == "adain":
        return adain_color_fix(content, source)
    if method == "none":
        return content
    raise ValueError(f"color fix {method!r} is not one of {COLOR_FIXES}.")


def color_fix_to_reference(method: str, content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """:func:`apply_color_fix` toward ``reference`` ``(B, 3, h, w)`` of any size, first resized (bicubic) to
    ``content``'s size; a single reference image serves a whole batch."""
    if reference.shape[0] not in (1, content.shape[0]):
        raise ValueError(
            f"the reference batch has {reference.shape[0]} images; expected 1 or as many as the image batch ({content.shape[0]})."
        )
    if reference.shape[-2:] != content.shape[-2:]:
        reference = F.interpolate(reference.float(), size=content.shape[-2:], mode="bicubic", align_corners=False)
    return apply_color_fix(method, content, reference.clamp(0, 1).expand_as(content))
