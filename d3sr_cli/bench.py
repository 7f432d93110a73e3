"""``d3sr bench``: time and peak memory of our pipeline against a reference path, in one process, interleaved.

The reference is **this project's pipeline run with the settings of the official ``test_osediff.py``** (peft LoRA
adapters unmerged, ``--merge_and_unload_lora False``; PyTorch's own kernels; OSEDiff's tiling; the official default
precision, fp16, on a GPU, and fp32 on the CPU, where the official script does not run). It is not the official
script itself (no DAPE tagger, no text encoder): it isolates what our defaults (merged LoRA, Winograd, tiles) change.
Before any time is taken, both paths must produce the same image within :data:`AGREEMENT_BOUNDS`; if our path runs
other tiles than the reference, the reference is run once more with ours for that check.

The models are built from the shipped configs with random weights and OSEDiff-shaped LoRA (rank 4 on every
convolution and attention projection of the UNet and the VAE encoder): speed does not depend on the values.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d3sr_core.backbones.base import BaseModel
from d3sr_core.backbones.sd2 import SHIPPED_CONFIG_DIR, sd2_base
from d3sr_core.checkpoints import OneStepCheckpoint, build_generator
from d3sr_core.lora import AdapterSpec, add_adapters, merge_adapters
from d3sr_core.options import PRESETS, UpscaleOptions
from d3sr_core.pipeline import Upscaler, resolve_dtypes

from d3sr_core.memory import release_freed_memory

TINY_UNET = {
    "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32, "attention_head_dim": 8,
    "layers_per_block": 1, "sample_size": 16, "use_linear_projection": True,
}
TINY_VAE = {
    "block_out_channels": [16, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "conv_in", "conv_out", "conv")


def random_base(arch: str, seed: int = 0) -> BaseModel:
    """An SD 2.x base of the shipped SD 2.1-base configs (``sd21``) or a tiny one, random weights, fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    with open(SHIPPED_CONFIG_DIR / "unet.json") as f:
        unet_config = json.load(f)
    with open(SHIPPED_CONFIG_DIR / "vae.json") as f:
        vae_config = json.load(f)
    with open(SHIPPED_CONFIG_DIR / "scheduler.json") as f:
        scheduler_config = json.load(f)
    if arch == "tiny":
        unet_config, vae_config = {**unet_config, **TINY_UNET}, {**vae_config, **TINY_VAE}
    elif arch != "sd21":
        raise ValueError(f"--arch {arch!r} is not one of sd21, tiny.")
    unet, vae = UNet2DConditionModel.from_config(unet_config), AutoencoderKL.from_config(vae_config)
    return sd2_base(unet, vae, scheduler_config, Path(f"random {arch}"))


def osediff_shaped_generator(arch: str, merge: bool):
    """The generator of a random OSEDiff-shaped model; ``merge`` folds the LoRA into the weights (ours) or keeps it
    as peft layers (the official scripts' default, ``--merge_and_unload_lora False``)."""
    base = random_base(arch)
    width = base.denoiser.config.cross_attention_dim
    embeds = torch.zeros(1, 77, width)
    generator = build_generator(
        OneStepCheckpoint("osediff", "sd2", "epsilon", 999, [], {}, {"prompt_embeds": embeds}), base, merge_lora=False
    )
    add_adapters(generator.denoiser, [AdapterSpec("default", "unet", 4, 8, LORA_TARGETS)])
    encoder_targets = tuple(n for n, m in generator.vae.named_modules() if n.startswith("encoder.") and isinstance(m, torch.nn.Conv2d))
    add_adapters(generator.vae, [AdapterSpec("default", "vae", 4, 8, encoder_targets)])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (generator.denoiser, generator.vae):
            for name, p in module.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    if merge:
        merge_adapters(generator.denoiser)
        merge_adapters(generator.vae)
    return generator


REFERENCE_IS = (
    "this project's pipeline with the official test_osediff.py settings: peft LoRA unmerged, PyTorch's own kernels, "
    "OSEDiff's tiling, fp16 on a GPU (the official default) and fp32 on the CPU"
)
AGREEMENT_BOUNDS = {"fp32": {"max_abs": 1e-3}, "half": {"min_psnr_db": 30.0}}
"""How close our path's image must be to the reference's (both in [0, 1]) before any time is printed: in fp32 on
both sides only rounding differs (merged LoRA, Winograd: measured 2.5e-5 on the tiny model), so 1e-3 at any pixel;
when either side computes in fp16 or bf16 (8 and 11 bits of mantissa), a PSNR of at least 30 dB between the two."""


class BenchMismatch(ValueError):
    """Our path and the reference computed different images; the message is one sentence with the numbers."""


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The CPU features that decide which kernels run (Winograd, oneDNN's AVX-512 and bf16 paths), as /proc/cpuinfo names them."""


def cpu_description() -> dict:
    """``{"name", "flags", "dtype_auto"}`` of this machine: a speed claim names the CPU it ran on."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    auto = "bf16" if resolve_dtypes("auto", torch.device("cpu"))[0] == torch.bfloat16 else "fp32"
    return {"name": name, "flags": [f for f in CPU_FLAGS if f in flags], "dtype_auto": auto}


def reference_dtype(device: torch.device) -> str:
    """The official script's precision where it runs: ``--mixed_precision fp16`` on a GPU; fp32 on the CPU."""
    return "fp32" if device.type == "cpu" else "fp16"


def agreement(reference: torch.Tensor, ours: torch.Tensor, half: bool) -> dict:
    """The two images' largest absolute difference and PSNR (images in [0, 1]), the bound that applies, and whether
    it is met."""
    difference = (reference.float().cpu() - ours.float().cpu())
    mse = float(difference.pow(2).mean())
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
    bound = AGREEMENT_BOUNDS["half" if half else "fp32"]
    max_abs = float(difference.abs().max())
    ok = max_abs <= bound["max_abs"] if "max_abs" in bound else psnr >= bound["min_psnr_db"]
    return {"max_abs": max_abs, "psnr_db": psnr, "bound": bound, "ok": ok}


_OPEN_CUDA_MEASURES: list["PeakMemory"] = []
"""CUDA measures in progress, outermost first: an inner one resets the allocator's peak, so it hands the peak so
far to the outer ones first."""


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's on a GPU, resident set size (sampled) on the CPU.
    ``release_freed`` first hands memory the allocator kept back to the system (CPU; not for nested measures inside
    a timed run)."""

    def __init__(self, device: torch.device, release_freed: bool = True):
        self.device, self.peak_bytes, self.release_freed = device, 0, release_freed

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for outer in _OPEN_CUDA_MEASURES:
                outer._seen = max(outer._seen, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = self._seen = torch.cuda.memory_allocated(self.device)
            _OPEN_CUDA_MEASURES.append(self)
        else:
            if self.release_freed:
                release_freed_memory()
            self._start, self._stop = self._rss(), threading.Event()
            self._top = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._top = max(self._top, self._rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            _OPEN_CUDA_MEASURES.remove(self)
            self.peak_bytes = max(self._seen, torch.cuda.max_memory_allocated(self.device)) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._top, self._rss()) - self._start
        return False


STAGES = ("encode", "denoise", "decode")


class StagePeaks:
    """Records the peak memory of each stage of a generator (``encode``, ``denoise``, ``decode``) above the level at
    the stage's start, by wrapping the generator's own methods (its maximum over the calls since :meth:`reset`)."""

    def __init__(self, generator, device: torch.device):
        self.peak_bytes: dict[str, int] = {}
        for stage in STAGES:
            setattr(generator, stage, self._measured(stage, getattr(generator, stage), device))

    def _measured(self, stage: str, run, device: torch.device):
        def measured(*args, **kwargs):
            with PeakMemory(device, release_freed=False) as memory:
                result = run(*args, **kwargs)
            self.peak_bytes[stage] = max(self.peak_bytes.get(stage, 0), memory.peak_bytes)
            return result

        return measured

    def reset(self) -> None:
        self.peak_bytes = {}


@dataclass
class BenchPath:
    name: str
    upscaler: Upscaler
    options: UpscaleOptions

    def __post_init__(self):
        self.stages = StagePeaks(self.upscaler.generator, self.upscaler.device)


def run_bench(arch: str, sizes: list[int], scale: int, repeats: int, device: torch.device, dtype: str,
              warmup: int = 1, progress=print, winograd: bool | None = None, tiles: tuple[int, int, int] | None = None,
              vae_tile_store: str = "ram") -> dict:
    """Median seconds and peak memory per image (whole and per stage) for both paths at each input size, and
    their ratios.

    The reference path (:data:`REFERENCE_IS`) runs OSEDiff's tiling, PyTorch's default kernels and
    :func:`reference_dtype`. Raises :class:`BenchMismatch` when the two paths' images differ beyond
    :data:`AGREEMENT_BOUNDS`, before anything is timed. Our path: ``winograd`` (``None``:
    wherever it applies, see ``Upscaler``), ``tiles`` = ``(latent, VAE encoder, VAE decoder)`` tile sizes instead
    of OSEDiff's, and ``vae_tile_store``."""
    osediff = PRESETS["osediff"].updated(scale=scale, min_process_side=0)
    ours = osediff.updated(vae_tile_store=vae_tile_store)
    if tiles is not None:
        ours = ours.updated(tile_size=tiles[0], tile_overlap=min(ours.tile_overlap, max(0, tiles[0] - 1)),
                            vae_encoder_tile_size=tiles[1], vae_decoder_tile_size=tiles[2])
    ours_upscaler = Upscaler(osediff_shaped_generator(arch, merge=True), device=device, dtype=dtype, winograd=winograd)
    ref_dtype = reference_dtype(device)
    paths = [
        BenchPath("reference", Upscaler(osediff_shaped_generator(arch, merge=False), device=device, dtype=ref_dtype,
                                        winograd=False), osediff),
        BenchPath("ours", ours_upscaler, ours),
    ]
    half = ours_upscaler.generator.denoiser_dtype != torch.float32 or ref_dtype != "fp32"
    results, agreements = [], []
    for size in sizes:
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        samples = {p.name: {"seconds": [], "peak_bytes": []} for p in paths}
        outputs = {}
        for _ in range(max(1, warmup)):  # not timed; the last run of each path is checked below
            for p in paths:
                outputs[p.name] = p.upscaler.upscale(image, p.options)
        if ours != osediff:  # other tiles compute another image: compare with the reference on ours
            outputs["reference"] = paths[0].upscaler.upscale(image, ours)
        check = agreement(outputs["reference"], outputs["ours"], half)
        agreements.append({"input_size": size, **check})
        if not check["ok"]:
            raise BenchMismatch(
                f"at {size} px our path's image differs from the reference's by {check['max_abs']:.3g} at most "
                f"(PSNR {check['psnr_db']:.1f} dB), outside the bound {check['bound']}, so no time is reported."
            )
        progress(f"{size}px: the paths agree (max |difference| {check['max_abs']:.2g}, PSNR {check['psnr_db']:.1f} dB, "
                 f"bound {check['bound']})")
        for p in paths:
            p.stages.reset()
        for repeat in range(repeats):
            for p in paths if repeat % 2 == 0 else reversed(paths):
                with PeakMemory(device) as memory:
                    start = time.perf_counter()
                    p.upscaler.upscale(image, p.options)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - start
                samples[p.name]["seconds"].append(seconds)
                samples[p.name]["peak_bytes"].append(memory.peak_bytes)
                progress(f"{size}px -> {size * scale}px  {p.name:9s}  {seconds:7.2f} s  peak {memory.peak_bytes / 2**20:8.1f} MiB")
        for p in paths:
            s = samples[p.name]
            results.append({
                "input_size": size, "output_size": size * scale, "path": p.name, "seconds": s["seconds"],
                "median_seconds": statistics.median(s["seconds"]), "peak_mib": max(s["peak_bytes"]) / 2**20,
                "stage_peak_mib": {k: v / 2**20 for k, v in p.stages.peak_bytes.items()},
            })
    ratios = []
    for size in sizes:
        ref, ours_result = (next(r for r in results if r["input_size"] == size and r["path"] == n) for n in ("reference", "ours"))
        ratios.append({
            "input_size": size,
            "speedup": ref["median_seconds"] / ours_result["median_seconds"],
            "memory_ratio": ours_result["peak_mib"] / max(ref["peak_mib"], 1e-9),
        })
    return {
        "arch": arch, "device": str(device), "dtype": dtype, "winograd": ours_upscaler.winograd, "scale": scale,
        "repeats": repeats, "warmup": warmup, "ours_options": ours.to_json(),
        "reference_is": REFERENCE_IS, "reference_dtype": ref_dtype, "reference_options": osediff.to_json(),
        "agreement": agreements,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_description(), "results": results,
        "ratios": ratios, "memory_growth": memory_growth(results),
    }


def _ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def memory_growth(results: list[dict]) -> list[dict]:
    """Each path's peak per stage (and whole) at every size as a multiple of its peak at the smallest size (``None``
    where that peak was zero)."""
    growth = []
    for name in ("reference", "ours"):
        rows = sorted((r for r in results if r["path"] == name), key=lambda r: r["input_size"])
        first = rows[0]
        for row in rows[1:]:
            entry = {"path": name, "input_size": row["input_size"], "versus_input_size": first["input_size"],
                     "whole": _ratio(row["peak_mib"], first["peak_mib"])}
            for stage in STAGES:
                entry[stage] = _ratio(row["stage_peak_mib"].get(stage, 0), first["stage_peak_mib"].get(stage, 0))
            growth.append(entry)
    return growth


def plot(report: dict, path: str | os.PathLike) -> Path:
    """Time and peak memory against output megapixels for both paths, as a PNG (drawn with PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    from d3sr_core.files import atomic_output

    width, height, margin = 900, 380, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    colours = {"reference": (200, 80, 60), "ours": (40, 110, 200)}
    panels = [("median_seconds", "seconds per image"), ("peak_mib", "peak memory (MiB)")]
    megapixels = sorted({r["output_size"] ** 2 / 1e6 for r in report["results"]})
    for index, (key, title) in enumerate(panels):
        left = margin + index * (width // 2)
        right, top, bottom = left + width // 2 - 2 * margin, 40, height - margin
        top_value = max(r[key] for r in report["results"]) * 1.1 or 1.0
        x_max = max(megapixels) * 1.05 or 1.0
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 12), f"{title}  ({report['arch']}, {report['device']}, {report['dtype']})", fill="black", font=font)
        draw.text((left, bottom + 24), "output megapixels", fill="black", font=font)
        for fraction in (0.0, 0.5, 1.0):
            draw.text((left - 50, bottom - fraction * (bottom - top) - 6), f"{top_value * fraction:.3g}", fill="black", font=font)
            draw.text((left + fraction * (right - left) - 10, bottom + 6), f"{x_max * fraction:.2g}", fill="black", font=font)
        for row, name in enumerate(("reference", "ours")):
            points = sorted((r["output_size"] ** 2 / 1e6, r[key]) for r in report["results"] if r["path"] == name)
            xy = [(left + x / x_max * (right - left), bottom - y / top_value * (bottom - top)) for x, y in points]
            if len(xy) > 1:
                draw.line(xy, fill=colours[name], width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
            draw.text((right - 80, top + 8 + 16 * row), name, fill=colours[name], font=font)
    path = Path(path)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def one_image_process_peak(arch: str, size: int, scale: int, options: dict, dtype: str, winograd: bool | None) -> dict:
    """In this process: build our path (:func:`osediff_shaped_generator`, merged), upscale one random ``size`` px
    image into an 8-bit buffer as a host that writes files does, and report the process's peak resident set
    (``ru_maxrss``, models, imports and all) and the resident set after the model was built."""
    import resource

    from d3sr_core.image_io import output_levels
    from d3sr_core.memory import fix_mmap_threshold

    fix_mmap_threshold()  # as the d3sr process does
    upscaler = Upscaler(osediff_shaped_generator(arch, merge=True), device="cpu", dtype=dtype, winograd=winograd)
    built = PeakMemory._rss()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    out = output_levels(size * scale, size * scale, 3)
    start = time.perf_counter()
    upscaler.upscale(image, UpscaleOptions.from_json(options), out=out)
    seconds = time.perf_counter() - start
    return {"input_size": size, "output_size": size * scale, "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_model_mib": built / 2**20}


def run_process_peaks(arch: str, sizes: list[int], scale: int, dtype: str = "auto", winograd: bool | None = None,
                      tiles: tuple[int, int, int] | None = None, vae_tile_store: str = "ram", progress=print) -> dict:
    """Whole-process peak memory of our path per size, each size in a fresh process (``python -m d3sr_cli.bench``,
    :func:`one_image_process_peak`), so no size inherits another's allocations: the number a user's process
    reaches, models and imports included, and its ratio to the smallest size's."""
    import subprocess
    import sys

    options = PRESETS["osediff"].updated(scale=scale, min_process_side=0, vae_tile_store=vae_tile_store)
    if tiles is not None:
        options = options.updated(tile_size=tiles[0], tile_overlap=min(options.tile_overlap, max(0, tiles[0] - 1)),
                                  vae_encoder_tile_size=tiles[1], vae_decoder_tile_size=tiles[2])
    rows = []
    for size in sizes:
        request = {"arch": arch, "size": size, "scale": scale, "options": options.to_json(), "dtype": dtype, "winograd": winograd}
        child = subprocess.run([sys.executable, "-m", "d3sr_cli.bench", json.dumps(request)], capture_output=True, text=True)
        if child.returncode != 0:
            raise ChildProcessError(f"the {size} px measurement failed: {child.stderr.strip().splitlines()[-1:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        progress(f"{size}px -> {row['output_size']}px  {row['seconds']:7.2f} s  process peak {row['peak_rss_mib']:8.1f} MiB "
                 f"(after building the model {row['rss_after_model_mib']:.1f} MiB)")
    first = rows[0]["peak_rss_mib"]
    for row in rows:
        row["peak_versus_smallest"] = row["peak_rss_mib"] / first
    return {"arch": arch, "scale": scale, "dtype": dtype, "ours_options": options.to_json(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_description(), "measure": "ru_maxrss of a fresh process per size, one image, 8-bit output",
            "process_peaks": rows}


if __name__ == "__main__":  # one measurement of run_process_peaks, in its own process
    import sys

    request = json.loads(sys.argv[1])
    print(json.dumps(one_image_process_peak(request["arch"], request["size"], request["scale"], request["options"],
                                            request["dtype"], request["winograd"])))
