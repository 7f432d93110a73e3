"""ComfyUI entry point of the D3SR node pack.

ComfyUI imports this folder as a package. It must never raise here, whatever is missing:
the node mappings below are filled by `nodes/` once the node pack lands.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
