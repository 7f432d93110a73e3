"""Reading tensor files safely and writing any file atomically.

Pickled files (``.pkl``, ``.ckpt``, ``.pt``, ``.pth``) are opened with ``torch.load(weights_only=True)``, whose
unpickler admits only tensors, dicts, lists, tuples, strings and numbers: a model file can never run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

try:
    import fcntl
except ImportError:  # Windows: temporary files are not locked, and a run's folder lock uses msvcrt
    fcntl = None

PICKLE_SUFFIXES = (".pkl", ".ckpt", ".pt", ".pth", ".bin")
LOCK_NAME = ".lock"
"""The file inside a temporary folder (or a run's output folder) its owner holds an ``flock`` on while it lives."""
STALE_AFTER_S = 10.0
"""A temporary file or folder nobody holds a lock on is swept only once it is this old (its owner may be about to
take the lock)."""

log = logging.getLogger("d3sr")


class ModelFileError(ValueError):
    """A model file is missing, unreadable, or not what was expected. The message is one sentence."""


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist; expected {what}.")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file; expected {what}.")
    return path


def read_safetensors(
    path: str | os.PathLike, what: str, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the ``__metadata__`` of a ``.safetensors`` file; with ``keep``, only the tensors
    whose names it accepts are read (a checkpoint's text encoders can be gigabytes that are never needed)."""
    path = require_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path} is not a readable .safetensors file ({err}); expected {what}.") from None
    return tensors, metadata


def _unpickler_reason(err: Exception) -> str:
    """What the weights-only unpickler objected to, without torch's advice to reload with ``weights_only=False``
    (which would run whatever code the file holds)."""
    text = str(err)
    reason = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
    reason = " ".join(reason.split())
    if not reason:
        reason = " ".join(line for line in text.splitlines() if "weights_only" not in line).strip()
    return reason or type(err).__name__


def read_pickle(path: str | os.PathLike, what: str) -> object:
    """The object in a torch-pickled file, unpickled with the restricted (weights-only) unpickler."""
    path = require_file(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"{path} was refused because it holds more than tensors, dicts, lists, strings and numbers "
            f"({_unpickler_reason(err)}); expected {what}."
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

    Readers therefore see either the old file or the complete new one, never a half-written file. The temporary
    file (``.<stem>.*<suffix>.tmp``) is ``flock``-ed while it lives, so :func:`sweep_stale_temporaries` can tell
    one a killed process left behind from one that is being written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    if fcntl is None:  # Windows cannot rename a file that is open
        os.close(fd)
        fd = None
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the result gets the usual mode
        os.replace(tmp, path)
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock


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


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; whether it was free."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlocked_and_old(lock_file: Path, now: float) -> bool:
    """Whether nobody holds a lock on ``lock_file`` and it is older than :data:`STALE_AFTER_S`."""
    if fcntl is None:
        return now - lock_file.stat().st_mtime > 3600
    try:
        if now - lock_file.stat().st_mtime < STALE_AFTER_S:
            return False
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


@contextmanager
def temporary_folder(prefix: str, dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh folder ``<dir>/<prefix>*`` (the system temp folder by default), removed on leaving, also when
    ``KeyboardInterrupt`` or a signal turned into an exception ends the block. The owner holds an ``flock`` on its
    ``.lock`` file while it lives; the lock dies with the process, so :func:`sweep_stale_temporaries` removes the
    folder a ``SIGKILL`` left behind on the next start."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    fd = os.open(folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        _try_lock(fd)  # a fresh folder: nobody else can hold it
        yield folder
    finally:
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def sweep_stale_temporaries(
    prefix: str, dir: str | os.PathLike | None = None, *, file_suffix: str | None = None
) -> list[Path]:
    """Remove the ``<dir>/<prefix>*`` folders of :func:`temporary_folder` (``file_suffix=None``), or the
    ``<dir>/<prefix>*<file_suffix>`` files of :func:`atomic_output` (``.<stem>.*.png.tmp``), whose owner is gone
    (no lock held, older than :data:`STALE_AFTER_S`); returns what was removed. Folders without a lock file
    (written before locks existed) count as stale after an hour."""
    root = Path(dir) if dir is not None else Path(tempfile.gettempdir())
    removed, now = [], time.time()
    try:
        candidates = list(root.glob(f"{prefix}*{file_suffix or ''}"))
    except OSError:
        return removed
    for item in candidates:
        try:
            if file_suffix is None and item.is_dir() and not item.is_symlink():
                lock = item / LOCK_NAME
                stale = _unlocked_and_old(lock, now) if lock.exists() else now - item.stat().st_mtime > 3600
                if stale:
                    shutil.rmtree(item, ignore_errors=True)
                    removed.append(item)
            elif file_suffix is not None and item.is_file() and _unlocked_and_old(item, now):
                item.unlink()
                removed.append(item)
        except OSError:
            continue
    for item in removed:
        log.info("d3sr: removed %s, left behind by a process that was killed", item)
    return removed


class FolderLockedError(RuntimeError):
    """Another live process holds the folder; the message is one sentence."""


_HELD: dict[str, list[int]] = {}
"""Folders this process holds: ``realpath -> [fd, holders]`` (a lock keeps other processes out, not this one)."""


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held from :meth:`acquire` until :meth:`release` or the end
    of the process (the kernel drops it when the process dies, ``SIGKILL`` included). Another process that asks
    for it gets :class:`FolderLockedError`; this process may take it again (it counts its holders)."""

    def __init__(self, folder: str | os.PathLike, what: str = "the folder"):
        self.folder = Path(folder)
        self.what = what
        self._key: str | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            holder = (self.folder / LOCK_NAME).read_text(errors="replace").strip() or "another process"
            raise FolderLockedError(
                f"{self.folder} is in use by {holder}; wait for it to end or choose another {self.what}."
            ) from None
        if fcntl is not None:  # msvcrt locks the first byte against writes too
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()}".encode())
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        held = _HELD.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
