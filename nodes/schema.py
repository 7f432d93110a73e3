"""``io.Schema`` across ComfyUI versions: fields that an older ``comfy_api`` does not know (``search_aliases``
arrived after 0.3.75) are left out there instead of failing the pack's import."""

import dataclasses

from comfy_api.latest import io

SEARCH_ALIASES = ["super resolution", "super-resolution", "upscale", "one-step diffusion", "osediff", "tsd-sr", "tsdsr",
                  "d3sr", "tad-sr", "sr"]
"""Words a user types in the node search that should find every D3SR node."""


def schema(**fields) -> io.Schema:
    known = {f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else set(fields)
    return io.Schema(**{name: value for name, value in fields.items() if name in known})
