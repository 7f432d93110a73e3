"""A ResShift model (the one file ``d3sr convert`` makes of the official layout) in the A1111 / Forge upscaler list,
upscaling as the command line does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from d3sr_cli.main import main as d3sr
from test_a1111_extension import ext, photo  # noqa: F401  (the ext fixture, over this module's models)
from tiny_resshift import write_official_files


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_models")
    files = write_official_files(root / "official")
    (root / "D3SR").mkdir()
    assert d3sr(["convert", str(files["unet"]), "--base", str(files["vq"]), "--base-config", str(files["config"]),
                 "-o", str(root / "D3SR" / "resshift.safetensors")]) == 0
    return root


def test_the_upscaler_lists_the_resshift_model_and_equals_the_command_line(ext, models, tmp_path):  # noqa: F811
    upscaler = ext.UpscalerD3SR(None)
    scaler = next(s for s in upscaler.scalers if s.name == "D3SR resshift")
    assert scaler.scale == 4
    image = photo(20, 24)
    image.save(tmp_path / "in.png")
    result = upscaler.do_upscale(image, scaler.data_path)
    assert result.size == (96, 80)
    # the webui passes seed 0 (its own default) and the model's other defaults
    assert d3sr(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "cli"), "--model", scaler.data_path,
                 "--seed", "0"]) == 0
    assert np.array_equal(np.asarray(result), np.asarray(Image.open(tmp_path / "cli" / "in.png")))
