"""SD3 bases as Stability's single files (sd3_medium.safetensors and its kind), and bases borrowed from a host.

The files are written here in Stability's key layout by a writer that is the inverse table of the key facts (from
Stability's reference files and diffusers' single-file tables), independent of the loader's own mapping. Each must
give the same image as the same weights saved as a diffusers folder, in the dtype they are stored in.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from d3sr_core.backbones import load_base
from d3sr_core.backbones.sd3 import SHIPPED_CONFIG_DIR, sd3_base_from_stability_state
from d3sr_core.borrowed import STORAGE_ONLY_DTYPES, weights_bound
from d3sr_core.checkpoints import build_generator, load_checkpoint
from d3sr_core.files import ModelFileError
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler
from tiny_models import random_image, tiny_sd3_transformer, tiny_sd3_vae, vae_key_to_ldm, write_base_config_dir, write_tsdsr_dir

OPTIONS = UpscaleOptions(scale=1, min_process_side=0, tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0,
                         color_fix="none")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}

# diffusers name -> Stability name, for the parts that are renamed one to one.
TO_STABILITY = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
# A few of the text encoder tensors an "incl_clips" file carries (they must not be read).
TEXT_ENCODER_KEYS = ("text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
                     "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight",
                     "text_encoders.t5xxl.transformer.shared.weight")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_stability(transformer) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel``'s weights under Stability's MMDiT names (without ``model.diffusion_model.``)."""
    state = transformer.state_dict()
    last = transformer.config.num_layers - 1
    out = {}
    for key, value in state.items():
        stem, _, kind = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif stem in TO_STABILITY:
            out[f"{TO_STABILITY[stem]}.{kind}"] = swap_halves(value) if stem == "norm_out.linear" else value
        else:
            m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", stem)
            part = m[2]
            if any(part in parts for parts in QKV.values()):
                continue  # written fused below
            swapped = part == "norm1_context.linear" and int(m[1]) == last  # the context stream ends in the last block
            out[f"joint_blocks.{m[1]}.{TO_STABILITY[part]}.{kind}"] = swap_halves(value) if swapped else value
    for i in range(transformer.config.num_layers):
        for fused, parts in QKV.items():
            for kind in ("weight", "bias"):
                out[f"joint_blocks.{i}.{fused}.{kind}"] = torch.cat([state[f"transformer_blocks.{i}.{p}.{kind}"] for p in parts])
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        ldm = vae_key_to_ldm(key, blocks)
        out[ldm] = value[:, :, None, None] if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2 else value
    return out


def tiny_models_in(dtype: torch.dtype):
    """The tiny SD3 transformer and VAE with weights rounded to ``dtype`` (kept in that dtype)."""
    return tiny_sd3_transformer().to(dtype), tiny_sd3_vae().to(dtype)


def write_stability_file(path, transformer, vae, *, text_encoders: bool = False, prefixed_vae: bool = True):
    state = {"model.diffusion_model." + k: v for k, v in transformer_to_stability(transformer).items()}
    if prefixed_vae:
        state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae).items()})
    if text_encoders:
        state.update({k: torch.zeros(11, 8, dtype=torch.float16) for k in TEXT_ENCODER_KEYS})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_sd3_config_dir(tmp_path_factory):
    return write_base_config_dir(tmp_path_factory.mktemp("sd3_config"), SHIPPED_CONFIG_DIR, transformer=tiny_sd3_transformer(),
                                 vae=tiny_sd3_vae())


@pytest.fixture(scope="module")
def tsdsr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tsdsr") / "tsdsr"
    write_tsdsr_dir(folder)
    return folder


def upscale(base, model, dtype="fp32", merge_lora=True, image=None):
    generator = build_generator(load_checkpoint(model), base, merge_lora=merge_lora)
    return Upscaler(generator, dtype=dtype).upscale(random_image(32, 48) if image is None else image, OPTIONS)


def diffusers_folder(folder, transformer, vae):
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    return folder


@pytest.mark.parametrize("stored", ["fp32", "fp16", "bf16", "fp8"])
@pytest.mark.parametrize("text_encoders", [False, True])
def test_single_file_equals_the_diffusers_folder(tmp_path, tiny_sd3_config_dir, tsdsr, stored, text_encoders):
    """Stored fp16 / bf16 / fp8: the diffusers folder loads them widened to fp32, the single file keeps them as they
    are stored and widens on use (and widens LoRA layers before merging), so at fp32 the images are the same."""
    transformer, vae = tiny_models_in(DTYPES[stored])
    single = write_stability_file(tmp_path / "sd3.safetensors", transformer, vae, text_encoders=text_encoders)
    folder = diffusers_folder(tmp_path / "folder", transformer, vae)
    from_file = load_base(single, tiny_sd3_config_dir)
    assert from_file.family == "sd3" and from_file.prompt_encoder is None
    assert next(from_file.denoiser.parameters()).dtype == DTYPES[stored]  # no second, widened copy at load
    assert torch.equal(upscale(load_base(folder), tsdsr), upscale(from_file, tsdsr))


def test_text_encoders_are_not_read(tmp_path, tiny_sd3_config_dir, monkeypatch):
    import d3sr_core.backbones.sd3 as sd3

    single = write_stability_file(tmp_path / "incl_clips.safetensors", *tiny_models_in(torch.float16), text_encoders=True)
    read = []
    real = sd3.read_safetensors

    def recording(path, what, keep=None):
        tensors, meta = real(path, what, keep)
        read.extend(tensors)
        return tensors, meta

    monkeypatch.setattr(sd3, "read_safetensors", recording)
    load_base(single, tiny_sd3_config_dir)
    assert read and not any(k.startswith("text_encoders.") for k in read)


def test_mmdit_file_with_a_separate_vae_file(tmp_path, tiny_sd3_config_dir, tsdsr):
    """ComfyUI's models/diffusion_models (an MMDiT, prefixed or not) + models/vae (LDM names)."""
    transformer, vae = tiny_models_in(torch.float16)
    mmdit = tmp_path / "mmdit.safetensors"
    save_file({k: v.contiguous() for k, v in transformer_to_stability(transformer).items()}, str(mmdit))
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae).items()}, str(vae_file))
    whole = write_stability_file(tmp_path / "whole.safetensors", transformer, vae)
    expected = upscale(load_base(whole, tiny_sd3_config_dir), tsdsr)
    assert torch.equal(upscale(load_base(mmdit, tiny_sd3_config_dir, vae_path=vae_file), tsdsr), expected)
    with pytest.raises(ModelFileError, match="holds no VAE .* give the SD3 VAE file"):
        load_base(mmdit, tiny_sd3_config_dir)


def test_cli_upscale_with_a_single_file_equals_the_folder(tmp_path, tiny_sd3_config_dir, tsdsr):
    """``d3sr upscale --base tiny_sd3.safetensors --base-config DIR --model tsdsr/`` gives the folder's image."""
    from PIL import Image

    from d3sr_cli.main import main

    transformer, vae = tiny_models_in(torch.float16)
    single = write_stability_file(tmp_path / "tiny_sd3.safetensors", transformer, vae)
    folder = diffusers_folder(tmp_path / "folder", transformer, vae)
    Image.fromarray((random_image(24, 32)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp_path / "lr.png")
    outputs = []
    for name, base in (("file", ["--base", single, "--base-config", tiny_sd3_config_dir]), ("folder", ["--base", folder])):
        args = ["upscale", tmp_path / "lr.png", "-o", tmp_path / name, "--model", tsdsr, "--dtype", "fp32", *base]
        assert main([str(a) for a in args]) == 0
        outputs.append(Image.open(tmp_path / name / "lr.png").tobytes())
    assert outputs[0] == outputs[1]


def test_shipped_configs_fit_sd3_medium_names_and_shapes(tmp_path):
    """Without --base-config, the shipped SD3-medium configs are used: a file of another size is one sentence."""
    single = write_stability_file(tmp_path / "tiny.safetensors", *tiny_models_in(torch.float16))
    with pytest.raises(ModelFileError, match=r"tiny\.safetensors does not (hold the weights of|match) the transformer config"):
        load_base(single)


def test_shipped_config_names_match_sd3_medium_on_the_meta_device():
    """Every tensor the SD3-medium transformer has is named by the mapping from Stability's names."""
    from diffusers import SD3Transformer2DModel

    from d3sr_core.backbones.sd3 import mmdit_to_diffusers
    from d3sr_core.backbones.base import read_json

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(read_json(SHIPPED_CONFIG_DIR / "transformer.json"))
    stability = transformer_to_stability(model)
    assert "joint_blocks.23.context_block.adaLN_modulation.1.weight" in stability
    assert "joint_blocks.23.context_block.attn.proj.weight" not in stability  # SD3's last context stream is pre-only
    converted = mmdit_to_diffusers(stability)
    expected = model.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_not_sd3_and_not_safetensors(tmp_path, tiny_sd3_config_dir):
    transformer, vae = tiny_models_in(torch.float16)
    state = {"model.diffusion_model." + k: v.contiguous() for k, v in transformer_to_stability(transformer).items()}
    torch.save({"state_dict": state}, tmp_path / "sd3.ckpt")
    with pytest.raises(ModelFileError, match=r"sd3\.ckpt is an SD3 model.*\.safetensors"):
        load_base(tmp_path / "sd3.ckpt", tiny_sd3_config_dir)
    scaled = tmp_path / "scaled_fp8.safetensors"
    save_file({**state, "model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(scaled))
    with pytest.raises(ModelFileError, match=r"scaled_fp8\.safetensors is a scaled fp8 MMDiT"):
        load_base(scaled, tiny_sd3_config_dir)
    empty_config = tmp_path / "config"
    empty_config.mkdir()
    single = write_stability_file(tmp_path / "sd3.safetensors", transformer, vae)
    with pytest.raises(ModelFileError, match="has no transformer.json"):
        load_base(single, empty_config)


def host_states(transformer, vae):
    """What a host holding the models in Stability's / LDM's layout hands over (ComfyUI: MODEL and VAE)."""
    mmdit = {k: v.clone() for k, v in transformer_to_stability(transformer).items()}
    ldm_vae = {k: v.clone() for k, v in vae_to_ldm(vae).items()}
    return mmdit, ldm_vae


@pytest.mark.parametrize("merge_lora", [True, False])
@pytest.mark.parametrize("stored", ["fp32", "fp16", "fp8"])
def test_borrowed_base_equals_the_file_and_leaves_the_host_untouched(tmp_path, tiny_sd3_config_dir, tsdsr, stored, merge_lora):
    transformer, vae = tiny_models_in(DTYPES[stored])
    mmdit, ldm_vae = host_states(transformer, vae)
    before = {k: v.clone() for k, v in {**mmdit, **ldm_vae}.items()}
    single = write_stability_file(tmp_path / "sd3.safetensors", transformer, vae)
    from_file = upscale(load_base(single, tiny_sd3_config_dir), tsdsr, merge_lora=merge_lora)
    base = sd3_base_from_stability_state(mmdit, ldm_vae, "the host", tiny_sd3_config_dir,
                                         borrowed=(lambda: mmdit, lambda: ldm_vae))
    borrowed = upscale(base, tsdsr, merge_lora=merge_lora)
    assert torch.equal(borrowed, from_file)
    for key, value in {**mmdit, **ldm_vae}.items():  # the host's tensors: same values, same dtype
        assert value.dtype == before[key].dtype and torch.equal(value.view(torch.uint8), before[key].view(torch.uint8)), key


def test_borrowed_tensors_are_views_during_a_run_and_placeholders_after(tiny_sd3_config_dir, tsdsr):
    transformer, vae = tiny_models_in(torch.float16)
    mmdit, ldm_vae = host_states(transformer, vae)
    base = sd3_base_from_stability_state(mmdit, ldm_vae, "the host", tiny_sd3_config_dir,
                                         borrowed=(lambda: mmdit, lambda: ldm_vae))
    generator = build_generator(load_checkpoint(tsdsr), base, merge_lora=False)
    Upscaler(generator, dtype="fp32")
    host_storages = {v.untyped_storage().data_ptr() for v in {**mmdit, **ldm_vae}.values()}
    own = [p for p in generator.parameters() if not p.is_meta]
    assert all(p.untyped_storage().data_ptr() not in host_storages for p in own)  # nothing of the host is held
    assert all("lora_" in n for n, p in generator.named_parameters() if not p.is_meta)  # unmerged: only LoRA is ours
    seen = []
    block = generator.denoiser.transformer_blocks[0].ff.net[2]
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(m.weight.untyped_storage().data_ptr()))
    with weights_bound(generator.denoiser, generator.vae):
        generator.predict(torch.zeros(1, 16, 4, 4))
    handle.remove()
    assert block.weight.is_meta and seen  # a placeholder again after the run
    key = "joint_blocks.0.x_block.mlp.fc2.weight"
    assert mmdit[key].dtype == torch.float16  # fp16 host, fp32 run: the module got a cast copy, the host kept its own


def test_fp8_weights_stay_fp8_in_memory(tmp_path, tiny_sd3_config_dir, tsdsr):
    single = write_stability_file(tmp_path / "sd3.safetensors", *tiny_models_in(torch.float8_e4m3fn))
    generator = build_generator(load_checkpoint(tsdsr), load_base(single, tiny_sd3_config_dir), merge_lora=False)
    Upscaler(generator, dtype="fp32")
    kept = generator.denoiser._d3sr_kept.stored
    assert kept and all(t.dtype in STORAGE_ONLY_DTYPES for t in kept.values())
    assert generator.denoiser_dtype == torch.float32
