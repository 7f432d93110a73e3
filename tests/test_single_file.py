"""A base written as one file in the original SD key layout gives the same output as the same weights as a diffusers folder."""

import pytest
import torch

from d3sr_core.backbones import load_base
from d3sr_core.backbones.sd2 import SHIPPED_CONFIG_DIR
from d3sr_core.checkpoints import build_generator, convert_checkpoint, load_checkpoint
from d3sr_core.files import ModelFileError
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler
from tiny_models import (
    TINY_UNET, TINY_VAE, random_image, tiny_text_encoder, tiny_unet, tiny_vae, write_base_config_dir, write_osediff_pkl,
    write_single_file,
)

OPTIONS = UpscaleOptions(scale=1, min_process_side=0, tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0,
                         color_fix="none")


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    return write_base_config_dir(tmp_path_factory.mktemp("tiny_config"), SHIPPED_CONFIG_DIR, unet=tiny_unet(), vae=tiny_vae())


@pytest.fixture(scope="module")
def model_with_prompt(tmp_path_factory, tiny_base_dir):
    """The OSEDiff test checkpoint with its empty-prompt embedding stored (single files carry no tokenizer)."""
    folder = tmp_path_factory.mktemp("ckpt")
    write_osediff_pkl(folder / "osediff.pkl")
    embeds = load_base(tiny_base_dir).encode_prompt("")["prompt_embeds"]
    return convert_checkpoint(folder / "osediff.pkl", folder / "osediff.safetensors", prompt_embeds=embeds)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_equals_diffusers_folder(tmp_path, tiny_base_dir, tiny_config_dir, model_with_prompt, suffix):
    single = tmp_path / f"base{suffix}"
    write_single_file(single, tiny_unet(), tiny_vae())
    image = random_image(48, 64)
    outputs = []
    for base in (load_base(tiny_base_dir), load_base(single, tiny_config_dir)):
        generator = build_generator(load_checkpoint(model_with_prompt), base)
        outputs.append(Upscaler(generator, dtype="fp32").upscale(image, OPTIONS))
    assert torch.equal(outputs[0], outputs[1])


def test_single_file_with_wrong_config_says_which_weight(tmp_path, tiny_base_dir):
    single = tmp_path / "base.safetensors"
    write_single_file(single, tiny_unet(), tiny_vae())
    with pytest.raises(ModelFileError, match=r"base\.safetensors .*(missing|shape)"):
        load_base(single)  # the shipped SD 2.1-base configs do not fit the tiny weights


def test_sd1_single_file_is_refused(tmp_path, tiny_config_dir):
    unet = type(tiny_unet())(**{**TINY_UNET, "cross_attention_dim": 768})
    single = tmp_path / "sd15.safetensors"
    write_single_file(single, unet, tiny_vae())
    with pytest.raises(ModelFileError, match=r"is an SD 1\.x model"):
        load_base(single, tiny_config_dir)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.safetensors"
    from safetensors.torch import save_file

    save_file({"hello": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="no UNet and VAE in the original key layout"):
        load_base(path)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_base(tmp_path / "nowhere")
