"""Tiny randomly initialised SD 2.x-shaped models (milliseconds per forward) and files written in the real formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from d3sr_core.backbones.sd2 import SHIPPED_CONFIG_DIR

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # attention at half resolution keeps tests fast
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    use_linear_projection=True,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=49408,
    max_position_embeddings=77,
    projection_dim=32,
)


def perturb_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Add noise to every parameter, so norms and biases are not at their trivial initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    perturb_(unet, seed)
    return unet.eval()


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    perturb_(vae, seed)
    return vae.eval()


def tiny_text_encoder(seed: int = 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()


def tiny_tokenizer(folder: Path):
    """A CLIP tokenizer with SD 2.x's special ids (start 49406, end 49407, pad "!" = 0) and single letters as words."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[c], vocab[c + "</w>"] = 1 + i, 27 + i
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def write_base_config_dir(folder: Path, scheduler_dir: Path, **modules) -> Path:
    """A ``--base-config`` folder: each module's config as ``<name>.json`` (``unet`` or ``transformer``, ``vae``),
    beside the ``scheduler.json`` shipped in ``scheduler_dir``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        (folder / f"{name}.json").write_text(json.dumps(dict(module.config)))
    shutil.copy(scheduler_dir / "scheduler.json", folder / "scheduler.json")
    return folder


def write_diffusers_base(folder: Path) -> Path:
    """A diffusers SD 2.x folder of tiny models, with a tokenizer and a text encoder."""
    tiny_unet().save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_text_encoder().save_pretrained(folder / "text_encoder")
    tiny_tokenizer(folder / "tokenizer_files").save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIPPED_CONFIG_DIR / "scheduler.json", folder / "scheduler" / "scheduler_config.json")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A smooth random image ``(1, C, H, W)`` in [0, 1] (low-frequency noise, like a photo more than like static)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, max(2, height // 8), max(2, width // 8), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (smooth + 0.05 * torch.rand(1, channels, height, width, generator=gen)).clamp(0, 1)


# OSEDiff's adapter layout (osediff.py: initialize_unet / initialize_vae), rebuilt here with peft as OSEDiff does.
OSEDIFF_UNET_PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
                         "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
OSEDIFF_VAE_PATTERNS = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
                        "to_k", "to_q", "to_v", "to_out.0"]


def osediff_unet_targets(unet) -> tuple[list, list, list]:
    encoder, decoder, others = [], [], []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in OSEDIFF_UNET_PATTERNS:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                encoder.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                decoder.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                others.append(n.replace(".weight", ""))
                break
    return encoder, decoder, others


def osediff_vae_targets(vae) -> list:
    targets = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in OSEDIFF_VAE_PATTERNS:  # no break, as in OSEDiff: the list repeats names
            if pattern in n and "encoder" in n:
                targets.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                targets.append(n.replace(".weight", ""))
    return targets


def write_osediff_pkl(path: Path, rank: int = 4, seed: int = 10) -> dict:
    """An OSEDiff .pkl for the tiny UNet/VAE of this module, with random non-zero LoRA and a trained conv_in.

    Returns the saved dict (what the reference forward reads)."""
    from peft import LoraConfig

    unet, vae = tiny_unet(), tiny_vae()
    encoder, decoder, others = osediff_unet_targets(unet)
    vae_targets = osediff_vae_targets(vae)
    unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=encoder), adapter_name="default_encoder")
    unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=decoder), adapter_name="default_decoder")
    unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=others), adapter_name="default_others")
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_targets), adapter_name="default_encoder")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        unet.conv_in.base_layer.weight.add_(torch.randn(unet.conv_in.base_layer.weight.shape, generator=gen) * 0.1)
    saved = {
        "unet_lora_encoder_modules": encoder,
        "unet_lora_decoder_modules": decoder,
        "unet_lora_others_modules": others,
        "vae_lora_encoder_modules": vae_targets,
        "rank_unet": rank,
        "rank_vae": rank,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
    }
    torch.save(saved, path)
    return saved


# The original (LDM / CompVis) single-file key layout, written independently of diffusers' converter.
RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_TO_LDM = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _sub_part(rest: str, table) -> str:
    for new, old in table:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key_to_ldm(key: str, layers: int, has_attention_up: list[bool]) -> str:
    import re

    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * (layers + 1) + j
        return f"input_blocks.{index}.{0 if kind == 'resnets' else 1}." + (_sub_part(rest, RESNET_TO_LDM) if kind == "resnets" else rest)
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        return f"middle_block.{index}." + (_sub_part(m[3], RESNET_TO_LDM) if m[1] == "resnets" else m[3])
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * (layers + 1) + j
        return f"output_blocks.{index}.{0 if kind == 'resnets' else 1}." + (_sub_part(rest, RESNET_TO_LDM) if kind == "resnets" else rest)
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention_up[i] else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    import re

    for half in ("encoder", "decoder"):
        if key.startswith(f"{half}.conv_norm_out."):
            return key.replace("conv_norm_out", "norm_out")
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}." + m[3].replace("conv_shortcut", "nin_shortcut")
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}." + m[3].replace("conv_shortcut", "nin_shortcut")
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)
    if m:
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key)
    if m:
        return f"{m[1]}.mid.attn_1." + _sub_part(m[2], VAE_ATTENTION_TO_LDM)
    return key


def write_single_file(path: Path, unet, vae, extra: dict | None = None) -> None:
    """``unet`` and ``vae`` saved in one .safetensors / .ckpt in the original SD key layout."""
    layers = unet.config.layers_per_block
    has_attention_up = ["CrossAttn" in t for t in unet.config.up_block_types]
    state = {"model.diffusion_model." + unet_key_to_ldm(k, layers, has_attention_up): v.clone()
             for k, v in unet.state_dict().items()}
    nb = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        ldm = vae_key_to_ldm(k, nb)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        state["first_stage_model." + ldm] = v.clone()
    state.update(extra or {})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 123}, path)


# SD3 / TSD-SR: a tiny SD3Transformer2DModel and 16-channel VAE, LoRA added the way TSD-SR's test_tsdsr.py adds it.
TINY_SD3 = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=24,
    out_channels=16,
    pos_embed_max_size=32,
)
TINY_SD3_VAE = {**TINY_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                "use_quant_conv": False, "use_post_quant_conv": False}
TSDSR_TRANSFORMER_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "proj", "linear", "proj_out"]


def tiny_sd3_transformer(seed: int = 3):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TINY_SD3)
    perturb_(model, seed)
    return model.eval()


def tiny_sd3_vae(seed: int = 4) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_SD3_VAE)
    perturb_(vae, seed)
    return vae.eval()


def write_sd3_base(folder: Path) -> Path:
    tiny_sd3_transformer().save_pretrained(folder / "transformer")
    tiny_sd3_vae().save_pretrained(folder / "vae")
    return folder


def tsdsr_vae_targets(vae) -> list[str]:
    """TSD-SR's explicit VAE list, generated for this VAE: every encoder conv, the mid-block attention
    projections, and quant_conv (which the SD3 VAE does not have, so it matches nothing)."""
    targets = []
    for name, module in vae.named_modules():
        if name.startswith("encoder.") and isinstance(module, torch.nn.Conv2d):
            targets.append(name)
        elif name.startswith("encoder.mid_block.attentions.0.") and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            targets.append(name)
        elif name == "encoder.mid_block.attentions.0.to_out.0":
            targets.append(name)
    return targets + ["quant_conv"]


def write_tsdsr_dir(folder: Path, rank: int = 4, seed: int = 20, batch_dim: bool = True) -> dict:
    """A TSD-SR LoRA folder (transformer.safetensors, vae.safetensors, prompt_embeds.pt, pool_embeds.pt) for the
    tiny SD3 models, saved as TSD-SR's save_model_hook does. Returns the tensors as saved."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    transformer, vae = tiny_sd3_transformer(), tiny_sd3_vae()
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=TSDSR_TRANSFORMER_TARGETS))
    vae.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=tsdsr_vae_targets(vae)))
    gen = torch.Generator().manual_seed(seed)
    saved = {}
    for name, model in (("transformer", transformer), ("vae", vae)):
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        state = {"transformer." + k: v.contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
        save_file(state, str(folder / f"{name}.safetensors"))
        saved[name] = state
    prompt = torch.randn(1, 7, TINY_SD3["joint_attention_dim"], generator=gen)
    pooled = torch.randn(1, TINY_SD3["pooled_projection_dim"], generator=gen)
    torch.save(prompt if batch_dim else prompt[0], folder / "prompt_embeds.pt")
    torch.save(pooled if batch_dim else pooled[0], folder / "pool_embeds.pt")
    saved["prompt_embeds"], saved["pooled_prompt_embeds"] = prompt, pooled
    return saved


# SD3's three text encoders, tiny: CLIP-L and CLIP-G stand-ins whose hidden widths (8 + 16) fit under T5's (32 =
# the transformer's joint_attention_dim) and whose projections (8 + 16) make the pooled width (24).
TINY_SD3_CLIPS = (dict(hidden_size=8, projection_dim=8), dict(hidden_size=16, projection_dim=16))


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer: pad 0, end-of-text 1, unknown 2, then single letters with and without a space."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def write_sd3_text_encoders(folder: Path, with_t5: bool = True) -> Path:
    """Add ``tokenizer``/``text_encoder`` (CLIP-L), ``_2`` (CLIP-G) and, ``with_t5``, ``_3`` (T5) to an SD3 folder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    for index, (suffix, sizes) in enumerate(zip(("", "_2"), TINY_SD3_CLIPS)):
        torch.manual_seed(30 + index)
        config = CLIPTextConfig(**{**TINY_TEXT, **sizes, "num_attention_heads": 2, "intermediate_size": 16})
        CLIPTextModelWithProjection(config).eval().save_pretrained(folder / f"text_encoder{suffix}")
        tiny_tokenizer(folder / f"tokenizer_files{suffix}").save_pretrained(folder / f"tokenizer{suffix}")
    if with_t5:
        torch.manual_seed(32)
        config = T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=TINY_SD3["joint_attention_dim"], d_kv=8, d_ff=37, num_layers=2, num_heads=4)
        T5EncoderModel(config).eval().save_pretrained(folder / "text_encoder_3")
        tiny_t5_tokenizer().save_pretrained(folder / "tokenizer_3")
    return folder


def write_hr_photos(folder: Path, count: int, size: tuple[int, int], seed: int) -> Path:
    """``count`` smooth random RGB PNGs ``img<i>.png`` of ``size = (height, width)``: a training folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=gen), size=size, mode="bicubic",
                                                align_corners=False)[0]
        Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def tiny_preset_config(method: str, hr_dir: Path, *overrides: str) -> dict:
    """The tiny preset's run of ``method`` on ``hr_dir`` at batch size 1, with ``--set`` style ``overrides``."""
    from training.config import load_config
    from training.methods import METHODS

    return load_config(
        preset="tiny",
        overrides=[f"method={method}", f"data.hr_dir={hr_dir}", "train.batch_size=1", *overrides],
        method_defaults=METHODS[method].defaults,
        other_sections=tuple(METHODS),
    )
