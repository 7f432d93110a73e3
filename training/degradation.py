"""Real-ESRGAN second-order degradation, on the fly, in torch (Wang et al. 2021, "Real-ESRGAN", §3).

One HR image becomes one LQ image by two rounds of blur -> resize -> noise -> JPEG, then a final
resize back with a sinc filter, as ``feed_data`` in Real-ESRGAN's ``realesrgan_model.py`` does and
as OSEDiff's ``dataloaders/realesrgan.py`` repeats with ``params_realesrgan.yml`` (our defaults).
The kernel formulas follow BasicSR's ``data/degradations.py``; the JPEG step is a block DCT codec
in the manner of DiffJPEG (BasicSR ``utils/diffjpeg.py``) with libjpeg's integer quantisation tables.
All randomness comes from one CPU ``torch.Generator``: the same seed gives bit-identical output.

Where we differ from Real-ESRGAN (a distribution match, not a bit match, is the goal):
- JPEG: integer quality and libjpeg's integer tables in the standard orientation, edge-replicate
  padding, bilinear chroma upsampling (as libjpeg decodes); DiffJPEG takes a float quality, scales
  the transposed tables without rounding, zero-pads and repeats chroma pixels.
- Kernels are applied at their own size; Real-ESRGAN zero-pads them to 21, which gives the same
  result. The unapplied final sinc (a pulse) is skipped.
- Resizes are given an output size, never a scale factor; sizes are clamped to at least 1 pixel,
  and blurs fall back to replicate padding on images too small to reflect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
_ISOTROPIC = ("iso", "generalized_iso", "plateau_iso")


@dataclass(frozen=True)
class DegradationConfig:
    """Parameters of the degradation; the defaults are OSEDiff's ``params_realesrgan.yml``.

    Fields ending in ``2`` are the same knobs for the second round.

    - ``scale``: HR/LQ size ratio; the output is ``(H // scale, W // scale)``.
    - ``kernel_list`` / ``kernel_prob``: blur kernel kinds (see :func:`mixed_kernel`) and their probabilities.
    - ``blur_kernel_size``: largest kernel size; each kernel's size is drawn from the odd sizes 7..this.
    - ``sinc_prob``: probability that the blur kernel is a circular low-pass (sinc) kernel instead.
    - ``blur_sigma``: range of sigma_x (and sigma_y for aniso kinds), in pixels.
    - ``betag_range`` / ``betap_range``: shape-parameter ranges of the generalized / plateau kernels.
    - ``resize_prob``: probabilities of (up, down, keep); ``resize_range``: (lowest, highest) factor.
    - ``gaussian_noise_prob``: Gaussian noise with this probability, otherwise Poisson noise.
    - ``noise_range``: Gaussian sigma range in 0..255 units; ``poisson_scale_range``: Poisson scale range.
    - ``gray_noise_prob``: probability that the noise is the same on all three channels.
    - ``jpeg_range``: JPEG quality range, integers, both ends included.
    - ``second_blur_prob``: probability that the second round blurs at all.
    - ``final_sinc_prob``: probability of the final sinc filter (otherwise the identity).
    """

    scale: int = 4
    kernel_list: tuple = KERNEL_KINDS
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    blur_kernel_size: int = 21
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)
    resize_prob: tuple = (0.2, 0.7, 0.1)
    resize_range: tuple = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 30.0)
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30, 95)
    second_blur_prob: float = 0.8
    kernel_list2: tuple = KERNEL_KINDS
    kernel_prob2: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30, 95)
    final_sinc_prob: float = 0.8

    def __post_init__(self):
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}.")
        if self.blur_kernel_size < 7 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be an odd int >= 7, got {self.blur_kernel_size!r}.")
        for kinds, probs in ((self.kernel_list, self.kernel_prob), (self.kernel_list2, self.kernel_prob2)):
            unknown = [k for k in kinds if k not in KERNEL_KINDS]
            if unknown or len(kinds) != len(probs):
                raise ValueError(f"kernel lists must hold kinds from {KERNEL_KINDS} with one probability "
                                 f"each, got {kinds!r} with {probs!r}.")
        if len(self.resize_prob) != 3 or len(self.resize_prob2) != 3:
            raise ValueError("resize_prob and resize_prob2 must each hold 3 probabilities (up, down, keep).")

    @classmethod
    def from_dict(cls, d: dict) -> "DegradationConfig":
        """Build from a plain dict (e.g. parsed YAML/JSON); lists become tuples, unknown keys are refused."""
        allowed = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in allowed]
        if unknown:
            raise ValueError(f"DegradationConfig has no key {unknown[0]!r}; allowed keys are {', '.join(allowed)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------- kernels


def _offsets(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets from the kernel centre, float64: x along columns, y along rows, each (size, size)."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd int, got {size!r}.")
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def mixed_kernel(kind: str, size: int, sigma_x: float, sigma_y: float | None = None,
                 rotation: float = 0.0, beta: float = 1.0) -> torch.Tensor:
    """One blur kernel of Real-ESRGAN's six kinds, (size, size) float32 summing to 1.

    With offsets p = (x, y) from the centre, Σ = R diag(σx², σy²) Rᵀ (R the rotation by ``rotation``)
    and Q = pᵀ Σ⁻¹ p:  gaussian ("iso", "aniso") exp(-Q/2);  generalized exp(-Q^β / 2);
    plateau 1 / (1 + Q^β).  Iso kinds (and ``sigma_y=None``) use σy = σx and rotation 0.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}.")
    if kind in _ISOTROPIC or sigma_y is None:
        sigma_y, rotation = sigma_x, 0.0
    c, s = math.cos(rotation), math.sin(rotation)
    px, py = 1.0 / sigma_x**2, 1.0 / sigma_y**2
    # Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ, written out entry by entry.
    a, b, d = c * c * px + s * s * py, c * s * (px - py), s * s * px + c * c * py
    x, y = _offsets(size)
    q = a * x * x + 2 * b * x * y + d * y * y
    if kind.startswith("generalized"):
        k = torch.exp(-0.5 * q.pow(beta))
    elif kind.startswith("plateau"):
        k = 1.0 / (1.0 + q.pow(beta))
    else:
        k = torch.exp(-0.5 * q)
    return (k / k.sum()).float()


def circular_lowpass_kernel(cutoff: float, size: int) -> torch.Tensor:
    """2-D circular low-pass ("sinc") kernel, (size, size) float32 summing to 1.

    k(r) = ω J1(ω r) / (2π r) with r the distance from the centre and ω = ``cutoff`` in radians
    (π is Nyquist); the centre takes the limit ω² / (4π).
    """
    x, y = _offsets(size)
    r = torch.sqrt(x * x + y * y)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))  # keeps 0/0 out of the centre
    k = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r > 0, k, torch.full_like(k, cutoff**2 / (4 * math.pi)))
    return (k / k.sum()).float()


def blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each channel of a (C, H, W) image with a (k, k) kernel (odd k); same shape out.

    Reflect padding of k // 2 as BasicSR's ``filter2D``; when the image is too small to reflect
    that far (pad >= H or W), replicate padding is used instead.
    """
    pad = kernel.shape[-1] // 2
    mode = "reflect" if pad < min(image.shape[-2:]) else "replicate"
    x = F.pad(image[None], (pad, pad, pad, pad), mode=mode)
    # A grouped (depthwise) conv is about 4x faster on CPU than folding channels into the batch.
    weight = kernel.to(image)[None, None].expand(image.shape[0], 1, -1, -1).contiguous()
    return F.conv2d(x, weight, groups=image.shape[0])[0]


def resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a (C, H, W) image to ``size`` with F.interpolate; no antialias, no clamp (as Real-ESRGAN)."""
    extra = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(image[None], size=(max(1, size[0]), max(1, size[1])), mode=mode, **extra)[0]


# ----------------------------------------------------------------------------- noise


def gaussian_noise(image: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Noise sigma/255 * N(0, 1) shaped like the (3, H, W) image; ``gray``: one draw shared by all channels."""
    shape = (1, *image.shape[1:]) if gray else image.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32) * (sigma / 255.0)
    return noise.to(image).expand_as(image)


def poisson_noise(image: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of a (3, H, W) image in [0, 1], as BasicSR's ``generate_poisson_noise_pt``.

    img is rounded to 1/255 steps, vals = 2^ceil(log2(number of distinct values in the image)),
    noise = (Poisson(img * vals) / vals - img) * scale.  ``gray`` computes it on the luma
    0.299 R + 0.587 G + 0.114 B and repeats it on the three channels.
    """
    img = image.detach().float().cpu()  # torch.poisson draws with a CPU generator
    if gray:
        img = (torch.tensor([0.299, 0.587, 0.114])[:, None, None] * img).sum(0, keepdim=True)
    levels = (img * 255.0).round().clamp(0, 255)
    img = levels / 255.0
    # Distinct values of an image on 256 levels, counted by bincount (O(n)) rather than a sort.
    distinct = int((torch.bincount(levels.long().flatten(), minlength=256) > 0).sum())
    vals = 2.0 ** math.ceil(math.log2(distinct))
    out = torch.poisson(img * vals, generator=generator) / vals
    return ((out - img) * scale).to(image).expand_as(image)


# ----------------------------------------------------------------------------- JPEG

# IJG / JPEG Annex K tables, rows = vertical frequency (the orientation libjpeg and PIL use).
_LUMA_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_CHROMA_TABLE = torch.full((8, 8), 99.0)
_CHROMA_TABLE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])
# JFIF full-range BT.601 colour transform (0..255; chroma offset by 128 separately).
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCBCR_TO_RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D, (n, n) float32: D[k, m] = c_k cos((2m + 1) k π / 2n),
    c_0 = sqrt(1/n), c_k = sqrt(2/n).  A block B transforms as D B Dᵀ and back as Dᵀ C D;
    for n = 8 this is exactly JPEG's FDCT/IDCT with its 1/4 C(u) C(v) normalisation."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos((2 * m + 1) * k * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


_DCT8 = dct_matrix(8)


def jpeg_quant_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's (luma, chroma) tables for ``quality`` in 1..100, each (8, 8) float32.

    s = 5000 // q for q < 50 else 200 - 2q (integer, as ``jpeg_quality_scaling``);
    table = floor((T * s + 50) / 100) clamped to [1, 255] (baseline JPEG)."""
    s = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(torch.floor((t * s + 50) / 100).clamp(1, 255) for t in (_LUMA_TABLE, _CHROMA_TABLE))


def _quantise_planes(planes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(P, H, W) planes in 0..255, H and W multiples of 8 -> the same after 8x8 DCT quantisation."""
    p, h, w = planes.shape
    # (P, H/8, 8, W/8, 8) -> (P, H/8, W/8, 8, 8): every block at once, no Python loop.
    blocks = (planes - 128.0).reshape(p, h // 8, 8, w // 8, 8).transpose(2, 3)
    d = _DCT8.to(planes)
    coef = torch.round(d @ blocks @ d.T / table) * table
    blocks = d.T @ coef @ d
    return blocks.transpose(2, 3).reshape(p, h, w) + 128.0


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Simulated baseline JPEG (4:2:0) round trip of one (3, H, W) RGB image in [0, 1]; same shape out, in [0, 1].

    RGB -> YCbCr (JFIF), edge-replicate padding to multiples of 16, chroma averaged over 2x2,
    level shift -128, 8x8 orthonormal DCT, quantisation with :func:`jpeg_quant_tables`, rounding,
    dequantisation, inverse DCT, +128, chroma upsampled bilinearly (half-pixel centres: the 3/4-1/4
    weights of libjpeg's default "fancy" upsampling), YCbCr -> RGB, crop, clamp.  Not bit-exact
    with libjpeg (float DCT, no intermediate uint8 rounding) and not differentiable through rounding.
    """
    if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
        raise ValueError(f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image))}.")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}.")
    _, h, w = image.shape
    x = F.pad(image.float().clamp(0, 1)[None] * 255.0, (0, (-w) % 16, 0, (-h) % 16), mode="replicate")[0]
    ycc = torch.einsum("ij,jhw->ihw", _RGB_TO_YCBCR.to(x), x)
    luma_table, chroma_table = (t.to(x) for t in jpeg_quant_tables(quality))
    y = _quantise_planes(ycc[:1], luma_table)
    # Chroma planes are offset by +128 like luma, so the same -128 level shift centres them.
    chroma = _quantise_planes(F.avg_pool2d(ycc[1:] + 128.0, 2), chroma_table) - 128.0
    chroma = F.interpolate(chroma[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    rgb = torch.einsum("ij,jhw->ihw", _YCBCR_TO_RGB.to(x), torch.cat([y, chroma]))
    return (rgb[:, :h, :w] / 255.0).clamp(0, 1).to(image.dtype)


# ----------------------------------------------------------------------------- random draws


def _rand(g: torch.Generator) -> float:
    return torch.rand((), generator=g, dtype=torch.float64).item()


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _choice(g: torch.Generator, options, probs=None):
    if probs is None:
        return options[int(torch.randint(len(options), (), generator=g))]
    u, acc = _rand(g) * sum(probs), 0.0
    for option, p in zip(options, probs):
        acc += p
        if u < acc:
            return option
    return options[-1]


def _beta(g: torch.Generator, beta_range: tuple) -> float:
    # BasicSR: half of the time β < 1 from [lo, 1), otherwise β from [1, hi].
    return _uniform(g, beta_range[0], 1.0) if _rand(g) < 0.5 else _uniform(g, 1.0, beta_range[1])


def _random_kernel(g, kinds, probs, sinc_prob, max_size, sigma, betag, betap) -> torch.Tensor:
    size = _choice(g, list(range(7, max_size + 1, 2)))
    if _rand(g) < sinc_prob:
        # Real-ESRGAN: a small kernel cannot hold a low cutoff, so it starts at π/3 below size 13.
        cutoff = _uniform(g, math.pi / 3 if size < 13 else math.pi / 5, math.pi)
        return circular_lowpass_kernel(cutoff, size)
    kind = _choice(g, kinds, probs)
    sigma_x = _uniform(g, *sigma)
    sigma_y, rotation = sigma_x, 0.0
    if kind not in _ISOTROPIC:
        sigma_y, rotation = _uniform(g, *sigma), _uniform(g, -math.pi, math.pi)
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _beta(g, betag)
    elif kind.startswith("plateau"):
        beta = _beta(g, betap)
    return mixed_kernel(kind, size, sigma_x, sigma_y, rotation, beta)


def _random_resize(x, g, probs, factor_range, base_hw) -> torch.Tensor:
    updown = _choice(g, ("up", "down", "keep"), probs)
    factor = 1.0
    if updown == "up":
        factor = _uniform(g, 1.0, factor_range[1])
    elif updown == "down":
        factor = _uniform(g, factor_range[0], 1.0)
    size = (int(base_hw[0] * factor), int(base_hw[1] * factor))
    return resize(x, size, _choice(g, RESIZE_MODES))


def _random_noise(x, g, gaussian_prob, sigma_range, poisson_range, gray_prob) -> torch.Tensor:
    if _rand(g) < gaussian_prob:
        sigma, gray = _uniform(g, *sigma_range), _rand(g) < gray_prob
        noise = gaussian_noise(x, sigma, gray, g)
    else:
        scale, gray = _uniform(g, *poisson_range), _rand(g) < gray_prob
        noise = poisson_noise(x, scale, gray, g)
    return (x + noise).clamp(0, 1)


def _random_jpeg(x, g, quality_range) -> torch.Tensor:
    # Real-ESRGAN draws a float quality for DiffJPEG; libjpeg's tables take an int, so we draw ints.
    return jpeg_compress(x.clamp(0, 1), int(torch.randint(quality_range[0], quality_range[1] + 1, (), generator=g)))


# ----------------------------------------------------------------------------- pipeline


def real_esrgan_degrade(hr: torch.Tensor, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """Degrade one HR image into its LQ partner with Real-ESRGAN's second-order model.

    hr: (3, H, W) float in [0, 1], H and W >= config.scale (multiples not required).
    Returns lq: (3, H // scale, W // scale) float32 in [0, 1], rounded to 1/255 steps as Real-ESRGAN does.
    All randomness from ``generator`` (a CPU torch.Generator): the same seed gives the identical output.
    """
    if not (isinstance(hr, torch.Tensor) and hr.ndim == 3 and hr.shape[0] == 3 and hr.is_floating_point()):
        raise ValueError(f"hr must be a (3, H, W) float tensor, got {getattr(hr, 'shape', type(hr))}.")
    if min(hr.shape[1:]) < config.scale:
        raise ValueError(f"hr must be at least {config.scale} pixels on each side, got {tuple(hr.shape[1:])}.")
    if not torch.isfinite(hr).all():
        raise ValueError("hr contains NaN or infinite values.")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}.")
    c, g = config, generator
    _, h, w = hr.shape
    lq_hw = (h // c.scale, w // c.scale)
    # Kernels are drawn first, as Real-ESRGAN's dataset does before feed_data applies them.
    k1 = _random_kernel(g, c.kernel_list, c.kernel_prob, c.sinc_prob, c.blur_kernel_size,
                        c.blur_sigma, c.betag_range, c.betap_range)
    k2 = _random_kernel(g, c.kernel_list2, c.kernel_prob2, c.sinc_prob2, c.blur_kernel_size,
                        c.blur_sigma2, c.betag_range2, c.betap_range2)
    sinc = None  # None is the pulse: filtering with it changes nothing, so it is skipped.
    if _rand(g) < c.final_sinc_prob:
        size = _choice(g, list(range(7, c.blur_kernel_size + 1, 2)))
        sinc = circular_lowpass_kernel(_uniform(g, math.pi / 3, math.pi), size)

    # First degradation: blur, resize relative to the HR size, noise, JPEG.
    x = blur(hr.float(), k1)
    x = _random_resize(x, g, c.resize_prob, c.resize_range, (h, w))
    x = _random_noise(x, g, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
    x = _random_jpeg(x, g, c.jpeg_range)
    # Second degradation: resize relative to the LQ size, so the final resize stays gentle.
    if _rand(g) < c.second_blur_prob:
        x = blur(x, k2)
    x = _random_resize(x, g, c.resize_prob2, c.resize_range2, (h / c.scale, w / c.scale))
    x = _random_noise(x, g, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2)

    def resize_back_and_sinc(t):
        t = resize(t, lq_hw, _choice(g, RESIZE_MODES))
        return t if sinc is None else blur(t, sinc)

    # Real-ESRGAN tries both orders; other orders (sinc, JPEG, resize) gave twisted lines.
    if _rand(g) < 0.5:
        x = _random_jpeg(resize_back_and_sinc(x), g, c.jpeg_range2)
    else:
        x = resize_back_and_sinc(_random_jpeg(x, g, c.jpeg_range2))
    return (x * 255.0).round().clamp(0, 255) / 255.0


# ----------------------------------------------------------------------------- evaluation inputs


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The clean LQ image: ``(3, H, W)`` in [0, 1] -> ``(3, H // scale, W // scale)`` by PIL's bicubic filter on the
    8-bit image (the usual SR benchmark protocol, "clean" inputs), returned in [0, 1] on 1/255 steps."""
    from PIL import Image

    _, h, w = hr.shape
    planes = []
    for plane in (hr.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy():
        small = Image.fromarray(plane).resize((w // scale, h // scale), Image.BICUBIC)
        planes.append(torch.from_numpy(np.asarray(small, dtype=np.float32).copy()))
    return torch.stack(planes) / 255


EVALUATION_BLUR_SIGMA = 1.2
EVALUATION_NOISE_SIGMA = 3.0
EVALUATION_JPEG_QUALITY = 70


def evaluation_degradation(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    """The fixed, simple degradation of the default model's "degraded" evaluation inputs (not the training model):
    Gaussian blur sigma 1.2 (kernel 9, reflect padding), PIL bicubic /``scale`` on 8 bits, Gaussian noise sigma 3
    (of 255, seeded by ``seed``), rounding to 8 bits, JPEG quality 70 by PIL (4:2:0). ``(3, H, W)`` in [0, 1] ->
    ``(3, H // scale, W // scale)`` in [0, 1]."""
    import io

    from PIL import Image

    x, y = _offsets(9)
    kernel = torch.exp(-(x * x + y * y) / (2 * EVALUATION_BLUR_SIGMA**2))
    blurred = blur(hr.float(), (kernel / kernel.sum()).float())
    small = bicubic_downscale(blurred, scale)
    noise = torch.randn(small.shape, generator=torch.Generator().manual_seed(seed)) * (EVALUATION_NOISE_SIGMA / 255)
    noisy = ((small + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=EVALUATION_JPEG_QUALITY)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1) / 255
