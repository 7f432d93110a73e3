"""ComfyUI entry point of the D3SR node pack.

ComfyUI imports this folder as a package. Nothing here may raise: if the pack's dependencies are missing, a
single node appears instead whose description says what to install.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)  # d3sr_core lives in this folder; a pip-installed d3sr_core comes first

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _error:
    _missing = getattr(_error, "name", None) or str(_error)
    if _missing.split(".")[0] in ("comfy_api", "comfy", "folder_paths"):
        _advice = f"The D3SR nodes need a newer ComfyUI (one with comfy_api.latest, 0.3.50 or later; {_missing!r} is missing): update ComfyUI."
    else:
        _advice = (
            f"The D3SR nodes could not load because the Python package {_missing!r} is missing. Install the pack's "
            f"requirements into ComfyUI's Python: python -m pip install -r {os.path.join(_here, 'requirements.txt')}"
        )

    class D3SRMissingDependencies:
        """Shown instead of the D3SR nodes when their dependencies are missing."""

        DESCRIPTION = _advice
        CATEGORY = "image/upscaling"
        RETURN_TYPES = ()
        FUNCTION = "explain"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def explain(self):
            raise RuntimeError(_advice)

    print(f"[d3sr] {_advice}", file=sys.stderr)
    NODE_CLASS_MAPPINGS = {"D3SRMissingDependencies": D3SRMissingDependencies}
    NODE_DISPLAY_NAME_MAPPINGS = {"D3SRMissingDependencies": "D3SR: missing dependencies (see description)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
