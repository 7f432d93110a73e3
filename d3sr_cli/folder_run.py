"""``d3sr upscale`` over many files: one process, or many under ``accelerate launch`` (GPUs, machines, or gloo
CPU processes), resumable after a kill, with a manifest.

How a run goes:

1. The main process takes the output folder's lock, reads what earlier runs recorded (``manifest.jsonl`` and the
   part files a killed run left) and plans: an input is *done* when a record says it succeeded with the same
   settings, the input file is unchanged (bytes, mtime) and its output is a valid PNG of the recorded size. The
   plan (the inputs still to do) goes to every process.
2. Process ``rank`` of ``world`` takes ``pending[rank::world]``: the same split on every process, and the
   pending list keeps the inputs' order, so the work of a restart is spread evenly too.
3. Each image is written to ``.d3sr-staging/<name>.png`` (atomically), its record is appended to the process's
   part file, and only then is the PNG renamed into place. The rename is the commit: a kill before it leaves no
   output (the image is done again, it was never finished), a kill after it leaves a record (never done twice).
4. At the end the main process appends every part's records to ``manifest.jsonl`` and removes the parts.

No process waits for another while images are processed (images differ in size): progress and failures are
counted in the launch's rendezvous store, which every process can add to without a collective call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

MANIFEST = "manifest.jsonl"
PART_PREFIX = ".manifest.rank"
"""``<output>/.manifest.rank<N>.jsonl``: where process N appends its records until the main process merges them."""
STAGING = ".d3sr-staging"
PREFETCH = 2
"""Images read and decoded ahead of the model by a background thread: enough to hide the I/O of the next image,
few enough that memory stays at a couple of images."""
SETTING_ARGS = ("model", "embeddings", "base", "base_config", "prompt", "scale", "upsample", "tile_size",
                "tile_overlap", "vae_tile_size", "color_fix", "dtype", "vae_sample", "seed", "no_merge_lora")
"""The ``d3sr upscale`` arguments that change the pixels of a result beyond rounding: an output made with other
values is not reused by a restart. The device, Winograd, batching and the tile store only change rounding."""

FOLDER_RUN_HELP = """\
Several processes: accelerate launch [--multi_gpu] --num_processes N -m d3sr_cli.main upscale IN... -o OUT ...
shards the inputs over the processes (one per GPU; gloo CPU processes where there is no GPU; with several machines
OUT must be a folder they share). Every result is written atomically and recorded in OUT/manifest.jsonl (one JSON
line per image processed: input, output, size, seconds, error, ...). A run that was stopped or killed resumes when
started again with the same inputs, model and options: results that are complete and valid are skipped. A bad
input is reported and skipped; the exit status is 1 when any image failed."""


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``d3sr upscale`` options and help of this module."""
    parser.add_argument(
        "--batch-size", type=int, default=1, metavar="N",
        help="upscale up to N consecutive images of the same size together (faster on a GPU; equal to one at a time "
        "up to rounding; not with --vae-sample sample, whose noise would depend on the batch) (default 1)",
    )
    parser.epilog = FOLDER_RUN_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run_settings(args: argparse.Namespace) -> dict:
    """The settings a result depends on (:data:`SETTING_ARGS`), with each model file's size and mtime, so a model
    retrained at the same path is a different setting."""
    settings = {}
    for name in SETTING_ARGS:
        value = getattr(args, name, None)
        if name in ("model", "embeddings", "base", "base_config") and value is not None:
            path = Path(value).resolve()
            stat = path.stat() if path.is_file() else None
            value = [str(path), stat.st_size, stat.st_mtime_ns] if stat else str(path)
        settings[name] = value
    return settings


def _settings_id(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _die_with_the_launcher() -> None:
    """Ask the kernel for SIGTERM when the launcher dies (Linux). torchrun starts its workers in sessions of their
    own, so a launcher killed with SIGKILL would leave them running, still holding the output folder; SIGTERM ends
    a worker as Ctrl-C does (no half-written file, exit 143)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher died before the request was in place


class _Processes:
    """This process's place in the launch: ``rank`` of ``world``; the accelerator and the rendezvous store when
    there are several."""

    def __init__(self, device_name: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        self.rank = 0
        self._store = None
        self._local: dict[str, int] = {}
        self._lock = threading.Lock()
        if self.world <= 1:
            return
        try:
            from accelerate import Accelerator
        except ImportError:
            raise ValueError("upscaling with several processes needs accelerate, from the [train] extra: "
                             "pip install 'd3sr[train]'.") from None
        import torch
        import torch.distributed.distributed_c10d as c10d

        _die_with_the_launcher()
        if device_name not in (None, "cpu"):
            raise ValueError(f"--device {device_name!r} cannot be used with {self.world} processes: each process takes "
                             "its own GPU; leave --device unset, or give cpu.")
        # Without a GPU, accelerate turns a multi-process launch into gloo CPU processes only when told to use the
        # CPU (as training/trainer.py does).
        self.accelerator = Accelerator(cpu=device_name == "cpu" or not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        # The key-value store every process of the launch already shares: atomic counters without a collective.
        self._store = c10d._get_default_store()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def add(self, key: str, amount: int = 1) -> int:
        """Add to a counter shared by all processes; returns its new value (``amount=0`` reads it)."""
        if self._store is not None:
            return int(self._store.add(f"d3sr_upscale/{key}", amount))
        with self._lock:
            self._local[key] = self._local.get(key, 0) + amount
            return self._local[key]

    def share(self, value: object) -> object:
        """The main process's ``value``, on every process."""
        if self.accelerator is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def wait_for_everyone(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


@dataclass
class _Item:
    """One input as the prefetch thread hands it over: its pixels, or why it could not be read."""

    index: int
    path: Path
    image: object = None  # LoadedImage
    error: Exception | None = None
    started: float = 0.0


def _prefetch(files: list[Path], indices: list[int], stop: threading.Event) -> Iterator[_Item]:
    """``files[i]`` for ``i`` in ``indices``, read and decoded by a background thread up to :data:`PREFETCH` images
    ahead, so the next image's I/O and decoding overlap the model's work on this one."""
    from d3sr_core.image_io import read_image

    items: queue.Queue = queue.Queue(maxsize=PREFETCH)
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        for index in indices:
            item = _Item(index, files[index], started=time.time())
            try:
                item.image = read_image(item.path)
            except Exception as err:  # handed to the consumer, which reports it for this image only
                item.error = err
            if not put(item):
                return
        put(done)

    thread = threading.Thread(target=reader, name="d3sr-prefetch", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _batches(items: Iterator[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Consecutive readable items of the same shape, up to ``batch_size`` together; an unreadable one alone."""
    batch: list[_Item] = []
    for item in items:
        fits = (item.error is None and batch and len(batch) < batch_size
                and item.image.pixels.shape == batch[0].image.pixels.shape)
        if batch and not fits:
            yield batch
            batch = []
        batch.append(item)
        if item.error is not None:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_records(out_dir: Path) -> tuple[list[str], list[dict]]:
    """The manifest's lines as they are, and every record of the manifest and the part files; a torn last line
    (a process killed while appending) is left out."""
    manifest_lines, records = [], []
    paths = [out_dir / MANIFEST] + sorted(out_dir.glob(f"{PART_PREFIX}*.jsonl"))
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if path.name == MANIFEST:
                manifest_lines.append(line)
            records.append(record)
    return manifest_lines, records


def _input_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _png_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of a PNG that reads back whole (every chunk's CRC), else ``None``."""
    from d3sr_core.image_io import ImageFileError, check_image

    try:
        with open(path, "rb") as f:
            head = f.read(24)
        if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 24:
            return None
        check_image(path)
    except (OSError, ImageFileError):
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _plan(files: list[Path], out_dir: Path, settings: str) -> list[int]:
    """Indices of the inputs still to do (main process; nobody else is writing). An output that was staged and
    recorded but not yet renamed (a kill between the two) is renamed now: it was finished."""
    _, records = _read_records(out_dir)
    latest = {}
    for record in records:  # a later record of an output supersedes an earlier one
        if isinstance(record.get("output"), str):
            latest[Path(record["output"]).name] = record
    staging = out_dir / STAGING
    pending = []
    for index, path in enumerate(files):
        name = f"{path.stem}.png"
        record = latest.get(name)
        finished = (
            record is not None
            and record.get("error") is None
            and record.get("settings") == settings
            and [record.get("input_bytes"), record.get("input_mtime_ns")] == list(_input_identity(path) or ())
            and isinstance(record.get("size"), list)
        )
        if finished and not (out_dir / name).exists() and _png_size(staging / name) == tuple(record["size"]):
            os.replace(staging / name, out_dir / name)
        if not (finished and _png_size(out_dir / name) == tuple(record["size"])):
            pending.append(index)
    if staging.is_dir():  # staged results without a record: their process died before committing them
        for leftover in staging.iterdir():
            if leftover.is_file() and not leftover.name.endswith(".tmp"):
                leftover.unlink()
    return pending


def _merge(out_dir: Path) -> int:
    """Append the part files' records to ``manifest.jsonl`` (atomically, in the order they finished, once each
    even when a merge was killed halfway) and remove the parts; returns how many were added."""
    from d3sr_core.files import atomic_output

    manifest_lines, records = _read_records(out_dir)
    merged = {(r.get("run"), r.get("output"), r.get("input")) for r in map(json.loads, manifest_lines)}
    new = [r for r in records if (r.get("run"), r.get("output"), r.get("input")) not in merged]
    new.sort(key=lambda r: (r.get("finished") or 0.0, r.get("rank") or 0))
    unique = {(r.get("run"), r.get("output"), r.get("input")): r for r in new}
    lines = manifest_lines + [json.dumps(r) for r in unique.values()]
    with atomic_output(out_dir / MANIFEST) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for part in out_dir.glob(f"{PART_PREFIX}*.jsonl"):
        part.unlink()
    return len(unique)


def _message(err: BaseException, path: Path) -> str:
    from d3sr_core.image_io import ImageFileError

    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if isinstance(err, ImageFileError) else f"{path}: {first}"


def upscale_files(
    files: list[Path],
    out_dir: Path,
    make_upscaler: Callable[[object], tuple[object, object]],
    *,
    device: str | None,
    resolve_device: Callable[[str | None], object],
    settings: dict,
    batch_size: int = 1,
    fixed_tile_store: bool = False,
) -> int:
    """Upscale ``files`` into ``out_dir/<stem>.png`` in this process's share of the launch; returns the exit
    status, the same on every process: 0 when every image of this run succeeded, else 1.

    Args:
        files: the inputs, in the same order on every process, with distinct stems.
        make_upscaler: builds ``(Upscaler, UpscaleOptions)`` on a ``torch.device``; called only by a process that
            has images to do.
        device: the ``--device`` argument; with several processes only ``None`` or ``cpu``.
        resolve_device: turns ``device`` into a ``torch.device`` when there is one process.
        settings: what the results depend on (:func:`run_settings`); a result made with others is done again.
        batch_size: consecutive images of the same size upscaled together.
        fixed_tile_store: keep the options' VAE tile store (``--vae-tile-store`` given) instead of choosing it per
            image from the free RAM (``d3sr_core.host_options.with_tile_store``), as the other hosts do.
    """
    from tqdm import tqdm

    from d3sr_core.files import LOCK_NAME, FolderLock, sweep_stale_temporaries
    from d3sr_core.host_options import with_tile_store
    from d3sr_core.image_io import ImageFileError, output_levels, write_png_levels
    from d3sr_core.image_store import as_output

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r} is not allowed; expected a whole number of at least 1.")
    if batch_size > 1 and settings.get("vae_sample") == "sample":
        raise ValueError("--batch-size above 1 cannot be used with --vae-sample sample: each image's noise would "
                         "depend on the images batched with it; use --batch-size 1.")
    procs = _Processes(device)
    settings_id = _settings_id(settings)
    lock = None
    plan = None
    created = procs.is_main and not out_dir.exists()
    try:
        if procs.is_main:
            lock = FolderLock(out_dir, "--output-dir").acquire()  # a second run into the same folder would redo work
            sweep_stale_temporaries(".", out_dir / STAGING, file_suffix=".png.tmp")
            run_id = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            plan = {"run": run_id, "pending": _plan(files, out_dir, settings_id)}
        plan = procs.share(plan)
        pending, run_id = plan["pending"], plan["run"]
        mine = pending[procs.rank::procs.world]
        skipped = len(files) - len(pending)

        bar, stop_bar, watcher = None, threading.Event(), None
        if procs.is_main:
            if skipped:
                print(f"d3sr: {skipped} of {len(files)} images are already done in {out_dir}; skipping them.", flush=True)
            # disable=None: a bar on a terminal, none in a log file (where it would be a line of carriage returns).
            bar = tqdm(total=len(files), initial=skipped, unit="image", desc="upscale", dynamic_ncols=True, disable=None)

            def watch() -> None:  # the counters of every process, read twice a second
                while not stop_bar.wait(0.5):
                    bar.update(skipped + procs.add("done", 0) + procs.add("failed", 0) - bar.n)

            watcher = threading.Thread(target=watch, name="d3sr-progress", daemon=True)
            watcher.start()

        part = out_dir / f"{PART_PREFIX}{procs.rank}.jsonl"
        staging = out_dir / STAGING
        if mine:
            import torch

            torch_device = procs.accelerator.device if procs.accelerator is not None else resolve_device(device)
            upscaler, options = make_upscaler(torch_device)
            staging.mkdir(exist_ok=True)

            def record(item: _Item, size, seconds: float, error: str | None) -> dict:
                identity = _input_identity(item.path) or (None, None)
                pixels = item.image.pixels if item.image is not None else None
                return {
                    "input": str(item.path), "output": str(out_dir / f"{item.path.stem}.png"),
                    "size": list(size) if size else None, "seconds": round(seconds, 4), "error": error,
                    "input_size": [pixels.shape[-1], pixels.shape[-2]] if pixels is not None else None,
                    "rank": procs.rank, "run": run_id, "started": item.started, "finished": time.time(),
                    "settings": settings_id, "input_bytes": identity[0], "input_mtime_ns": identity[1],
                }

            def append(line: dict) -> None:
                # One write per record through O_APPEND: a kill leaves whole lines (or a torn last one, which
                # readers skip); fsync because the record must be on disk before its output is renamed.
                fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, (json.dumps(line) + "\n").encode("utf-8"))
                    os.fsync(fd)
                finally:
                    os.close(fd)

            def fail(item: _Item, err: BaseException) -> None:
                message = _message(err, item.path)
                append(record(item, None, 0.0, message))
                procs.add("failed")
                tqdm.write(f"d3sr: error: {message}", file=sys.stderr)

            committed: set[int] = set()

            def results(batch: list[_Item]) -> Iterator[tuple[_Item, torch.Tensor]]:
                """Each item with its result as levels ``(H, W, C)`` of its bit depth. The tile store follows the
                free RAM unless --vae-tile-store chose it; on disk every image runs alone, straight into its
                8- or 16-bit buffer, so no float copy of a large image is ever made."""
                channels, height, width = batch[0].image.pixels.shape
                chosen = options if fixed_tile_store else with_tile_store(options, upscaler.generator.vae, height, width)
                size = (height * chosen.scale, width * chosen.scale)
                steps = upscaler.count_steps(height, width, chosen)  # per pass: a batch runs its tiles together
                # The images bar moves once per image: for a large one, a bar of its tiles shows progress and ETA.
                with tqdm(total=steps, unit="tile", desc=batch[0].path.name, leave=False, dynamic_ncols=True,
                          disable=None if procs.is_main else True, position=1) as tiles:
                    def progress(done: int, total: int) -> None:
                        tiles.update(done - tiles.n)

                    if chosen.vae_tile_store == "disk":
                        for item in batch:
                            levels = output_levels(*size, channels, item.image.bit_depth)
                            tiles.reset(total=steps)
                            upscaler.upscale(item.image.pixels[None], chosen, progress, out=levels)
                            yield item, levels[0]
                        return
                    pixels = upscaler.upscale(torch.stack([item.image.pixels for item in batch]), chosen, progress)
                bits = {8: torch.uint8, 16: torch.uint16}
                for item, image in zip(batch, pixels):
                    yield item, as_output(image.permute(1, 2, 0), bits[item.image.bit_depth])

            def upscale(batch: list[_Item]) -> None:
                begin = time.perf_counter()
                done = list(results(batch))
                seconds = (time.perf_counter() - begin) / len(batch)
                for item, levels in done:
                    name = f"{item.path.stem}.png"
                    write_png_levels(staging / name, levels)
                    pixels = levels.permute(2, 0, 1)
                    append(record(item, (pixels.shape[-1], pixels.shape[-2]), seconds, None))
                    os.replace(staging / name, out_dir / name)  # the commit (see the module's docstring)
                    committed.add(item.index)
                    procs.add("done")
                    tqdm.write(f"{item.path} -> {out_dir / name} ({item.image.pixels.shape[-1]}x"
                               f"{item.image.pixels.shape[-2]} -> {pixels.shape[-1]}x{pixels.shape[-2]})")

            expected = (ImageFileError, ValueError, RuntimeError, OSError)  # RuntimeError includes out of memory
            stop = threading.Event()
            for batch in _batches(_prefetch(files, mine, stop), batch_size):
                if batch[0].error is not None:
                    if not isinstance(batch[0].error, expected):
                        raise batch[0].error
                    fail(batch[0], batch[0].error)
                    continue
                try:
                    upscale(batch)
                except expected as err:
                    if len(batch) == 1:
                        fail(batch[0], err)
                        continue
                    for item in batch:  # which one failed: each alone (those already committed are not redone)
                        if item.index in committed:
                            continue
                        try:
                            upscale([item])
                        except expected as single:
                            fail(item, single)
        procs.wait_for_everyone()
        total_failed = procs.add("failed", 0)
        done = procs.add("done", 0)
        if bar is not None:
            stop_bar.set()
            watcher.join()
            bar.update(skipped + done + total_failed - bar.n)
            bar.close()
        if procs.is_main:
            _merge(out_dir)
            print(f"d3sr: {done} upscaled, {skipped} already done, {total_failed} failed; manifest: {out_dir / MANIFEST}")
        # Nobody leaves before the merge is written: a launcher stops every process as soon as one exits with 1.
        procs.wait_for_everyone()
        return 1 if total_failed else 0
    finally:
        if procs.is_main:
            try:
                (out_dir / STAGING).rmdir()  # also after Ctrl-C or SIGTERM, when empty
            except OSError:
                pass
        if lock is not None:
            lock.release()
        if created and {p.name for p in out_dir.iterdir()} <= {LOCK_NAME}:
            # A run that wrote nothing (its model failed to load, say) leaves no folder it made behind.
            (out_dir / LOCK_NAME).unlink(missing_ok=True)
            out_dir.rmdir()

