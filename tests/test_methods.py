"""Every one-step method on the tiny preset: it moves only what it trains, its export runs in `d3sr upscale`,
and a resumed run (all optimizers, fake score and discriminator included) ends where a straight run ends."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d3sr_cli.main import main as d3sr_main
from d3sr_core.checkpoints import load_checkpoint
from d3sr_core.image_io import read_image
from tiny_models import tiny_preset_config, write_hr_photos
from training.trainer import Trainer

ONE_STEP_METHODS = ("d3sr", "osediff", "tadsr", "tsdsr")


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    return write_hr_photos(tmp_path_factory.mktemp("hr"), 3, (80, 96), seed=1)


def config_for(method: str, hr_dir: Path, *overrides: str) -> dict:
    return tiny_preset_config(method, hr_dir, "train.checkpoint_every=2", f"{method}.generator.lr=1e-3", *overrides)


@pytest.mark.parametrize("method", ONE_STEP_METHODS)
def test_method_moves_only_what_it_trains_and_exports_a_model_upscale_runs(method, hr_dir, tmp_path):
    trainer = Trainer(config_for(method, hr_dir, "train.max_steps=2"), tmp_path / "run")
    models = trainer.method.models()
    before = {(m, n): p.detach().clone() for m, model in models.items() for n, p in model.named_parameters()}
    trained = trainer.method.named_trained_parameters()
    trained_ids = {id(p) for p in trained.values()}
    trained_before = {n: p.detach().clone() for n, p in trained.items()}
    assert trainer.train() == "finished"
    for m, model in models.items():
        for name, p in model.named_parameters():
            if id(p) not in trained_ids:
                assert torch.equal(p, before[(m, name)]), f"{m}.{name} is frozen but moved"
    moved = [n for n, p in trained.items() if not torch.equal(p, trained_before[n])]
    assert any(n.startswith("generator.") and ".lora_B." in n for n in moved)
    assert any(not n.startswith("generator.") for n in moved), "the second model (fake score / discriminator) did not train"

    exported = tmp_path / "run" / "model.safetensors"
    assert load_checkpoint(exported).method == method
    out = tmp_path / "up"
    assert d3sr_main(["upscale", str(hr_dir / "img0.png"), "-o", str(out), "--model", str(exported)]) == 0
    assert read_image(out / "img0.png").pixels.shape == (3, 320, 384)


@pytest.mark.parametrize("method", ONE_STEP_METHODS)
def test_method_resumes_exactly(method, hr_dir, tmp_path):
    Trainer(config_for(method, hr_dir, "train.max_steps=4"), tmp_path / "straight").train()
    Trainer(config_for(method, hr_dir, "train.max_steps=2"), tmp_path / "resumed").train()
    resumed = Trainer(config_for(method, hr_dir, "train.max_steps=4"), tmp_path / "resumed", resume=True)
    assert resumed.start_step == 2
    resumed.train()
    a = load_file(str(tmp_path / "straight" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(not k.startswith("generator.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
