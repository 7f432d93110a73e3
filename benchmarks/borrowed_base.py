"""Memory and speed of a TSD-SR generator whose SD3 base comes from the host's graph (borrowed) or from the file.

The scene is a ComfyUI user whose graph already holds the SD3 base (Stability's layout, as ComfyUI keeps it).
The generator is then built either "from the file" (the same weights read again: a second copy) or "from the graph"
(``d3sr_core.borrowed``: the host's tensors, no copy), with its LoRA merged (the layers LoRA touches get their own
float32 copy) or unmerged (no copy; LoRA computed at run time). Each case runs in its own process, which first loads
the host's model, then resets its peak-memory mark (``/proc/self/clear_refs``), builds, and upscales six times.

``python benchmarks/borrowed_base.py [--size tiny|small|medium] [--host-dtype fp32|fp16] [--side 64] [--json OUT]`` prints a Markdown table:
peak resident memory above the host's own (MiB), the bytes of weights the generator owns once built (MiB), and the
median seconds of the last five upscales. ``small`` is a 6-layer, 512-wide MMDiT (about 60 M parameters with its VAE), so that
copies of the weights stand out of the process's own allocations; ``medium`` is SD3-medium's full architecture (random
weights, about 4 GB in fp16: run it by hand on a machine that holds it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": None,  # the test suite's tiny SD3 (tests/tiny_models.py)
    "small": {
        "transformer": dict(sample_size=32, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
                            num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=512,
                            pooled_projection_dim=256, out_channels=16, pos_embed_max_size=64),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(64, 128, 128, 128),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False),
    },
    "medium": "shipped",
}
CASES = [("file", True), ("file", False), ("graph", True), ("graph", False)]

CHILD = r"""
import gc, json, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
from d3sr_core.backbones import load_base
from d3sr_core.backbones.sd3 import MMDIT_PREFIX, VAE_PREFIX, sd3_base_from_stability_state
from d3sr_core.checkpoints import build_generator, load_checkpoint
from d3sr_core.memory import fix_mmap_threshold
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler

folder, source, merge, side = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "merged", int(sys.argv[4])
torch.set_num_threads(1)
fix_mmap_threshold()  # as the d3sr command does: freed memory leaves the process, so RSS shows what is held

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

# The host: ComfyUI's MODEL and VAE, holding the file's tensors under its names in its own memory (ComfyUI copies
# them into its modules; views of the file's mapping would only become resident when first read, inside the run).
state = load_file(str(folder / "base.safetensors"))
host_mmdit = {k[len(MMDIT_PREFIX):]: v.clone() for k, v in state.items() if k.startswith(MMDIT_PREFIX)}
host_vae = {k[len(VAE_PREFIX):]: v.clone() for k, v in state.items() if k.startswith(VAE_PREFIX)}
del state
host_storage = {t.untyped_storage().data_ptr() for t in [*host_mmdit.values(), *host_vae.values()]}
gc.collect()
baseline = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
config = folder / "config"
if source == "file":
    base = load_base(folder / "base.safetensors", config)
else:
    base = sd3_base_from_stability_state(host_mmdit, host_vae, "the host", config,
                                         borrowed=(lambda: host_mmdit, lambda: host_vae))
generator = build_generator(load_checkpoint(folder / "tsdsr.safetensors"), base, merge_lora=merge)
upscaler = Upscaler(generator, dtype="fp32")
seen, owned = set(), 0
for t in [*generator.parameters(), *generator.buffers(), *generator.denoiser._d3sr_kept.stored.values()]:
    ptr = t.untyped_storage().data_ptr() if not t.is_meta else None
    if ptr is not None and ptr not in seen and ptr not in host_storage:
        seen.add(ptr)
        owned += t.untyped_storage().nbytes()
options = UpscaleOptions(scale=1, min_process_side=0, tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0,
                         color_fix="none")
image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
upscaler.upscale(image, options)
times = []
for _ in range(5):
    start = time.perf_counter()
    upscaler.upscale(image, options)
    times.append(time.perf_counter() - start)
seconds = sorted(times)[2]
print(json.dumps({"source": source, "lora": "merged" if merge else "unmerged", "peak_above_host_mib": rss("VmHWM") - baseline,
                  "generator_owns_mib": owned / 2**20, "upscale_seconds": seconds}))
"""


def write_models(folder: Path, size: str, host_dtype: str) -> None:
    """The base as one Stability-layout file in ``host_dtype``, its configs, and a TSD-SR-shaped LoRA checkpoint (ours)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from test_sd3_single_file import transformer_to_stability, vae_to_ldm
    from tiny_models import TINY_SD3, TINY_SD3_VAE, TSDSR_TRANSFORMER_TARGETS

    from d3sr_core.backbones.sd3 import SHIPPED_CONFIG_DIR
    from d3sr_core.backbones.base import read_json
    from d3sr_core.checkpoints import OneStepCheckpoint, save_checkpoint
    from d3sr_core.lora import AdapterSpec, add_adapters
    from d3sr_core.options import PRESETS

    if SIZES[size] is None:
        transformer_config, vae_config = TINY_SD3, TINY_SD3_VAE
    elif SIZES[size] == "shipped":
        transformer_config = read_json(SHIPPED_CONFIG_DIR / "transformer.json")
        vae_config = read_json(SHIPPED_CONFIG_DIR / "vae.json")
    else:
        transformer_config, vae_config = SIZES[size]["transformer"], SIZES[size]["vae"]
    torch.manual_seed(0)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[host_dtype]
    transformer = SD3Transformer2DModel.from_config(transformer_config).to(dtype).eval()
    vae = AutoencoderKL.from_config(vae_config).to(dtype).eval()
    state = {"model.diffusion_model." + k: v for k, v in transformer_to_stability(transformer).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "base.safetensors"))
    config = folder / "config"
    config.mkdir()
    (config / "transformer.json").write_text(json.dumps(dict(transformer.config)))
    (config / "vae.json").write_text(json.dumps(dict(vae.config)))
    (config / "scheduler.json").write_text((SHIPPED_CONFIG_DIR / "scheduler.json").read_text())
    rank = 4
    spec = AdapterSpec("default", "transformer", rank, rank, tuple(TSDSR_TRANSFORMER_TARGETS))
    lora_model = SD3Transformer2DModel.from_config(transformer_config)
    add_adapters(lora_model, [spec])
    generator = torch.Generator().manual_seed(1)
    tensors = {"transformer." + n: torch.randn(p.shape, generator=generator) * 0.02
               for n, p in lora_model.named_parameters() if ".lora_" in n}
    conditioning = {"prompt_embeds": torch.randn(1, 7, transformer_config["joint_attention_dim"], generator=generator),
                    "pooled_prompt_embeds": torch.randn(1, transformer_config["pooled_projection_dim"], generator=generator)}
    save_checkpoint(OneStepCheckpoint(method="tsdsr", base_family="sd3", prediction_type="flow", timestep=1000,
                                      adapters=[spec], tensors=tensors, conditioning=conditioning, defaults=PRESETS["tsdsr"]),
                    folder / "tsdsr.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--side", type=int, default=64, help="input side in pixels (processed at scale 1, untiled)")
    parser.add_argument("--host-dtype", choices=("fp32", "fp16"), default="fp32",
                        help="the dtype the host holds the base in (ComfyUI on a CPU: fp32); the run computes in fp32")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_models(Path(tmp), args.size, args.host_dtype)
        for source, merge in CASES:
            result = subprocess.run([sys.executable, "-c", CHILD, tmp, source, "merged" if merge else "unmerged", str(args.side)],
                                    capture_output=True, text=True, cwd=ROOT, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"SD3 base ({args.size}, {args.host_dtype}) held by the host; TSD-SR LoRA rank 4; {args.side} px, fp32, CPU\n")
    print("| base from | LoRA | peak above the host (MiB) | weights the generator owns (MiB) | upscale (s) |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['source']} | {row['lora']} | {row['peak_above_host_mib']:.1f} | {row['generator_owns_mib']:.1f} "
              f"| {row['upscale_seconds']:.3f} |")
    if args.json:
        record = {"size": args.size, "host_dtype": args.host_dtype, "side": args.side, "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
