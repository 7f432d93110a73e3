"""Stand-in for reForge main's modules.modelloader.load_upscalers: the list is built from a fixed set of the
webui's own classes (Panchovix/stable-diffusion-webui-reForge, modules/modelloader.py), not from every Upscaler
subclass as A1111 1.10 and Forge build it, so an extension's upscaler is not in it unless the extension adds it."""

from modules import shared


def load_upscalers():
    shared.sd_upscalers = []  # reForge: None, Lanczos, Nearest, then its fixed classes; none of them is ours
