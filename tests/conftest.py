"""Shared fixtures; the model factories live in tiny_models.py so tests can import them."""

from pathlib import Path

import pytest

from tiny_models import write_diffusers_base


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return write_diffusers_base(tmp_path_factory.mktemp("tiny_base"))
