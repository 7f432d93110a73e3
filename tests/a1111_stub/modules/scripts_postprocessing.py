class PostprocessedImage:
    def __init__(self, image):
        self.image = image
        self.info = {}
        self.extra_images = []


class ScriptPostprocessing:
    filename = None
    controls = None
    args_from = None
    args_to = None
    order = 1000
    name = None
    group = None

    def ui(self):
        pass

    def process(self, pp, **args):
        pass
