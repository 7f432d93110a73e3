"""Pipeline behaviour: exact output size, batches, progress, dtypes, NaN, pre-upsampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import build_generator, load_checkpoint
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler, pil_bicubic_resize, processing_size, resolve_dtypes
from bounds import IMAGE_REORDER, MATTERS, max_difference
from tiny_models import random_image, write_osediff_pkl


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory, tiny_base_dir, device):
    path = tmp_path_factory.mktemp("m") / "osediff.pkl"
    write_osediff_pkl(path)
    return Upscaler(build_generator(load_checkpoint(path), load_base(tiny_base_dir)), dtype="fp32", device=device)


SMALL = dict(min_process_side=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0)


def test_batch_equals_images_one_by_one(upscaler):
    a, b = random_image(48, 80, seed=1), random_image(48, 80, seed=2)
    options = UpscaleOptions(scale=2, tile_size=8, tile_overlap=2, **SMALL)
    both = upscaler.upscale(torch.cat([a, b]), options)
    one_by_one = torch.cat([upscaler.upscale(a, options), upscaler.upscale(b, options)])
    assert max_difference(both, one_by_one) <= IMAGE_REORDER, max_difference(both, one_by_one)
    assert max_difference(both[0:1], one_by_one[1:2]) > MATTERS  # the images differ, so a swap would show


def test_progress_counts_every_tile_and_ends_at_total(upscaler):
    options = UpscaleOptions(
        scale=4, min_process_side=0, tile_size=8, tile_overlap=2, vae_encoder_tile_size=64, vae_decoder_tile_size=8
    )
    calls = []
    image = random_image(30, 41)
    upscaler.upscale(image, options, lambda done, total: calls.append((done, total)))
    total = upscaler.count_steps(30, 41, options)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == list(range(1, total + 1))
    assert total > 20  # tiled encoder, latent tiles and tiled decoder all reported


def test_cancel_from_progress_stops_the_run(upscaler):
    def cancel(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscaler.upscale(random_image(16, 16), UpscaleOptions(scale=4, tile_size=8, tile_overlap=2), cancel)


def test_output_is_exactly_scale_times_input_even_when_processed_larger(upscaler):
    assert processing_size(37, 53, UpscaleOptions()) == (512, 733)
    out = upscaler.upscale(random_image(37, 53), UpscaleOptions(tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0))
    assert out.shape == (1, 3, 148, 212)
    assert 0 <= out.min() and out.max() <= 1


def test_nan_output_is_an_error_not_a_black_image(upscaler, monkeypatch):
    monkeypatch.setattr(upscaler.generator, "predict", lambda z: torch.full_like(z, float("nan")))
    with pytest.raises(ValueError, match="produced NaN"):
        upscaler.upscale(random_image(16, 16), UpscaleOptions(scale=1, **SMALL))


def test_nan_input_is_refused(upscaler):
    image = random_image(8, 8)
    image[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        upscaler.upscale(image, UpscaleOptions(scale=1, **SMALL))


def test_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtypes("auto", cpu) == (torch.float32, torch.float32)
    assert resolve_dtypes("fp16", cuda) == (torch.float16, torch.float32)  # the SD VAE overflows in fp16
    assert resolve_dtypes("bf16", cpu) == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        resolve_dtypes("fp8", cpu)


def test_bf16_runs_close_to_fp32(tmp_path, tiny_base_dir, device):
    path = tmp_path / "osediff.pkl"
    write_osediff_pkl(path)
    image = random_image(32, 32)
    options = UpscaleOptions(scale=1, color_fix="wavelet", **SMALL)
    results = {}
    for dtype in ("fp32", "bf16"):
        generator = build_generator(load_checkpoint(path), load_base(tiny_base_dir))
        results[dtype] = Upscaler(generator, dtype=dtype, device=device).upscale(image, options)
    assert results["bf16"].dtype == torch.float32
    assert (results["bf16"] - results["fp32"]).abs().mean() < 0.05


def test_pil_bicubic_equals_pil_on_8bit_images_and_uses_floats_otherwise():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((120, 80), Image.BICUBIC)).astype(np.float32) / 255
    ours = pil_bicubic_resize(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, (80, 120))
    assert np.array_equal(ours[0].permute(1, 2, 0).numpy(), expected)
    deep = torch.from_numpy(rng.integers(0, 65536, (1, 1, 20, 30)).astype(np.float32) / 65535)
    resized = pil_bicubic_resize(deep, (80, 120))
    assert not np.allclose(resized.numpy() * 255, np.round(resized.numpy() * 255))  # not quantised to 8 bits


def test_processing_size_of_extreme_strips_is_capped():
    options = UpscaleOptions()  # x4, short side brought to 512
    assert processing_size(100, 100, options) == (512, 512)
    assert processing_size(3, 500, options) == (12, 2048)  # long side capped at 4 x 512, not 512 x 85,333
    assert processing_size(1000, 2000, options) == (4000, 8000)  # large inputs: plain x4


@pytest.mark.parametrize("color_fix", ["adain", "wavelet"])
def test_color_source_input_uses_the_input_as_tsdsr_does(upscaler, color_fix, monkeypatch):
    """TSD-SR takes AdaIN statistics from the input itself and the wavelet's low frequencies from its PIL-bicubic
    upsampling; OSEDiff takes both from the upsampled input."""
    import d3sr_core.pipeline as pipeline

    seen = []
    real = pipeline.apply_color_fix
    monkeypatch.setattr(pipeline, "apply_color_fix", lambda method, content, source: seen.append(source) or real(method, content, source))
    image = random_image(20, 24)
    options = UpscaleOptions(scale=2, upsample="torch_bicubic", color_fix=color_fix, color_source="input", **SMALL)
    upscaler.upscale(image, options)
    expected = image if color_fix == "adain" else pil_bicubic_resize(image, (40, 48))
    assert torch.equal(seen[-1].cpu(), expected)  # the colour source is moved to the output's device, unchanged
    upscaler.upscale(image, options.updated(color_source="upsampled"))
    assert torch.equal(seen[-1].cpu(), torch.nn.functional.interpolate(image, size=(40, 48), mode="bicubic", align_corners=False).clamp(0, 1))


def test_out_of_memory_halves_tiles_down_to_the_floor_then_gives_up(upscaler, monkeypatch):
    from d3sr_core.pipeline import OutOfMemoryError

    tried, freed = [], []

    def always_out_of_memory(images, options, progress=None, out=None):
        tried.append((options.tile_size, options.vae_encoder_tile_size, options.vae_decoder_tile_size))
        raise OutOfMemoryError("out of memory")

    monkeypatch.setattr(upscaler, "upscale", always_out_of_memory)
    with pytest.raises(OutOfMemoryError):
        upscaler.upscale_within_memory(random_image(8, 8), UpscaleOptions(), free_cache=lambda: freed.append(1))
    assert tried == [(96, 1024, 224), (48, 512, 112), (24, 256, 56), (16, 256, 32)]
    assert len(freed) == 3
