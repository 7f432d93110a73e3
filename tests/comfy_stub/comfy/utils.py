"""Stand-in for comfy.utils.ProgressBar; every bar made is kept in BARS for the tests to read."""

BARS = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id, self.values = total, 0, node_id, []
        BARS.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        self.values.append(self.current)

    def update(self, value):
        self.update_absolute(self.current + value)
