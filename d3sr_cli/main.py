"""``d3sr upscale | convert | info | eval | bench | train``."""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
from pathlib import Path

from d3sr_core.color import COLOR_FIXES
from d3sr_core.files import ModelFileError
from d3sr_core.image_io import IMAGE_SUFFIXES, ImageFileError
from d3sr_core.metrics import ALL_METRICS
from d3sr_core.files import FolderLockedError
from d3sr_core.host_options import host_options
from d3sr_core.options import (
    DEFAULT_MAX_OUTPUT_PIXELS,
    DEFAULT_MAX_SCALE,
    DTYPES,
    UPSAMPLERS,
    VAE_SAMPLE_MODES,
    UpscaleOptions,
)
from d3sr_core.memory import fix_mmap_threshold
from d3sr_core.tiled_vae import TILE_STORES

from .folder_run import add_folder_arguments, run_settings, upscale_files
from .train import add_train


WINOGRAD_HELP = (
    "run the large 3x3 convolutions with NNPACK's Winograd algorithm: about 1.6x faster on the CPU, equal up to "
    "rounding (default: on wherever it applies, CPU and fp32)"
)


class CommandError(Exception):
    """Ends the command with one sentence on stderr and exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every ``with`` block cleans up as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _options_from_args(args: argparse.Namespace, defaults: UpscaleOptions, vae_scale_factor: int) -> UpscaleOptions:
    # Tile values as in ComfyUI and A1111 (d3sr_core.host_options): unset or -1 the model's default, 0 off.
    return host_options(
        defaults,
        vae_scale_factor,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        vae_tile_size=args.vae_tile_size,
        scale=args.scale,
        upsample=args.upsample,
        tile_batch_size=args.tile_batch_size,
        color_fix=args.color_fix,
        vae_sample=args.vae_sample,
        seed=args.seed,
        steps=args.steps,
        chop_size=args.chop_size,
        vae_tile_store=args.vae_tile_store,
        max_scale=args.max_scale,
        max_output_pixels=args.max_output_pixels,
    )


def _add_upscale(sub) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale image files or folders",
        description="Upscale images with a one-step diffusion SR model. Unset options take the model's method defaults.",
    )
    p.add_argument("inputs", nargs="+", help=f"image files or folders ({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the PNG results (<input name>.png)")
    p.add_argument("--model", help="checkpoint: ours (.safetensors), OSEDiff (.pkl), a TSD-SR folder, or a ResShift "
                   "/ TAD-SR UNet .pth (with --base autoencoder_vq_f4.pth and optionally --base-config, its official YAML) "
                   "(default: the bundled d3sr-small-x4)")
    p.add_argument("--embeddings", help="folder with TSD-SR's prompt_embeds.pt and pool_embeds.pt (default: --model)")
    p.add_argument("--base", help="base model: SD 2.x or SD3 diffusers folder, single-file SD 2.x .safetensors/.ckpt, or "
                   "single-file SD3 .safetensors in Stability's layout (sd3_medium.safetensors, with or without text encoders)")
    p.add_argument("--base-config", help="config folder for a single-file base that is not SD 2.1-base (unet.json, vae.json, "
                   "scheduler.json) or not SD3-medium (transformer.json, vae.json, scheduler.json)")
    p.add_argument("--scale", type=int, help="upscaling factor (default: the model's, 4 for OSEDiff)")
    p.add_argument("--upsample", choices=UPSAMPLERS, help="pre-upsampling filter (default: the method's)")
    p.add_argument("--tile-size", type=int,
                   help="latent tile size in latent pixels; -1 (or unset) the model's default, 0 no latent tiling")
    p.add_argument("--tile-overlap", type=int,
                   help="latent tile overlap in latent pixels; -1 (or unset) the model's default, at most a third of a "
                   "--tile-size you give")
    p.add_argument("--vae-tile-size", type=int,
                   help="VAE tile size in image pixels (decoder tiles cover as many); -1 (or unset) the model's "
                   "default, 0 no VAE tiling")
    p.add_argument("--tile-batch-size", type=int, help="latent tiles per denoiser call")
    p.add_argument("--color-fix", choices=COLOR_FIXES, help="colour correction toward the input (default: the method's)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: on a CPU bf16 where it is native (AVX512-BF16, AMX), else fp32; bf16/fp16 on a GPU (D3SR_CPU_BF16=0 keeps fp32 on every CPU)")
    p.add_argument("--vae-sample", choices=VAE_SAMPLE_MODES, help="posterior mode (deterministic) or a seeded sample")
    p.add_argument("--seed", type=int, help="seed for --vae-sample sample, and for a ResShift / TAD-SR model's noise "
                   "(default there 12345, as officially)")
    p.add_argument("--steps", type=int, help="ResShift / TAD-SR sampling steps (default: the config's, 15 for realsr v1; "
                   "1 is TAD-SR's one step at t = T-1; fewer respace the schedule, 4 of 15 visiting t = 11, 7, 3, 0)")
    p.add_argument("--chop-size", type=int, help="ResShift / TAD-SR: run inputs with a side over this many pixels in "
                   "overlapping patches (the official --chop_size, default 512, stride 448); 0 whole")
    p.add_argument("--prompt", help="text prompt (default: the embedding stored in the model, else empty)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--no-merge-lora", action="store_true", help="keep LoRA unmerged (slower; for debugging)")
    p.add_argument("--winograd", action=argparse.BooleanOptionalAction, help=WINOGRAD_HELP)
    p.add_argument("--vae-tile-store", choices=TILE_STORES,
                   help="where VAE tiles and whole-image tensors wait: ram, or disk (memory bounded by the tiles and a "
                   "band of rows at any image size, same result) (default: disk when the in-memory path would take "
                   "more than half the free RAM, per image)")
    p.add_argument("--max-scale", type=int, default=DEFAULT_MAX_SCALE,
                   help=f"refuse a --scale (or a model's scale) above this (default {DEFAULT_MAX_SCALE})")
    p.add_argument("--max-output-pixels", type=int, default=DEFAULT_MAX_OUTPUT_PIXELS,
                   help="refuse an image whose output, or processing size, has more pixels than this "
                   f"(default {DEFAULT_MAX_OUTPUT_PIXELS}, 8192x8192)")
    add_folder_arguments(p)
    p.set_defaults(run=run_upscale)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an official checkpoint to the d3sr .safetensors format")
    p.add_argument("source", help="OSEDiff .pkl, TSD-SR folder, ResShift / TAD-SR .pth (or one of ours)")
    p.add_argument("-o", "--output", required=True, help="destination .safetensors")
    p.add_argument("--embeddings", help="folder with TSD-SR's prompt_embeds.pt and pool_embeds.pt (default: source)")
    p.add_argument("--base", help="base model whose text encoder embeds --prompt into the checkpoint; for a ResShift / "
                   "TAD-SR .pth its VQ autoencoder (autoencoder_vq_f4.pth), stored in the one file")
    p.add_argument("--base-config", help="config folder for a single-file base that is not SD 2.1-base")
    p.add_argument("--prompt", help="store this prompt's embedding, so inference needs no text encoder")
    p.set_defaults(run=run_convert)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's metadata as JSON")
    p.add_argument("model", help="one-step checkpoint file or TSD-SR folder")
    p.add_argument("--embeddings", help="folder with TSD-SR's prompt_embeds.pt and pool_embeds.pt (default: model)")
    p.set_defaults(run=run_info)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="metrics of results against ground truths, paired by file name",
        description="PSNR and SSIM on the Y channel as the papers' test_metrics.py; pyiqa's learned metrics when their "
        "weights are already on disk ($TORCH_HOME/hub); nothing is downloaded.",
    )
    p.add_argument("--pred", required=True, help="folder of results")
    p.add_argument("--gt", required=True, help="folder of ground truths with the same file names")
    p.add_argument("--metrics", default="psnr,ssim", help=f"comma-separated, from: {','.join(ALL_METRICS)}")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", help="write the full report (per image too) here")
    p.add_argument("--markdown", help="write the means as a Markdown table here")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from d3sr_cli.evaluate import evaluate, markdown
    from d3sr_core.files import atomic_output

    for folder in (args.pred, args.gt):
        if not Path(folder).is_dir():
            raise CommandError(f"{folder} is not a folder of images.")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    report = evaluate(Path(args.pred), Path(args.gt), metrics, _device(args.device))
    table = markdown(report)
    print(table, end="")
    for problem in report["problems"]:
        print(f"d3sr: warning: {problem}", file=sys.stderr)
    for path, text in ((args.json, json.dumps(report, indent=2)), (args.markdown, table)):
        if path:
            with atomic_output(path) as tmp:
                tmp.write_text(text)
    if report["images"] == 0:
        print(f"d3sr: error: no image pair of {args.pred} and {args.gt} was scored (see the warnings above).", file=sys.stderr)
        return 1
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time and peak memory of our pipeline against the official way of running the same weights",
        description="Random-weight models from the shipped configs; the reference path keeps LoRA unmerged in fp32 as the "
        "official scripts do; both run interleaved in this process; medians and ratios are printed and saved.",
    )
    p.add_argument("--arch", choices=("sd21", "tiny"), default="sd21", help="full-size SD 2.1-base, or a tiny model")
    p.add_argument("--sizes", type=int, nargs="+", default=[128], help="input sides in pixels (outputs are scale x)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path and size, alternating the order")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per path and size first")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="our path's precision (the reference runs fp32)")
    p.add_argument("--winograd", action=argparse.BooleanOptionalAction, help=f"our path only: {WINOGRAD_HELP}")
    p.add_argument("--tiles", type=int, nargs=3, metavar=("LATENT", "ENCODER", "DECODER"),
                   help="our path's tile sizes (latent pixels, image pixels, latent pixels) instead of OSEDiff's")
    p.add_argument("--vae-tile-store", choices=TILE_STORES, default="ram", help="our path's VAE tile store (ram or disk)")
    p.add_argument("--process-peak", action="store_true",
                   help="instead: our path only, each size in a fresh process, one image written to an 8-bit buffer; "
                   "reports the whole process's peak resident memory (ru_maxrss, models included) and its ratio to "
                   "the smallest size's")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG of time and peak memory against output megapixels")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from d3sr_cli.bench import STAGES, plot, run_bench as bench
    from d3sr_core.files import atomic_output

    fix_mmap_threshold()  # resident memory then follows what the paths hold, not what glibc kept of it
    if args.process_peak:
        from d3sr_cli.bench import run_process_peaks

        report = run_process_peaks(args.arch, args.sizes, args.scale, args.dtype, args.winograd,
                                   tuple(args.tiles) if args.tiles else None, args.vae_tile_store)
        for row in report["process_peaks"]:
            print(f"{row['output_size']}px: process peak {row['peak_rss_mib']:.1f} MiB, "
                  f"{row['peak_versus_smallest']:.2f}x that at {report['process_peaks'][0]['output_size']}px")
        if args.json:
            with atomic_output(args.json) as tmp:
                tmp.write_text(json.dumps(report, indent=2))
        return 0
    device = _device(args.device)
    report = bench(args.arch, args.sizes, args.scale, args.repeats, device, args.dtype, args.warmup, winograd=args.winograd,
                   tiles=tuple(args.tiles) if args.tiles else None, vae_tile_store=args.vae_tile_store)
    for ratio in report["ratios"]:
        print(f"{ratio['input_size']}px: ours is {ratio['speedup']:.2f}x as fast, at {ratio['memory_ratio']:.2f}x the peak memory")
    times = lambda ratio: "n/a" if ratio is None else f"{ratio:.2f}x"  # noqa: E731
    for g in report["memory_growth"]:
        stages = ", ".join(f"{stage} {times(g[stage])}" for stage in STAGES)
        print(f"{g['path']}: peak memory at {g['input_size']}px is {times(g['whole'])} that at {g['versus_input_size']}px "
              f"({stages})")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d3sr", description="One-step diffusion super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_upscale(sub)
    _add_convert(sub)
    _add_info(sub)
    _add_eval(sub)
    _add_bench(sub)
    add_train(sub)
    return parser


def _device(name: str | None):
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device; expected cpu, cuda, cuda:N or mps.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise CommandError(f"--device {name!r} was asked for, but this torch build has no such device.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CommandError(f"--device {name!r} was asked for, but there are {torch.cuda.device_count()} CUDA devices.")
    return device


def run_upscale(args: argparse.Namespace) -> int:
    from d3sr_core.files import sweep_stale_temporaries
    from d3sr_core.image_io import list_images
    from d3sr_core.loading import load_model
    from d3sr_core.pipeline import Upscaler

    if args.vae_tile_store != "ram":  # disk, or chosen per image from the free RAM
        fix_mmap_threshold()  # the memory that disk-parked tiles save must also leave the process
    files = list_images(args.inputs)
    if not files:
        raise CommandError(f"no image files found in {', '.join(args.inputs)}.")
    names = [f.stem for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CommandError(f"several inputs would write {duplicates[0]}.png; give inputs with distinct names.")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--output-dir {out_dir} cannot be used: it is a file, not a folder.")
    clobbered = [f for f in files if (out_dir / f"{f.stem}.png").resolve() == f.resolve()]
    if clobbered:
        raise CommandError(f"the result for {clobbered[0]} would overwrite it; choose another --output-dir.")
    # Options and the output folder are checked before the model loads, so a typo costs no loading time.
    try:
        _options_from_args(args, UpscaleOptions(min_process_side=0), 8)  # the model's own is checked once loaded
    except ValueError as err:
        raise CommandError(f"the options do not fit: {err}") from None
    # Nothing is created yet (a model that fails to load leaves no folder behind): the nearest existing folder
    # must let this user create the rest.
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable by this user" if existing == out_dir.absolute() else f"cannot be created in {existing}"
        raise CommandError(f"--output-dir {out_dir} {what}.")
    if out_dir.is_dir():
        for name in {f.stem for f in files}:  # half-written results a killed run left behind
            sweep_stale_temporaries(f".{glob.escape(name)}.", out_dir, file_suffix=".png.tmp")
    if not args.model:
        from d3sr_core.loading import DEFAULT_MODEL

        if not DEFAULT_MODEL.is_file():
            raise CommandError(f"no --model given and the bundled default model is missing ({DEFAULT_MODEL}).")
        args.model = DEFAULT_MODEL
    def make_upscaler(device):
        loaded = load_model(
            args.model,
            args.base,
            embeddings_dir=args.embeddings,
            base_config=args.base_config,
            prompt=args.prompt,
            merge_lora=not args.no_merge_lora,
        )
        options = _options_from_args(args, loaded.defaults, loaded.generator.vae_scale_factor)
        return Upscaler(loaded.generator, device=device, dtype=args.dtype, winograd=args.winograd), options

    # One process, or this process's share of an `accelerate launch` (see folder_run.py).
    return upscale_files(files, out_dir, make_upscaler, device=args.device, resolve_device=_device,
                         settings=run_settings(args), batch_size=args.batch_size,
                         fixed_tile_store=args.vae_tile_store is not None)


def run_convert(args: argparse.Namespace) -> int:
    from d3sr_core.checkpoints import convert_checkpoint

    prompt_embeds = None
    if args.prompt is not None:
        if not args.base:
            raise CommandError("--prompt needs --base, whose text encoder embeds the prompt.")
        from d3sr_core.backbones import load_base

        prompt_embeds = load_base(args.base, args.base_config).encode_prompt(args.prompt)["prompt_embeds"]
    out = convert_checkpoint(args.source, args.output, prompt_embeds=prompt_embeds, embeddings_dir=args.embeddings,
                             base=args.base, base_config=args.base_config)
    print(f"{args.source} -> {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from d3sr_core.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(args.model, embeddings_dir=args.embeddings)
    info = checkpoint.metadata()
    info["adapters"] = json.loads(info["adapters"])
    for key in ("defaults", "base_configs", "training_config"):
        if key in info:
            info[key] = json.loads(info[key])
    info["file"] = str(args.model)
    info["file_format"] = (
        "TSD-SR folder" if Path(args.model).is_dir()
        else "d3sr .safetensors" if Path(args.model).suffix == ".safetensors"
        else "ResShift / TAD-SR .pth" if checkpoint.method == "resshift" else "OSEDiff .pkl"
    )
    info["tensors"] = len(checkpoint.tensors)
    info["parameters"] = sum(t.numel() for t in checkpoint.tensors.values())
    print(json.dumps(info, indent=2))
    return 0


def _quiet_libraries() -> None:
    """Our own progress bars and errors are the output; the libraries' loading bars and notices are noise."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors end in one line on stderr (exit 2), Ctrl-C and SIGTERM in one line (130, 143)
    after every temporary file and folder of the run was removed."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _quiet_libraries()
        return args.run(args)
    except (CommandError, ModelFileError, ImageFileError, ValueError, OSError, FolderLockedError) as err:
        print(f"d3sr: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(f"d3sr: {'terminated (SIGTERM)' if terminated else 'interrupted'}; nothing half-written was left.", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
