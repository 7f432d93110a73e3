"""The ``d3sr`` command line: a host like ComfyUI and A1111, above both the core and the trainer."""
