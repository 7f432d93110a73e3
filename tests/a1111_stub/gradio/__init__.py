"""Stand-in gradio: components record their arguments; layouts are context managers."""


class Component:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Dropdown(Component): ...
class Slider(Component): ...
class Number(Component): ...
class Checkbox(Component): ...
class Textbox(Component): ...
class Row(Component): ...
class Column(Component): ...


def update(**kwargs):
    return kwargs
