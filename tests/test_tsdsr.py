"""TSD-SR on an SD3 base: parity with a reference forward written from methods.md 2.1, conversion, bad folders.

The reference folds each LoRA into its weight by hand (``W + (alpha / r) B A`` with alpha = r), then:
``z = VAE.encode(x).mode * 1.5305`` (no shift factor, as the official code) ->
``v = transformer(z, t = 1000, prompt_embeds, pooled)`` -> ``x0 = z - v`` -> ``VAE.decode(x0 / 1.5305)``.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d3sr_cli.main import main
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import build_generator, convert_checkpoint, load_checkpoint
from d3sr_core.files import ModelFileError
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler
from bounds import IMAGE_REORDER, max_difference
from tiny_models import random_image, tiny_sd3_transformer, tiny_sd3_vae, write_sd3_base, write_tsdsr_dir

EXACT = UpscaleOptions(scale=1, min_process_side=0, tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0,
                       color_fix="none", upsample="torch_bicubic")


def fold_lora(model, state: dict, rank: int) -> None:
    with torch.no_grad():
        for key in state:
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("transformer.") : -len(".lora_A.weight")]
            A, B = state[key], state[key.replace("lora_A", "lora_B")]
            delta = B @ A if A.ndim == 2 else torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
            model.get_submodule(name).weight += (rank / rank) * delta


def reference_forward(saved: dict, image: torch.Tensor, rank: int = 4) -> torch.Tensor:
    transformer, vae = tiny_sd3_transformer(), tiny_sd3_vae()
    fold_lora(transformer, saved["transformer"], rank)
    fold_lora(vae, saved["vae"], rank)
    with torch.no_grad():
        z = vae.encode(image * 2 - 1).latent_dist.mode() * 1.5305
        v = transformer(
            hidden_states=z,
            timestep=torch.tensor([1000.0]),
            encoder_hidden_states=saved["prompt_embeds"],
            pooled_projections=saved["pooled_prompt_embeds"],
        ).sample
        return (vae.decode((z - v) / 1.5305).sample.clamp(-1, 1) + 1) / 2


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return write_sd3_base(tmp_path_factory.mktemp("sd3_base"))


@pytest.fixture(scope="module")
def tsdsr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tsdsr")
    return folder, write_tsdsr_dir(folder)


def ours(model, base_dir, image, **kwargs):
    generator = build_generator(load_checkpoint(model, **kwargs), load_base(base_dir))
    return Upscaler(generator, dtype="fp32").upscale(image, EXACT)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_tsdsr_folder_matches_reference(tsdsr, sd3_base, merge_lora):
    folder, saved = tsdsr
    image = random_image(64, 96)
    expected = reference_forward(saved, image)
    generator = build_generator(load_checkpoint(folder), load_base(sd3_base), merge_lora=merge_lora)
    result = Upscaler(generator, dtype="fp32").upscale(image, EXACT)
    assert max_difference(result, expected) <= IMAGE_REORDER, max_difference(result, expected)
    # The LoRA and the prompt must matter, or the comparison proves little.
    plain = reference_forward({**saved, "transformer": {}, "vae": {}}, image)
    assert (plain - expected).abs().max().item() > 1e-2


def test_converted_file_gives_identical_output_and_embeds_the_prompt(tsdsr, sd3_base, tmp_path):
    folder, saved = tsdsr
    converted = convert_checkpoint(folder, tmp_path / "tsdsr.safetensors")
    checkpoint = load_checkpoint(converted)
    assert checkpoint.method == "tsdsr" and checkpoint.prediction_type == "flow" and checkpoint.timestep == 1000
    assert torch.equal(checkpoint.conditioning["pooled_prompt_embeds"], saved["pooled_prompt_embeds"])
    assert checkpoint.defaults.upsample == "torch_bicubic" and checkpoint.defaults.color_fix == "wavelet"
    assert (checkpoint.defaults.tile_size, checkpoint.defaults.tile_overlap) == (64, 8)
    image = random_image(64, 64, seed=2)
    assert torch.equal(ours(folder, sd3_base, image), ours(converted, sd3_base, image))


def test_embeddings_without_batch_dimension_and_from_another_folder(tmp_path, tsdsr, sd3_base):
    folder, _ = tsdsr
    lora = tmp_path / "lora"
    embeddings = tmp_path / "default"
    saved = write_tsdsr_dir(lora, batch_dim=False)
    embeddings.mkdir()
    for name in ("prompt_embeds.pt", "pool_embeds.pt"):
        shutil.move(lora / name, embeddings / name)
    checkpoint = load_checkpoint(lora, embeddings_dir=embeddings)
    assert checkpoint.conditioning["prompt_embeds"].shape == saved["prompt_embeds"].shape
    with pytest.raises(ModelFileError, match="has no prompt_embeds.pt or pool_embeds.pt"):
        load_checkpoint(lora)


@pytest.mark.parametrize("form", ["folder", "converted"])
def test_cli_upscales_end_to_end(tsdsr, sd3_base, tmp_path, form):
    from PIL import Image

    folder, _ = tsdsr
    model = folder
    if form == "converted":
        model = tmp_path / "tsdsr.safetensors"
        assert main(["convert", str(folder), "-o", str(model)]) == 0
    Image.fromarray((random_image(20, 28)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "lr.png")
    args = ["upscale", str(tmp_path / "lr.png"), "-o", str(tmp_path / "out"), "--model", str(model), "--base", str(sd3_base)]
    assert main(args) == 0
    assert Image.open(tmp_path / "out" / "lr.png").size == (112, 80)


def broken_copy(folder, tmp_path, file, change):
    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    if file is not None:
        state = load_file(str(target / file))
        save_file(change(state), str(target / file))
    return target


def test_key_that_matches_no_module(tsdsr, sd3_base, tmp_path):
    folder, _ = tsdsr

    def add_stray(state):
        a = state["transformer.pos_embed.proj.lora_A.weight"]
        return {**state, "transformer.no_such.block.lora_A.weight": torch.zeros(a.shape[0], 4),
                "transformer.no_such.block.lora_B.weight": torch.zeros(4, a.shape[0])}

    broken = broken_copy(folder, tmp_path, "transformer.safetensors", add_stray)
    with pytest.raises(ModelFileError, match="'no_such.block.lora_A.default.weight', which the base model does not have"):
        build_generator(load_checkpoint(broken), load_base(sd3_base))


def test_rank_that_does_not_fit(tsdsr):
    from d3sr_core.checkpoints import read_tsdsr_dir

    folder, _ = tsdsr
    with pytest.raises(ModelFileError, match="holds rank-4 LoRA weights, but rank 64 was given"):
        read_tsdsr_dir(folder, rank=64)


def test_missing_vae_file(tsdsr, tmp_path):
    folder, _ = tsdsr
    broken = broken_copy(folder, tmp_path, None, None)
    (broken / "vae.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"vae\.safetensors does not exist; expected a TSD-SR LoRA folder"):
        load_checkpoint(broken)


def test_tsdsr_on_an_sd2_base_is_refused(tsdsr, tiny_base_dir):
    folder, _ = tsdsr
    with pytest.raises(ModelFileError, match="made for base family SD3, but .* is SD 2.x"):
        build_generator(load_checkpoint(folder), load_base(tiny_base_dir))


def test_one_transformer_in_half_precision_with_lora_merged(tsdsr, sd3_base):
    """SD3-medium is 2B parameters: the generator reuses the base's transformer (no copy), LoRA is folded in,
    and a bf16 run keeps the transformer and VAE in bf16."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    folder, _ = tsdsr
    base = load_base(sd3_base)
    transformer = base.denoiser
    upscaler = Upscaler(build_generator(load_checkpoint(folder), base), dtype="bf16")
    assert upscaler.generator.denoiser is transformer
    for module in (upscaler.generator.denoiser, upscaler.generator.vae):
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    out = upscaler.upscale(random_image(32, 32), EXACT)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("tile_size", [0, 9, 96])
def test_odd_latent_sizes_and_odd_tiles_fit_the_patch_grid(tsdsr, sd3_base, tile_size):
    """136 px gives 17 latent pixels, which the transformer's 2x2 patches cannot cover: the pipeline pads to a
    multiple of 16 pixels and rounds tiles down to whole patches, then crops back."""
    folder, _ = tsdsr
    upscaler = Upscaler(build_generator(load_checkpoint(folder), load_base(sd3_base)), dtype="fp32")
    options = load_checkpoint(folder).defaults.updated(min_process_side=0, tile_size=tile_size, tile_overlap=2)
    out = upscaler.upscale(random_image(34, 34), options if tile_size else options.updated(tile_size=0))
    assert out.shape == (1, 3, 136, 136)


def test_latents_beyond_the_transformer_positions_are_tiled(sd3_base, tsdsr):
    """SD3's learned positions end at pos_embed_max_size patches (32 x 2 = 64 latent pixels here): larger latents
    are tiled at that size even with tiling off, instead of failing inside the transformer."""
    generator = build_generator(load_checkpoint(tsdsr[0]), load_base(sd3_base))
    assert generator.max_latent_side == 64
    assert generator._latent_tiling(72, 40, None, 8) == ((64, 40), 8)
    assert generator._latent_tiling(72, 40, None, 8, "area") == ((64, 40), 8)  # 72 * 40 <= 64^2, yet beyond them
    assert generator._latent_tiling(40, 40, None, 8) is None
    latents = torch.randn(1, 16, 72, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = generator.denoise(latents, tile_size=0, tile_overlap=8)
    assert x0.shape == latents.shape and torch.isfinite(x0).all()
