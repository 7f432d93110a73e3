"""A ResShift checkpoint in the official layout (tiny, written here) through the command line and the ComfyUI nodes:
the official ``.pth`` with its VQ file and YAML, and the one file ``d3sr convert`` makes of them, give the same
pixels as the core."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bounds import IMAGE_REORDER
from d3sr_cli.main import main as d3sr
from d3sr_core.loading import load_model
from d3sr_core.pipeline import Upscaler
from test_comfyui_nodes import inputs_of, pack  # noqa: F401  (the pack fixture, over this module's models)
from tiny_models import random_image
from tiny_resshift import write_official_files


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    files = write_official_files(root / "official")
    (root / "d3sr").mkdir()
    (root / "checkpoints").mkdir()
    assert d3sr(["convert", str(files["unet"]), "--base", str(files["vq"]), "--base-config", str(files["config"]),
                 "-o", str(root / "d3sr" / "resshift.safetensors")]) == 0
    shutil.copy(files["unet"], root / "d3sr" / "resshift_official.pth")
    shutil.copy(files["vq"], root / "checkpoints" / "autoencoder_vq_f4.pth")
    return root


def photo(path, height=20, width=24, seed=0):
    pixels = (random_image(height, width, seed=seed)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_cli_upscales_the_official_files_and_the_converted_one_alike(models, tmp_path, capsys):
    official = models / "official"
    args = ["--base", str(official / "autoencoder_vq_f4.pth"), "--base-config", str(official / "tiny.yaml")]
    image = photo(tmp_path / "in.png")
    assert d3sr(["upscale", str(image), "-o", str(tmp_path / "a"), "--model", str(official / "unet.pth"), *args,
                 "--steps", "4"]) == 0
    assert d3sr(["upscale", str(image), "-o", str(tmp_path / "b"), "--model", str(models / "d3sr" / "resshift.safetensors"),
                 "--steps", "4"]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "in.png"))
    assert a.shape == (80, 96, 3)
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "in.png")))
    # the core, with the official defaults (seed 12345, no colour fix)
    loaded = load_model(official / "unet.pth", official / "autoencoder_vq_f4.pth", base_config=official / "tiny.yaml")
    pixels = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None].float() / 255
    expected = Upscaler(loaded.generator, dtype="fp32").upscale(pixels, loaded.defaults.updated(steps=4))
    # the PNG holds 8-bit levels: half a level of rounding, plus the suite's summation-order bound
    assert np.abs(a / 255 - expected[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + IMAGE_REORDER
    # another seed, one step and chopping each change the result
    for extra in (["--seed", "1"], ["--steps", "1"], ["--chop-size", "64", "--steps", "4"]):
        out = tmp_path / "_".join(extra)
        assert d3sr(["upscale", str(photo(tmp_path / "big.png", 80, 72)) if "--chop-size" in extra else str(image), "-o",
                     str(out), "--model", str(models / "d3sr" / "resshift.safetensors"), *extra]) == 0
        if "--chop-size" not in extra:
            assert np.abs(np.asarray(Image.open(out / "in.png")).astype(int) - a).max() > 2
    assert np.asarray(Image.open(tmp_path / "--chop-size_64_--steps_4" / "big.png")).shape == (320, 288, 3)
    capsys.readouterr()
    assert d3sr(["info", str(official / "unet.pth")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["base_family"], info["prediction_type"], info["file_format"]) == (
        "resshift", "resshift", "x_start", "ResShift / TAD-SR .pth")


def test_cli_names_what_is_missing_in_one_line(models, tmp_path, capsys):
    official = models / "official"
    image = photo(tmp_path / "in.png")
    assert d3sr(["upscale", str(image), "-o", str(tmp_path / "x"), "--model", str(official / "unet.pth")]) == 2
    assert d3sr(["convert", str(official / "unet.pth"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert d3sr(["upscale", str(image), "-o", str(tmp_path / "y"), "--model", str(models / "d3sr" / "resshift.safetensors"),
                 "--steps", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("d3sr: error")]
    assert len(errors) == 3
    assert "base model" in errors[0] and "--base autoencoder_vq_f4.pth" in errors[1] and "steps=0" in errors[2]
    assert not (tmp_path / "x.safetensors").exists()


def test_comfyui_loader_and_upscale_node_run_the_converted_model(pack, models):  # noqa: F811
    nodes = pack.NODE_CLASS_MAPPINGS
    loader = nodes["D3SRModelLoader"]
    assert "resshift.safetensors" in inputs_of(loader)["model_name"].options
    loaded = loader.execute("resshift.safetensors", inputs_of(loader)["base_name"].options[0], "fp32").args[0]
    image = random_image(20, 24, seed=2).movedim(1, -1)
    values = dict(scale=4, tile_size=-1, tile_overlap=-1, vae_tile_size=-1, color_fix="method default",
                  vae_sample="mode", seed=12345)
    out = nodes["D3SRUpscale"].execute(loaded, image, **values).args[0]
    assert out.shape == (1, 80, 96, 3)
    core = load_model(models / "d3sr" / "resshift.safetensors")
    expected = Upscaler(core.generator, dtype="fp32").upscale(image.movedim(-1, 1), core.defaults)
    assert torch.equal(out, expected.movedim(1, -1))


def test_comfyui_loader_takes_an_official_pth_with_the_vq_file_as_its_base(pack):  # noqa: F811
    """The official layout in models/d3sr and models/checkpoints reaches the ResShift loader, which reads the VQ file
    with the shipped realsr v1 config; the tiny files do not fit that full-size config, and it says so."""
    from d3sr_core.files import ModelFileError

    loader = pack.NODE_CLASS_MAPPINGS["D3SRModelLoader"]
    assert "resshift_official.pth" in inputs_of(loader)["model_name"].options
    assert "autoencoder_vq_f4.pth" in inputs_of(loader)["base_name"].options
    with pytest.raises(ModelFileError, match="autoencoder_vq_f4.pth does not hold the weights of the VQ autoencoder config"):
        loader.execute("resshift_official.pth", "autoencoder_vq_f4.pth", "fp32")
