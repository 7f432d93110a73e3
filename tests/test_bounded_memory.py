"""Whole-image memory bounded at any size: the disk path (``vae_tile_store="disk"``) keeps every whole-image tensor
on disk and gives the in-memory path's pixels; the chooser; the row-band blending; the process-peak bench."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import d3sr_core.pipeline as pipeline
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import build_generator, load_checkpoint
from d3sr_core.color import channel_mean_std, streamed_channel_mean_std
from d3sr_core.image_io import output_levels, to_pil
from d3sr_core.image_store import PlaneFile, as_output
from d3sr_core.loading import DEFAULT_MODEL, load_model
from d3sr_core.memory import choose_tile_store, ram_store_bytes
from d3sr_core.options import UpscaleOptions
from d3sr_core.pipeline import Upscaler
from d3sr_core.tiling import gaussian_blend_rows, gaussian_tile_weights, overlapping_tile_starts
from bounds import IMAGE_REORDER, max_difference
from tiny_models import random_image, write_osediff_pkl

TILED = dict(min_process_side=0, tile_size=8, tile_overlap=2, vae_encoder_tile_size=64, vae_decoder_tile_size=8)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory, tiny_base_dir):
    path = tmp_path_factory.mktemp("m") / "osediff.pkl"
    write_osediff_pkl(path)
    return Upscaler(build_generator(load_checkpoint(path), load_base(tiny_base_dir)), dtype="fp32")


@pytest.fixture(scope="module")
def bundled():
    loaded = load_model(DEFAULT_MODEL)
    return Upscaler(loaded.generator, dtype="fp32"), loaded.defaults.updated(min_process_side=0)


@pytest.mark.parametrize("color_fix, color_source, upsample", [
    ("adain", "upsampled", "pil_bicubic"), ("wavelet", "upsampled", "pil_bicubic"), ("none", "upsampled", "torch_bicubic"),
    ("wavelet", "input", "torch_bicubic"), ("adain", "input", "torch_bicubic"),
])
def test_disk_path_gives_the_in_memory_pixels(upscaler, color_fix, color_source, upsample):
    """Every colour fix and source: equal, except AdaIN, whose whole-image statistics are summed band by band."""
    image = random_image(37, 53, seed=3)
    options = UpscaleOptions(scale=4, color_fix=color_fix, color_source=color_source, upsample=upsample, **TILED)
    in_memory = upscaler.upscale(image, options)
    on_disk = upscaler.upscale(image, options.updated(vae_tile_store="disk"))
    assert on_disk.shape == in_memory.shape == (1, 3, 148, 212)
    if color_fix == "adain":
        assert max_difference(on_disk, in_memory) <= IMAGE_REORDER
    else:
        assert torch.equal(on_disk, in_memory)


@pytest.mark.parametrize("channels", [1, 4])
def test_disk_path_keeps_gray_and_alpha_and_resizes_small_images(upscaler, channels):
    image = torch.rand(1, channels, 20, 30, generator=torch.Generator().manual_seed(channels))
    options = UpscaleOptions(scale=2, **{**TILED, "min_process_side": 64})  # processed at 64 x 96, resized to 40 x 60
    in_memory = upscaler.upscale(image, options)
    on_disk = upscaler.upscale(image, options.updated(vae_tile_store="disk"))
    assert on_disk.shape == in_memory.shape == (1, channels, 40, 60)
    assert max_difference(on_disk, in_memory) <= IMAGE_REORDER


def test_out_buffers_receive_what_the_files_would_hold(upscaler):
    """uint8 / uint16 / float32 ``out`` equal the float result converted as to_pil and write_png convert, in both
    paths; a wrong buffer is one sentence."""
    image = random_image(24, 40, seed=8)
    options = UpscaleOptions(scale=2, color_fix="wavelet", **TILED)
    reference = upscaler.upscale(image, options)[0].permute(1, 2, 0)
    for store in ("ram", "disk"):
        for dtype in (torch.uint8, torch.uint16, torch.float32):
            out = torch.empty(1, 48, 80, 3, dtype=dtype)
            assert upscaler.upscale(image, options.updated(vae_tile_store=store), out=out) is out
            assert torch.equal(out[0], as_output(reference, dtype))
    eight_bit = output_levels(48, 80, 3)
    upscaler.upscale(image, options.updated(vae_tile_store="disk"), out=eight_bit)
    assert np.array_equal(np.asarray(to_pil(reference.permute(2, 0, 1))), eight_bit[0].numpy())
    with pytest.raises(ValueError, match=r"out has shape \(1, 48, 81, 3\).*expected \(1, 48, 80, 3\)"):
        upscaler.upscale(image, options, out=torch.empty(1, 48, 81, 3))


def test_pointwise_autoencoder_runs_band_by_band_bit_for_bit(bundled, monkeypatch):
    """The bundled model's patch autoencoder: latents as large as the image are encoded, denoised and decoded by
    the denoiser's tile rows (never whole), with exactly the in-memory pixels, batched tiles or not."""
    upscaler, defaults = bundled
    image = random_image(40, 72, seed=5)
    encoded_rows = []
    encode = upscaler.generator.encode
    monkeypatch.setattr(upscaler.generator, "encode", lambda x, **k: encoded_rows.append(x.shape[-2]) or encode(x, **k))
    for batch in (1, 3):
        options = defaults.updated(tile_size=16, tile_overlap=4, tile_batch_size=batch, color_fix="wavelet")
        in_memory = upscaler.upscale(image, options)
        encoded_rows.clear()
        on_disk = upscaler.upscale(image, options.updated(vae_tile_store="disk"))
        assert torch.equal(on_disk, in_memory)
        latent_height = 160 // upscaler.generator.vae_scale_factor
        assert encoded_rows and max(encoded_rows) < 160 and sum(encoded_rows) > latent_height  # rows, read per tile row


class LargestTensors(TorchDispatchMode):
    """Records the shape of every float tensor an operation creates (the tile store's byte views are not images)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(result) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return result


def created_shapes(upscaler, image, options, out):
    with LargestTensors() as seen:
        upscaler.upscale(image, options, out=out)
    return seen.shapes


def test_no_tensor_spans_the_image_on_disk(upscaler, monkeypatch):
    """SD-shaped VAE: on disk no operation creates an image tensor ``(B, C, h, w)`` covering half the image's area
    (tiles, bands, latents only); in memory several do, so the check can fail."""
    monkeypatch.setattr(pipeline, "BAND_PIXELS", 4096)  # bands of 8 rows: far below the image at this size
    upscaler = Upscaler(upscaler.generator, dtype="fp32", winograd=False)  # Winograd's transformed strips are not images
    image = random_image(96, 128, seed=2)
    options = UpscaleOptions(scale=4, color_fix="wavelet", **TILED)
    half_area = 384 * 512 // 2
    spans = lambda shapes: [s for s in shapes if len(s) == 4 and s[-2] * s[-1] >= half_area]  # noqa: E731
    out = output_levels(384, 512, 3)
    assert spans(created_shapes(upscaler, image, options, out))  # the in-memory path: whole-image tensors
    assert spans(created_shapes(upscaler, image, options.updated(vae_tile_store="disk"), out)) == []


def test_no_tensor_holds_half_an_image_of_latents_on_disk(bundled, monkeypatch):
    """Pointwise autoencoder: its latents hold as many values as the image; on disk no operation creates a tensor
    of half an RGB image's values; in memory several do."""
    upscaler, defaults = bundled
    monkeypatch.setattr(pipeline, "BAND_PIXELS", 4096)
    image = random_image(128, 160, seed=6)
    options = defaults.updated(tile_size=16, tile_overlap=4, tile_batch_size=1, color_fix="adain")
    half_image = 3 * 512 * 640 // 2
    large = lambda shapes: [s for s in shapes if int(np.prod(s)) >= half_image]  # noqa: E731
    out = output_levels(512, 640, 3)
    assert large(created_shapes(upscaler, image, options, out))
    assert large(created_shapes(upscaler, image, options.updated(vae_tile_store="disk"), out)) == []


def test_rows_are_blended_in_order_as_the_whole_image():
    """``gaussian_blend_rows`` against an independent whole-image accumulation: bands in order, covering every
    row once, bit for bit; it reads a tile row at a time."""
    latents = torch.randn(1, 2, 29, 23, generator=torch.Generator().manual_seed(0))
    predict = lambda z: 2 * z + z[..., :1, :1]  # noqa: E731  (depends on where the tile is; exact in any layout)
    tile, overlap = 8, 3
    rows, cols = overlapping_tile_starts(29, tile, overlap), overlapping_tile_starts(23, tile, overlap)
    window = gaussian_tile_weights(tile, tile).float()
    total, weights = torch.zeros(1, 2, 29, 23), torch.zeros(29, 23)
    for y in rows:
        for x in cols:
            total[..., y : y + tile, x : x + tile] += predict(latents[..., y : y + tile, x : x + tile]) * window
            weights[y : y + tile, x : x + tile] += window
    expected = total / weights
    for batch in (1, 4):
        bands, reads = [], []

        def read(y0, y1):
            reads.append((y0, y1))
            return latents[..., y0:y1, :]

        gaussian_blend_rows(predict, read, tuple(latents.shape), tile, overlap, lambda y0, b: bands.append((y0, b)),
                            tile_batch_size=batch)
        starts = [y0 for y0, _ in bands]
        assert starts == sorted(starts) and starts[0] == 0
        assert all(a + b.shape[-2] == c for (a, b), (c, _) in zip(bands, bands[1:]))
        assert torch.equal(torch.cat([b for _, b in bands], dim=-2), expected)
        if batch == 1:
            assert all(y1 - y0 == tile for y0, y1 in reads) and len(reads) == len(rows)


def test_streamed_statistics_equal_the_whole_image():
    image = torch.rand(2, 3, 50, 40, generator=torch.Generator().manual_seed(1))
    mean, std = channel_mean_std(image)
    streamed_mean, streamed_std = streamed_channel_mean_std(image[..., y : y + 7, :] for y in range(0, 50, 7))
    assert max_difference(mean, streamed_mean) < 1e-6 and max_difference(std, streamed_std) < 1e-6
    single = torch.rand(1, 3, 1, 1)
    assert torch.equal(streamed_channel_mean_std([single])[1], channel_mean_std(single)[1])  # one pixel: variance 0


def test_plane_file_reads_back_what_was_written(tmp_path):
    plane = PlaneFile(tmp_path / "p.f32", 3, 10, 12)
    values = torch.randn(3, 10, 12)
    plane.write(0, 0, values[:, :4])
    plane.write(4, 0, values[:, 4:, :5])
    plane.write(4, 5, values[:, 4:, 5:])
    assert torch.equal(plane.read(0, 10), values) and torch.equal(plane.read(2, 7, 3, 9), values[:, 2:7, 3:9])
    plane.write(0, 0, torch.zeros(1, 10, 12), first_channel=1)
    assert plane.read(0, 10)[1].abs().max() == 0 and torch.equal(plane.read(0, 10)[2], values[2])


def test_chooser_counts_whole_image_tensors_of_every_autoencoder(upscaler, bundled):
    """The bundled model's patch autoencoder holds no tile activations, but its whole-image tensors (latents as
    large as the image) still choose the disk for an 8000 x 6000 image unless the free RAM is many times larger."""
    patch_vae, sd_vae = bundled[0].generator.vae, upscaler.generator.vae
    float_image = 4 * 3 * 6000 * 8000
    assert ram_store_bytes(patch_vae, 6000, 8000) > 8 * float_image
    assert ram_store_bytes(sd_vae, 6000, 8000) > ram_store_bytes(sd_vae, 3000, 4000) * 3.9
    assert choose_tile_store(patch_vae, 6000, 8000, free_bytes=8 * 2**30) == "disk"
    assert choose_tile_store(patch_vae, 6000, 8000, free_bytes=64 * 2**30) == "ram"
    assert choose_tile_store(sd_vae, 512, 512, free_bytes=8 * 2**30) == "ram"


def test_process_peak_bench_runs_each_size_in_a_fresh_process():
    from d3sr_cli.bench import run_process_peaks

    report = run_process_peaks("tiny", [16], 2, dtype="fp32", winograd=False, tiles=(8, 64, 8), vae_tile_store="disk",
                               progress=lambda line: None)
    row = report["process_peaks"][0]
    assert row["output_size"] == 32 and row["peak_versus_smallest"] == 1.0
    assert row["peak_rss_mib"] >= row["rss_after_model_mib"] > 50  # a whole process: imports and models
    assert report["ours_options"]["vae_tile_store"] == "disk"

