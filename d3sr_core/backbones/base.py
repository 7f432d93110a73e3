"""What every backbone hands to the generator."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..borrowed import borrow
from ..files import ModelFileError

PredictFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]
"""``predict_fn(denoiser, latents, timestep, conditioning) -> prediction``; each backbone supplies its own."""

def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_scheduler_config(folder: Path, shipped_config_dir: Path) -> dict:
    """A diffusers folder's ``scheduler/scheduler_config.json``, or the shipped one when the folder has none."""
    own = folder / "scheduler" / "scheduler_config.json"
    return read_json(own if own.is_file() else shipped_config_dir / "scheduler.json")


def from_pretrained(cls, folder: Path, subfolder: str, what: str):
    """``cls.from_pretrained`` of a local diffusers folder, with a failure reported in one sentence."""
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{folder / subfolder} could not be loaded ({first_line}); expected {what}.") from None


FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "resshift": "ResShift"}
"""Base-model families and their display names."""


def detect_family_from_unet_config(config: dict) -> str:
    """``"sdxl"``, ``"sd1"`` or ``"sd2"`` from a ``UNet2DConditionModel`` config.

    SDXL adds ``text_time`` embeddings; SD 1.x cross-attends to 768-wide CLIP-L tokens; everything else (SD 2.x
    with its 1024-wide OpenCLIP tokens, and the small SD 2.x-shaped models this project builds) counts as SD 2.x.
    """
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("cross_attention_dim") == 768:
        return "sd1"
    return "sd2"


@dataclass
class BaseModel:
    """A loaded base model.

    Attributes:
        family: one of ``FAMILIES``.
        denoiser: the UNet or transformer.
        vae: the ``AutoencoderKL``.
        predict_fn: how to call ``denoiser`` (see ``PredictFn``).
        scheduler_config: the diffusers scheduler config (noise schedule, prediction type, clip_sample).
        source: where it was loaded from, for messages.
        prompt_encoder: turns a prompt into conditioning tensors; ``None`` when the base has no text encoder.
    """

    family: str
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    predict_fn: PredictFn
    scheduler_config: dict
    source: Path
    prompt_encoder: Callable[[str], dict[str, torch.Tensor]] | None = None
    denoiser_component: str = "unet"
    """The name checkpoints give the denoiser's tensors: ``unet`` or ``transformer``."""
    _prompt_cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def conditioning_widths(self) -> dict[str, int]:
        """The conditioning tensors the denoiser needs and the size of their last dimension."""
        config = self.denoiser.config
        if self.denoiser_component == "transformer":
            return {"prompt_embeds": config.joint_attention_dim, "pooled_prompt_embeds": config.pooled_projection_dim}
        return {"prompt_embeds": config.cross_attention_dim}

    def encode_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        """Conditioning tensors for ``prompt`` (each with batch dimension 1), computed once per prompt and cached."""
        if prompt not in self._prompt_cache:
            if self.prompt_encoder is None:
                raise ValueError(
                    f"The base model at {self.source} has no text encoder, so the prompt {prompt!r} cannot be encoded: "
                    "use a checkpoint that stores its prompt embedding, or a base model that includes its text encoder."
                )
            with torch.no_grad():
                self._prompt_cache[prompt] = self.prompt_encoder(prompt)
        return self._prompt_cache[prompt]


def check_weights(expected: dict, state: dict, path: Path, what: str) -> None:
    """Every tensor of ``expected`` must be in ``state`` with the same shape; else one sentence naming the first that is not."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFileError(
            f"{path} does not hold the weights of the {what} config: "
            f"{len(missing)} {what} weights are missing, such as {missing[0]!r}."
        )
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ModelFileError(
                f"{path} does not match the {what} config: {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)} (pass the matching base config folder)."
            )


def build_with_weights(factory, state: dict, path: Path, what: str) -> torch.nn.Module:
    """``factory()`` built on the meta device and then given ``state``'s tensors, so a full-size model costs no
    random initialisation."""
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    check_weights(expected, state, path, what)
    # Cloned into fresh storage: tensors read from a file can be unaligned views, and CPU kernels then round
    # differently from the same weights loaded any other way.
    model.load_state_dict({k: state[k].clone() for k in expected}, assign=True)
    return model


def in_fresh_storage(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each tensor cloned into its own allocation. ``from_pretrained`` leaves views into the file's
    memory that are not 64-byte aligned, and CPU kernels round those differently from the same weights loaded any
    other way (a single file, a host's model), so the same weights would not give the same image."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


def build_borrowing(factory, read: Callable[[], dict], path: Path, what: str) -> torch.nn.Module:
    """``factory()`` built on the meta device and then given views of a host's tensors, ``read()`` under the model's
    names, instead of copies (see ``d3sr_core.borrowed``)."""
    with torch.device("meta"):
        model = factory()
    check_weights(model.state_dict(), read(), path, what)
    borrow(model, read)
    return model


def embedded_part_state(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part (``unet``, ``transformer``, ``vae``) of an embedded base, without the part prefix."""
    return {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}


def check_embedded_configs(configs: dict, parts: tuple[str, ...], source: Path) -> None:
    """An embedded base's ``base_configs`` must hold a config mapping for each of ``parts``."""
    for part in parts:
        if not isinstance(configs.get(part), dict):
            raise ModelFileError(f"{source} embeds a base model without a {part} config.")
