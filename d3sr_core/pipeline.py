"""The upscaling pipeline: pre-processing, tiled encode / predict / decode, colour fix, exact output size.

Host-free: images come in and go out as float tensors ``(B, C, H, W)`` in [0, 1] with C = 1 (gray), 3 (RGB)
or 4 (RGBA). Hosts convert their own layouts at their edge.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .borrowed import place_for_run, weights_bound
from .color import apply_color_fix
from .generator import OneStepGenerator
from .residual_shift import ResShiftGenerator
from .resshift_pipeline import residual_shift_result, residual_shift_steps
from .options import UpscaleOptions, halved_tiles
from .winograd import WinogradConvolutions, nnpack_available

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
"""What a device out of memory raises (``torch.OutOfMemoryError`` from torch 2.5 on)."""

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``, called after every tile; it may raise to cancel the run."""


CPU_BF16_VARIABLE = "D3SR_CPU_BF16"
"""Set to ``0`` to keep ``auto`` at fp32 on a CPU with native bf16 (the test suite does, so that its numbers do not
depend on the CPU it runs on)."""


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), by torch's own CPU query. On such CPUs
    oneDNN runs bf16 convolutions and matrix products at about twice the fp32 rate (2.1-2.2x for an SD 2.1-sized
    3x3 convolution and linear layer on an AMD EPYC Zen 4); elsewhere bf16 is emulated and slower than fp32."""
    if os.environ.get(CPU_BF16_VARIABLE, "1") == "0":
        return False
    queries = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, q, lambda: False)() for q in queries)


def resolve_dtypes(name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """``(denoiser dtype, VAE dtype)`` for ``name`` in auto/fp32/fp16/bf16 on ``device``.

    ``auto`` follows the hardware: on the CPU bf16 where it is native (:func:`native_bf16_cpu`), else fp32 (where
    the Winograd convolutions apply); bf16 on an accelerator (fp16 on NVIDIA GPUs older than Ampere). An fp16
    request keeps the VAE in fp32, because the SD VAE decoder overflows fp16 on large images; bf16 has fp32's range.
    """
    if name == "auto":
        if device.type == "cpu":
            name = "bf16" if native_bf16_cpu() else "fp32"
        elif device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            name = "fp16"  # bf16 is only emulated before Ampere
        else:
            name = "bf16"
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype {name!r} is not one of auto, fp32, fp16, bf16.")
    dtype = table[name]
    return dtype, (torch.float32 if dtype == torch.float16 else dtype)


def pil_bicubic_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` in [0, 1] to ``size = (h, w)`` with PIL's bicubic filter, as OSEDiff does.

    Images that hold 8-bit values go through PIL's 8-bit path, which rounds and clips between its horizontal and
    vertical passes, so results equal OSEDiff's bit for bit; other images (16-bit, float) use PIL's float path.
    """
    arrays = images.detach().float().cpu().numpy()
    eight_bit = np.abs(arrays * 255 - np.round(arrays * 255)).max() < 1e-3
    out = np.empty((*arrays.shape[:2], *size), dtype=np.float32)
    for b in range(arrays.shape[0]):
        for c in range(arrays.shape[1]):
            plane = np.round(arrays[b, c] * 255).astype(np.uint8) if eight_bit else np.ascontiguousarray(arrays[b, c])
            resized = np.asarray(Image.fromarray(plane).resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32)
            out[b, c] = resized / 255 if eight_bit else resized
    return torch.from_numpy(out).clamp(0, 1).to(images.device)


def torch_bicubic_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize with ``F.interpolate(mode="bicubic", align_corners=False)`` (TSD-SR's upsampler), clamped to [0, 1]."""
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)


UPSAMPLE_FNS = {"pil_bicubic": pil_bicubic_resize, "torch_bicubic": torch_bicubic_resize}


def processing_size(height: int, width: int, options: UpscaleOptions) -> tuple[int, int]:
    """Size at which an ``height x width`` input is processed: ``scale`` x the input, or larger so that the short
    side reaches ``min_process_side`` as the official scripts do, but never so large that the long side passes
    ``max(scale x long side, 4 x min_process_side)`` (a 3 x 500 strip is not processed at 512 x 85,000).
    Raises ``LimitError`` when the output or the processing size is over ``options.max_output_pixels``."""
    long_limit = max(options.scale * max(height, width), 4 * options.min_process_side)
    factor = max(float(options.scale), min(options.min_process_side / min(height, width), long_limit / max(height, width)))
    size = round(height * factor), round(width * factor)
    options.check_size(height, width, size)
    return size


class Upscaler:
    """One-step diffusion super-resolution of whole images of any size.

    Args:
        generator: a built :class:`OneStepGenerator` (see ``checkpoints.build_generator``).
        device: where to run.
        dtype: ``auto``, ``fp32``, ``fp16`` or ``bf16`` (see :func:`resolve_dtypes`).
        winograd: run the large 3x3 convolutions with NNPACK's Winograd algorithm (see ``winograd.py``): SD 2.1 at
            512 px is about 1.6x as fast on the CPU, equal to the default kernels up to rounding. CPU and fp32 only;
            ``None`` (the default) uses it wherever it applies (CPU, fp32, a torch build with NNPACK).
    """

    def __init__(
        self,
        generator: OneStepGenerator,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        winograd: bool | None = None,
    ):
        self.device = torch.device(device)
        denoiser_dtype, vae_dtype = resolve_dtypes(dtype, self.device)
        fp32 = (denoiser_dtype, vae_dtype) == (torch.float32, torch.float32)
        if winograd is None:
            winograd = self.device.type == "cpu" and fp32 and nnpack_available()
        elif winograd:
            if self.device.type != "cpu":
                raise ValueError(f"winograd=True speeds up CPU convolutions only; device is {self.device}.")
            if not fp32:
                raise ValueError(f"winograd=True computes in float32 only; dtype is {dtype!r}, use 'fp32' or 'auto'.")
            if not nnpack_available():
                raise ValueError("winograd=True needs NNPACK, which this torch build or CPU does not provide.")
        self.winograd = winograd
        self.generator = generator
        for module, dtype in ((generator.denoiser, denoiser_dtype), (generator.vae, vae_dtype)):
            place_for_run(module, self.device, dtype)  # fp8 and a host's borrowed weights are cast on use

    def count_steps(self, height: int, width: int, options: UpscaleOptions) -> int:
        """How many progress steps (tiles) :meth:`upscale` takes for an ``height x width`` input."""
        if isinstance(self.generator, ResShiftGenerator):
            return residual_shift_steps(self.generator, height, width, options)
        f = self.generator.pixel_multiple
        ph, pw = (-(-s // f) * f for s in processing_size(height, width, options))
        return self._count(ph, pw, options)

    def _count(self, ph: int, pw: int, options: UpscaleOptions) -> int:
        g = self.generator
        lh, lw = ph // g.vae_scale_factor, pw // g.vae_scale_factor
        return (
            g.vae_progress_steps("encoder", ph, pw, options.vae_encoder_tile_size)
            + g.denoise_progress_steps(lh, lw, options.tile_size, options.tile_overlap, options.tile_rule)
            + g.vae_progress_steps("decoder", lh, lw, options.vae_decoder_tile_size)
        )

    @torch.no_grad()
    def upscale(
        self, images: torch.Tensor, options: UpscaleOptions, progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Upscale ``images`` ``(B, C, H, W)`` in [0, 1], C in {1, 3, 4}, to ``(B, C, scale*H, scale*W)`` in [0, 1].

        Gray inputs are processed as RGB and returned as gray; an alpha channel is resized with the same
        upsampler and passed through. Raises ``ValueError`` on an empty image or when the model yields NaN.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
            raise ValueError(f"images must be (B, C, H, W) with C in 1, 3, 4; got shape {tuple(images.shape)}.")
        if isinstance(self.generator, ResShiftGenerator):  # no VAE tiles to park: its chopping bounds memory
            options = options.updated(vae_tile_store="ram")
        batch, channels, height, width = images.shape
        if height == 0 or width == 0 or batch == 0:
            raise ValueError(f"images must have at least one pixel; got shape {tuple(images.shape)}.")
        process_size = processing_size(height, width, options)  # refuses sizes over the limit, before allocating
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values; expected finite values in [0, 1].")
        images = images.float().clamp(0, 1)
        rgb = images[:, :3] if channels != 1 else images.expand(-1, 3, -1, -1)
        out_size = (height * options.scale, width * options.scale)
        upsample = UPSAMPLE_FNS[options.upsample]
        source = upsample(rgb, process_size)
        with weights_bound(self.generator.denoiser, self.generator.vae):  # a host's weights, as it holds them now
            if isinstance(self.generator, ResShiftGenerator):  # conditioned on the input itself, chopped its own way
                result = residual_shift_result(self.generator, rgb, process_size, options, self.device, progress)
            else:
                result = self._run(source, options, progress)
        if options.color_source == "upsampled":
            reference = source
        else:
            reference = rgb if options.color_fix == "adain" else pil_bicubic_resize(rgb, process_size)
        result = apply_color_fix(options.color_fix, result, reference.to(result.device).float())
        if process_size != out_size:
            result = F.interpolate(result, size=out_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if channels == 1:
            return result.mean(dim=1, keepdim=True)
        if channels == 4:
            alpha = upsample(images[:, 3:], process_size)
            if process_size != out_size:
                alpha = F.interpolate(alpha, size=out_size, mode="bicubic", align_corners=False, antialias=True)
            result = torch.cat([result, alpha.clamp(0, 1).to(result.device)], dim=1)
        return result

    def upscale_within_memory(
        self,
        images: torch.Tensor,
        options: UpscaleOptions,
        progress: ProgressFn | None = None,
        free_cache: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """:meth:`upscale`, retried with every tile halved (:func:`halved_tiles`) while the device runs out of
        memory, as ComfyUI's own model upscaler does; ``free_cache`` (the host's way to hand cached memory back)
        runs before each retry. Re-raises once the tiles are at their floor."""
        while True:
            try:
                return self.upscale(images, options, progress)
            except OutOfMemoryError:
                options = halved_tiles(options)
                if options is None:
                    raise
                if free_cache is not None:
                    free_cache()

    def _run(self, source: torch.Tensor, options: UpscaleOptions, progress: ProgressFn | None) -> torch.Tensor:
        """The one step on an upsampled RGB ``source`` ``(B, 3, H, W)`` in [0, 1]; returns ``(B, 3, H, W)`` in [0, 1]."""
        height, width = source.shape[-2:]
        f = self.generator.pixel_multiple
        pad_h, pad_w = -height % f, -width % f
        lq = F.pad(source.to(self.device) * 2 - 1, (0, pad_w, 0, pad_h), mode="replicate")
        total, done = self._count(*lq.shape[-2:], options), 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        g = self.generator
        seeded = torch.Generator(self.device).manual_seed(options.seed) if options.seed is not None else None
        with WinogradConvolutions() if self.winograd else contextlib.nullcontext():
            latents = g.encode(
                lq,
                sample=options.vae_sample == "sample",
                generator=seeded,
                tile_size=options.vae_encoder_tile_size or None,
                tile_store=options.vae_tile_store,
                progress=tick,
            )
            x0 = g.denoise(
                latents,
                tile_size=options.tile_size or None,
                tile_overlap=options.tile_overlap,
                tile_rule=options.tile_rule,
                tile_batch_size=options.tile_batch_size,
                progress=tick,
            )
            decoded = g.decode(
                x0, tile_size=options.vae_decoder_tile_size or None, tile_store=options.vae_tile_store, progress=tick
            )
        if not torch.isfinite(decoded).all():
            raise ValueError("the model produced NaN or infinite values; try dtype fp32 or bf16.")
        return ((decoded + 1) / 2)[..., :height, :width].float()
