"""The upscaling pipeline: pre-processing, tiled encode / predict / decode, colour fix, exact output size.

Host-free: images come in and go out as float tensors ``(B, C, H, W)`` in [0, 1] with C = 1 (gray), 3 (RGB)
or 4 (RGBA). Hosts convert their own layouts at their edge.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .borrowed import place_for_run, weights_bound
from .color import WAVELET_HALO, adain_with_stats, apply_color_fix, channel_mean_std, streamed_channel_mean_std
from .generator import OneStepGenerator
from .residual_shift import ResShiftGenerator
from .resshift_pipeline import residual_shift_result, residual_shift_steps
from .image_store import OUTPUT_DTYPES, PlaneFile, as_output
from .options import UpscaleOptions, halved_tiles
from .tiled_vae import RegionSource, scratch_folder
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


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero on the CPU inside the block, then give the caller back its own mode.

    Activations that underflow (the far tails of a sharp attention softmax, for one) send x86 CPUs down a slow
    microcode path: the bundled model took 5.1 s instead of 0.4 s on a 96 x 96 input once its attention had
    sharpened. Values below 1.2e-38 change nothing an image can show. PyTorch has no getter for the mode, so it is
    read from whether a subnormal survives a multiplication."""
    was_on = (torch.tensor([1e-39]) * 1.0).item() == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


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
    out = np.empty((*arrays.shape[:2], *size), dtype=np.float32)
    for b in range(arrays.shape[0]):
        for c, plane in enumerate(_pil_bicubic_planes(arrays[b], size)):
            out[b, c] = _plane_values(plane)
    return torch.from_numpy(out).clamp(0, 1).to(images.device)


def _pil_bicubic_planes(planes: np.ndarray, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Each plane of ``planes`` ``(C, H, W)`` float in [0, 1] resized to ``size`` by PIL's bicubic filter, one at a
    time: ``uint8`` when all of ``planes`` hold 8-bit values (PIL's 8-bit path), else float32."""
    eight_bit = np.abs(planes * 255 - np.round(planes * 255)).max() < 1e-3
    for plane in planes:
        plane = np.round(plane * 255).astype(np.uint8) if eight_bit else np.ascontiguousarray(plane)
        yield np.asarray(Image.fromarray(plane).resize((size[1], size[0]), Image.BICUBIC))


def _plane_values(plane: np.ndarray) -> np.ndarray:
    """A plane of :func:`_pil_bicubic_planes` (or a part of one) as float32 in [0, 1]."""
    return plane.astype(np.float32) / 255 if plane.dtype == np.uint8 else plane.astype(np.float32)


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
        self,
        images: torch.Tensor,
        options: UpscaleOptions,
        progress: ProgressFn | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upscale ``images`` ``(B, C, H, W)`` in [0, 1], C in {1, 3, 4}, to ``(B, C, scale*H, scale*W)`` in [0, 1].

        Gray inputs are processed as RGB and returned as gray; an alpha channel is resized with the same
        upsampler and passed through. Raises ``ValueError`` on an empty image or when the model yields NaN.

        ``out``, the host's own result buffer ``(B, scale*H, scale*W, C)`` (uint8, uint16 or float32, see
        ``image_store.as_output``), receives the result, converted band by band, and is returned: the image then
        never exists as a float tensor. With ``options.vae_tile_store == "disk"`` every whole-image tensor waits
        on disk (see :meth:`_upscale_on_disk`), so memory is bounded by the tiles and one band of rows, not by
        the image, with the same pixels as in memory.
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
        expected = (batch, height * options.scale, width * options.scale, channels)
        if out is not None and (tuple(out.shape) != expected or out.dtype not in OUTPUT_DTYPES):
            raise ValueError(f"out has shape {tuple(out.shape)} and dtype {out.dtype}; expected {expected} and one of "
                             f"{OUTPUT_DTYPES}.")
        images = images.float().clamp(0, 1)
        with denormals_flushed():
            if options.vae_tile_store == "disk":
                if out is None:
                    return self._upscale_on_disk(images, options, process_size, progress, torch.empty(expected)).movedim(-1, 1)
                return self._upscale_on_disk(images, options, process_size, progress, out)
            result = self._upscale_in_memory(images, options, process_size, progress)
        if out is None:
            return result
        out.copy_(as_output(result.movedim(1, -1), out.dtype))
        return out

    def _upscale_in_memory(
        self, images: torch.Tensor, options: UpscaleOptions, process_size: tuple[int, int], progress: ProgressFn | None
    ) -> torch.Tensor:
        """:meth:`upscale` with every whole-image tensor in memory, the batch at once; ``images`` float in [0, 1]."""
        _, channels, height, width = images.shape
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
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`upscale`, retried with every tile halved (:func:`halved_tiles`) while the device runs out of
        memory, as ComfyUI's own model upscaler does; ``free_cache`` (the host's way to hand cached memory back)
        runs before each retry. Re-raises once the tiles are at their floor."""
        while True:
            try:
                return self.upscale(images, options, progress, out)
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

    def _upscale_on_disk(
        self,
        images: torch.Tensor,
        options: UpscaleOptions,
        process_size: tuple[int, int],
        progress: ProgressFn | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`upscale` into ``out`` ``(B, H', W', C)`` with every whole-image tensor on disk, one image at a time.

        The upsampled input and the decoded image are :class:`image_store.PlaneFile`\\ s in one scratch folder
        (removed on any exit, Cancel included). The encoder reads its tiles from the upsampled input; the decoder
        writes its tiles to the decoded file; the colour fix then runs in bands of rows (the wavelet fix with
        ``WAVELET_HALO`` rows of context, AdaIN with whole-image statistics gathered first) and each band goes into
        ``out``. A pointwise autoencoder, whose latents are as large as the image, is run band by band through the
        denoiser's tile rows (``OneStepGenerator.denoise_rows``) and never holds whole latents. What stays in
        memory grows with the image only as an 8-bit plane while a plane is upsampled (a float32 plane for
        16-bit or float input and for ``torch_bicubic``), one band of rows, and the latents of a compressing VAE
        (1/16 of a float image for SD's 4 channels at 1/8). An output that is resized after processing (inputs
        whose short side is below ``min_process_side``) is resized whole. Pixels equal :meth:`upscale` in memory
        up to float32 rounding of the AdaIN statistics; ``vae_sample = "sample"`` draws the same distribution,
        image by image."""
        batch, channels = images.shape[:2]
        f = self.generator.pixel_multiple
        padded = (-(-process_size[0] // f) * f, -(-process_size[1] // f) * f)
        total, done = batch * self._count(*padded, options), 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        seeded = torch.Generator(self.device).manual_seed(options.seed) if options.seed is not None else None
        with scratch_folder() as folder, WinogradConvolutions() if self.winograd else contextlib.nullcontext():
            for index in range(batch):
                image = images[index]
                rgb = image[:3] if channels != 1 else image.expand(3, -1, -1)
                source = PlaneFile(folder / "source.f32", 3, *process_size)
                _upsample_into(source, rgb, options.upsample)
                decoded = PlaneFile(folder / "decoded.f32", 3, *process_size)
                with weights_bound(self.generator.denoiser, self.generator.vae):  # a host's weights, as held now
                    self._run_on_disk(source, decoded, padded, options, seeded, tick)
                if options.color_fix == "none" or options.color_source == "upsampled":
                    reference = source
                elif options.color_fix == "adain":
                    reference = rgb[None]  # TSD-SR's AdaIN takes the input's own statistics
                elif options.upsample == "pil_bicubic":
                    reference = source
                else:
                    reference = PlaneFile(folder / "reference.f32", 3, *process_size)
                    _upsample_into(reference, rgb, "pil_bicubic")
                alpha = None
                if channels == 4:
                    alpha = PlaneFile(folder / "alpha.f32", 1, *process_size)
                    _upsample_into(alpha, image[3:], options.upsample)
                _finish_on_disk(decoded, reference, alpha, options.color_fix, channels == 1, out[index])
        return out

    def _run_on_disk(
        self,
        source: PlaneFile,
        decoded: PlaneFile,
        padded: tuple[int, int],
        options: UpscaleOptions,
        seeded: torch.Generator | None,
        tick: Callable[[], None],
    ) -> None:
        """:meth:`_run` from the upsampled input in ``source`` into ``decoded`` (both ``(3, H, W)`` in [0, 1]),
        the encoder's input ``padded`` to whole pixel multiples by repeating the last row and column."""
        g = self.generator
        _, height, width = source.shape

        def lq_region(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            rows, cols = torch.arange(y0, y1).clamp(max=height - 1), torch.arange(x0, x1).clamp(max=width - 1)
            part = source.read(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            part = part[:, rows - rows[0]][:, :, cols - cols[0]]
            return part[None].to(self.device) * 2 - 1

        def write_decoded(y0: int, x0: int, part: torch.Tensor) -> None:
            if not torch.isfinite(part).all():
                raise ValueError("the model produced NaN or infinite values; try dtype fp32 or bf16.")
            part = ((part + 1) / 2)[0, :, : max(0, height - y0), : max(0, width - x0)]
            if part.numel():
                decoded.write(y0, x0, part.float())

        encode = {"sample": options.vae_sample == "sample", "generator": seeded}
        if getattr(g.vae, "pointwise", False):  # latents as large as the image: never whole, band by band
            scale = g.vae_scale_factor
            latent_shape = (1, g.vae.config.latent_channels, padded[0] // scale, padded[1] // scale)
            tick()  # the encoder's one step

            def latent_rows(y0: int, y1: int) -> torch.Tensor:
                return g.encode(lq_region(y0 * scale, y1 * scale, 0, padded[1]), **encode)

            def decode_rows(y0: int, x0: torch.Tensor) -> None:
                write_decoded(y0 * scale, 0, g.decode(x0))

            g.denoise_rows(
                latent_rows, latent_shape, decode_rows, tile_size=options.tile_size or None,
                tile_overlap=options.tile_overlap, tile_rule=options.tile_rule,
                tile_batch_size=options.tile_batch_size, progress=tick,
            )
            tick()  # the decoder's one step
            return
        lq = RegionSource((1, 3, *padded), self.device, lq_region)
        latents = g.encode(lq, **encode, tile_size=options.vae_encoder_tile_size or None, tile_store="disk", progress=tick)
        x0 = g.denoise(
            latents, tile_size=options.tile_size or None, tile_overlap=options.tile_overlap,
            tile_rule=options.tile_rule, tile_batch_size=options.tile_batch_size, progress=tick,
        )
        del latents
        g.decode(x0, tile_size=options.vae_decoder_tile_size or None, tile_store="disk", progress=tick, into=write_decoded)


BAND_PIXELS = 2**20
"""Pixels per band of rows in the disk path's last pass (colour fix, conversion into the host's buffer): 12 MiB of
float32 RGB per band, plus the wavelet fix's context rows, at any image size."""


CUBIC_REACH = 2
"""Input rows a bicubic output row reads beyond its own: taps at floor(y) - 1 ... floor(y) + 2."""


def _upsample_into(store: PlaneFile, planes: torch.Tensor, method: str) -> None:
    """``planes`` ``(C, h, w)`` in [0, 1] upsampled by ``method`` to ``store``'s size, as :data:`UPSAMPLE_FNS`
    computes it (clamped to [0, 1]): PIL one 8-bit plane at a time (float for other input); ``torch_bicubic`` at a
    whole factor in bands of rows, each from its input rows and :data:`CUBIC_REACH` more on each side. At a whole
    factor ``s`` a band's source coordinates are the image's shifted by whole rows (the same ``1 / s``), so its
    weights and taps are the image's: bit for bit at power-of-two factors, within float rounding at others."""
    _, height, width = store.shape
    rows = max(1, BAND_PIXELS // width)
    in_height, in_width = planes.shape[-2:]
    factor = height // in_height
    if method == "torch_bicubic" and (in_height * factor, in_width * factor) == (height, width):
        step = max(1, rows // factor)
        for y0 in range(0, in_height, step):
            y1 = min(in_height, y0 + step)
            top, bottom = max(0, y0 - CUBIC_REACH), min(in_height, y1 + CUBIC_REACH)
            band = torch_bicubic_resize(planes[None, :, top:bottom].float(), ((bottom - top) * factor, width))
            store.write(y0 * factor, 0, band[0, :, (y0 - top) * factor : (y1 - top) * factor])
        return
    if method == "pil_bicubic":
        resized = _pil_bicubic_planes(planes.detach().float().cpu().numpy(), (height, width))
    else:  # torch_bicubic to a size that is no whole multiple (small inputs processed larger): a plane at a time
        resized = (torch_bicubic_resize(plane[None, None], (height, width))[0, 0].cpu().numpy() for plane in planes)
    for channel, plane in enumerate(resized):
        for y0 in range(0, height, rows):
            band = torch.from_numpy(_plane_values(plane[y0 : y0 + rows])).clamp(0, 1)
            store.write(y0, 0, band[None], first_channel=channel)


def _finish_on_disk(
    decoded: PlaneFile,
    reference: PlaneFile | torch.Tensor,
    alpha: PlaneFile | None,
    color_fix: str,
    gray: bool,
    out: torch.Tensor,
) -> None:
    """The colour fix of ``decoded`` toward ``reference`` (a plane file of the same size, or for AdaIN the input
    itself ``(1, 3, h, w)``), gray or ``alpha`` added, resized to ``out`` ``(H', W', C)`` when the processing size
    differs, and converted into ``out``, in bands of rows."""
    _, height, width = decoded.shape
    rows = max(1, BAND_PIXELS // width)
    spans = [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]
    if color_fix == "adain":
        content_stats = streamed_channel_mean_std(decoded.read(y0, y1)[None] for y0, y1 in spans)
        source_stats = (
            streamed_channel_mean_std(reference.read(y0, y1)[None] for y0, y1 in spans)
            if isinstance(reference, PlaneFile) else channel_mean_std(reference)
        )

    def fixed(y0: int, y1: int) -> torch.Tensor:
        if color_fix == "wavelet":
            top, bottom = max(0, y0 - WAVELET_HALO), min(height, y1 + WAVELET_HALO)
            band = apply_color_fix("wavelet", decoded.read(top, bottom)[None], reference.read(top, bottom)[None])
            return band[..., y0 - top : y1 - top, :]
        if color_fix == "adain":
            return adain_with_stats(decoded.read(y0, y1)[None], content_stats, source_stats)
        return apply_color_fix(color_fix, decoded.read(y0, y1)[None], None)

    def alpha_rows(y0: int, y1: int) -> torch.Tensor:
        return alpha.read(y0, y1)[None]

    out_size = tuple(out.shape[:2])
    bands = ((y0, fixed(y0, y1)) for y0, y1 in spans)
    if out_size != (height, width):  # a small image processed larger (min_process_side): resized whole
        whole = torch.cat([band for _, band in bands], dim=-2)
        bands = [(0, F.interpolate(whole, size=out_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1))]
        if alpha is not None:
            resized_alpha = F.interpolate(alpha_rows(0, height), size=out_size, mode="bicubic", align_corners=False,
                                          antialias=True).clamp(0, 1)
            alpha_rows = lambda y0, y1: resized_alpha[..., y0:y1, :]  # noqa: E731
    for y0, band in bands:
        y1 = y0 + band.shape[-2]
        if gray:
            band = band.mean(dim=1, keepdim=True)
        elif alpha is not None:
            band = torch.cat([band, alpha_rows(y0, y1)], dim=1)
        out[y0:y1] = as_output(band[0].movedim(0, -1), out.dtype).to(out.device)
