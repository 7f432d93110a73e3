"""LoRA adapters through peft, the library the official OSEDiff and TSD-SR checkpoints were made with.

A model may carry several named adapters at once (OSEDiff puts three on its UNet), each with its own
rank, alpha and target list. peft's rules decide which modules a target names: a module matches when
its full name equals the target or ends with ``"." + target``. The LoRA update of a layer is
``W x + (alpha / rank) * B(A x)``.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

PEFT_DEFAULT_LORA_ALPHA = 8
"""peft's ``LoraConfig.lora_alpha`` default; OSEDiff never sets alpha, so its scale is 8 / rank."""


@dataclass(frozen=True)
class AdapterSpec:
    """One named LoRA adapter on one component (``"unet"``, ``"vae"`` or ``"transformer"``)."""

    name: str
    component: str
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, item: dict) -> "AdapterSpec":
        return cls(
            name=str(item["name"]),
            component=str(item["component"]),
            rank=int(item["rank"]),
            alpha=float(item["alpha"]),
            targets=tuple(str(t) for t in item["targets"]),
        )


def adapters_to_json(specs: list[AdapterSpec]) -> str:
    return json.dumps([s.to_json() for s in specs])


def adapters_from_json(text: str) -> list[AdapterSpec]:
    return [AdapterSpec.from_json(item) for item in json.loads(text)]


def add_adapters(model: torch.nn.Module, specs: list[AdapterSpec]) -> None:
    """Inject every adapter of ``specs`` into ``model`` (in place) and make all of them active together.

    The new LoRA weights are zero-initialised (``B = 0``), so the model is unchanged until weights are loaded.
    """
    for spec in specs:
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.targets),
            init_lora_weights=True,
        )
        with warnings.catch_warnings():
            # Several adapters on one model are the point here, not the accident peft warns about.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=spec.name)
    names = [s.name for s in specs]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([n for n in names if n in module.lora_A])


def lora_state_keys(model: torch.nn.Module) -> set[str]:
    """Names of the LoRA parameters of ``model`` as peft writes them: ``<module>.lora_A.<adapter>.weight``."""
    return {name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def unwrapped_name(peft_name: str) -> str:
    """The parameter name a peft-wrapped layer had before wrapping (``conv_in.base_layer.weight`` -> ``conv_in.weight``)."""
    return peft_name.replace(".base_layer.", ".")


def wrapped_name(model: torch.nn.Module, name: str) -> str:
    """The inverse of :func:`unwrapped_name` for ``model``: where ``name`` lives now that adapters may wrap its module."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, BaseTunerLayer):
        return f"{module_name}.base_layer.{param}"
    return name


def merge_adapters(model: torch.nn.Module) -> None:
    """Fold every active adapter into its base weights and drop the LoRA layers, so inference costs nothing extra."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        module.merge(adapter_names=list(module.active_adapters))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())


@contextmanager
def _requires_grad_kept(layers: list[BaseTunerLayer]):
    """peft's switches also set which LoRA weights train; put every flag back as it was on leaving."""
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its base (every LoRA layer bypassed) inside the ``with`` block, e.g. to encode the real
    images with the original VAE encoder while the encoder's adapter trains."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    with _requires_grad_kept(layers):
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield model
        finally:
            for layer in layers:
                layer.enable_adapters(True)


@contextmanager
def adapter_selected(model: torch.nn.Module, name: str | None):
    """Run ``model`` with the adapter ``name`` alone active (``None``: none, the base) inside the ``with`` block;
    layers without that adapter run as their base. One frozen copy of a base can so serve as TSD-SR's teacher
    (base + teacher LoRA) and fake score (base + its own LoRA). Which weights train is left as it was."""
    if name is None:
        with adapters_disabled(model):
            yield model
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not any(name in layer.lora_A for layer in layers):
        raise ValueError(f"the model has no LoRA adapter named {name!r}.")
    previous = [list(layer.active_adapters) for layer in layers]
    with _requires_grad_kept(layers):
        for layer in layers:
            layer.set_adapter([name])
        try:
            yield model
        finally:
            for layer, names in zip(layers, previous):
                layer.set_adapter(names)
