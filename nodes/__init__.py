"""ComfyUI nodes: thin adapters over ``d3sr_core`` (declared inputs, layout conversion, one core call)."""
