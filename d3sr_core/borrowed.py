"""Weights a model runs on without owning them, and weights kept in the dtype they are stored in.

A host that already holds a base model (ComfyUI's MODEL and VAE) should not hold it twice. So a base built from a
host's model *borrows* its tensors (:func:`borrow`): the model's own slots hold views of the host's tensors while the
generator is built, then empty placeholders (``meta`` device, no memory). For the length of a run
(:func:`weights_bound`) each module is handed, for the length of its ``forward``, the tensor the host holds at that
moment, wherever the host has put it (moved since or not). Nothing of the host is written to: layers that a
checkpoint changes get their own copy first (:func:`own_weights`), and borrowed tensors are never converted in place.

Weights stored as fp8 (which no layer computes in) are *kept* the same way: they stay fp8 beside the model, and a
module gets them cast to the run's dtype for one call, as ComfyUI's own "manual cast" layers do. Every other tensor is
converted in place once, as ``Module.to`` does (:func:`place_for_run`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .lora import unwrapped_name

STORAGE_ONLY_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name)
)
"""Dtypes weights may be stored in but no layer computes in: such weights are cast on use."""

ReadFn = Callable[[], dict[str, torch.Tensor]]
"""``read()`` -> the model's state under its own (diffusers) names, as views of the host's tensors right now."""


class KeptWeights:
    """The tensors of one model that its slots do not hold between calls (see the module doc).

    Attributes:
        read: gives the host's tensors (borrowed models only).
        borrowed: names of the borrowed tensors, and their shapes.
        stored: tensors the model owns in a storage-only dtype (fp8), by name.
        run_state: the host's tensors for the current run; ``None`` outside :func:`weights_bound`.
    """

    def __init__(self, read: ReadFn | None = None, borrowed: dict[str, torch.Size] | None = None):
        self.read = read
        self.borrowed = dict(borrowed or {})
        self.stored: dict[str, torch.Tensor] = {}
        self.run_state: dict[str, torch.Tensor] | None = None
        self.hooks: list = []


def _kept(model: torch.nn.Module) -> KeptWeights:
    if getattr(model, "_d3sr_kept", None) is None:
        model._d3sr_kept = KeptWeights()
    return model._d3sr_kept


def _slots(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, bool]]:
    """``(name, module, attribute, is_parameter)`` of every tensor of ``model``, named as before LoRA wrapping."""
    for module_name, module in model.named_modules():
        for is_parameter, table in ((True, module._parameters), (False, module._buffers)):
            for attribute, tensor in list(table.items()):
                if tensor is not None:
                    name = f"{module_name}.{attribute}" if module_name else attribute
                    yield unwrapped_name(name), module, attribute, is_parameter


def _get(module: torch.nn.Module, attribute: str, is_parameter: bool) -> torch.Tensor:
    return (module._parameters if is_parameter else module._buffers)[attribute]


def _set(module: torch.nn.Module, attribute: str, is_parameter: bool, tensor: torch.Tensor) -> None:
    if is_parameter:
        module._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attribute] = tensor


def borrow(model: torch.nn.Module, read: ReadFn) -> None:
    """Make every tensor of ``model`` (built on the meta device) a view of the host's as ``read()`` gives them now.
    The caller has checked names and shapes. The views stay until :func:`release`, which building ends with."""
    state = read()
    borrowed = {}
    for name, module, attribute, is_parameter in list(_slots(model)):
        _set(module, attribute, is_parameter, state[name])
        borrowed[name] = state[name].shape
    model._d3sr_kept = KeptWeights(read, borrowed)


def borrowed_names(model: torch.nn.Module) -> set[str]:
    kept = getattr(model, "_d3sr_kept", None)
    return set() if kept is None else set(kept.borrowed)


def own_weights(model: torch.nn.Module, module_names: set[str]) -> None:
    """Give the modules ``module_names`` of ``model`` their own float32 copy of every weight that is borrowed or
    stored in less than float32, so LoRA merges and weight loads land in a copy (never in a host's tensor) and are
    computed in float32 as on a base loaded from a diffusers folder (which diffusers widens to float32)."""
    kept = getattr(model, "_d3sr_kept", None)
    for module_name in module_names:
        module = model.get_submodule(module_name)
        for is_parameter, table in ((True, module._parameters), (False, module._buffers)):
            for attribute, tensor in list(table.items()):
                name = unwrapped_name(f"{module_name}.{attribute}" if module_name else attribute)
                lent = kept is not None and name in kept.borrowed
                if tensor is None or not tensor.is_floating_point() or (tensor.dtype == torch.float32 and not lent):
                    continue
                if tensor.is_meta:
                    raise ValueError(f"{name!r} is borrowed from a host and was released; own it before the build ends.")
                _set(module, attribute, is_parameter, tensor.detach().to(torch.float32, copy=True))
                if lent:
                    del kept.borrowed[name]


def release(model: torch.nn.Module) -> None:
    """Replace each borrowed tensor of ``model`` by an empty placeholder of its shape and dtype, so no view keeps the
    host's memory alive (the host may move or free its weights at any time)."""
    kept = getattr(model, "_d3sr_kept", None)
    if kept is None:
        return
    for name, module, attribute, is_parameter in list(_slots(model)):
        if name in kept.borrowed:
            _set(module, attribute, is_parameter, torch.empty_like(_get(module, attribute, is_parameter), device="meta"))


@contextlib.contextmanager
def weights_bound(*models: torch.nn.Module):
    """Inside the ``with`` block the borrowed tensors of ``models`` come from the host as it is now (read once)."""
    bound = []
    try:
        for model in models:
            kept = getattr(model, "_d3sr_kept", None)
            if kept is None or not kept.borrowed:
                continue
            state = kept.read()
            for name, shape in kept.borrowed.items():
                if name not in state or state[name].shape != shape:
                    found = tuple(state[name].shape) if name in state else "missing"
                    raise ValueError(f"the host's model changed since it was loaded: {name!r} is {found}, expected {tuple(shape)}.")
            kept.run_state = state
            bound.append(kept)
        yield
    finally:
        for kept in bound:
            kept.run_state = None


def _cast_hooks(kept: KeptWeights, slots: list[tuple[str, str, bool]], dtype: torch.dtype, device: torch.device):
    """Hooks that hand a module its kept tensors (``slots``: name, attribute, is_parameter) in ``dtype`` on
    ``device`` for one call, and put its placeholders back afterwards."""
    placeholders: list[tuple[str, bool, torch.Tensor]] = []

    def before(module, args=None):
        for name, attribute, is_parameter in slots:
            if name in kept.borrowed:
                if kept.run_state is None:
                    raise RuntimeError(f"{name!r} is borrowed from a host: run the model inside borrowed.weights_bound().")
                source = kept.run_state[name]
            else:
                source = kept.stored[name]
            wanted = dtype if source.is_floating_point() else source.dtype
            placeholders.append((attribute, is_parameter, _get(module, attribute, is_parameter)))
            table = module._parameters if is_parameter else module._buffers
            table[attribute] = source.to(device=device, dtype=wanted)

    def after(module, args=None, output=None):
        while placeholders:
            attribute, is_parameter, placeholder = placeholders.pop()
            (module._parameters if is_parameter else module._buffers)[attribute] = placeholder

    return before, after


def place_for_run(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Put ``model`` on ``device`` computing in ``dtype``: tensors it owns are converted in place (as ``Module.to``),
    borrowed and fp8 tensors are kept and cast on use (see the module doc). An earlier placement's hooks are replaced."""
    device = torch.device(device)
    kept = _kept(model)
    for handle in kept.hooks:
        handle.remove()
    kept.hooks = []
    per_module: dict[int, tuple[torch.nn.Module, list]] = {}
    for name, module, attribute, is_parameter in list(_slots(model)):
        tensor = _get(module, attribute, is_parameter)
        if name in kept.borrowed or name in kept.stored or tensor.dtype in STORAGE_ONLY_DTYPES:
            if name not in kept.borrowed:
                kept.stored[name] = (kept.stored.get(name, tensor)).detach().to(device)  # stays fp8
            wanted = dtype if tensor.is_floating_point() else tensor.dtype
            # The placeholder says what the module computes in (the VAE decoder reads its dtype); it holds no memory.
            _set(module, attribute, is_parameter, torch.empty_like(tensor, device="meta", dtype=wanted))
            per_module.setdefault(id(module), (module, []))[1].append((name, attribute, is_parameter))
            continue
        wanted = dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.device != device or tensor.dtype != wanted:
            tensor.data = tensor.data.to(device=device, dtype=wanted)
    for module, slots in per_module.values():
        before, after = _cast_hooks(kept, slots, dtype, device)
        module._d3sr_cast = (before, after)
        kept.hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    model._d3sr_compute_dtype = dtype


@contextlib.contextmanager
def materialized(module: torch.nn.Module):
    """Inside the ``with`` block ``module``'s kept tensors are real, for code that reads a module's weights without
    calling it (the tiled VAE's GroupNorm with whole-image statistics)."""
    hooks = getattr(module, "_d3sr_cast", None)
    if hooks is None:
        yield module
        return
    before, after = hooks
    before(module)
    try:
        yield module
    finally:
        after(module)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: what :func:`place_for_run` set, else its first parameter's (float32 for a
    model without weights)."""
    placed = getattr(model, "_d3sr_compute_dtype", None)
    if placed is not None:
        return placed
    first = next(model.parameters(), None)
    return torch.float32 if first is None else first.dtype


def offload(model: torch.nn.Module, device: torch.device | str) -> None:
    """Move the tensors ``model`` owns to ``device`` (a host's offload device), each in its dtype; borrowed ones stay
    placeholders (the host keeps its own tensors where it wants them)."""
    device = torch.device(device)
    kept = getattr(model, "_d3sr_kept", None)
    if kept is not None:
        kept.stored = {name: tensor.to(device) for name, tensor in kept.stored.items()}
    for name, module, attribute, is_parameter in list(_slots(model)):
        tensor = _get(module, attribute, is_parameter)
        if not tensor.is_meta and tensor.device != device:
            tensor.data = tensor.data.to(device)
