"""One training loop for every method, on ``accelerate``: one CPU process, several GPUs and several nodes run
the same code (``accelerate launch`` is the distributed engine).

A run writes into its output folder:

* ``checkpoint-<step>/``: everything to resume exactly (``accelerate``'s optimizer, scheduler and RNG states;
  ``trainable.safetensors`` with the trained tensors and the EMA; ``training_state.json`` with the step; the
  run's ``config.yaml``) and ``model.safetensors``, the generator as it was at that step. A checkpoint is
  written under ``checkpoint-<step>.partial`` and renamed when complete, so a process that dies while writing
  never leaves a damaged checkpoint under a final name.
* ``model.safetensors`` (our format, loads in ``d3sr upscale`` and the host plug-ins as it is) and, when the UNet
  carries LoRA, ``model_kohya_unet_lora.safetensors`` for ComfyUI's and A1111's own LoRA loaders.
* ``logs/train.csv`` (or TensorBoard event files).

The data a step sees, and every random draw of a step, are functions of (seed, step, rank): a resumed run
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import zipfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from d3sr_core.files import FolderLock, FolderLockedError, atomic_output, sweep_stale_temporaries

from .config import resume_changes
from .data import SRPairDataset, StreamPosition, build_dataloader
from .teachers import Teacher
from .degradation import DegradationConfig
from .methods import METHODS, Prepared, TrainingMethod
from .methods.base import frozen_dtype

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "training_state.json"
EMA_PREFIX = "ema."
LOG_WITH = ("csv", "tensorboard")
MIXED_PRECISION = ("no", "fp16", "bf16")


class TrainingError(ValueError):
    """A run that cannot start or continue; the message is one sentence."""


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{micro_step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _state_step(folder: Path) -> int:
    """The step in ``folder``'s ``training_state.json``; ``ValueError`` (one phrase) when it cannot be read."""
    try:
        with open(folder / STATE_FILE, encoding="utf-8") as f:
            step = json.load(f)["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{STATE_FILE} cannot be read ({type(err).__name__}: {err})") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{STATE_FILE} has the step {step!r}, not a whole number")
    return step


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder (not ``.partial``), oldest first, by name."""
    found = []
    for folder in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        number = folder.name[len(CHECKPOINT_PREFIX):]
        if folder.is_dir() and number.isdigit():
            found.append((int(number), folder))
    return sorted(found)


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint in ``output_dir`` whose state file reads, oldest first."""
    found = []
    for _, folder in checkpoint_folders(output_dir):
        try:
            found.append((_state_step(folder), folder))
        except ValueError:
            continue
    return sorted(found)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, checked file by file without loading weights into a model (the state
    file, the trained tensors, the config, and every pickled state of accelerate is a complete archive); ``None``
    when every file is whole."""
    try:
        _state_step(folder)
    except ValueError as err:
        return str(err)
    for name in (TRAINABLE_FILE, "config.yaml"):
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        from safetensors import safe_open

        with safe_open(str(folder / TRAINABLE_FILE), framework="pt") as f:
            if not list(f.keys()):
                return f"{TRAINABLE_FILE} holds no tensors"
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return f"{TRAINABLE_FILE} cannot be read ({type(err).__name__}: {err})"
    try:
        with open(folder / "config.yaml", encoding="utf-8") as f:
            if not isinstance(yaml.safe_load(f), dict):
                return "config.yaml holds no mapping"
    except (OSError, ValueError, yaml.YAMLError) as err:
        return f"config.yaml cannot be read ({type(err).__name__})"
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".bin", ".pkl", ".pt", ".pth"):
            continue
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} is damaged (its member {bad} fails its checksum)"
            else:
                with open(path, "rb") as f:
                    if f.read(1) != b"\x80":
                        return f"{path.name} is neither a torch archive nor a pickle"
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            return f"{path.name} is damaged ({type(err).__name__}: {err})"
    return None


class EMA:
    """Exponential moving average of the generator's trained weights: ``shadow = decay * shadow + (1 - decay) * w``."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for key, p in params.items():
            self.shadow[key].lerp_(p.detach().float(), 1 - self.decay)


class CSVLog:
    """``logs/train.csv``: one row per logged step; a resumed run first drops the rows after its start step."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]

    def log(self, values: dict, step: int) -> None:
        self.rows.append({"step": step, **values})
        fields = list(dict.fromkeys(k for row in self.rows for k in row))
        with atomic_output(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)


class Trainer:
    """Runs ``config`` (see ``training/config.py``) into ``output_dir``.

    ``resume``: continue from the newest complete checkpoint in ``output_dir``. Without it an output folder that
    already holds checkpoints is refused, so a run is never mixed into another by accident.
    """

    def __init__(self, config: dict, output_dir: str | os.PathLike, *, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = config
        self.output_dir = Path(output_dir)
        train = config["train"]
        if config["method"] not in METHODS:
            raise TrainingError(f"method {config['method']!r} is not one of {sorted(METHODS)}.")
        if train["mixed_precision"] not in MIXED_PRECISION:
            raise TrainingError(f"train.mixed_precision {train['mixed_precision']!r} is not one of {MIXED_PRECISION}.")
        if train["log_with"] not in LOG_WITH:
            raise TrainingError(f"train.log_with {train['log_with']!r} is not one of {LOG_WITH}.")
        for key in ("checkpoint_every", "log_every", "max_steps", "batch_size", "gradient_accumulation_steps"):
            if int(train[key]) < 1:
                raise TrainingError(f"train.{key} is {train[key]}; it must be at least 1.")
        if config["data"]["hr_dir"] is None:
            raise TrainingError("no training data: set data.hr_dir (a folder of high-resolution images), e.g. with --data DIR.")
        # One run per output folder: the lock dies with the process that holds it, SIGKILL included.
        self._lock = None
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                self._lock = FolderLock(self.output_dir, "--output-dir").acquire()
            except FolderLockedError as err:
                raise TrainingError(str(err)) from None
            except OSError as err:
                raise TrainingError(f"--output-dir {self.output_dir} cannot be used ({err.strerror or err}).") from None
            self._sweep_leftovers()
        existing = checkpoint_folders(self.output_dir) if self.output_dir.is_dir() else []
        if existing and not resume:
            raise TrainingError(
                f"{self.output_dir} already holds checkpoints (newest step {existing[-1][0]}); pass --resume to "
                "continue that run, or choose another --output-dir."
            )
        # Resume candidates, newest first: damaged ones are skipped (and said so); a changed config is refused
        # before any model is built.
        self._candidates = self._resume_candidates(existing) if resume else []
        # Without a GPU, accelerate turns a multi-process launch (torchrun's WORLD_SIZE) into gloo CPU processes
        # only when told to use the CPU.
        cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = accelerator = Accelerator(
            cpu=cpu_processes,
            mixed_precision=train["mixed_precision"],
            gradient_accumulation_steps=int(train["gradient_accumulation_steps"]),
            log_with="tensorboard" if train["log_with"] == "tensorboard" else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        # The same seed on every process: every rank builds identical random weights (LoRA, heads, a random base).
        set_seed(int(config["seed"]))
        self.method: TrainingMethod = METHODS[config["method"]](config)
        self.teacher = None
        if config["teacher"]["network"] is not None:
            if not self.method.needs_lq or config["data"]["latent_dir"] is not None:
                raise TrainingError("a teacher makes targets from LQ images: it needs a method that trains on LQ inputs and no data.latent_dir.")
            self.teacher = Teacher(config["teacher"], int(config["data"]["scale"])).to(accelerator.device)
        self._prepare()
        self.ema = None
        if float(train["ema_decay"]) > 0:
            self.ema = EMA(self.method.exported_parameters(), float(train["ema_decay"]))
        accelerator.register_save_state_pre_hook(self._save_models_hook)
        accelerator.register_load_state_pre_hook(self._load_models_hook)
        self.start_step = 0
        if self._candidates:
            self.start_step = self._resume_newest()
        self._stop_requested = False
        self.model_path: Path | None = None
        """Where :meth:`train` wrote the finished model (main process)."""

    def _prepare(self) -> None:
        accelerator, train = self.accelerator, self.config["train"]
        models = self.method.models()
        dtype = frozen_dtype(accelerator.mixed_precision)
        if dtype != torch.float32:
            for model in models.values():
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(dtype)
        specs = self.method.optimizer_specs()
        optimizers = [
            torch.optim.AdamW(s.params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay) for s in specs
        ]
        # accelerate steps a prepared scheduler once per process at every optimizer step.
        warmup = int(train["lr_warmup_steps"]) * accelerator.num_processes
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
            for opt in optimizers
        ]
        prepared = accelerator.prepare(*models.values(), *optimizers, *schedulers)
        n, k = len(models), len(optimizers)
        self.method.bind(
            Prepared(
                models=dict(zip(models, prepared[:n])),
                optimizers={s.name: o for s, o in zip(specs, prepared[n:n + k])},
                schedulers={s.name: sch for s, sch in zip(specs, prepared[n + k:])},
            ),
            accelerator,
            float(train["max_grad_norm"]) or None,
        )

    # accelerate would save and load every weight of every model, frozen base included; the trained tensors
    # are all a run needs, so the hooks take the models out of its hands.
    def _save_models_hook(self, models, weights, output_dir) -> None:
        weights.clear()
        if self.accelerator.is_main_process:
            tensors = self.method.trainable_state_dict()
            if self.ema is not None:
                tensors.update({EMA_PREFIX + k: v for k, v in self.ema.shadow.items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(output_dir) / TRAINABLE_FILE))

    def _load_models_hook(self, models, input_dir) -> None:
        models.clear()

    def _sweep_leftovers(self) -> None:
        """With the folder's lock held, what a killed run left half-written is removed: ``.partial`` checkpoints
        and temporary files of atomic writes."""
        for partial in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}"):
            shutil.rmtree(partial, ignore_errors=True)
            print(f"removed {partial}, left half-written by a run that was killed")
        for folder in (self.output_dir, self.output_dir / "logs"):
            if folder.is_dir():
                sweep_stale_temporaries(".", folder, file_suffix=".tmp")

    def _resume_candidates(self, existing: list[tuple[int, Path]]) -> list[Path]:
        """The checkpoints to try, newest first: damaged ones are left out with one line each, and the newest
        whole one's config must equal this run's but for :data:`training.config.CHANGEABLE_ON_RESUME`."""
        candidates = []
        for step, folder in reversed(existing):
            problem = checkpoint_problem(folder)
            if problem is not None:
                print(f"checkpoint {folder} is damaged ({problem}); falling back to the previous complete one")
                continue
            candidates.append(folder)
        if existing and not candidates:
            raise TrainingError(f"every checkpoint in {self.output_dir} is damaged; nothing can be resumed (start a new --output-dir).")
        if candidates:
            self._check_resume_config(candidates[0])
        return candidates

    def _check_resume_config(self, folder: Path) -> None:
        with open(folder / "config.yaml", encoding="utf-8") as f:
            saved = yaml.safe_load(f)
        allowed, refused = resume_changes(saved, self.config)
        if refused:
            shown = ", ".join(f"{k} ({_flat_value(saved, k)!r} -> {_flat_value(self.config, k)!r})" for k in refused[:8])
            more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
            raise TrainingError(
                f"--resume cannot change {shown}{more} of the run saved in {folder}; resume with the saved values, "
                "or start a new --output-dir."
            )
        self.resume_changes = allowed
        for key, (old, new) in allowed.items():
            print(f"resuming with {key} changed from {old!r} to {new!r}")

    def _resume_newest(self) -> int:
        """Load the newest whole checkpoint; one that fails to load falls back to the previous one, said so."""
        errors = (TrainingError, ValueError, RuntimeError, OSError, KeyError, EOFError, pickle.UnpicklingError)
        for index, folder in enumerate(self._candidates):
            if index:
                self._check_resume_config(folder)
            try:
                step = self._resume(folder)
            except errors as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.accelerator.print(f"checkpoint {folder} cannot be loaded ({detail}); falling back to the previous complete one")
                continue
            if self.accelerator.is_main_process and getattr(self, "resume_changes", None):
                self._record_changes(step)
            return step
        raise TrainingError(f"no checkpoint in {self.output_dir} could be loaded; nothing can be resumed (start a new --output-dir).")

    def _record_changes(self, step: int) -> None:
        """Append this resume's allowed config changes to ``logs/resumes.yaml`` (the next checkpoint's
        ``config.yaml`` and the exported model's ``training_config`` hold the new values too)."""
        path = self.output_dir / "logs" / "resumes.yaml"
        history = []
        if path.is_file():
            try:
                history = yaml.safe_load(path.read_text(encoding="utf-8")) or []
            except (OSError, yaml.YAMLError):
                history = []
        history.append({"step": step, "changes": {k: {"from": o, "to": n} for k, (o, n) in self.resume_changes.items()}})
        with atomic_output(path) as tmp:
            tmp.write_text(yaml.safe_dump(history, sort_keys=False), encoding="utf-8")

    def _resume(self, folder: Path) -> int:
        self.accelerator.load_state(str(folder))
        tensors = load_file(str(folder / TRAINABLE_FILE))
        expected = set(self.method.trainable_state_dict())
        missing = sorted(expected - set(tensors))
        if missing:
            raise TrainingError(f"{folder / TRAINABLE_FILE} lacks the trained tensor {missing[0]!r} of this run.")
        self.method.load_trainable_state_dict({k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)})
        if self.ema is not None:
            for key in self.ema.shadow:
                if EMA_PREFIX + key not in tensors:
                    raise TrainingError(f"{folder} has no EMA weights, but this run keeps an EMA (train.ema_decay > 0).")
                self.ema.shadow[key].copy_(tensors[EMA_PREFIX + key])
        with open(folder / STATE_FILE, encoding="utf-8") as f:
            step = int(json.load(f)["step"])
        self.accelerator.print(f"resumed from {folder} at step {step}")
        return step

    def save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` (through a ``.partial`` name) and keep the newest ``checkpoints_total_limit``."""
        accelerator = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        try:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(partial))
            accelerator.wait_for_everyone()  # every rank's RNG state is in the folder before it is renamed
            if accelerator.is_main_process:
                self.write_model(partial)
                with open(partial / "config.yaml", "w", encoding="utf-8") as f:
                    yaml.safe_dump(self.config, f, sort_keys=False)
                with open(partial / STATE_FILE, "w", encoding="utf-8") as f:
                    json.dump({"step": step, "method": self.config["method"]}, f)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
        except (OSError, RuntimeError) as err:  # a full disk: torch's writer raises RuntimeError, the rest OSError
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingError(
                f"{final.name} could not be written in {self.output_dir} ({detail}); the half-written folder was removed "
                "and the earlier checkpoints are kept: free some space and run again with --resume."
            ) from None
            limit = int(self.config["train"]["checkpoints_total_limit"])
            for _, old in complete_checkpoints(self.output_dir)[:-limit] if limit > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def write_model(self, folder: Path) -> Path:
        """The method's model in ``folder`` (EMA weights when the run keeps an EMA)."""
        return self.method.write_model(folder, self.config, self.ema.shadow if self.ema is not None else None)

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (all processes must take the same branch)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="sum")
        return bool(value.item() > 0)

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (SIGTERM)."""
        return self._any_process(self._stop_requested)

    def _dataloader(self):
        data, train = self.config["data"], self.config["train"]
        dataset = SRPairDataset(
            data["hr_dir"],
            crop_size=int(data["crop_size"]),
            scale=int(data["scale"]),
            seed=int(self.config["seed"]),
            flip=bool(data["flip"]),
            lr_dir=data["lr_dir"],
            degradation=DegradationConfig.from_dict({"scale": int(data["scale"]), **data["degradation"]}),
            make_lq=self.method.needs_lq,
            cache_images=bool(data["cache_images"]),
            latent_dir=data["latent_dir"],
            skip_bad_images=bool(data["skip_bad_images"]),
            clean_prob=float(data["clean_prob"]),
        )
        accumulation = int(train["gradient_accumulation_steps"])
        position = StreamPosition(
            micro_batch=self.start_step * accumulation,
            batch_size=int(train["batch_size"]),
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )
        return build_dataloader(dataset, position, int(data["num_workers"]))

    def train(self) -> str:
        """Train to ``train.max_steps``; returns ``"finished"`` (exports written) or ``"stopped"`` (SIGTERM:
        checkpoint written, resume with ``--resume``)."""
        accelerator, train = self.accelerator, self.config["train"]
        max_steps, accumulation = int(train["max_steps"]), int(train["gradient_accumulation_steps"])
        every, log_every = int(train["checkpoint_every"]), int(train["log_every"])
        log = CSVLog(self.output_dir / "logs" / "train.csv", self.start_step) if train["log_with"] == "csv" else None
        if train["log_with"] == "tensorboard":
            accelerator.init_trackers("d3sr", config=_flat(self.config))
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        batches = iter(self._dataloader())
        bar = tqdm(total=max_steps, initial=self.start_step, desc=f"d3sr train ({self.config['method']})",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        status, step = "finished", self.start_step
        try:
            while step < max_steps:
                sums: dict[str, float] = {}
                for micro in range(accumulation):
                    batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                    if self.teacher is not None:
                        batch = self.teacher.apply(batch)
                    rng = torch.Generator().manual_seed(step_seed(int(self.config["seed"]), step, micro, accelerator.process_index))
                    for key, value in self.method.training_step(batch, step, rng).items():
                        sums[key] = sums.get(key, 0.0) + value / accumulation
                step += 1
                if self.ema is not None:
                    self.ema.update(self.method.exported_parameters())
                if self._any_process(any(not math.isfinite(v) for v in sums.values())):
                    raise TrainingError(f"a loss became NaN or infinite at step {step} ({sums}); lower the learning rates or check the data.")
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in sums.items() if k.startswith("loss")})
                if step % log_every == 0 or step == max_steps:
                    if log is not None and accelerator.is_main_process:
                        log.log(sums, step)
                    accelerator.log(sums, step=step)
                stop = self._stop_agreed()
                if step % every == 0 or step == max_steps or stop:
                    self.save(step)
                if stop:
                    status = "stopped"
                    break
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
        try:
            if status == "finished" and accelerator.is_main_process:
                self.model_path = self.write_model(self.output_dir)
            accelerator.wait_for_everyone()
            accelerator.end_training()
        finally:
            self.release()
        return status

    def release(self) -> None:
        """Give the output folder's lock back (it also goes when the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _flat_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def _flat(config: dict, prefix: str = "") -> dict:
    """Scalars of a nested config as ``a.b.c`` keys (what TensorBoard's hyper-parameter table takes)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
    return flat
