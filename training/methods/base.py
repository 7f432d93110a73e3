"""What a training method tells the trainer: its models, its optimizers, one step, and what to export.

The trainer owns the loop, ``accelerate``, checkpoints, logging and data; a method owns the math. A method is
built on the CPU, then :meth:`TrainingMethod.bind` hands it the models and optimizers after
``accelerator.prepare`` (wrapped for distributed training when there are several processes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """The precision frozen weights are kept in for accelerate's ``mixed_precision`` (``no``, ``fp16``, ``bf16``)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


@dataclass
class OptimizerSpec:
    """One optimizer: the parameters it moves and its AdamW settings."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Prepared:
    """The method's models and optimizers after ``accelerator.prepare``, by name."""

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, object] = field(default_factory=dict)


class TrainingMethod(ABC):
    """A method plug-in (``training/methods/<name>.py``).

    Class attributes: ``name`` (the ``--method`` value and the config section holding its options),
    ``defaults`` (that section's default values) and ``needs_lq`` (whether batches carry low-quality inputs).
    """

    name: str
    defaults: dict
    needs_lq: bool = True

    @abstractmethod
    def models(self) -> dict[str, torch.nn.Module]:
        """The modules that train (what ``accelerator.prepare`` wraps), by name."""

    @abstractmethod
    def optimizer_specs(self) -> list[OptimizerSpec]:
        """The optimizers, in the order their steps happen."""

    @abstractmethod
    def training_step(self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, float]:
        """One optimisation step of every optimizer on ``batch``; returns the losses to log.

        ``generator`` is the step's own random generator (seeded by run seed, step and rank), so a resumed run
        draws exactly what the uninterrupted run drew.
        """

    @abstractmethod
    def named_trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every trained parameter of every model (what a checkpoint stores), by a stable name."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.named_trained_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`trainable_state_dict` returned."""
        own = self.named_trained_parameters()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"the checkpoint lacks the trained tensor {missing[0]!r}; it was written by another setup.")
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(state[key].to(param.dtype))

    @abstractmethod
    def exported_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters of the model the run produces, by name (what the EMA averages)."""

    @abstractmethod
    def write_model(self, folder: Path, training_config: dict, trained: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model the run produces into ``folder`` (atomically) and return its path; ``trained`` (e.g. EMA
        averages, named as in :meth:`exported_parameters`) replaces the current weights when given."""

    def bind(self, prepared: Prepared, accelerator, max_grad_norm: float | None) -> None:
        """Receive the prepared models and optimizers before the first step."""
        self.prepared = prepared
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm

    def update(self, optimizer: str, loss: torch.Tensor) -> None:
        """Backward ``loss`` and step the named optimizer and its scheduler (accelerate skips the step, and keeps
        the gradients, while accumulating)."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        opt = self.prepared.optimizers[optimizer]
        if accelerator.sync_gradients and self.max_grad_norm:
            # accelerator.clip_grad_norm_ would unscale every optimizer's gradients (fp16), including the ones
            # another optimizer is still accumulating; unscale this one alone.
            accelerator.unscale_gradients(optimizer=opt)
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        opt.step()
        self.prepared.schedulers[optimizer].step()
        opt.zero_grad(set_to_none=True)
