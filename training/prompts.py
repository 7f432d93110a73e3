"""Precompute a run's prompt embeddings, so training holds no text encoder in memory (SD3's T5-XXL alone is 4.7 B
parameters).

``python -m training.prompts --base SD3_FOLDER --prompt TEXT [--negative-prompt TEXT] --out FILE.safetensors``
encodes the prompt the generator and the teacher see and the negative prompt (the unconditional side of
classifier-free guidance) with the base's own text encoders; set ``model.prompt_embeddings`` to ``FILE`` in the
run. The file holds ``prompt_embeds``, ``negative_prompt_embeds`` and, for SD3, ``pooled_prompt_embeds`` and
``negative_pooled_prompt_embeds``, each with a batch dimension of 1.

SD3's recipe (as ``StableDiffusion3Pipeline.encode_prompt`` and TSD-SR's ``data/process.py``): the penultimate
hidden states of CLIP-L and CLIP-G at 77 tokens, concatenated on channels and zero-padded to T5's width, followed
on the sequence axis by T5's last hidden state at ``max_sequence_length`` tokens (zeros when the folder has no
T5); the pooled embedding is the two CLIP projections concatenated. An SD 2.x base gives its text encoder's last
hidden state (what ``model.prompt`` would give).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from d3sr_core.backbones import load_base
from d3sr_core.backbones.base import from_pretrained, read_json
from d3sr_core.backbones.sd3 import is_sd3_folder
from d3sr_core.files import ModelFileError, atomic_output, read_safetensors

NEGATIVE_PREFIX = "negative_"
CLIP_TOKENS = 77


def encode_sd3_prompt(folder: Path, prompt: str, *, max_sequence_length: int = 256, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """``{prompt_embeds (1, 77 + L, D_t5), pooled_prompt_embeds (1, D_l + D_g)}`` of ``prompt`` (float32, CPU)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    what = "a diffusers SD3 folder with its text encoders"
    clip_states, pooled = [], []
    for index in ("", "_2"):
        tokenizer = from_pretrained(AutoTokenizer, folder, f"tokenizer{index}", what)
        encoder = from_pretrained(CLIPTextModelWithProjection, folder, f"text_encoder{index}", what)
        encoder.to(device, dtype).eval()
        ids = tokenizer(prompt, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids.to(device), output_hidden_states=True)
        clip_states.append(out.hidden_states[-2].float().cpu())
        pooled.append(out.text_embeds.float().cpu())
        del encoder
    clip = torch.cat(clip_states, dim=-1)
    if (folder / "text_encoder_3" / "config.json").is_file():
        tokenizer = from_pretrained(AutoTokenizer, folder, "tokenizer_3", what)
        encoder = from_pretrained(T5EncoderModel, folder, "text_encoder_3", what).to(device, dtype).eval()
        ids = tokenizer(prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        with torch.no_grad():
            t5 = encoder(ids.to(device))[0].float().cpu()
    else:
        width = read_json(folder / "transformer" / "config.json")["joint_attention_dim"]
        t5 = torch.zeros(1, max_sequence_length, width)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}


def encode_prompts(base: str | os.PathLike, prompt: str, negative_prompt: str, **sd3_options) -> dict[str, torch.Tensor]:
    """The embeddings file's tensors for ``prompt`` and ``negative_prompt`` with the text encoders of ``base``."""
    path = Path(base)
    if path.is_dir() and is_sd3_folder(path):
        encode = lambda text: encode_sd3_prompt(path, text, **sd3_options)  # noqa: E731
    else:
        loaded = load_base(path)
        if loaded.prompt_encoder is None:
            raise ModelFileError(f"{path} has no text encoder, so it cannot encode prompts.")
        encode = loaded.encode_prompt
    tensors = dict(encode(prompt))
    tensors.update({NEGATIVE_PREFIX + k: v for k, v in encode(negative_prompt).items()})
    return {k: v.contiguous() for k, v in tensors.items()}


def write_prompt_embeddings(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} must end in .safetensors.")
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_prompt_embeddings(path: str | os.PathLike, widths: dict[str, int]) -> tuple[dict, dict]:
    """``(conditioning, negative conditioning)`` from an embeddings file, checked against the denoiser's
    ``widths`` (``BaseModel.conditioning_widths``: each tensor's name and last dimension)."""
    tensors, _ = read_safetensors(Path(path), "a prompt embeddings file (python -m training.prompts)")
    conditioning, negative = {}, {}
    for name, width in widths.items():
        for target, key in ((conditioning, name), (negative, NEGATIVE_PREFIX + name)):
            if key not in tensors:
                raise ModelFileError(f"{path} has no {key!r}; expected the file python -m training.prompts writes for this base.")
            if tensors[key].shape[-1] != width or tensors[key].shape[0] != 1:
                raise ModelFileError(
                    f"{path} holds {key} of shape {tuple(tensors[key].shape)}; the base expects (1, ..., {width})."
                )
            target[name] = tensors[key].float().clone()
    return conditioning, negative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.prompts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the run's base with its text encoders (an SD3 or SD 2.x diffusers folder)")
    parser.add_argument("--prompt", default="", help="what the generator and the teacher are conditioned on")
    parser.add_argument("--negative-prompt", default="", help="the unconditional side of classifier-free guidance")
    parser.add_argument("--out", required=True, help="the .safetensors to write (model.prompt_embeddings)")
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (SD3; TSD-SR uses 256)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="text encoder precision (SD3)")
    parser.add_argument("--device", default="cpu", help="where the text encoders run (SD3)")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        tensors = encode_prompts(args.base, args.prompt, args.negative_prompt, max_sequence_length=args.max_sequence_length,
                                 dtype=dtype, device=args.device)
        metadata = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "base": str(args.base),
                    "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()})}
        path = write_prompt_embeddings(args.out, tensors, metadata)
    except (ModelFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"prompt embeddings in {path}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
