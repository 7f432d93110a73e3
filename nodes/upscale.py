"""Upscale an IMAGE batch with a loaded one-step SR model: tiles, progress, interrupt, out-of-memory back-off."""

import torch
from comfy import model_management
from comfy.utils import ProgressBar
from comfy_api.latest import io

from d3sr_core.color import COLOR_FIXES
from d3sr_core.options import VAE_SAMPLE_MODES, vae_tile_sizes
from d3sr_core.pipeline import Upscaler

from .loader import D3SR_MODEL

METHOD_DEFAULT = "method default"


def dtype_name(precision: str, device: torch.device) -> str:
    """``auto`` follows ComfyUI's own choice for the device."""
    if precision != "auto" or device.type == "cpu":
        return "fp32" if precision == "auto" else precision
    if model_management.should_use_bf16(device):
        return "bf16"
    return "fp16" if model_management.should_use_fp16(device) else "fp32"


class Upscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D3SRUpscale",
            display_name="Upscale Image (One-Step Diffusion SR)",
            category="image/upscaling",
            description="Super-resolves images in one diffusion step, tile by tile; any image size fits in memory.",
            inputs=[
                D3SR_MODEL.Input("d3sr_model", tooltip="From Load One-Step SR Model."),
                io.Image.Input("image", tooltip="Images to upscale; alpha passes through, upscaled."),
                io.Int.Input("scale", default=4, min=1, max=8, tooltip="Output size = scale x input size, exactly."),
                io.Int.Input(
                    "tile_size", default=0, min=0, max=1024, step=8,
                    tooltip="Latent tile size (1 latent pixel = 8 image pixels). 0: the method's default (96 OSEDiff, 64 TSD-SR). "
                    "Halved automatically when the GPU runs out of memory.",
                ),
                io.Int.Input(
                    "tile_overlap", default=-1, min=-1, max=512,
                    tooltip="Overlap of latent tiles, blended with a Gaussian window. -1: the method's default (32 OSEDiff, 8 TSD-SR).",
                ),
                io.Int.Input(
                    "vae_tile_size", default=0, min=0, max=8192, step=64,
                    tooltip="VAE tile size in image pixels (GroupNorm statistics are shared, so no colour steps). 0: the method's default.",
                ),
                io.Combo.Input(
                    "color_fix", options=[METHOD_DEFAULT, *COLOR_FIXES], default=METHOD_DEFAULT,
                    tooltip="Colour correction toward the input: wavelet (low frequencies of the input), adain (channel mean "
                    "and spread), none. The method's default: adain for OSEDiff, wavelet for TSD-SR.",
                ),
                io.Combo.Input(
                    "vae_sample", options=list(VAE_SAMPLE_MODES), default="mode",
                    tooltip="mode: deterministic. sample: draw the VAE posterior like the official scripts, seeded by seed.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                    tooltip="Seed for vae_sample = sample (mode ignores it).",
                ),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, d3sr_model, image, scale, tile_size, tile_overlap, vae_tile_size, color_fix, vae_sample, seed) -> io.NodeOutput:
        options = d3sr_model.defaults.updated(
            scale=scale,
            tile_size=tile_size or None,
            tile_overlap=None if tile_overlap < 0 else tile_overlap,
            **vae_tile_sizes(vae_tile_size or None, d3sr_model.generator.vae_scale_factor),
            color_fix=None if color_fix == METHOD_DEFAULT else color_fix,
            vae_sample=vae_sample,
            seed=seed,
        )
        device = model_management.get_torch_device()
        generator = d3sr_model.generator
        if device.type != "cpu":  # make room: the graph's own SD model may still sit on the GPU
            needed = model_management.module_size(generator.denoiser) + model_management.module_size(generator.vae)
            model_management.free_memory(needed + model_management.minimum_inference_memory(), device)
        images = image.movedim(-1, 1)
        batch, channels, height, width = images.shape
        out = None
        try:
            upscaler = Upscaler(generator, device=device, dtype=dtype_name(d3sr_model.precision, device))
            pbar = ProgressBar(batch * upscaler.count_steps(height, width, options))
            for index in range(batch):
                result = cls._upscale_one(upscaler, images[index : index + 1], options, pbar)
                if out is None:  # one output tensor, filled frame by frame: no second copy for long batches
                    out = torch.empty(batch, *result.shape[2:], result.shape[1], device=model_management.intermediate_device())
                out[index] = result[0].movedim(0, -1).clamp(0, 1).to(out)
        finally:
            generator.to(model_management.unet_offload_device())
            model_management.soft_empty_cache()
        return io.NodeOutput(out)

    @staticmethod
    def _upscale_one(upscaler, image, options, pbar):
        start = pbar.current

        def progress(done, total):
            model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(start + done)

        return upscaler.upscale_within_memory(image, options, progress, model_management.soft_empty_cache).cpu()
