"""Stand-in for modules.shared: options, command-line options, job state, models folder."""

import os
from types import SimpleNamespace

models_path = os.environ.get("D3SR_TEST_MODELS_DIR", "/nonexistent/models")
cmd_opts = SimpleNamespace(no_half=False, d3sr_models_path=None, ckpt_dir=None)
class State:
    """The job state; begin() starts a job and clears the interrupt and skip flags, as the webui's does."""

    def __init__(self):
        self.interrupted = self.skipped = False
        self.sampling_steps = self.sampling_step = 0
        self.job_count, self.job_no = 0, 0
        self.job = ""
        self.jobs = []

    def begin(self, job="(unknown)"):
        self.interrupted = self.skipped = False
        self.sampling_steps = self.sampling_step = 0
        self.job_count, self.job_no = -1, 0  # as A1111 1.10's State.begin
        self.job = job
        self.jobs.append(job)

    def progress(self):
        """What A1111 1.10's /sdapi/v1/progress reports (modules/api/api.py, progressapi)."""
        progress = 0.01
        if self.job_count > 0:
            progress += self.job_no / self.job_count
        if self.sampling_steps > 0 and self.job_count != 0:
            progress += 1 / self.job_count * self.sampling_step / self.sampling_steps
        return min(progress, 1)

    def end(self):
        self.job = ""


state = State()


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, refresh=None):
        self.default, self.label, self.component, self.component_args, self.section = default, label, component, component_args, section
        self.comment = None

    def info(self, comment):
        self.comment = comment
        return self


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()


sd_upscalers = []
"""The webui's upscaler list, as modules.modelloader.load_upscalers fills it."""
