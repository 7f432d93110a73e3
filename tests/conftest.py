"""Shared fixtures; the model factories live in tiny_models.py so tests can import them."""

import os
from pathlib import Path

import pytest
import torch

from tiny_models import write_diffusers_base

DEVICE_VARIABLE = "D3SR_TEST_DEVICE"
# The suite's numbers must not depend on the CPU it runs on: `dtype="auto"` stays fp32 even on CPUs with native bf16
# (inherited by the real ComfyUI and webui processes the suite starts); tests/test_cpu_dtype.py covers the bf16 choice.
os.environ.setdefault("D3SR_CPU_BF16", "0")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"device: the test takes the `device` fixture, so it runs where {DEVICE_VARIABLE} says (set on every such test "
        "by conftest.py; `-m device` selects them, as benchmarks/gpu_check.sh --dry-run does)",
    )


def pytest_collection_modifyitems(config, items):
    # Marked from the fixture itself, so a test that takes `device` cannot be left out of `-m device` by a
    # forgotten decorator.
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-agnostic tests run: ``D3SR_TEST_DEVICE`` (benchmarks/gpu_check.sh sets ``cuda``), else the CPU.

    A device that is asked for but absent fails the tests that take it rather than quietly running them on the CPU:
    a GPU check that ran nothing on the GPU must not pass."""
    name = os.environ.get(DEVICE_VARIABLE, "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        pytest.fail(f"{DEVICE_VARIABLE}={name!r} is not a torch device; expected e.g. cpu, cuda or cuda:1.")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_VARIABLE}={name!r} but torch sees no CUDA device.")
    if chosen.type not in ("cpu", "cuda"):
        pytest.fail(f"{DEVICE_VARIABLE}={name!r}: the suite runs on cpu or cuda only.")
    return chosen


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return write_diffusers_base(tmp_path_factory.mktemp("tiny_base"))
