"""Stand-in for modules.upscaler with A1111 1.10's Upscaler.upscale loop."""

import os

from PIL import Image

from modules import shared


class Upscaler:
    name = None
    model_path = None
    model_name = None
    model_url = None
    enable = True
    filter = None
    model = None
    user_path = None
    scalers = []
    tile = True

    def __init__(self, create_dirs=False):
        self.scale = 1
        if self.model_path is None and self.name:
            self.model_path = os.path.join(shared.models_path, self.name)
        if self.model_path and create_dirs:
            os.makedirs(self.model_path, exist_ok=True)

    def upscale(self, img, scale, selected_model=None):
        self.scale = scale
        dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
        for _ in range(3):
            if img.width >= dest_w and img.height >= dest_h:
                break
            shape = (img.width, img.height)
            img = self.do_upscale(img, selected_model)
            if shape == (img.width, img.height):
                break
        if img.width != dest_w or img.height != dest_h:
            img = img.resize((int(dest_w), int(dest_h)), resample=Image.LANCZOS)
        return img

    def do_upscale(self, img, selected_model):
        return img

    def load_model(self, path):
        pass


class UpscalerData:
    name = None
    data_path = None
    scale = 4
    scaler = None
    model = None

    def __init__(self, name, path, upscaler=None, scale=4, model=None):
        self.name, self.data_path, self.local_data_path = name, path, path
        self.scaler, self.scale, self.model = upscaler, scale, model
