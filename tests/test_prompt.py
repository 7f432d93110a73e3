"""Prompt conditioning: encoded once by the base's CLIP text encoder and cached; the empty prompt by default."""

import pytest
import torch

from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import OneStepCheckpoint, build_generator
from tiny_models import tiny_text_encoder, tiny_unet, tiny_vae, write_base_config_dir, write_single_file


def test_prompt_goes_through_tokenizer_and_text_encoder(tiny_base_dir):
    base = load_base(tiny_base_dir)
    ids = torch.tensor([[49406, 27, 29, 49407] + [0] * 73])  # "a c": start, "a</w>", "c</w>", end, "!" padding
    with torch.no_grad():
        expected = tiny_text_encoder()(ids)[0]
    assert torch.equal(base.encode_prompt("a c")["prompt_embeds"], expected)


def test_prompt_is_encoded_once(tiny_base_dir, monkeypatch):
    base = load_base(tiny_base_dir)
    calls = []
    encoder = base.prompt_encoder
    monkeypatch.setattr(base, "prompt_encoder", lambda p: calls.append(p) or encoder(p))
    first = base.encode_prompt("abc")
    second = base.encode_prompt("abc")
    assert calls == ["abc"] and first is second


def test_generator_uses_stored_embedding_else_empty_prompt_else_given_prompt(tiny_base_dir):
    stored = torch.randn(1, 77, 32)
    plain = OneStepCheckpoint("none", "sd2", "epsilon", 999, [], {})
    with_embedding = OneStepCheckpoint("none", "sd2", "epsilon", 999, [], {}, {"prompt_embeds": stored})
    empty = load_base(tiny_base_dir).encode_prompt("")["prompt_embeds"]
    assert torch.equal(build_generator(plain, load_base(tiny_base_dir)).conditioning["prompt_embeds"], empty)
    assert torch.equal(build_generator(with_embedding, load_base(tiny_base_dir)).conditioning["prompt_embeds"], stored)
    given = build_generator(with_embedding, load_base(tiny_base_dir), prompt="ab").conditioning["prompt_embeds"]
    assert torch.equal(given, load_base(tiny_base_dir).encode_prompt("ab")["prompt_embeds"])


def test_single_file_without_text_encoder_needs_a_stored_embedding(tmp_path, tiny_base_dir):
    from d3sr_core.backbones.sd2 import SHIPPED_CONFIG_DIR

    config = write_base_config_dir(tmp_path / "config", SHIPPED_CONFIG_DIR, unet=tiny_unet(), vae=tiny_vae())
    write_single_file(tmp_path / "base.safetensors", tiny_unet(), tiny_vae())
    plain = OneStepCheckpoint("none", "sd2", "epsilon", 999, [], {})
    with pytest.raises(ValueError, match="has no text encoder, so the prompt '' cannot be encoded"):
        build_generator(plain, load_base(tmp_path / "base.safetensors", config))
