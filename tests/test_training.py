"""The trainer and the D3SR method on the tiny preset: learning, frozen weights, export round trip, resume after
SIGKILL and SIGTERM, atomic checkpoints, and two processes under accelerate launch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from d3sr_cli.main import main as d3sr_main
from d3sr_core.checkpoints import load_checkpoint
from d3sr_core.image_io import read_image
from d3sr_core.loading import load_model
from d3sr_core.pipeline import Upscaler
from bounds import IMAGE_REORDER
from training.config import ConfigError, load_config, merge, parse_override
from training.data import SRPairDataset, StreamPosition, StreamSampler
from training.methods import METHODS
from training.trainer import Trainer, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    """Six photo-like images (smooth shapes plus texture), 80 to 128 px a side."""
    folder = tmp_path_factory.mktemp("hr")
    gen = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(96, 128), (80, 112), (128, 96), (88, 88), (120, 100), (96, 96)]):
        coarse = torch.rand(3, 6, 6, generator=gen)
        image = F.interpolate(coarse[None], size=(h, w), mode="bicubic", align_corners=False)[0]
        image = (image + 0.15 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"photo{i}.png")
    return folder


def tiny_config(hr_dir: Path, *overrides: str) -> dict:
    return load_config(
        preset="tiny",
        overrides=[f"data.hr_dir={hr_dir}", "train.batch_size=1", *overrides],
        method_defaults=METHODS["d3sr"].defaults,
        other_sections=tuple(METHODS),
    )


def train_command(hr_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "d3sr_cli.main", "train", "--preset", "tiny", "--data", str(hr_dir),
            "--max-steps", str(steps), "--output-dir", str(out), "--set", "train.batch_size=1", *extra]


def test_config_layers_and_refusals(tmp_path):
    assert parse_override("train.batch_size=8") == {"train": {"batch_size": 8}}
    assert parse_override("model.base=null") == {"model": {"base": None}}
    with pytest.raises(ConfigError, match="unknown config key 'train.batch'"):
        merge({"train": {"batch_size": 1}}, {"train": {"batch": 2}})
    config = tiny_config(tmp_path, "d3sr.loss.gan_weight=0.5")
    assert config["d3sr"]["loss"]["gan_weight"] == 0.5 and config["data"]["crop_size"] == 64
    assert config["model"]["base_configs"]["unet"]["block_out_channels"] == [32, 64]
    with pytest.raises(ConfigError, match="preset 'huge' does not exist"):
        load_config(preset="huge", method_defaults={})


def test_stream_sampler_resumes_mid_stream_and_splits_ranks():
    def take(position, count, size=5):
        it = iter(StreamSampler(size, seed=3, position=position))
        return [next(it) for _ in range(count)]

    whole = take(StreamPosition(0, batch_size=2), 20)
    # Starting at micro-batch 4 continues the same stream: nothing replayed, nothing skipped.
    assert take(StreamPosition(4, batch_size=2), 12) == whole[8:]
    # Each epoch visits every image once; epochs are shuffled differently.
    epochs = [sorted(i % 5 for i in whole[e * 5:(e + 1) * 5]) for e in range(4)]
    assert all(e == list(range(5)) for e in epochs)
    assert [i % 5 for i in whole[:5]] != [i % 5 for i in whole[5:10]]
    # Two ranks read interleaved micro-batches of the one stream.
    rank0, rank1 = take(StreamPosition(0, 2, 0, 2), 4), take(StreamPosition(0, 2, 1, 2), 4)
    assert rank0 == whole[0:2] + whole[4:6] and rank1 == whole[2:4] + whole[6:8]


def test_dataset_is_seeded_and_pairs_line_up(hr_dir, tmp_path):
    dataset = SRPairDataset(hr_dir, crop_size=64, scale=4, seed=1)
    a, b, c = dataset[7], dataset[7], dataset[8]
    assert torch.equal(a["gt"], b["gt"]) and torch.equal(a["lq"], b["lq"])
    assert a["gt"].shape == (3, 64, 64) and a["lq"].shape == (3, 16, 16)
    assert -1 <= a["lq"].min() and a["lq"].max() <= 1 and not torch.equal(a["gt"], c["gt"])

    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for f in sorted(hr_dir.iterdir()):
        with Image.open(f) as im:
            im.resize((im.width // 4, im.height // 4), Image.BOX).save(lr_dir / f.name)
    paired = SRPairDataset(hr_dir, lr_dir=lr_dir, crop_size=64, scale=4, seed=1)
    sample = paired[3]
    # The LQ crop is the box-downscaled HR crop: pairs are cut at matching places (and flipped together).
    box = F.avg_pool2d((sample["gt"][None] + 1) / 2, 4)[0]
    assert ((sample["lq"] + 1) / 2 - box).abs().max() < 2 / 255
    (lr_dir / "photo0.png").unlink()
    with pytest.raises(ValueError, match="no image named like photo0.png"):
        SRPairDataset(hr_dir, lr_dir=lr_dir, crop_size=64, scale=4, seed=1)


def test_d3sr_steps_lower_the_loss_and_move_only_trained_weights(hr_dir, tmp_path):
    config = tiny_config(hr_dir, "d3sr.generator.lr=2e-3", "d3sr.discriminator.lr=2e-3")
    trainer = Trainer(config, tmp_path / "run")
    method = trainer.method
    generator = method.generator
    frozen_before = {n: p.detach().clone() for n, p in generator.named_parameters() if not p.requires_grad}
    disc_frozen = {n: p.detach().clone() for n, p in method.discriminator.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in method.named_trained_parameters().items()}
    batch = next(iter(torch.utils.data.DataLoader(SRPairDataset(hr_dir, crop_size=64, scale=4, seed=0), batch_size=2)))

    def reconstruction_loss():
        with torch.no_grad():
            lq_up = F.interpolate(batch["lq"], size=batch["gt"].shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
            _, x_hat = generator(lq_up)
            return F.mse_loss(x_hat, batch["gt"]).item()

    before = reconstruction_loss()
    for step in range(12):
        logs = method.training_step(batch, step, torch.Generator().manual_seed(step))
    after = reconstruction_loss()
    assert after < 0.7 * before, (before, after)
    assert set(logs) >= {"loss_g", "mse", "ea_dists", "gan_g", "loss_d", "d_real", "d_fake"}
    for name, value in frozen_before.items():
        assert torch.equal(dict(generator.named_parameters())[name], value), name
    for name, value in disc_frozen.items():
        assert torch.equal(dict(method.discriminator.named_parameters())[name], value), name
    moved = {n for n, p in method.named_trained_parameters().items() if not torch.equal(p, trained_before[n])}
    assert any(n.startswith("generator.unet.") and ".lora_B." in n for n in moved)
    assert any(n.startswith("discriminator.head.") for n in moved) and any(".lora_B." in n and n.startswith("discriminator.") for n in moved)


def test_export_round_trip_through_d3sr_upscale(hr_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert d3sr_main(["train", "--preset", "tiny", "--data", str(hr_dir), "--max-steps", "3", "--output-dir", str(out),
                      "--set", "train.batch_size=1", "--set", "d3sr.generator.lr=1e-3"]) == 0
    exported = out / "model.safetensors"
    checkpoint = load_checkpoint(exported)
    assert checkpoint.method == "d3sr" and checkpoint.base_configs is not None and checkpoint.training_config["train"]["max_steps"] == 3
    assert (out / "model_kohya_unet_lora.safetensors").is_file() and (out / "checkpoint-3" / "model.safetensors").is_file()

    # The in-memory model: rebuild the trainer's generator from the final checkpoint's trained tensors.
    # The run's own config: --resume refuses any change but max_steps, saving and logging.
    trainer = Trainer(tiny_config(hr_dir, "train.max_steps=3", "d3sr.generator.lr=1e-3"), out, resume=True)
    in_memory = trainer.method.generator.generator.eval()
    image = read_image(hr_dir / "photo3.png").pixels
    options = checkpoint.defaults.updated(tile_size=0)
    # Default kernels on both sides: Winograd's rounding differs between merged and unmerged LoRA layers.
    expected = Upscaler(in_memory, winograd=False).upscale(image[None], options)[0]
    loaded = load_model(exported).generator
    torch.testing.assert_close(Upscaler(loaded, winograd=False).upscale(image[None], options)[0], expected, rtol=0, atol=IMAGE_REORDER)

    assert d3sr_main(["upscale", str(hr_dir / "photo3.png"), "-o", str(tmp_path / "up"), "--model", str(exported), "--tile-size", "0"]) == 0
    written = read_image(tmp_path / "up" / "photo3.png").pixels
    assert written.shape == (3, 352, 352)
    assert (written - expected).abs().max() <= 1 / 255 + 1e-6


def test_sigkill_mid_run_resumes_to_the_uninterrupted_parameters(hr_dir, tmp_path):
    steps = 8
    straight = tmp_path / "straight"
    subprocess.run(train_command(hr_dir, straight, steps, "--set", "train.checkpoint_every=2"), check=True, cwd=REPO,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(hr_dir, killed, steps, "--set", "train.checkpoint_every=2"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-4").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = complete_checkpoints(killed)[-1][0]
    assert 4 <= newest < steps, "the run was not killed mid-way"
    assert not (killed / "model.safetensors").exists()

    subprocess.run(train_command(hr_dir, killed, steps, "--set", "train.checkpoint_every=2", "--resume"), check=True,
                   cwd=REPO, capture_output=True)
    a = load_file(str(straight / f"checkpoint-{steps}" / "trainable.safetensors"))
    b = load_file(str(killed / f"checkpoint-{steps}" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (killed / "logs" / "train.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(5, steps + 1, 5)) + ([steps] if steps % 5 else [])


def test_sigterm_saves_a_checkpoint_and_a_write_that_dies_leaves_no_final_checkpoint(hr_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(hr_dir, "train.max_steps=10", "train.checkpoint_every=100", "train.ema_decay=0.9"), out)
    real_step = trainer.method.training_step

    def step_then_sigterm(batch, step, generator):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(batch, step, generator)

    monkeypatch.setattr(trainer.method, "training_step", step_then_sigterm)
    assert trainer.train() == "stopped"
    assert [s for s, _ in complete_checkpoints(out)] == [3]
    assert signal.getsignal(signal.SIGTERM) is not trainer._request_stop
    assert not (out / "model.safetensors").exists()

    # The process dies inside the next checkpoint write: only the .partial folder exists, resume ignores it.
    resumed = Trainer(tiny_config(hr_dir, "train.max_steps=10", "train.checkpoint_every=100", "train.ema_decay=0.9"), out, resume=True)
    assert resumed.start_step == 3
    torch.testing.assert_close(resumed.ema.shadow, trainer.ema.shadow, rtol=0, atol=0)

    def dies(path):
        (Path(path) / "optimizer.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(resumed.accelerator, "save_state", dies)
    with pytest.raises(KeyboardInterrupt):
        resumed.save(4)
    assert (out / "checkpoint-4.partial").is_dir() and not (out / "checkpoint-4").exists()
    assert [s for s, _ in complete_checkpoints(out)] == [3]
    assert Trainer(tiny_config(hr_dir, "train.max_steps=10", "train.ema_decay=0.9"), out, resume=True).start_step == 3
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny_config(hr_dir), out)


def test_two_processes_under_accelerate_launch_end_with_identical_parameters(hr_dir, tmp_path):
    out = tmp_path / "dist"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "tests" / "scripts" / "distributed_run.py"), str(hr_dir), str(out), "3"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2 done" in result.stdout and "rank 1 of 2 done" in result.stdout
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert load_checkpoint(out / "model.safetensors").method == "d3sr"


def test_precomputed_latents_line_up_with_the_crops_and_feed_training(hr_dir, tiny_base_dir, tmp_path):
    from training.latents import write_latents

    assert write_latents(str(tiny_base_dir), hr_dir, tmp_path / "latents") == 6
    dataset = SRPairDataset(hr_dir, crop_size=64, scale=4, seed=1, latent_dir=tmp_path / "latents")
    assert dataset.latent_factor == 8
    full = load_file(str(tmp_path / "latents" / "photo0.safetensors"))["latent"]
    found = 0
    for sample_id in range(0, 60, 6):  # ids that are photo0 (6 images)
        sample = dataset[sample_id]
        latent = sample["gt_latent"]
        assert latent.shape == (4, 8, 8)
        # The latent is a window of the whole image's latent, flipped with the crop when the crop is flipped.
        windows = full.unfold(1, 8, 1).unfold(2, 8, 1)  # (4, h-7, w-7, 8, 8)
        hr = read_image(hr_dir / "photo0.png").pixels * 2 - 1
        for y in range(windows.shape[1]):
            for x in range(windows.shape[2]):
                for flipped in (False, True):
                    window = windows[:, y, x].flip(-1) if flipped else windows[:, y, x]
                    image = hr[:, y * 8:y * 8 + 64, x * 8:x * 8 + 64]
                    # ... and the image crop is the same place of the same photo, flipped the same way.
                    if torch.equal(window, latent) and torch.allclose(image.flip(-1) if flipped else image, sample["gt"]):
                        found += 1
    assert found == 10
    out = tmp_path / "run"
    config = tiny_config(hr_dir, "train.max_steps=2", f"data.latent_dir={tmp_path / 'latents'}")
    config["model"]["base"], config["model"]["base_configs"] = str(tiny_base_dir), None
    assert Trainer(config, out).train() == "finished"
    with pytest.raises(ValueError, match="has no photo0.safetensors"):
        (tmp_path / "latents" / "photo0.safetensors").unlink()
        SRPairDataset(hr_dir, crop_size=64, scale=4, seed=1, latent_dir=tmp_path / "latents")
