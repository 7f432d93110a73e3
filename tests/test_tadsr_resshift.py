"""TAD-SR on a ResShift base (reference/methods.md 3.1, 3.2): the teacher is the multi-step SR model, the student its
full copy; the tiny-resshift preset trains only the student (and the discriminator), exports a model `d3sr upscale`
runs in one step at t = T - 1, and resumes exactly.

Each loss formula is checked against a reference written here from the official ``training_losses_distill`` /
``training_losses_D`` operations (the eta table in closed form in float64, the official DDIM coefficients k, m, j,
the official eps expression ``(x - (x0 + eta (y - x0))) / (sqrt(eta) kappa)``), feeding the same network.
Bound: ``RELATIVE_REORDER`` of the largest magnitude compared (tests/bounds.py): the reference and the code differ
only in float32 rounding of a few elementwise operations per network call; the bugs guarded against (a wrong eta, a
timestep off by one, the input normalised twice, a different noise for student and target) move values by a large
fraction of their magnitude, which each test checks where it can (``MATTERS``-style counter-checks below).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bounds import RELATIVE_REORDER, max_difference
from test_cpu_dtype import BF16_AGREEMENT_DB
from d3sr_cli.main import main as d3sr_main
from d3sr_core.backbones.resshift import read_resshift_config, unet_from_config
from d3sr_core.checkpoints import load_checkpoint
from d3sr_core.image_io import read_image
from d3sr_core.loading import load_model
from d3sr_core.pipeline import Upscaler
from d3sr_core.residual_shift import bicubic_upsample
from tiny_models import write_hr_photos
from tiny_resshift import write_official_files
from training.config import load_config
from training.methods import METHODS
from training.methods.tadsr_resshift import TADSRResShiftMethod
from training.trainer import Trainer

KAPPA, STEPS = 2.0, 15


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    return write_hr_photos(tmp_path_factory.mktemp("hr"), 3, (80, 96), seed=1)


def tiny_config(hr_dir: Path, *overrides: str) -> dict:
    return load_config(
        preset="tiny-resshift",
        overrides=[f"data.hr_dir={hr_dir}", "train.batch_size=1", "train.checkpoint_every=2",
                   "tadsr.resshift.student_lr=1e-3", "tadsr.discriminator.lr=1e-3", *overrides],
        method_defaults=METHODS["tadsr"].defaults,
        other_sections=tuple(METHODS),
    )


def reference_etas() -> torch.Tensor:
    """eta_t (float64) of the realsr schedule in closed form: sqrt(eta_t) = 0.02 * (0.99 / 0.02)^((t / 14)^0.3)."""
    start = min(0.04 / KAPPA, 0.04)
    t = torch.arange(STEPS, dtype=torch.float64)
    return (start * (0.99 / start) ** ((t / (STEPS - 1)) ** 0.3)) ** 2


def scaled(x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    return (x / torch.sqrt(eta * KAPPA**2 + 1)).float()


def reference_ddim(net, x_T: torch.Tensor, z_y: torch.Tensor, lq: torch.Tensor, visited: list[int]) -> torch.Tensor:
    """The official ``ddim_sample_loop`` over the ``visited`` timesteps (ascending), last first: x0 of the network,
    then ``k x0 + m x + j y`` with the official k, m, j; the float64 etas in closed form."""
    etas, x = reference_etas(), x_T.double()
    for i in reversed(range(len(visited))):
        t, eta = visited[i], etas[visited[i]]
        eta_prev = etas[visited[i - 1]] if i else torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            x0 = net(scaled(x, eta), torch.full((x.shape[0],), t), lq=lq).double()
        k = 1 - eta_prev + torch.sqrt(eta_prev * eta) - torch.sqrt(eta_prev / eta)
        m, j = torch.sqrt(eta_prev / eta), eta_prev - torch.sqrt(eta_prev * eta)
        x = x0 * k + m * x + j * z_y.double()
    return x.float()


@pytest.fixture(scope="module")
def method(hr_dir) -> TADSRResShiftMethod:
    torch.manual_seed(0)
    built = METHODS["tadsr"](tiny_config(hr_dir))
    assert isinstance(built, TADSRResShiftMethod)
    return built


def test_tadsr_on_a_resshift_base_starts_the_student_as_a_copy_and_uses_the_official_timesteps(method, hr_dir):
    teacher = dict(method.teacher.denoiser.named_parameters())
    student = dict(method.student.named_parameters())
    assert teacher.keys() == student.keys()
    assert all(torch.equal(teacher[k], student[k]) and teacher[k] is not student[k] for k in teacher)
    assert not any(p.requires_grad for p in teacher.values()) and all(p.requires_grad for p in student.values())
    # t_h ~ U{0, 1, 2} (official randint(0, 3)), t_d ~ U{0..13} (randint(0, T - 1)), the student at T - 1.
    assert (method.hsd_t_max, method.disc_t_max, method.steps) == (2, 13, 15)
    assert method.export_defaults.steps == 1 and method.export_defaults.seed == 12345
    for override, message in (("tadsr.resshift.hsd_t_max=15", "hsd_t_max=15 must be a timestep from 0 to 14"),
                              ("data.crop_size=48", "data.crop_size=48 must be a multiple of 64"),
                              ("data.scale=2", "data.scale=2, but the ResShift model upscales x4"),
                              ("tadsr.resshift.hsd_target=lq", "hsd_target 'lq' is not one of")):
        with pytest.raises(ValueError, match=message):
            METHODS["tadsr"](tiny_config(hr_dir, override))


def test_teacher_target_is_the_official_ddim_loop(method):
    """z_teacher: the official ``ddim_sample_loop`` from x_T, every trained step (and a respaced 4-step run)."""
    gen = torch.Generator().manual_seed(3)
    lq = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z_y = torch.randn(2, 3, 16, 16, generator=gen)
    x_T = z_y + KAPPA * 0.99 * torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        full = method.teacher.ddim_x_start(x_T, z_y, lq)
        respaced = method.teacher.ddim_x_start(x_T, z_y, lq, 4)
    expected = reference_ddim(method.teacher.denoiser, x_T, z_y, lq, list(range(STEPS)))
    assert max_difference(full, expected) <= RELATIVE_REORDER * expected.abs().max().item()
    expected_4 = reference_ddim(method.teacher.denoiser, x_T, z_y, lq, [0, 3, 7, 11])
    assert max_difference(respaced, expected_4) <= RELATIVE_REORDER * expected_4.abs().max().item()
    assert max_difference(full, respaced) > 1e-2  # the step count matters, so the comparison above can fail


@pytest.mark.parametrize("twice", [False, True])
def test_hsd_matches_the_official_operations(method, twice):
    """HSD: both latents shifted with the same noise at t_h, the teacher's x0 -> eps, ``mean(stopgrad(gap) * z_hat)``."""
    gen = torch.Generator().manual_seed(4)
    lq = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z_y, z_target = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    z_hat = torch.randn(2, 3, 16, 16, generator=gen).requires_grad_(True)
    noise = torch.rand(2, 3, 16, 16, generator=gen)  # the official th.rand_like
    t_h = torch.tensor([0, 2])
    method.resshift["hsd_input_scaled_twice"] = twice
    try:
        loss = method.hsd_loss(z_hat, z_target, z_y, lq, t_h, noise)
    finally:
        method.resshift["hsd_input_scaled_twice"] = False
    loss.backward()

    eta = reference_etas()[t_h].view(-1, 1, 1, 1)
    sqrt_eta = eta.sqrt()

    def eps(z: torch.Tensor, n: torch.Tensor, twice: bool) -> torch.Tensor:
        x = z.double() + eta * (z_y.double() - z.double()) + KAPPA * sqrt_eta * n.double()
        x_in = scaled(x, eta) if not twice else scaled(scaled(x, eta).double(), eta)
        with torch.no_grad():
            x0 = method.teacher.denoiser(x_in, t_h, lq=lq).double()
        return (x - (x0 + eta * (z_y.double() - x0))) / (sqrt_eta * KAPPA)

    def reference_grad(target_noise: torch.Tensor, twice: bool) -> torch.Tensor:
        gap = eps(z_hat.detach(), noise, twice) - eps(z_target, target_noise, twice)
        return gap / gap.numel()

    expected_grad = reference_grad(noise, twice)
    expected = (expected_grad * z_hat.detach().double()).sum()
    bound = RELATIVE_REORDER * expected_grad.abs().max().item()
    assert abs(loss.item() - expected.item()) <= bound * z_hat.detach().abs().sum().item()
    assert max_difference(z_hat.grad, expected_grad) <= bound
    # What the comparison catches: another noise for the target, or the other input normalisation.
    assert max_difference(reference_grad(torch.rand(noise.shape, generator=gen), twice), expected_grad) > 100 * bound
    assert max_difference(reference_grad(noise, not twice), expected_grad) > 100 * bound


def test_discriminator_reads_the_end_of_every_level_and_the_middle(method):
    # The official realsr UNet: only_fea returns hs[3], hs[6], hs[9], hs[11] and the middle block.
    with torch.device("meta"):
        official = unet_from_config(read_resshift_config()["model"])
    assert official.level_ends == (3, 6, 9, 11)
    net = method.teacher.denoiser
    assert net.level_ends == (2, 3)
    seen = {}
    hooks = [net.input_blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in (2, 3)]
    hooks.append(net.middle_block.register_forward_hook(lambda m, a, out: seen.__setitem__("middle", out)))
    gen = torch.Generator().manual_seed(5)
    x, lq, t = torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, 3, 16, 16, generator=gen), torch.tensor([0, 13])
    try:
        with torch.no_grad():
            net(x, t, lq=lq)
            features = net.encoder_features(x, t, lq=lq)
    finally:
        for hook in hooks:
            hook.remove()
    assert [f.shape[1] for f in features] == [32, 64, 64]
    for feature, key in zip(features, (2, 3, "middle")):
        assert torch.equal(feature, seen[key]), key


def test_student_trains_alone_and_its_export_is_the_same_one_step(hr_dir, tmp_path):
    trainer = Trainer(tiny_config(hr_dir, "train.max_steps=2"), tmp_path / "run")
    method = trainer.method
    teacher_before = {k: v.clone() for k, v in method.teacher.denoiser.state_dict().items()}
    vq_before = {k: v.clone() for k, v in method.teacher.vae.state_dict().items()}
    student_before = {k: v.detach().clone() for k, v in method.student.named_parameters()}
    disc_before = {k: v.detach().clone() for k, v in method.discriminator.named_parameters()}
    assert trainer.train() == "finished"
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.denoiser.state_dict().items())
    assert all(torch.equal(v, vq_before[k]) for k, v in method.teacher.vae.state_dict().items())
    moved = [k for k, v in method.student.named_parameters() if not torch.equal(v, student_before[k])]
    assert len(moved) > 0.9 * len(student_before), "every student weight trains (a full copy, no LoRA)"
    assert any(not torch.equal(v, disc_before[k]) for k, v in method.discriminator.named_parameters())

    exported = tmp_path / "run" / "model.safetensors"
    checkpoint = load_checkpoint(exported)
    assert (checkpoint.method, checkpoint.base_family, checkpoint.timestep) == ("tadsr", "resshift", 14)
    assert checkpoint.base_configs is not None and checkpoint.defaults.steps == 1
    # The exported one step (d3sr_core's sampler, noise drawn from the seed) equals the trained student's.
    loaded = load_model(exported).generator
    gen = torch.Generator().manual_seed(7)
    lq = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        sampled = loaded.sample_latents(lq, 1, torch.Generator().manual_seed(12345))
        z_y = method.teacher.encode(bicubic_upsample(lq, 4))
        noise = torch.randn(z_y.shape, generator=torch.Generator().manual_seed(12345))
        expected = method.student_latents(method.student.eval(), method.student_input(z_y, noise), lq)
    assert max_difference(sampled, expected) <= RELATIVE_REORDER * expected.abs().max().item()


def test_cli_trains_the_tiny_resshift_preset_and_upscale_runs_the_export(hr_dir, tmp_path):
    out = tmp_path / "run"
    assert d3sr_main(["train", "--method", "tadsr", "--preset", "tiny-resshift", "--data", str(hr_dir), "--max-steps", "1",
                      "--output-dir", str(out), "--set", "train.batch_size=1"]) == 0
    exported = out / "model.safetensors"
    assert load_checkpoint(exported).base_family == "resshift"
    up = tmp_path / "up"
    assert d3sr_main(["upscale", str(hr_dir / "img0.png"), "-o", str(up), "--model", str(exported)]) == 0
    assert read_image(up / "img0.png").pixels.shape == (3, 320, 384)
    # bf16 (what dtype auto takes on a CPU with native bf16, and a bf16 run's frozen teacher): the Swin UNet's
    # float32 GroupNorms take their cast weights as float32.
    image = read_image(hr_dir / "img0.png").pixels[None]
    results = {}
    for dtype in ("fp32", "bf16"):
        loaded = load_model(exported)
        results[dtype] = Upscaler(loaded.generator, dtype=dtype).upscale(image, loaded.defaults)
    mse = (results["bf16"].float() - results["fp32"].float()).pow(2).mean().item()
    assert 10 * math.log10(1 / max(mse, 1e-20)) >= BF16_AGREEMENT_DB


def test_tiny_resshift_resumes_exactly(hr_dir, tmp_path):
    Trainer(tiny_config(hr_dir, "train.max_steps=4"), tmp_path / "straight").train()
    Trainer(tiny_config(hr_dir, "train.max_steps=2"), tmp_path / "resumed").train()
    resumed = Trainer(tiny_config(hr_dir, "train.max_steps=4"), tmp_path / "resumed", resume=True)
    assert resumed.start_step == 2
    resumed.train()
    a = load_file(str(tmp_path / "straight" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_official_resshift_files_are_the_teacher(hr_dir, tmp_path):
    """model.base = the official UNet .pth, model.autoencoder = autoencoder_vq_f4.pth, model.resshift_config = YAML."""
    files = write_official_files(tmp_path / "official", wrap="state_dict", prefix="module.")
    config = tiny_config(hr_dir, "model.base_configs=null", f"model.base={files['unet']}",
                         f"model.autoencoder={files['vq']}", f"model.resshift_config={files['config']}")
    built = METHODS["tadsr"](config)
    assert isinstance(built, TADSRResShiftMethod)
    teacher = dict(built.teacher.denoiser.named_parameters())
    for key, value in teacher.items():
        assert torch.equal(value, files["unet_state"][key]), key
        assert torch.equal(dict(built.student.named_parameters())[key], value)
    assert math.isclose(built.teacher.kappa, KAPPA)
    # An SD-only option the ResShift path has no use for is not silently taken for another.
    with pytest.raises(ValueError, match="model.init_generator does not apply"):
        METHODS["tadsr"](tiny_config(hr_dir, f"model.init_generator={files['unet']}"))
    # The official .pth is recognised by its keys alone: without its autoencoder the run says what is missing.
    bare = tiny_config(hr_dir, "model.base_configs=null", f"model.base={files['unet']}")
    with pytest.raises(ValueError, match="give its VQ autoencoder as model.autoencoder"):
        METHODS["tadsr"](bare)
    # A method that trains on SD refuses a ResShift base in one sentence.
    with pytest.raises(ValueError, match="describes a ResShift base, which only --method tadsr trains on"):
        METHODS["d3sr"](load_config(preset="tiny-resshift", overrides=["method=d3sr", f"data.hr_dir={hr_dir}"],
                                    method_defaults=METHODS["d3sr"].defaults, other_sections=tuple(METHODS)))


def test_a_training_step_regresses_the_student_to_the_teacher_from_the_same_x_T(hr_dir, tmp_path):
    trainer = Trainer(tiny_config(hr_dir, "train.max_steps=1"), tmp_path / "run")
    method = trainer.method
    batch = next(iter(trainer._dataloader()))
    student = copy.deepcopy(method.student).eval()
    logs = method.training_step(batch, 0, torch.Generator().manual_seed(11))
    # Reference: x_T = z_y + kappa sqrt(eta_T) eps with eps the step's first draw; sqrt(eta_T) = etas_end = 0.99.
    lq = batch["lq"]
    with torch.no_grad():
        z_y = method.teacher.encode(F.interpolate(lq, scale_factor=4, mode="bicubic"))
        eps = torch.randn(z_y.shape, generator=torch.Generator().manual_seed(11))
        x_T = z_y.double() + KAPPA * 0.99 * eps.double()
        z_hat = student(scaled(x_T, reference_etas()[-1]), torch.full((lq.shape[0],), STEPS - 1), lq=lq).double()
        z_teacher = reference_ddim(method.teacher.denoiser, x_T.float(), z_y, lq, list(range(STEPS))).double()
    expected = (z_hat - z_teacher).pow(2).mean().item()
    assert abs(logs["regression"] - expected) <= RELATIVE_REORDER * (z_hat - z_teacher).pow(2).max().item()
    # Another x_T for the teacher (its own noise) would give another target: the comparison can tell.
    with torch.no_grad():
        other = reference_ddim(method.teacher.denoiser, (z_y + KAPPA * 0.99 * torch.randn_like(z_y)), z_y, lq, list(range(STEPS)))
    assert abs((z_hat - other.double()).pow(2).mean().item() - expected) > 1e-3
