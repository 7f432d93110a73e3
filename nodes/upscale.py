"""Upscale an IMAGE batch with a loaded one-step SR model: tiles, progress with an ETA, interrupt, memory kept
within what is free (VAE tiles parked on disk when RAM would not hold them), memory handed back after Cancel."""

import logging
import os

import torch
from comfy import model_management
from comfy.utils import ProgressBar
from comfy_api.latest import io
from tqdm import tqdm

from d3sr_core.borrowed import offload
from d3sr_core.color import COLOR_FIXES
from d3sr_core.host_options import DEFAULT, describe_defaults, host_options, with_tile_store
from d3sr_core.memory import released_after_run
from d3sr_core.options import VAE_SAMPLE_MODES
from d3sr_core.pipeline import Upscaler

from .loader import D3SR_MODEL
from .schema import SEARCH_ALIASES, schema

METHOD_DEFAULT = "method default"
log = logging.getLogger("d3sr")


def dtype_name(precision: str, device: torch.device) -> str:
    """``auto`` follows ComfyUI's own choice for the device."""
    if precision != "auto" or device.type == "cpu":
        return "fp32" if precision == "auto" else precision
    if model_management.should_use_bf16(device):
        return "bf16"
    return "fp16" if model_management.should_use_fp16(device) else "fp32"


LIMIT_VARIABLES = {"max_output_pixels": "D3SR_MAX_OUTPUT_PIXELS", "max_scale": "D3SR_MAX_SCALE"}
"""The server's size limits, raised by setting these in ComfyUI's environment (defaults: d3sr_core.options)."""


def server_limits() -> dict[str, int]:
    """``max_output_pixels`` / ``max_scale`` from the environment, where set; a value that is not a whole number is
    one sentence."""
    limits = {}
    for name, variable in LIMIT_VARIABLES.items():
        text = os.environ.get(variable, "").strip()
        if text:
            if not text.isdigit():
                raise ValueError(f"the environment variable {variable}={text!r} is not a whole number of at least 1.")
            limits[name] = int(text)
    return limits


class Upscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        tiles = "-1: the model's default ({}). 0: off (the whole image at once)."
        return schema(
            node_id="D3SRUpscale",
            display_name="Upscale Image (One-Step Diffusion SR)",
            category="image/upscaling",
            description="Super-resolves images in one diffusion step, tile by tile. Memory stays within what is free: "
            "when the in-memory path would take more than half the free memory, the VAE's tiles and every whole-image "
            "tensor wait on disk (same result, memory bounded by the tiles). The IMAGE output itself is float32: "
            "12 bytes a pixel, 576 MB for an 8000x6000 result.",
            search_aliases=SEARCH_ALIASES,
            inputs=[
                D3SR_MODEL.Input("d3sr_model", tooltip="From Load One-Step SR Model."),
                io.Image.Input("image", tooltip="Images to upscale; alpha passes through, upscaled."),
                io.Int.Input("scale", default=4, min=1, max=8, tooltip="Output size = scale x input size, exactly."),
                io.Int.Input(
                    "tile_size", default=DEFAULT, min=-1, max=1024,
                    tooltip="Latent tile size (1 latent pixel = 8 image pixels). " + tiles.format(describe_defaults("tile_size"))
                    + " Halved automatically when the GPU runs out of memory.",
                ),
                io.Int.Input(
                    "tile_overlap", default=DEFAULT, min=-1, max=512,
                    tooltip="Overlap of latent tiles, blended with a Gaussian window. -1: the model's default ("
                    + describe_defaults("tile_overlap") + "), at most a third of a tile_size you set.",
                ),
                io.Int.Input(
                    "vae_tile_size", default=DEFAULT, min=-1, max=8192,
                    tooltip="VAE tile size in image pixels, a multiple of 8 of at least 64 (GroupNorm statistics are shared, "
                    "so no colour steps). " + tiles.format(describe_defaults("vae_encoder_tile_size", " px")),
                ),
                io.Combo.Input(
                    "color_fix", options=[METHOD_DEFAULT, *COLOR_FIXES], default=METHOD_DEFAULT,
                    tooltip="Colour correction toward the input: wavelet (low frequencies of the input), adain (channel mean "
                    "and spread), none. The method's default: adain for OSEDiff, wavelet for TSD-SR and d3sr-small-x4.",
                ),
                io.Combo.Input(
                    "vae_sample", options=list(VAE_SAMPLE_MODES), default="mode",
                    tooltip="mode: deterministic. sample: draw the VAE posterior like the official scripts, seeded by seed.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=2**63 - 1, control_after_generate="fixed",
                    tooltip="Seed for vae_sample = sample (mode ignores it).",
                ),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, d3sr_model, image, scale, tile_size, tile_overlap, vae_tile_size, color_fix, vae_sample, seed) -> io.NodeOutput:
        generator = d3sr_model.generator
        options = host_options(
            d3sr_model.defaults, generator.vae_scale_factor, tile_size=tile_size, tile_overlap=tile_overlap, vae_tile_size=vae_tile_size,
            scale=scale, color_fix=None if color_fix == METHOD_DEFAULT else color_fix, vae_sample=vae_sample, seed=seed,
            **server_limits(),
        )
        device = model_management.get_torch_device()
        if device.type != "cpu" and d3sr_model.host_models:  # the graph's MODEL and VAE weights are the generator's
            model_management.load_models_gpu(list(d3sr_model.host_models))
        elif device.type != "cpu":  # make room: the graph's own SD model may still sit on the GPU
            needed = model_management.module_size(generator.denoiser) + model_management.module_size(generator.vae)
            model_management.free_memory(needed + model_management.minimum_inference_memory(), device)
        images = image.movedim(-1, 1)
        batch, channels, height, width = images.shape
        options = with_tile_store(options, generator.vae, height, width, model_management.get_free_memory(device))
        log.info("D3SR: latent tiles %s/%s, VAE tiles %s px, tile store %s", options.tile_size, options.tile_overlap,
                 options.vae_encoder_tile_size, options.vae_tile_store)
        out = None
        try:
            with released_after_run():
                upscaler = Upscaler(generator, device=device, dtype=dtype_name(d3sr_model.precision, device))
                total = batch * upscaler.count_steps(height, width, options)
                pbar = ProgressBar(total)
                # The IMAGE output itself, float32 (B, H, W, C): the core fills it frame by frame, band by band with
                # the disk store, so no other copy of the result is ever made.
                out = torch.empty(batch, height * options.scale, width * options.scale, channels,
                                  device=model_management.intermediate_device())
                with tqdm(total=total, desc="D3SR", unit="tile") as eta:  # the console shows the ETA
                    for index in range(batch):
                        cls._upscale_one(upscaler, images[index : index + 1], options, pbar, eta, out[index : index + 1])
        except BaseException:
            out = None  # a host that keeps the exception keeps this frame, but not the image buffer
            raise
        finally:
            for module in (generator.denoiser, generator.vae):  # what it borrows stays the host's, where the host keeps it
                offload(module, model_management.unet_offload_device())
            model_management.soft_empty_cache()
        return io.NodeOutput(out)

    @staticmethod
    def _upscale_one(upscaler, image, options, pbar, eta, out):
        start = pbar.current

        def progress(done, total):
            model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(start + done)
            eta.update(start + done - eta.n)

        upscaler.upscale_within_memory(image, options, progress, model_management.soft_empty_cache, out=out)
