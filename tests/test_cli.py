"""``d3sr upscale | convert | info`` end to end on tiny models: unusual valid input works, bad input gets one clear
error each and leaves no output file."""

import json
import os
import pickle

import numpy as np
import png
import pytest
import torch
from PIL import Image

from d3sr_cli.main import main
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import convert_checkpoint, load_checkpoint, save_checkpoint
from d3sr_core.image_io import read_image
from tiny_models import write_osediff_pkl


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_base_dir):
    folder = tmp_path_factory.mktemp("model")
    write_osediff_pkl(folder / "osediff.pkl")
    return folder / "osediff.pkl"


def upscale(args, model, base):
    return main(["upscale", *map(str, args), "--model", str(model), "--base", str(base)])


def photo(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.random((-(-height // 6), -(-width // 6), channels))
    big = np.kron(coarse, np.ones((6, 6, 1)))[:height, :width]
    return np.clip(big + 0.05 * rng.random((height, width, channels)), 0, 1)


def test_rgb_odd_size(tmp_path, model, tiny_base_dir):
    Image.fromarray((photo(37, 53) * 255).astype(np.uint8)).save(tmp_path / "odd.png")
    assert upscale([tmp_path / "odd.png", "-o", tmp_path / "out", "--seed", 3], model, tiny_base_dir) == 0
    out = Image.open(tmp_path / "out" / "odd.png")
    assert out.size == (53 * 4, 37 * 4) and out.mode == "RGB"


def test_info_prints_metadata_json(model, capsys):
    assert main(["info", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "osediff" and info["timestep"] == "999" and len(info["adapters"]) == 4


def test_rgba_alpha_passes_through_upscaled(tmp_path, model, tiny_base_dir):
    rgba = photo(40, 48, 4)
    rgba[..., 3] = np.linspace(0, 1, 48)[None, :]
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(tmp_path / "a.png")
    assert upscale([tmp_path / "a.png", "-o", tmp_path / "out", "--scale", 2], model, tiny_base_dir) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "a.png")).astype(np.float32) / 255
    assert out.shape == (80, 96, 4)
    alpha_in = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"))[..., 3].astype(np.float32) / 255)
    expected = torch.nn.functional.interpolate(alpha_in[None, None], size=(80, 96), mode="bicubic", align_corners=False)
    assert np.abs(out[..., 3] - expected[0, 0].clamp(0, 1).numpy()).max() < 0.03
    assert np.abs(out[..., 3].mean(axis=0) - np.linspace(0, 1, 96)).max() < 0.05


def test_16bit_png_is_read_and_written_at_full_precision(tmp_path, model, tiny_base_dir):
    data = (photo(32, 40) * 65535).round().astype(np.uint16)
    data[0, 0] = [1000, 1001, 1002]  # not representable in 8 bits
    png.Writer(40, 32, greyscale=False, bitdepth=16).write(open(tmp_path / "deep.png", "wb"), data.reshape(32, 120))
    loaded = read_image(tmp_path / "deep.png")
    assert loaded.bit_depth == 16
    assert loaded.pixels[:, 0, 0].mul(65535).round().tolist() == [1000, 1001, 1002]
    assert upscale([tmp_path / "deep.png", "-o", tmp_path / "out"], model, tiny_base_dir) == 0
    width, height, _, info = png.Reader(filename=str(tmp_path / "out" / "deep.png")).read()
    assert (width, height, info["bitdepth"]) == (160, 128, 16)


def test_grayscale_stays_grayscale(tmp_path, model, tiny_base_dir):
    Image.fromarray((photo(30, 30, 1)[..., 0] * 255).astype(np.uint8), "L").save(tmp_path / "g.jpg")
    assert upscale([tmp_path / "g.jpg", "-o", tmp_path / "out"], model, tiny_base_dir) == 0
    out = Image.open(tmp_path / "out" / "g.png")
    assert out.mode == "L" and out.size == (120, 120)


def test_seed_makes_vae_sampling_deterministic(tmp_path, model, tiny_base_dir):
    Image.fromarray((photo(24, 24) * 255).astype(np.uint8)).save(tmp_path / "s.png")
    results = []
    for run, seed in ((1, 7), (2, 7), (3, 8)):
        args = [tmp_path / "s.png", "-o", tmp_path / f"o{run}", "--vae-sample", "sample", "--seed", seed]
        assert upscale(args, model, tiny_base_dir) == 0
        results.append(np.asarray(Image.open(tmp_path / f"o{run}" / "s.png")))
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


def assert_one_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("d3sr: error: ") and err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def test_corrupt_and_empty_images_fail_cleanly(tmp_path, model, tiny_base_dir, capsys):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert upscale([tmp_path / "corrupt.png", "-o", tmp_path / "out"], model, tiny_base_dir) == 1
    assert_one_error(capsys, "corrupt.png is not a readable image")
    (tmp_path / "empty.png").write_bytes(b"")
    assert upscale([tmp_path / "empty.png", "-o", tmp_path / "out"], model, tiny_base_dir) == 1
    assert_one_error(capsys, "empty.png is empty (0 bytes)")
    assert not list((tmp_path / "out").glob("*.png"))  # the manifest records the failures; no image is written


def test_zero_pixel_image_fails_cleanly(tmp_path, model, tiny_base_dir, capsys):
    header = png.Writer(1, 1, greyscale=True)
    with open(tmp_path / "zero.png", "wb") as f:
        header.write(f, [[0]])
    raw = bytearray((tmp_path / "zero.png").read_bytes())
    raw[16:24] = (0).to_bytes(4, "big") + (0).to_bytes(4, "big")  # IHDR width and height = 0
    (tmp_path / "zero.png").write_bytes(bytes(raw))
    assert upscale([tmp_path / "zero.png", "-o", tmp_path / "out"], model, tiny_base_dir) == 1
    assert_one_error(capsys, "zero.png has no pixels (0x0)")
    assert not (tmp_path / "out" / "zero.png").exists()


def test_truncated_safetensors_is_refused(tmp_path, model, tiny_base_dir, capsys):
    good = convert_checkpoint(model, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    assert upscale([tmp_path / "x.png", "-o", tmp_path / "out"], tmp_path / "cut.safetensors", tiny_base_dir) == 2
    assert_one_error(capsys, "cut.safetensors is not a readable .safetensors file")
    assert not (tmp_path / "out").exists()


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, capsys, writer):
    marker = tmp_path / "pwned"
    payload = {"rank_unet": 4, "state_dict_unet": RunsAShellCommand(marker)}
    path = tmp_path / "evil.pkl"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    assert main(["info", str(path)]) == 2
    assert_one_error(capsys, "evil.pkl was refused because it holds more than tensors")
    assert not marker.exists()


def test_checkpoint_for_another_base_family_is_refused(tmp_path, model, tiny_base_dir, capsys):
    checkpoint = load_checkpoint(model)
    checkpoint.base_family = "sdxl"
    save_checkpoint(checkpoint, tmp_path / "xl.safetensors")
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    assert upscale([tmp_path / "x.png", "-o", tmp_path / "out"], tmp_path / "xl.safetensors", tiny_base_dir) == 2
    assert_one_error(capsys, "xl.safetensors was made for base family SDXL", "is SD 2.x")
    assert not (tmp_path / "out").exists()


def test_convert_with_prompt_stores_the_embedding(tmp_path, model, tiny_base_dir):
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(model), "-o", str(out), "--base", str(tiny_base_dir), "--prompt", ""]) == 0
    stored = load_checkpoint(out).conditioning["prompt_embeds"]
    assert torch.equal(stored, load_base(tiny_base_dir).encode_prompt("")["prompt_embeds"])


def test_png_with_sbit_chunk_is_read_at_its_real_level(tmp_path):
    with open(tmp_path / "plain.png", "wb") as f:
        png.Writer(4, 4, greyscale=False, bitdepth=16).write(f, np.full((4, 12), 60000, dtype=np.uint16))
    with open(tmp_path / "sbit.png", "wb") as f:  # pypng stores 12-bit data as 16-bit samples plus an sBIT chunk
        png.Writer(4, 4, greyscale=False, bitdepth=12).write(f, np.full((4, 12), 4000, dtype=np.uint16))
    assert read_image(tmp_path / "plain.png").pixels.mean().item() == pytest.approx(60000 / 65535)
    assert read_image(tmp_path / "sbit.png").pixels.mean().item() == pytest.approx(4000 / 4095)


def test_outputs_get_the_usual_file_mode(tmp_path, model, tiny_base_dir):
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "m.png")
    old = os.umask(0o022)
    try:
        assert upscale([tmp_path / "m.png", "-o", tmp_path / "out"], model, tiny_base_dir) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "m.png").stat().st_mode & 0o777 == 0o644


def test_refuses_to_overwrite_an_input(tmp_path, model, tiny_base_dir, capsys):
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "keep.png")
    before = (tmp_path / "keep.png").read_bytes()
    assert upscale([tmp_path, "-o", tmp_path], model, tiny_base_dir) == 2
    assert_one_error(capsys, "keep.png would overwrite it")
    assert (tmp_path / "keep.png").read_bytes() == before


def test_unknown_or_missing_device(tmp_path, model, tiny_base_dir, capsys):
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "d.png")
    assert upscale([tmp_path / "d.png", "-o", tmp_path / "out", "--device", "gpu"], model, tiny_base_dir) == 2
    assert_one_error(capsys, "--device 'gpu' is not a device")
    if not torch.cuda.is_available():
        assert upscale([tmp_path / "d.png", "-o", tmp_path / "out", "--device", "cuda"], model, tiny_base_dir) == 2
        assert_one_error(capsys, "--device 'cuda' was asked for")


def test_base_folder_without_weights(tmp_path, model, tiny_base_dir, capsys):
    import shutil

    broken = tmp_path / "base"
    shutil.copytree(tiny_base_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    assert upscale([tmp_path / "b.png", "-o", tmp_path / "out"], model, broken) == 2
    assert_one_error(capsys, "unet could not be loaded", "expected a diffusers SD 2.x folder")


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path, model, tiny_base_dir, capsys):
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "taken").write_text("a file")
    assert upscale([tmp_path / "x.png", "-o", tmp_path / "taken"], model, tiny_base_dir) == 2
    assert_one_error(capsys, "--output-dir", "cannot be used")


def test_vae_tiles_waiting_on_disk_give_the_same_image(tmp_path, model, tiny_base_dir):
    """--vae-tile-store disk bounds memory by one tile; the written image equals the in-memory tiling's exactly."""
    Image.fromarray((photo(40, 56) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    for store in ("ram", "disk"):
        args = [tmp_path / "in.png", "-o", tmp_path / store, "--vae-tile-size", "64", "--vae-tile-store", store, "--scale", "2"]
        assert upscale(args, model, tiny_base_dir) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ram" / "in.png")), np.asarray(Image.open(tmp_path / "disk" / "in.png")))


def test_tile_values_mean_what_they_mean_in_every_host(tmp_path, model, tiny_base_dir, monkeypatch):
    """Unset and -1: the model's default; 0: off; a small --tile-size gets an overlap that fits it (OSEDiff's 32 would
    not), as in the ComfyUI node and the A1111 extension (d3sr_core.host_options). The options the model runs with
    are recorded (the tiling itself is tested in test_tiling.py)."""
    from d3sr_core.pipeline import Upscaler

    captured = []

    def record(self, images, options, *args, **kwargs):
        captured.append(options)
        return torch.zeros(*images.shape[:2], images.shape[2] * options.scale, images.shape[3] * options.scale)

    monkeypatch.setattr(Upscaler, "upscale", record)
    Image.fromarray((photo(24, 32) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    runs = [[], ["--tile-size", "-1", "--tile-overlap", "-1", "--vae-tile-size", "-1"], ["--tile-size", "0", "--vae-tile-size", "0"],
            ["--tile-size", "8"], ["--tile-size", "16", "--tile-overlap", "4"]]
    for index, extra in enumerate(runs):
        assert upscale([tmp_path / "in.png", "-o", tmp_path / f"out{index}", "--scale", "2", *extra], model, tiny_base_dir) == 0
    tiles = [(o.tile_size, o.tile_overlap, o.vae_encoder_tile_size, o.vae_decoder_tile_size) for o in captured]
    assert tiles == [(96, 32, 1024, 224), (96, 32, 1024, 224), (0, 32, 0, 0), (8, 2, 1024, 224), (16, 4, 1024, 224)]


def test_tile_value_below_minus_one_is_one_sentence(tmp_path, model, tiny_base_dir, capsys):
    Image.fromarray((photo(16, 16) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    assert upscale([tmp_path / "x.png", "-o", tmp_path / "out", "--tile-size", "-2"], model, tiny_base_dir) == 2
    assert_one_error(capsys, "tile_size=-2 is not allowed", "-1 (the model's default), 0 (off)")
    assert not (tmp_path / "out").exists()


def test_the_tile_store_follows_the_free_ram_per_image(tmp_path, model, tiny_base_dir, monkeypatch):
    """Without --vae-tile-store the store is chosen per image from the free RAM, as in ComfyUI and A1111; on disk a
    16-bit input is upscaled straight into a 16-bit buffer and written with the in-memory path's levels (AdaIN's
    statistics summed by bands: within IMAGE_REORDER)."""
    import d3sr_core.memory as memory
    from d3sr_core.pipeline import Upscaler
    from bounds import IMAGE_REORDER

    data = (photo(32, 40) * 65535).round().astype(np.uint16)
    png.Writer(40, 32, greyscale=False, bitdepth=16).write(open(tmp_path / "deep.png", "wb"), data.reshape(32, 120))
    seen, real = [], Upscaler.upscale

    def watched(self, images, options, progress=None, out=None):
        seen.append((options.vae_tile_store, None if out is None else out.dtype, progress is not None))
        return real(self, images, options, progress, out)

    monkeypatch.setattr(Upscaler, "upscale", watched)
    assert upscale([tmp_path / "deep.png", "-o", tmp_path / "roomy", "--scale", "2"], model, tiny_base_dir) == 0
    monkeypatch.setattr(memory, "available_ram", lambda: 1024**2)
    assert upscale([tmp_path / "deep.png", "-o", tmp_path / "tight", "--scale", "2"], model, tiny_base_dir) == 0
    assert seen == [("ram", None, True), ("disk", torch.uint16, True)]  # a tile progress bar in both
    levels = [np.vstack(list(png.Reader(filename=str(tmp_path / run / "deep.png")).asDirect()[2])).astype(int)
              for run in ("roomy", "tight")]
    assert levels[0].shape == (64, 240) and np.abs(levels[0] - levels[1]).max() <= IMAGE_REORDER * 65535
