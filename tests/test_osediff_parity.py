"""OSEDiff parity: our loader and pipeline against a reference forward written here from methods.md 1.1.

The reference does not use peft or d3sr_core: it folds each LoRA into its weight by hand
(``W + alpha/r * B A`` with alpha = 8, peft's default that OSEDiff keeps), replaces conv_in, and runs
encode (posterior mode) -> eps = UNet(z_L, 999, empty-prompt embedding) ->
``x0 = (z_L - sqrt(1 - alpha_bar_999) eps) / sqrt(alpha_bar_999)`` -> decode(x0 / 0.18215).clamp(-1, 1),
with alpha_bar from the SD 2.1 scaled-linear betas computed in float64.
"""

import math

import pytest
import torch
from bounds import IMAGE_REORDER, MATTERS, max_difference

from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import build_generator, convert_checkpoint, load_checkpoint
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler
from tiny_models import random_image, tiny_text_encoder, tiny_unet, tiny_vae, write_osediff_pkl

LORA_ALPHA = 8.0


def fold_lora(model: torch.nn.Module, state: dict, adapters: dict[str, list[str]], rank: int) -> None:
    """``W += (alpha / r) * B A`` for every target of every adapter (conv: B is 1x1, A has the kernel)."""
    scale = LORA_ALPHA / rank
    with torch.no_grad():
        for adapter, targets in adapters.items():
            for name in dict.fromkeys(targets):
                A = state[f"{name}.lora_A.{adapter}.weight"]
                B = state[f"{name}.lora_B.{adapter}.weight"]
                if A.ndim == 2:
                    delta = B @ A
                else:
                    delta = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
                model.get_submodule(name).weight += scale * delta


def reference_forward(saved: dict, lq: torch.Tensor) -> torch.Tensor:
    """OSEDiff's one step, written from the formulas; ``lq`` is (1, 3, H, W) in [-1, 1]."""
    unet, vae, text = tiny_unet(), tiny_vae(), tiny_text_encoder()
    with torch.no_grad():
        unet.conv_in.weight.copy_(saved["state_dict_unet"]["conv_in.base_layer.weight"])
        unet.conv_in.bias.copy_(saved["state_dict_unet"]["conv_in.base_layer.bias"])
    fold_lora(
        unet,
        saved["state_dict_unet"],
        {
            "default_encoder": saved["unet_lora_encoder_modules"],
            "default_decoder": saved["unet_lora_decoder_modules"],
            "default_others": saved["unet_lora_others_modules"],
        },
        saved["rank_unet"],
    )
    fold_lora(vae, saved["state_dict_vae"], {"default_encoder": saved["vae_lora_encoder_modules"]}, saved["rank_vae"])
    # SD 2.x tokenizer on "": <start>, <end>, then "!" (id 0) padding to 77.
    ids = torch.tensor([[49406, 49407] + [0] * 75])
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[999].item()
    with torch.no_grad():
        prompt_embeds = text(ids)[0]
        z = vae.encode(lq).latent_dist.mode() * 0.18215
        eps = unet(z, 999, encoder_hidden_states=prompt_embeds).sample
        x0 = (z - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        return vae.decode(x0 / 0.18215).sample.clamp(-1, 1)


EXACT = UpscaleOptions(scale=1, min_process_side=0, tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0,
                       color_fix="none")


@pytest.fixture(scope="module")
def osediff_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp("osediff") / "osediff.pkl"
    return path, write_osediff_pkl(path)


def run_ours(model_path, base_dir, image, merge_lora):
    generator = build_generator(load_checkpoint(model_path), load_base(base_dir), merge_lora=merge_lora)
    return Upscaler(generator, dtype="fp32").upscale(image, EXACT)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_pkl_matches_reference(osediff_pkl, tiny_base_dir, merge_lora):
    path, saved = osediff_pkl
    image = random_image(64, 96)
    expected = (reference_forward(saved, image * 2 - 1) + 1) / 2
    ours = run_ours(path, tiny_base_dir, image, merge_lora)
    assert ours.shape == expected.shape
    # Merged (the default) folds LoRA into the weights as the reference does; unmerged adds B(Ax) after the base
    # matmul. Both equal the reference in exact arithmetic and differ only in summation order, which the CPU's
    # kernels choose (measured: 1.1e-5 merged on an AVX-512 CPU, where x0 = z / 0.068 amplifies rounding 15 times).
    assert max_difference(ours, expected) <= IMAGE_REORDER
    # The LoRA must matter, or the comparison above proves nothing about loading it.
    plain = Upscaler(build_generator_without_lora(tiny_base_dir), dtype="fp32").upscale(image, EXACT)
    assert max_difference(plain, expected) > MATTERS


def build_generator_without_lora(base_dir):
    from d3sr_core.checkpoints import OneStepCheckpoint

    empty = OneStepCheckpoint("none", "sd2", "epsilon", 999, [], {})
    return build_generator(empty, load_base(base_dir))


def test_converted_safetensors_gives_identical_output(osediff_pkl, tiny_base_dir, tmp_path):
    path, _ = osediff_pkl
    converted = convert_checkpoint(path, tmp_path / "osediff.safetensors")
    image = random_image(64, 96, seed=3)
    from_pkl = run_ours(path, tiny_base_dir, image, merge_lora=True)
    from_ours = run_ours(converted, tiny_base_dir, image, merge_lora=True)
    assert torch.equal(from_pkl, from_ours)
    meta = load_checkpoint(converted)
    assert meta.method == "osediff" and meta.timestep == 999 and meta.base_family == "sd2"
    assert [(a.name, a.component, a.rank, a.alpha) for a in meta.adapters] == [
        ("default_encoder", "unet", 4, 8.0),
        ("default_decoder", "unet", 4, 8.0),
        ("default_others", "unet", 4, 8.0),
        ("default_encoder", "vae", 4, 8.0),
    ]


def test_peek_reads_family_and_scale_without_tensors(osediff_pkl, tmp_path):
    from d3sr_core.checkpoints import peek, save_checkpoint

    path, _ = osediff_pkl
    assert peek(path) == ("sd2", 4)
    checkpoint = load_checkpoint(path)
    checkpoint.defaults = checkpoint.defaults.updated(scale=2)
    saved = save_checkpoint(checkpoint, tmp_path / "x2.safetensors")
    assert peek(saved) == ("sd2", 2)
    assert load_checkpoint(saved).defaults.scale == 2
