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
        seed: seeds the posterior sample.
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

    def __post_init__(self) -> None:
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
            (self.vae_tile_store in TILE_STORES, "vae_tile_store", f"one of {TILE_STORES}"),
            (self.color_fix in COLOR_FIXES, "color_fix", f"one of {COLOR_FIXES}"),
            (self.color_source in COLOR_SOURCES, "color_source", f"one of {COLOR_SOURCES}"),
            (self.vae_sample in VAE_SAMPLE_MODES, "vae_sample", f"one of {VAE_SAMPLE_MODES}"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected {allowed}.")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "UpscaleOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

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
    """``options`` with every tile halved (overlap kept below the tile), for a retry after running out of memory;
    ``None`` when all tiles are already at their floor (16 latent, 256 image and 32 latent pixels)."""
    tile = max(MIN_TILE_SIZE, options.tile_size // 2) if options.tile_size else MIN_TILE_SIZE * 4
    encoder = options.vae_encoder_tile_size
    encoder = max(MIN_VAE_ENCODER_TILE_SIZE, encoder // 2 // 8 * 8) if encoder else MIN_VAE_ENCODER_TILE_SIZE * 4
    decoder = options.vae_decoder_tile_size
    decoder = max(MIN_VAE_DECODER_TILE_SIZE, decoder // 2) if decoder else MIN_VAE_DECODER_TILE_SIZE * 4
    if (tile, encoder, decoder) == (options.tile_size, options.vae_encoder_tile_size, options.vae_decoder_tile_size):
        return None
    return replace(
        options,
        tile_size=tile,
        tile_overlap=min(options.tile_overlap, tile // 2),
        vae_encoder_tile_size=encoder,
        vae_decoder_tile_size=decoder,
    )
