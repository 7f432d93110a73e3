"""Stand-in for comfy_api.latest.io: schemas are plain records, inputs keep their arguments."""

from dataclasses import dataclass, field


class ComfyNode:
    pass


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    search_aliases: list = field(default_factory=list)  # newer ComfyUI (0.3.75 has none): nodes/schema.py adapts


class NodeOutput:
    def __init__(self, *args):
        self.args = args


class Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **widget):
        self.id, self.display_name, self.optional, self.tooltip, self.widget = id, display_name, optional, tooltip, widget


class Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _type(name):
    return type(name, (), {"io_type": name, "Input": type("Input", (Input,), {}), "Output": type("Output", (Output,), {})})


class Combo(_type("COMBO")):
    class Input(Input):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None, **kw):
            super().__init__(id, display_name, optional, tooltip, lazy, default=default, **kw)
            self.options = options


Int = _type("INT")
Image = _type("IMAGE")
Model = _type("MODEL")
Vae = _type("VAE")


def Custom(io_type):
    return _type(io_type)
