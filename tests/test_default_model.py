"""The bundled default model and how it is made: the photos, the autoencoder and diffusion stages, the
three-stage reproduction at a few steps, the Real-ESRGAN baseline loader, and the model the package ships."""

import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from d3sr_cli.main import main as d3sr_main
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import load_checkpoint
from d3sr_core.image_io import read_image
from d3sr_core.loading import DEFAULT_MODEL, bundled_models, load_model
from training import photos
from training.config import load_config
from training.data import SRPairDataset
from training.default_model import reproduce
from training.methods import METHODS
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "chelsea_lr.png"


def _photo(seed: int, h: int, w: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    image = F.interpolate(torch.rand(1, 3, 5, 5, generator=gen), size=(h, w), mode="bicubic", align_corners=False)[0]
    image = (image + 0.1 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(4):
        Image.fromarray(_photo(i, 96 + 8 * i, 112)).save(folder / f"p{i}.png")
    return folder


def small_config(method: str, preset: str, photo_dir: Path, *overrides: str) -> dict:
    return load_config(
        preset=preset,
        overrides=[f"data.hr_dir={photo_dir}", "train.batch_size=2", "data.num_workers=0", *overrides],
        method_defaults=METHODS[method].defaults,
    )


def test_photos_come_from_the_wheels_with_a_fixed_held_out_split(tmp_path):
    cache = tmp_path / "wheels"
    cache.mkdir()
    members: dict[str, list[tuple[str, bytes]]] = {}
    for i, (package, member, _, _) in enumerate(photos.PHOTOS):
        buffer = io.BytesIO()
        Image.fromarray(_photo(i, 41 + i, 58)).save(buffer, format={"bmp": "BMP", "jpg": "JPEG"}.get(member[-3:], "PNG"))
        members.setdefault(package, []).append((member, buffer.getvalue()))
    for package, version in photos.WHEELS.items():
        with zipfile.ZipFile(cache / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
            for member, data in members[package]:
                wheel.writestr(member, data)
    names = photos.prepare_photos(tmp_path / "out", cache)
    held_out = [name for _, _, name, held in photos.PHOTOS if held]
    assert names["heldout"] == held_out and len(names["train"]) == len(photos.PHOTOS) - len(held_out)
    assert sorted(p.stem for p in (tmp_path / "out" / "train").iterdir()) == sorted(names["train"])
    hr = read_image(tmp_path / "out" / "heldout_hr" / "chelsea.png").pixels
    lr = read_image(tmp_path / "out" / "heldout_lr" / "chelsea.png").pixels
    assert hr.shape[-2] % 4 == 0 and hr.shape[-1] % 4 == 0 and lr.shape[-2:] == (hr.shape[-2] // 4, hr.shape[-1] // 4)
    photos.prepare_photos(tmp_path / "again", cache)
    assert torch.equal(read_image(tmp_path / "again" / "heldout_lr" / "chelsea.png").pixels, lr)


def test_autoencoder_stage_learns_and_writes_a_base_with_unit_variance_latents(photo_dir, tmp_path):
    config = small_config("autoencoder", "default_vae", photo_dir, "train.max_steps=6", "autoencoder.lr=2e-3")
    trainer = Trainer(config, tmp_path / "vae")
    dataset = SRPairDataset(photo_dir, crop_size=64, scale=4, seed=0, make_lq=False)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    vae = trainer.method.model.vae

    def recon_error():
        with torch.no_grad():
            return F.l1_loss(vae.decode(vae.encode(batch["gt"]).latent_dist.mean).sample, batch["gt"]).item()

    before = recon_error()
    for step in range(6):
        trainer.method.training_step(batch, step, torch.Generator().manual_seed(step))
    assert recon_error() < before
    folder = trainer.method.write_model(tmp_path / "out", config)
    base = load_base(folder, load_text_encoder=False)
    assert base.vae.config.latent_channels == 8 and base.denoiser.config.in_channels == 8
    latents = base.vae.encode(batch["gt"]).latent_dist.mean * base.vae.config.scaling_factor
    assert 0.4 < latents.std().item() < 2.5
    torch.testing.assert_close(dict(base.vae.named_parameters())["encoder.conv_in.weight"], vae.encoder.conv_in.weight)


def test_three_stage_reproduction_runs_at_a_few_steps_and_makes_a_self_contained_model(photo_dir, tmp_path):
    model = reproduce(photo_dir, tmp_path / "runs", ["train.max_steps=2", "train.batch_size=1", "data.num_workers=0"])
    assert model == tmp_path / "runs" / "sr" / "model.safetensors"
    vae_base = load_base(tmp_path / "runs" / "vae" / "base", load_text_encoder=False)
    prior_base = load_base(tmp_path / "runs" / "prior" / "base", load_text_encoder=False)
    # The prior stage trained the UNet and kept the VAE.
    assert not torch.equal(vae_base.denoiser.conv_in.weight, prior_base.denoiser.conv_in.weight)
    torch.testing.assert_close(vae_base.vae.state_dict(), prior_base.vae.state_dict(), rtol=0, atol=0)
    checkpoint = load_checkpoint(model)
    assert checkpoint.method == "d3sr" and checkpoint.base_configs is not None and checkpoint.timestep == 250
    assert checkpoint.training_config["model"]["base"] == str(tmp_path / "runs" / "prior" / "base")
    # Finished stages are not run again.
    stamp = model.stat().st_mtime_ns
    reproduce(photo_dir, tmp_path / "runs", ["train.max_steps=2"])
    assert model.stat().st_mtime_ns == stamp
    out = tmp_path / "up"
    assert d3sr_main(["upscale", str(photo_dir / "p0.png"), "-o", str(out), "--model", str(model)]) == 0
    assert read_image(out / "p0.png").pixels.shape == (3, 384, 448)


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_realesrgan_ncnn_weights_fill_the_network_in_layer_order():
    rrdb = _load_benchmark("realesrgan_x4plus")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in rrdb.RRDBNet().modules()) == 351  # as the .param lists
    source = rrdb.RRDBNet(blocks=1, features=8, growth=4)
    gen = torch.Generator().manual_seed(0)
    data = b""
    for conv in (m for m in source.modules() if isinstance(m, torch.nn.Conv2d)):
        weight = torch.randn(conv.weight.shape, generator=gen).half()
        bias = torch.randn(conv.out_channels, generator=gen)
        data += rrdb.NCNN_FP16_TAG.to_bytes(4, "little") + weight.numpy().tobytes() + bias.numpy().tobytes()
        with torch.no_grad():
            conv.weight.copy_(weight.float())
            conv.bias.copy_(bias)
    loaded = rrdb.load_ncnn_weights(rrdb.RRDBNet(blocks=1, features=8, growth=4), data)
    torch.testing.assert_close(loaded.state_dict(), source.state_dict(), rtol=0, atol=0)
    x = torch.rand(1, 3, 6, 5, generator=gen)
    assert loaded(x).shape == (1, 3, 24, 20)
    with pytest.raises(ValueError, match="left over"):
        rrdb.load_ncnn_weights(rrdb.RRDBNet(blocks=1, features=8, growth=4), data + b"\0\0\0\0")


def test_the_bundled_model_is_small_self_contained_and_upscales_the_sample(tmp_path):
    assert bundled_models() == {"d3sr-small-x4": DEFAULT_MODEL}
    assert DEFAULT_MODEL.stat().st_size < 50 * 2**20
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    assert checkpoint.method == "d3sr" and checkpoint.base_configs is not None and checkpoint.defaults.scale == 4
    assert load_model(DEFAULT_MODEL).generator.timestep == checkpoint.timestep
    # The README's first command.
    assert d3sr_main(["upscale", str(SAMPLE), "-o", str(tmp_path)]) == 0
    lr = read_image(SAMPLE).pixels
    assert read_image(tmp_path / "chelsea_lr.png").pixels.shape == (3, lr.shape[-2] * 4, lr.shape[-1] * 4)
