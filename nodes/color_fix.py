"""Colour-fix any image toward a reference image (wavelet, AdaIN or none)."""

import torch
from comfy_api.latest import io

from d3sr_core.color import COLOR_FIXES, color_fix_to_reference

from .schema import SEARCH_ALIASES, schema


class ColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="D3SRColorFix",
            display_name="Color Fix (Wavelet / AdaIN)",
            category="image/postprocessing",
            description="Takes the colours of a reference image (e.g. the low-resolution input) into an image (e.g. an "
            "upscaled result) while keeping the image's detail: wavelet keeps its high frequencies and takes the "
            "reference's low ones, adain matches each channel's mean and spread. Alpha passes through.",
            search_aliases=[*SEARCH_ALIASES, "color correction", "colour fix", "color match", "wavelet", "adain"],
            inputs=[
                io.Image.Input("image", tooltip="The image to correct, e.g. an upscaled result."),
                io.Image.Input("reference", tooltip="Whose colours to take, e.g. the low-resolution input; resized to image."),
                io.Combo.Input(
                    "method", options=list(COLOR_FIXES), default="wavelet",
                    tooltip="wavelet: keep image's detail, take reference's low frequencies. adain: match channel mean and spread.",
                ),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, reference, method) -> io.NodeOutput:
        fixed = color_fix_to_reference(method, image[..., :3].movedim(-1, 1), reference[..., :3].movedim(-1, 1))
        return io.NodeOutput(torch.cat([fixed.movedim(1, -1), image[..., 3:]], dim=-1))
