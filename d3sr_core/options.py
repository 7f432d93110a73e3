"""Upscaling options and the per-method presets (the defaults of each method's official inference script)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .color import COLOR_FIXES
from .tiled_vae import TILE_STORES
from .tiling import TILE_RULES

UPSAMPLERS = ("pil_bicubic", "torch_bicubic")
DTYPES = ("auto", "fp32", "fp16", "bf16")
VAE_SAMPLE_MODES = ("mode", "sample")
COLOR_SOURCES = ("upsampled", "input")

DEFAULT_MAX_SCALE = 16
"""The largest ``scale`` allowed unless the user raises ``max_scale``."""
DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192
"""The most pixels an image may be processed at (output, or the larger processing size) unless the user raises
``max_output_pixels``: 67 megapixels, about 0.8 GB per float32 RGB copy, what a workstation holds a few of."""
LIMIT_FIELDS = ("max_scale", "max_output_pixels")
"""Fields set by the user or host only: a model file's stored defaults never raise them."""
_INT_FIELDS = ("scale", "min_process_side", "tile_size", "tile_overlap", "vae_encoder_tile_size",
               "vae_decoder_tile_size", "tile_batch_size", "chop_size", "max_scale", "max_output_pixels")
MAX_STEPS = 1000
MIN_CHOP_SIZE = 64


class LimitError(ValueError):
    """A request over ``max_scale`` or ``max_output_pixels``; the message is one sentence that says so."""


@dataclass(frozen=True)
class UpscaleOptions:
    """Everything that shapes one upscale besides the model.

    Attributes:
        scale: output size / input size.
        upsample: how the low-resolution image is brought to the output size before encoding
            (``pil_bicubic`` as OSEDiff does, ``torch_bicubic`` as TSD-SR does).
        min_process_side: inputs whose upscaled short side is below this are processed at a larger scale
            (as the official scripts do) and resized back, so the output is always ``scale`` x the input.
        tile_size, tile_overlap: latent tiles and their overlap in latent pixels; 0 turns latent tiling off.
        tile_rule: when latents are tiled and the tiles' shape: ``area`` (the official OSEDiff and TSD-SR scripts:
            untiled while ``h * w <= tile_size^2``, else square tiles of ``min(tile_size, h, w)``) or ``side``
            (untiled while the longer side fits, else ``min(tile_size, h) x min(tile_size, w)``; the default, and
            what models stored without this field were made with). See ``tiling.latent_tile_shape``.
        vae_encoder_tile_size: encoder tiles in image pixels; vae_decoder_tile_size: decoder tiles in latent
            pixels; 0 turns VAE tiling off.
        tile_batch_size: latent tiles sent through the denoiser together.
        vae_tile_store: where the tiled VAE keeps every tile's activations between GroupNorm stages: ``ram``, or
            ``disk`` (a temporary folder), which bounds memory by one tile at any image size, still exact.
        color_fix: ``wavelet``, ``adain`` or ``none``.
        color_source: what the colours are taken from: ``upsampled`` (the pre-upsampled input, as OSEDiff) or
            ``input`` (as TSD-SR: the input itself for AdaIN, its PIL-bicubic upsampling for the wavelet fix).
        vae_sample: ``mode`` (deterministic) or ``sample`` (seeded with ``seed``).
        seed: seeds the posterior sample, and the noise of a multi-step model (ResShift: ``torch.manual_seed(seed)``
            then ``randn`` in the latent's shape on its device, as the official sampler draws it, once per image).
        steps: sampling steps of a multi-step model (ResShift, TAD-SR); ``None`` takes the model's own (its config's
            step count); 1 is TAD-SR's one step at t = T - 1; other counts respace the schedule. One-step models
            ignore it.
        chop_size: ResShift's chopping of the low-quality input (its ``--chop_size``): inputs with a side over this
            many pixels run in overlapping patches of this size (stride 448 for 512, 224 for 256, 48 for 64, else
            7/8 of it) whose results are averaged; 0 runs the whole image at once. One-step models ignore it.
        max_scale: the largest ``scale`` accepted (raise it to allow more).
        max_output_pixels: the most pixels an image may be processed at, the output or the larger processing size
            that ``min_process_side`` asks for (raise it to allow more). Checked by :meth:`check_size` before
            anything is allocated.
    """

    scale: int = 4
    upsample: str = "pil_bicubic"
    min_process_side: int = 512
    tile_size: int = 96
    tile_overlap: int = 32
    tile_rule: str = "side"
    vae_encoder_tile_size: int = 1024
    vae_decoder_tile_size: int = 224
    tile_batch_size: int = 1
    vae_tile_store: str = "ram"
    color_fix: str = "adain"
    color_source: str = "upsampled"
    vae_sample: str = "mode"
    seed: int | None = None
    steps: int | None = None
    chop_size: int = 0
    max_scale: int = DEFAULT_MAX_SCALE
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} is not allowed; expected a whole number.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} is not allowed; expected a whole number or None.")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or not 1 <= self.steps <= MAX_STEPS):
            raise ValueError(f"steps={self.steps!r} is not allowed; expected None (the model's own) or 1 to {MAX_STEPS}.")
        if self.max_scale < 1 or self.max_output_pixels < 1:
            raise ValueError(f"max_scale={self.max_scale} and max_output_pixels={self.max_output_pixels} must be at least 1.")
        if self.scale > self.max_scale:
            raise LimitError(
                f"scale={self.scale} is over the limit max_scale={self.max_scale}; raise max_scale to allow it."
            )
        checks = [
            (self.scale >= 1, "scale", "a whole number of at least 1"),
            (self.upsample in UPSAMPLERS, "upsample", f"one of {UPSAMPLERS}"),
            (self.min_process_side >= 0, "min_process_side", "at least 0"),
            (self.tile_size == 0 or self.tile_size >= 8, "tile_size", "0 (off) or at least 8 latent pixels"),
            (0 <= self.tile_overlap and (self.tile_size == 0 or self.tile_overlap < self.tile_size),
             "tile_overlap", "at least 0 and smaller than tile_size"),
            (self.vae_encoder_tile_size == 0 or (self.vae_encoder_tile_size >= 64 and self.vae_encoder_tile_size % 8 == 0),
             "vae_encoder_tile_size", "0 (off) or a multiple of 8 of at least 64 pixels"),
            (self.vae_decoder_tile_size == 0 or self.vae_decoder_tile_size >= 8,
             "vae_decoder_tile_size", "0 (off) or at least 8 latent pixels"),
            (self.tile_rule in TILE_RULES, "tile_rule", f"one of {TILE_RULES}"),
            (self.tile_batch_size >= 1, "tile_batch_size", "at least 1"),
            (self.chop_size == 0 or self.chop_size >= MIN_CHOP_SIZE, "chop_size", f"0 (off) or at least {MIN_CHOP_SIZE} pixels"),
            (self.vae_tile_store in TILE_STORES, "vae_tile_store", f"one of {TILE_STORES}"),
            (self.color_fix in COLOR_FIXES, "color_fix", f"one of {COLOR_FIXES}"),
            (self.color_source in COLOR_SOURCES, "color_source", f"one of {COLOR_SOURCES}"),
            (self.vae_sample in VAE_SAMPLE_MODES, "vae_sample", f"one of {VAE_SAMPLE_MODES}"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected {allowed}.")
        if self.min_process_side**2 > self.max_output_pixels:
            raise LimitError(
                f"min_process_side={self.min_process_side} would process every image at over "
                f"max_output_pixels={self.max_output_pixels} pixels; raise max_output_pixels to allow it."
            )

    def check_size(self, height: int, width: int, processed: tuple[int, int]) -> None:
        """Refuse, in one sentence, an ``height x width`` input whose output (``scale`` x) or processing size
        ``processed`` has more than ``max_output_pixels`` pixels. Pure arithmetic: call it before allocating."""
        out_h, out_w = height * self.scale, width * self.scale
        pixels = max(out_h * out_w, processed[0] * processed[1])
        if pixels > self.max_output_pixels:
            at = f"{out_w}x{out_h}" if processed == (out_h, out_w) else f"{out_w}x{out_h}, processed at {processed[1]}x{processed[0]},"
            raise LimitError(
                f"a {width}x{height} image at scale {self.scale} would be {at} {pixels} pixels, over the limit "
                f"max_output_pixels={self.max_output_pixels}; raise max_output_pixels to allow it."
            )

    def to_json(self) -> dict:
        """The upscaling fields (not the limits, which belong to the user, not to a model file)."""
        return {k: v for k, v in asdict(self).items() if k not in LIMIT_FIELDS}

    @classmethod
    def from_json(cls, data: dict, **limits) -> "UpscaleOptions":
        """Options from stored JSON; limit fields in ``data`` are ignored, ``limits`` sets them."""
        if not isinstance(data, dict):
            raise ValueError(f"the options must be a JSON object, not {type(data).__name__}.")
        known = {f.name for f in fields(cls)} - set(LIMIT_FIELDS)
        return cls(**{k: v for k, v in data.items() if k in known}, **limits)

    def updated(self, **changes) -> "UpscaleOptions":
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS = {
    # test_osediff.py: PIL bicubic x4, process size 512, --align_method adain, latent tiles 96/32 by its rule (untiled
    # while h * w <= 96^2, else square tiles), VAE tiles 1024/224 (always installed there).
    "osediff": UpscaleOptions(tile_rule="area"),
    # test_tsdsr.py: torch bicubic x4, process size 512, --align_method wavelet toward the PIL-upsampled input
    # (adain toward the input itself, as the paper's table with the tsdsr-mse weights), latent tiles 64/8 by the
    # same rule as OSEDiff, blending the velocity; the VAE untiled (--is_use_tile defaults to False). A host that
    # runs out of memory turns VAE tiles on (halved_tiles), as it halves them for the other presets.
    "tsdsr": UpscaleOptions(
        upsample="torch_bicubic", color_fix="wavelet", color_source="input", tile_size=64, tile_overlap=8,
        tile_rule="area", vae_encoder_tile_size=0, vae_decoder_tile_size=0,
    ),
    # ResShift's inference_resshift.py (and TAD-SR's inference.py): x4 by its own torch bicubic upsampling inside the
    # sampler, no colour fix, chopping at 512 (stride 448) instead of latent or VAE tiles, --seed 12345, the
    # config's step count.
    "resshift": UpscaleOptions(
        upsample="torch_bicubic", min_process_side=0, color_fix="none", tile_size=0, vae_encoder_tile_size=0,
        vae_decoder_tile_size=0, chop_size=512, seed=12345,
    ),
}


def vae_tile_sizes(pixels: int | None, vae_scale_factor: int) -> dict[str, int | None]:
    """``vae_encoder_tile_size`` and ``vae_decoder_tile_size`` for one VAE tile side in image pixels, the decoder's
    tile covering as many image pixels (``pixels / vae_scale_factor`` latents): ``None`` leaves both as they are,
    0 turns VAE tiling off."""
    if pixels is None:
        return {"vae_encoder_tile_size": None, "vae_decoder_tile_size": None}
    return {"vae_encoder_tile_size": pixels, "vae_decoder_tile_size": pixels // vae_scale_factor}


MIN_TILE_SIZE = 16
MIN_VAE_ENCODER_TILE_SIZE = 256
MIN_VAE_DECODER_TILE_SIZE = 32


def halved_tiles(options: UpscaleOptions) -> UpscaleOptions | None:
    """``options`` with every tile (and ResShift's chop) halved (overlap kept below the tile), for a retry after running
    out of memory; ``None`` when all are already at their floor (16 latent, 256 image, 32 latent and 64 input pixels)."""
    tile = max(MIN_TILE_SIZE, options.tile_size // 2) if options.tile_size else MIN_TILE_SIZE * 4
    encoder = options.vae_encoder_tile_size
    encoder = max(MIN_VAE_ENCODER_TILE_SIZE, encoder // 2 // 8 * 8) if encoder else MIN_VAE_ENCODER_TILE_SIZE * 4
    decoder = options.vae_decoder_tile_size
    decoder = max(MIN_VAE_DECODER_TILE_SIZE, decoder // 2) if decoder else MIN_VAE_DECODER_TILE_SIZE * 4
    chop = max(MIN_CHOP_SIZE, options.chop_size // 2) if options.chop_size else MIN_CHOP_SIZE * 4
    current = (options.tile_size, options.vae_encoder_tile_size, options.vae_decoder_tile_size, options.chop_size)
    if (tile, encoder, decoder, chop) == current:
        return None
    return replace(
        options,
        tile_size=tile,
        tile_overlap=min(options.tile_overlap, tile // 2),
        vae_encoder_tile_size=encoder,
        vae_decoder_tile_size=decoder,
        chop_size=chop,
    )
