"""A UNet LoRA in the kohya layout, which ComfyUI's and A1111/Forge's own LoRA loaders read.

Keys (reference/ecosystem.md 1.4; the diffusers module path with dots turned into underscores):

* ``lora_unet_<path>.lora_down.weight`` = peft's ``lora_A``, ``.lora_up.weight`` = ``lora_B``, ``.alpha`` a
  scalar; the loaders apply ``W + (alpha / rank) * up @ down``.
* ``lora_unet_<path>.diff`` / ``.diff_b``: a fully trained layer, stored as the change of its weight and bias.

Several adapters on one layer (OSEDiff's three) become one LoRA of the summed rank: ``down`` stacks the ``A``
matrices and ``up`` the ``B`` matrices each times its own ``alpha_i / rank_i``, with ``alpha`` = summed rank,
so the update is exactly the sum of the adapters' updates. A layer that is fully trained *and* carries LoRA
(OSEDiff's ``conv_in``) is stored as one ``diff`` holding both changes: the hosts apply only one patch per layer
(ComfyUI keeps the ``diff``, A1111 the LoRA).
"""

from __future__ import annotations

import torch

from .lora import AdapterSpec

KOHYA_UNET_PREFIX = "lora_unet_"


def kohya_key(module_path: str) -> str:
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def kohya_unet_lora(
    unet_tensors: dict[str, torch.Tensor],
    adapters: list[AdapterSpec],
    base_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The kohya state dict of a UNet's adapters and fully trained layers.

    ``unet_tensors``: UNet tensors in our format without the ``unet.`` prefix (peft LoRA names
    ``<module>.lora_A.<adapter>.weight`` and plain names for fully trained weights); ``adapters``: the UNet's
    adapter specs. ``base_weights``: the base model's original values of the fully trained weights, needed to
    store them as differences; without it fully trained weights are an error.
    """
    scales = {s.name: s.alpha / s.rank for s in adapters}
    downs: dict[str, list[torch.Tensor]] = {}
    ups: dict[str, list[torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sorted(unet_tensors.items()):
        if ".lora_A." in key or ".lora_B." in key:
            module, kind, rest = key.replace(".lora_A.", "\0A\0").replace(".lora_B.", "\0B\0").split("\0")
            adapter = rest.rsplit(".", 1)[0]
            if adapter not in scales:
                raise ValueError(f"LoRA weight {key!r} belongs to adapter {adapter!r}, which is not in the adapter list.")
            if kind == "A":
                downs.setdefault(module, []).append(value.float())
            else:
                ups.setdefault(module, []).append(value.float() * scales[adapter])
            continue
        module, _, param = key.rpartition(".")
        if base_weights is None or key not in base_weights:
            raise ValueError(f"{key!r} is fully trained; its base value is needed to store it as a kohya difference.")
        suffix = {"weight": "diff", "bias": "diff_b"}.get(param)
        if suffix is None:
            raise ValueError(f"{key!r} is neither a weight nor a bias; kohya files cannot hold it.")
        out[f"{kohya_key(module)}.{suffix}"] = (value.float() - base_weights[key].float()).contiguous()
    for module, down_list in downs.items():
        down = torch.cat(down_list, dim=0)
        up = torch.cat(ups[module], dim=1)
        key = kohya_key(module)
        if f"{key}.diff" in out:
            delta = (up.flatten(1) @ down.flatten(1)).view(out[f"{key}.diff"].shape)
            out[f"{key}.diff"] = (out[f"{key}.diff"] + delta).contiguous()
            continue
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
