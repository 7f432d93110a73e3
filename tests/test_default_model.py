"""The bundled default model and how it is made: the photos, the autoencoder and diffusion stages, the
three-stage reproduction at a few steps, the Real-ESRGAN baseline loader, and the model the package ships."""

import io
import json
import shutil
from dataclasses import replace
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bounds import IMAGE_REORDER
from d3sr_cli.main import main as d3sr_main
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import load_checkpoint, save_checkpoint
from d3sr_core.backbones.patch_autoencoder import PatchAutoencoder, autoencoder_from_config
from d3sr_core.color import COLOR_FIXES
from d3sr_core.generator import vae_scale_factor
from d3sr_core.image_io import read_image, write_png
from d3sr_core.loading import DEFAULT_MODEL, bundled_models, load_model
from d3sr_core.lora import unwrapped_name
from training import photos, teachers
from training.config import load_config
from training.data import SRPairDataset, clean_downscale
from training.degradation import bicubic_downscale, evaluation_degradation
from training.evaluation import KINDS, selection_key
from training import default_model
from training.default_model import reproduce
from training.methods import plain_cnn
from training.methods import METHODS
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
KL_BASE_CONFIGS = {
    # A small SD 2.x-shaped base with an AutoencoderKL (8 latent channels, 4x), for the autoencoder method.
    "unet": {"sample_size": 16, "in_channels": 8, "out_channels": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
             "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 8, "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64},
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "clip_sample": False},
}
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
        method_defaults=METHODS[method].defaults, other_sections=tuple(METHODS),
    )


def _fake_sources(cache: Path) -> None:
    """Wheels (zips) and an extracted Debian package holding a small synthetic image under every member name."""
    members: dict[str, list[tuple[str, bytes]]] = {}
    for i, (package, member, _, _) in enumerate(photos.PHOTOS):
        buffer = io.BytesIO()
        Image.fromarray(_photo(i, 41 + 7 * i, 58)).save(buffer, format={"bmp": "BMP", "jpg": "JPEG"}.get(member[-3:], "PNG"))
        members.setdefault(package, []).append((member, buffer.getvalue()))
    for package, version in photos.WHEELS.items():
        with zipfile.ZipFile(cache / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
            for member, data in members[package]:
                wheel.writestr(member, data)
    for package, version in photos.DEBIAN_PACKAGES.items():
        for member, data in members[package]:
            path = cache / f"{package}_{version}" / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def test_photos_come_from_registry_packages_in_three_disjoint_splits_with_a_manifest(tmp_path):
    cache = tmp_path / "packages"
    cache.mkdir()
    _fake_sources(cache)
    names = photos.prepare_photos(tmp_path / "out", cache)
    splits = {split: {name for _, _, name, s in photos.PHOTOS if s == split} for split in photos.SPLITS}
    assert {k: set(v) for k, v in names.items()} == splits
    assert len(splits["heldout"]) >= 8 and len(splits["validation"]) >= 4
    # The held-out photos come from a source that nothing else uses.
    heldout_sources = {pkg for pkg, _, _, s in photos.PHOTOS if s == "heldout"}
    assert all(pkg not in heldout_sources for pkg, _, _, s in photos.PHOTOS if s != "heldout")
    assert sorted(p.stem for p in (tmp_path / "out" / "train").iterdir()) == sorted(splits["train"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {(m["name"], m["split"]) for m in manifest} == {(n, s) for _, _, n, s in photos.PHOTOS}
    assert all(m["licence"] and m["source"].split(":")[0] in ("pypi", "debian") for m in manifest)
    for split in ("validation", "heldout"):
        for name in splits[split]:
            hr = read_image(tmp_path / "out" / split / "hr" / f"{name}.png").pixels
            clean = read_image(tmp_path / "out" / split / "lr_clean" / f"{name}.png").pixels
            degraded = read_image(tmp_path / "out" / split / "lr_degraded" / f"{name}.png").pixels
            assert hr.shape[-1] == hr.shape[-2] <= photos.EVAL_CROP and hr.shape[-1] % 4 == 0
            assert clean.shape == degraded.shape == (3, hr.shape[-2] // 4, hr.shape[-1] // 4)
            assert not torch.equal(clean, degraded)
    photos.prepare_photos(tmp_path / "again", cache)
    for kind in ("lr_clean", "lr_degraded"):
        first, again = (read_image(root / "heldout" / kind / "kodak_I03.png").pixels for root in (tmp_path / "out", tmp_path / "again"))
        assert torch.equal(first, again)


def test_clean_inputs_are_pil_bicubic_and_the_evaluation_degradation_is_blur_resize_noise_jpeg():
    hr = torch.from_numpy(_photo(3, 40, 48)).permute(2, 0, 1).float() / 255
    clean = bicubic_downscale(hr, 4)
    reference = Image.fromarray(_photo(3, 40, 48)).resize((12, 10), Image.BICUBIC)
    assert torch.equal((clean * 255).round().byte(), torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1))
    # An independent blur: the sigma-1.2 Gaussian over a 9x9 window with reflected borders, summed in float64.
    ax = np.arange(9) - 4
    kernel = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.2**2))
    kernel /= kernel.sum()
    padded = np.pad(hr.double().numpy(), ((0, 0), (4, 4), (4, 4)), mode="reflect")
    blurred = np.zeros(hr.shape)
    for dy in range(9):
        for dx in range(9):
            blurred += kernel[dy, dx] * padded[:, dy:dy + 40, dx:dx + 48]
    small = bicubic_downscale(torch.from_numpy(blurred).float(), 4)
    noise = torch.randn(small.shape, generator=torch.Generator().manual_seed(7)) * (3 / 255)
    noisy = ((small + noise).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=70)
    expected = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    got = evaluation_degradation(hr, 4, seed=7)
    # The float32 blur may round a pixel to the other 8-bit neighbour, and JPEG spreads that over its block.
    assert (got - expected).abs().max() <= 3 / 255 and (got - expected).abs().mean() < 0.2 / 255


def test_clean_prob_picks_the_bicubic_downscale_for_that_fraction_of_samples(photo_dir):
    def samples(clean_prob):
        data = SRPairDataset(photo_dir, crop_size=64, scale=4, seed=3, clean_prob=clean_prob)
        return [data[i] for i in range(24)]

    for sample in samples(1.0):
        assert not sample["degraded"]
        torch.testing.assert_close(sample["lq"], clean_downscale((sample["gt"] + 1) / 2, 4) * 2 - 1, rtol=0, atol=0)
    mixed, degraded = samples(0.5), samples(0.0)
    assert all(s["degraded"] for s in degraded)
    flags = [bool(s["degraded"]) for s in mixed]
    assert 0 < sum(flags) < len(flags)
    # A degraded sample is the same whatever the fraction: each sample draws from its own generator.
    for s, d in zip(mixed, degraded):
        if s["degraded"]:
            assert torch.equal(s["lq"], d["lq"])
    with pytest.raises(ValueError, match="clean_prob"):
        SRPairDataset(photo_dir, crop_size=64, scale=4, seed=3, clean_prob=1.5)


def _random_ncnn_weights(path: Path, seed: int = 0) -> teachers.RRDBNet:
    """A full-size x4plus network of small random weights and the same weights as an ncnn .bin at ``path``."""
    network = teachers.RRDBNet()
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for conv in (m for m in network.modules() if isinstance(m, torch.nn.Conv2d)):
        weight = (torch.randn(conv.weight.shape, generator=gen) * 0.02).half()
        bias = torch.randn(conv.out_channels, generator=gen) * 0.01
        chunks += [teachers.NCNN_FP16_TAG.to_bytes(4, "little"), weight.numpy().tobytes(), bias.numpy().tobytes()]
        with torch.no_grad():
            conv.weight.copy_(weight.float())
            conv.bias.copy_(bias)
    path.write_bytes(b"".join(chunks))
    return network.eval()


def test_a_teacher_replaces_the_targets_of_degraded_samples_by_its_output(tmp_path):
    network = _random_ncnn_weights(tmp_path / "realesrgan-x4plus.bin")
    options = {"network": "realesrgan_x4plus", "weights": str(tmp_path / "realesrgan-x4plus.bin"), "targets": "degraded"}
    teacher = teachers.Teacher(options, scale=4)
    gen = torch.Generator().manual_seed(1)
    batch = {"gt": torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1, "lq": torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1,
             "degraded": torch.tensor([True, False, True])}
    out = teacher.apply(batch)
    with torch.no_grad():
        expected = network((batch["lq"] + 1) / 2) * 2 - 1
    # Images in [-1, 1] from float32 passes that differ in batch size (so, on some CPUs, in kernel and summation order).
    torch.testing.assert_close(out["gt"][[0, 2]], expected[[0, 2]], rtol=0, atol=2 * IMAGE_REORDER)
    assert torch.equal(out["gt"][1], batch["gt"][1]) and out["teacher_target"].tolist() == [True, False, True]
    everything = teachers.Teacher({**options, "targets": "all"}, scale=4).apply(batch)
    torch.testing.assert_close(everything["gt"], expected, rtol=0, atol=2 * IMAGE_REORDER)
    for bad, match in (({"network": "swinir"}, "teacher.network"), ({"targets": "some"}, "teacher.targets")):
        with pytest.raises(ValueError, match=match):
            teachers.Teacher({**options, **bad}, scale=4)
    with pytest.raises(ValueError, match="x4"):
        teachers.Teacher(options, scale=2)


def test_a_run_with_a_teacher_trains_on_its_targets(photo_dir, tmp_path, monkeypatch):
    _random_ncnn_weights(tmp_path / "realesrgan-x4plus.bin")
    seen = []
    original = teachers.Teacher.apply
    monkeypatch.setattr(teachers.Teacher, "apply", lambda self, batch: seen.append(original(self, batch)) or seen[-1])
    config = load_config(
        preset="tiny",
        overrides=[f"data.hr_dir={photo_dir}", "data.num_workers=0", "train.batch_size=2", "train.max_steps=1",
                   "data.crop_size=32", "data.clean_prob=0.5", "teacher.network=realesrgan_x4plus",
                   f"teacher.weights={tmp_path / 'realesrgan-x4plus.bin'}", "teacher.targets=all", "d3sr.perceptual=random"],
        method_defaults=METHODS["d3sr"].defaults, other_sections=tuple(METHODS),
    )
    assert Trainer(config, tmp_path / "run").train() == "finished"
    assert len(seen) == 1 and seen[0]["teacher_target"].all()


def test_the_patch_autoencoder_is_exact_space_to_depth():
    vae = PatchAutoencoder(patch_size=4, scaling_factor=1.85)
    image = torch.rand(2, 3, 8, 12) * 2 - 1
    latents = vae.encode(image).latent_dist.mode()
    # z[:, c * 16 + i * 4 + j, y, x] = image[:, c, 4 y + i, 4 x + j], written out.
    expected = torch.empty(2, 48, 2, 3)
    for c in range(3):
        for i in range(4):
            for j in range(4):
                expected[:, c * 16 + i * 4 + j] = image[:, c, i::4, j::4]
    assert torch.equal(latents, expected) and vae.config.latent_channels == 48
    assert torch.equal(vae.decode(latents).sample, image)
    assert not list(vae.parameters()) and vae_scale_factor(vae) == 4
    built = autoencoder_from_config(json.loads(json.dumps(dict(vae.config))))
    assert isinstance(built, PatchAutoencoder) and built.config.scaling_factor == 1.85
    with pytest.raises(ValueError, match="patch_size"):
        PatchAutoencoder(patch_size=0)


def test_three_stage_reproduction_trains_then_selects_a_model_on_validation_only(photo_dir, tmp_path):
    photos_root = tmp_path / "photos"
    shutil.copytree(photo_dir, photos_root / "train")
    for kind in ("hr", "lr_clean", "lr_degraded"):
        (photos_root / "validation" / kind).mkdir(parents=True)
    for i in range(2):
        hr = torch.from_numpy(_photo(10 + i, 32, 32)).permute(2, 0, 1).float() / 255
        write_png(photos_root / "validation" / "hr" / f"v{i}.png", hr)
        write_png(photos_root / "validation" / "lr_clean" / f"v{i}.png", bicubic_downscale(hr, 4))
        write_png(photos_root / "validation" / "lr_degraded" / f"v{i}.png", evaluation_degradation(hr, 4, i))
    _random_ncnn_weights(tmp_path / "realesrgan-x4plus.bin")
    overrides = ["train.max_steps=2", "train.batch_size=1", "data.num_workers=0", "train.checkpoint_every=1",
                 f"teacher.weights={tmp_path / 'realesrgan-x4plus.bin'}"]
    model = reproduce(photos_root, tmp_path / "runs", overrides)
    report = json.loads((tmp_path / "runs" / "selection.json").read_text())
    expected = [("sharp", s, c) for s in (1, 2) for c in COLOR_FIXES] + [("sr", 2, c) for c in COLOR_FIXES]
    assert sorted((c["stage"], c["step"], c["color_fix"]) for c in report["candidates"]) == sorted(expected)
    assert set(report["bicubic"]) == {"clean", "degraded"} and model == tmp_path / "runs" / "model_selected.safetensors"
    selected = report["selected"]
    folder = tmp_path / "runs" / selected["stage"] / f"checkpoint-{selected['step']}"
    chosen = load_checkpoint(folder / "model.safetensors")
    assert load_checkpoint(model).defaults == replace(chosen.defaults, color_fix=selected["color_fix"])
    prior_base = load_base(tmp_path / "runs" / "prior" / "base", load_text_encoder=False)
    assert isinstance(prior_base.vae, PatchAutoencoder) and prior_base.denoiser.config.in_channels == 48
    checkpoint = load_checkpoint(model)
    assert checkpoint.method == "d3sr" and checkpoint.base_configs is not None and checkpoint.timestep == 250
    assert checkpoint.base_configs["vae"]["autoencoder_type"] == "patch"
    sharp_config = load_checkpoint(tmp_path / "runs" / "sharp" / "model.safetensors").training_config
    assert sharp_config["teacher"]["network"] == "realesrgan_x4plus" and sharp_config["model"]["init_generator"] == "model.safetensors"
    # Finished stages are not run again.
    stamps = {s: (tmp_path / "runs" / s / "model.safetensors").stat().st_mtime_ns for s in ("sr", "sharp")}
    reproduce(photos_root, tmp_path / "runs", overrides)
    assert {s: (tmp_path / "runs" / s / "model.safetensors").stat().st_mtime_ns for s in ("sr", "sharp")} == stamps
    out = tmp_path / "up"
    assert d3sr_main(["upscale", str(photo_dir / "p0.png"), "-o", str(out), "--model", str(model)]) == 0
    assert read_image(out / "p0.png").pixels.shape == (3, 384, 448)


def test_a_later_stage_starts_from_an_earlier_stages_exported_generator(photo_dir, tmp_path):
    first = small_config("d3sr", "tiny", photo_dir, "train.max_steps=2", "data.crop_size=32", "d3sr.perceptual=random",
                         "train.ema_decay=0")
    assert Trainer(first, tmp_path / "first").train() == "finished"
    exported = load_checkpoint(tmp_path / "first" / "model.safetensors")
    second = small_config("d3sr", "tiny", photo_dir, "data.crop_size=32", "d3sr.perceptual=random",
                          f"model.init_generator={tmp_path / 'first' / 'model.safetensors'}")
    trained = Trainer(second, tmp_path / "second").method.generator.trained_parameters()
    assert trained and any(".lora_B." in k for k in trained)
    for key, param in trained.items():
        assert torch.equal(param.detach(), exported.tensors[unwrapped_name(key)])
    assert any(exported.tensors[unwrapped_name(k)].abs().sum() > 0 for k in trained if ".lora_B." in k)
    other_rank = small_config("d3sr", "tiny", photo_dir, "data.crop_size=32", "d3sr.perceptual=random", "d3sr.generator.lora_rank=2",
                              f"model.init_generator={tmp_path / 'first' / 'model.safetensors'}")
    with pytest.raises(ValueError, match="other LoRA adapters"):
        Trainer(other_rank, tmp_path / "third")
    other_base = small_config("d3sr", "tiny", photo_dir, "data.crop_size=32", "d3sr.perceptual=random", "seed=9",
                              f"model.init_generator={tmp_path / 'first' / 'model.safetensors'}")
    with pytest.raises(ValueError, match="another base"):
        Trainer(other_base, tmp_path / "fourth")


def test_selection_prefers_checkpoints_as_faithful_as_bicubic_then_the_lowest_st_lpips():
    bicubic = {k: {"psnr": 25.0, "stlpips": 0.4} for k in KINDS}
    faithful_sharp = {k: {"psnr": 25.5, "stlpips": 0.25} for k in KINDS}
    faithful_soft = {k: {"psnr": 27.0, "stlpips": 0.30} for k in KINDS}
    sharp_unfaithful = {"clean": {"psnr": 26.0, "stlpips": 0.1}, "degraded": {"psnr": 24.9, "stlpips": 0.1}}
    ranked = sorted([sharp_unfaithful, faithful_soft, faithful_sharp], key=lambda s: selection_key(s, bicubic))
    assert ranked == [faithful_sharp, faithful_soft, sharp_unfaithful]


def test_the_bundled_model_is_small_self_contained_and_upscales_the_sample(tmp_path):
    assert bundled_models() == {"d3sr-small-x4": DEFAULT_MODEL}
    assert DEFAULT_MODEL.stat().st_size < 50 * 2**20
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    assert checkpoint.method == "d3sr" and checkpoint.base_configs is not None and checkpoint.defaults.scale == 4
    assert checkpoint.base_configs["vae"]["autoencoder_type"] == "patch"
    generator = load_model(DEFAULT_MODEL).generator
    assert generator.timestep == checkpoint.timestep
    assert sum(p.numel() for p in generator.parameters()) <= 8_000_000  # the budget; Real-ESRGAN has 16.7 M
    assert not any(str(v).startswith("/") for v in json.dumps(checkpoint.training_config).split('"'))
    # The README's first command.
    assert d3sr_main(["upscale", str(SAMPLE), "-o", str(tmp_path)]) == 0
    lr = read_image(SAMPLE).pixels
    assert read_image(tmp_path / "chelsea_lr.png").pixels.shape == (3, lr.shape[-2] * 4, lr.shape[-1] * 4)


def test_the_plain_cnn_yardstick_trains_exports_and_upscales(photo_dir, tmp_path):
    config = load_config(
        preset="default_plain_cnn",
        overrides=[f"data.hr_dir={photo_dir}", "data.num_workers=0", "train.batch_size=2", "train.max_steps=3",
                   "data.crop_size=32", "plain_cnn.lpips_weight=0", "plain_cnn.lr=1e-2", "train.ema_decay=0"],
        method_defaults=METHODS["plain_cnn"].defaults,
    )
    trainer = Trainer(config, tmp_path / "run")
    network = trainer.method.network
    lq = torch.rand(1, 3, 6, 5) * 2 - 1
    bicubic = F.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.equal(network(lq), bicubic)  # a zero tail: it starts as the bicubic enlargement
    assert trainer.train() == "finished"
    upscale = plain_cnn.load_plain_cnn(tmp_path / "run" / "model.safetensors")
    out = upscale((lq[0] + 1) / 2)
    with torch.no_grad():
        expected = ((network(lq)[0] + 1) / 2).clamp(0, 1)
    assert out.shape == (3, 24, 20) and not torch.allclose(expected, ((bicubic[0] + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="plain_cnn"):
        plain_cnn.load_plain_cnn(DEFAULT_MODEL)


def test_installing_a_model_drops_the_paths_of_the_machine_that_trained_it(tmp_path, monkeypatch):
    source = tmp_path / "model.safetensors"
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    checkpoint.training_config = {"data": {"hr_dir": str(tmp_path / "photos" / "train")}, "model": {"base": "relative/base"}, "seed": 2}
    save_checkpoint(checkpoint, source)
    target = tmp_path / "bundled" / "d3sr-small-x4.safetensors"
    monkeypatch.setattr(default_model, "DEFAULT_MODEL", target)
    default_model.install(source)
    assert load_checkpoint(target).training_config == {"data": {"hr_dir": "train"}, "model": {"base": "relative/base"}, "seed": 2}
