"""ComfyUI nodes: thin adapters over ``d3sr_core`` (declared inputs, layout conversion, one core call).

Nodes use the V3 schema API and are listed in ``NODE_CLASS_MAPPINGS`` too: a module that exports the mappings is
loaded through them, and V3 classes work there on every ComfyUI that has ``comfy_api``.
"""

from .color_fix import ColorFix
from .loader import ModelLoader
from .model_folder import place_sample, register_model_folder
from .upscale import Upscale

register_model_folder()
place_sample()

NODES = (ModelLoader, Upscale, ColorFix)
NODE_CLASS_MAPPINGS = {node.define_schema().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.define_schema().node_id: node.define_schema().display_name for node in NODES}
