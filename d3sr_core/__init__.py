"""d3sr_core: one-step diffusion super-resolution, host-free (torch, diffusers, peft, safetensors)."""

__version__ = "0.1.0"
