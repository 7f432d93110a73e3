"""Reading tensor files safely and writing any file atomically.

Pickled files (``.pkl``, ``.ckpt``, ``.pt``, ``.pth``) are opened with ``torch.load(weights_only=True)``, whose
unpickler admits only tensors, dicts, lists, tuples, strings and numbers: a model file can never run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".pkl", ".ckpt", ".pt", ".pth", ".bin")


class ModelFileError(ValueError):
    """A model file is missing, unreadable, or not what was expected. The message is one sentence."""


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist; expected {what}.")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file; expected {what}.")
    return path


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the ``__metadata__`` of a ``.safetensors`` file."""
    path = require_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path} is not a readable .safetensors file ({err}); expected {what}.") from None
    return tensors, metadata


def read_pickle(path: str | os.PathLike, what: str) -> object:
    """The object in a torch-pickled file, unpickled with the restricted (weights-only) unpickler."""
    path = require_file(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(
            f"{path} was refused because it holds more than tensors, dicts, lists, strings and numbers "
            f"({first_line}); expected {what}."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelFileError(f"{path} is not a readable torch file ({err}); expected {what}.") from None


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a ``.safetensors`` or pickled file (unwrapping a ``state_dict`` key)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, what)[0]
    if path.suffix not in PICKLE_SUFFIXES:
        raise ModelFileError(f"{path} has an unknown extension; expected {what} (.safetensors or {', '.join(PICKLE_SUFFIXES)}).")
    obj = read_pickle(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path} does not hold a flat dict of tensors; expected {what}.")
    return obj


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed.

    Readers therefore see either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the result gets the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_output` for a folder: yield an empty temporary folder beside ``path``; on success it takes
    ``path``'s place, on failure it is removed. An old folder at ``path`` is moved aside first and put back if the
    swap fails, so readers see the old folder or the new one (or, for the instant between two renames, none)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; the result gets the usual mode
        if not path.exists():
            os.replace(tmp, path)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, aside / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(aside / path.name, path)
            raise
        shutil.rmtree(aside)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
