"""TSD-SR training on SD3: the flow-matching formulas against diffusers, the teacher and the fake score as two
adapters of one frozen copy against LoRA folded by hand, the prompt-embedding command against diffusers'
StableDiffusion3Pipeline, and a run on an SD3 folder base that conditions on precomputed embeddings."""

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file

from d3sr_cli.main import main as d3sr_main
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import build_generator, load_checkpoint
from d3sr_core.generator import flow_match_sigmas
from d3sr_core.image_io import read_image
from d3sr_core.losses import fake_score_flow_loss, flow_diffuse
from d3sr_core.pipeline import Upscaler
from bounds import ACTIVATION_REORDER, IMAGE_REORDER, max_difference
from tiny_models import tiny_preset_config, write_hr_photos, write_sd3_base, write_sd3_text_encoders, write_tsdsr_dir
from training.methods.tsdsr import FAKE_SCORE, TEACHER
from training.prompts import encode_sd3_prompt, main as prompts_main
from training.trainer import Trainer


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    return write_hr_photos(tmp_path_factory.mktemp("hr"), 2, (64, 80), seed=2)


def tsdsr_config(hr_dir: Path, *overrides: str) -> dict:
    return tiny_preset_config("tsdsr", hr_dir, *overrides)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_sigmas_are_diffusers_training_table(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sigmas = flow_match_sigmas({"num_train_timesteps": 1000, "shift": shift})
    assert torch.allclose(sigmas, scheduler.sigmas[:1000], atol=1e-7, rtol=0)
    assert torch.allclose(sigmas * 1000, scheduler.timesteps, atol=1e-4, rtol=0)
    assert sigmas[0] == 1 and torch.all(sigmas[1:] < sigmas[:-1])


def test_flow_diffuse_is_diffusers_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    index = torch.tensor([10, 700])
    expected = scheduler.scale_noise(x0, scheduler.timesteps[index], noise)
    assert torch.allclose(flow_diffuse(x0, noise, scheduler.sigmas[index]), expected, atol=1e-6)
    assert torch.allclose(flow_diffuse(x0, noise, 0.25), 0.25 * noise + 0.75 * x0)


def test_fake_score_flow_loss_by_hand():
    gen = torch.Generator().manual_seed(1)
    velocity, noised, target = (torch.randn(2, 1, 1, 2, generator=gen) for _ in range(3))
    sigma, weight = torch.tensor([0.5, 0.25]), torch.tensor([0.8, 0.1])
    total = 0.0
    for b in range(2):
        for j in range(2):
            x0 = noised[b, 0, 0, j].item() - sigma[b].item() * velocity[b, 0, 0, j].item()
            total += weight[b].item() * (x0 - target[b, 0, 0, j].item()) ** 2
    expected = 0.5 * total / 4
    assert abs(fake_score_flow_loss(velocity, noised, sigma, target, weight).item() - expected) < 1e-6


def _folded(model: SD3Transformer2DModel, config: dict, loras: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]):
    """A plain transformer with ``model``'s base weights and each LoRA ``{module: (A, B, scale)}`` folded in by hand."""
    plain = SD3Transformer2DModel.from_config(config).eval()
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(base)
    with torch.no_grad():
        for lora in loras:
            for module, (a, b, scale) in lora.items():
                weight = plain.get_submodule(module).weight
                delta = b @ a if a.ndim == 2 else torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
                weight += scale * delta
    return plain


def _guided(model, latents, sigma, cond, null, cfg):
    t = torch.full((latents.shape[0],), float(sigma) * 1000)
    run = lambda c: model(hidden_states=latents, timestep=t, encoder_hidden_states=c["prompt_embeds"],  # noqa: E731
                          pooled_projections=c["pooled_prompt_embeds"]).sample
    with torch.no_grad():
        uncond, conditioned = run(null), run(cond)
    return uncond + cfg * (conditioned - uncond)


def test_teacher_and_fake_score_are_two_adapters_of_one_frozen_copy(hr_dir, tmp_path):
    saved = write_tsdsr_dir(tmp_path / "teacher", rank=4)
    teacher_file = tmp_path / "teacher" / "transformer.safetensors"
    config = tsdsr_config(hr_dir, f"tsdsr.teacher_lora={teacher_file}", "train.max_steps=1")
    trainer = Trainer(config, tmp_path / "run")
    method = trainer.method
    score = method.score_model
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in score.named_parameters():
            if f".lora_B.{FAKE_SCORE}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    flags = {n: p.requires_grad for n, p in score.named_parameters()}
    assert not any(flag for n, flag in flags.items() if f".{TEACHER}." in n) and all(
        flag for n, flag in flags.items() if f".{FAKE_SCORE}." in n)
    method.conditioning = {"prompt_embeds": torch.randn(1, 3, 32, generator=gen), "pooled_prompt_embeds": torch.randn(1, 24, generator=gen)}
    method.null_conditioning = {k: torch.zeros_like(v) for k, v in method.conditioning.items()}
    method.options["cfg_scale"] = 7.5  # the tiny preset trains unguided (its zero embeddings are equal); these differ

    teacher_lora = {}
    for key, a in saved["transformer"].items():
        if key.endswith(".lora_A.weight"):
            module = key[len("transformer."):-len(".lora_A.weight")]
            teacher_lora[module] = (a, saved["transformer"][key.replace("lora_A", "lora_B")], 1.0)
    fake_lora = {}
    params = dict(score.named_parameters())
    for name in params:
        if f".lora_A.{FAKE_SCORE}." in name:
            module = name.split(".lora_A.")[0]
            fake_lora[module] = (params[name].detach(), params[name.replace("lora_A", "lora_B")].detach(), 1.0)
    transformer_config = config["model"]["base_configs"]["transformer"]
    latents = torch.randn(2, 16, 8, 8, generator=gen)
    sigma = torch.tensor(0.6)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in method.conditioning.items()}
    null = {k: v.expand(2, *v.shape[1:]) for k, v in method.null_conditioning.items()}
    with torch.no_grad():
        teacher = method.guided_velocity(TEACHER, latents, sigma)
        fake = method.guided_velocity(FAKE_SCORE, latents, sigma)
        base = method.guided_velocity(None, latents, sigma)
    expected_teacher = _guided(_folded(score, transformer_config, [teacher_lora]), latents, sigma, cond, null, 7.5)
    expected_fake = _guided(_folded(score, transformer_config, [fake_lora]), latents, sigma, cond, null, 7.5)
    expected_base = _guided(_folded(score, transformer_config, []), latents, sigma, cond, null, 7.5)
    assert torch.allclose(teacher, expected_teacher, atol=2e-4), (teacher - expected_teacher).abs().max()
    assert torch.allclose(fake, expected_fake, atol=2e-4), (fake - expected_fake).abs().max()
    assert torch.allclose(base, expected_base, atol=2e-4)
    assert (teacher - fake).abs().max() > 1e-2 and (teacher - base).abs().max() > 1e-2
    assert {n: p.requires_grad for n, p in score.named_parameters()} == flags


def test_prompt_embeddings_match_diffusers_sd3_pipeline(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    folder = write_sd3_text_encoders(write_sd3_base(tmp_path / "sd3"))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKL.from_pretrained(folder / "vae"),
        **{f"text_encoder{s}": CLIPTextModelWithProjection.from_pretrained(folder / f"text_encoder{s}") for s in ("", "_2")},
        **{f"tokenizer{s}": AutoTokenizer.from_pretrained(folder / f"tokenizer{s}") for s in ("", "_2", "_3")},
        text_encoder_3=T5EncoderModel.from_pretrained(folder / "text_encoder_3"),
    )
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a cat on a mat", None, None, max_sequence_length=12, negative_prompt="blurry"
        )
    ours = encode_sd3_prompt(folder, "a cat on a mat", max_sequence_length=12)
    assert ours["prompt_embeds"].shape == (1, 77 + 12, 32) and ours["pooled_prompt_embeds"].shape == (1, 24)
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=ACTIVATION_REORDER)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=ACTIVATION_REORDER)

    out = tmp_path / "embeds.safetensors"
    assert prompts_main(["--base", str(folder), "--prompt", "a cat on a mat", "--negative-prompt", "blurry",
                         "--max-sequence-length", "12", "--out", str(out)]) == 0
    written = load_file(str(out))
    assert torch.allclose(written["negative_prompt_embeds"], negative, atol=ACTIVATION_REORDER)
    assert torch.allclose(written["negative_pooled_prompt_embeds"], negative_pooled, atol=ACTIVATION_REORDER)

    # Without T5, the T5 part is zeros of the transformer's width (as the pipeline does with text_encoder_3=None).
    pipe.text_encoder_3 = None
    with torch.no_grad():
        no_t5 = pipe.encode_prompt("a cat", None, None, max_sequence_length=12, do_classifier_free_guidance=False)[0]
    for part in ("text_encoder_3", "tokenizer_3"):
        for file in (folder / part).iterdir():
            file.unlink()
        (folder / part).rmdir()
    assert torch.allclose(encode_sd3_prompt(folder, "a cat", max_sequence_length=12)["prompt_embeds"], no_t5, atol=ACTIVATION_REORDER)


def test_run_on_an_sd3_folder_conditions_on_precomputed_embeddings(hr_dir, tmp_path):
    folder = write_sd3_text_encoders(write_sd3_base(tmp_path / "sd3"), with_t5=False)
    overrides = [f"model.base={folder}", "model.base_configs=null", "train.max_steps=1", "data.crop_size=64",
                 "tsdsr.generator.lr=1e-3", "tsdsr.generator.lora_alpha=8"]
    with pytest.raises(ValueError, match="model.prompt_embeddings"):
        Trainer(tsdsr_config(hr_dir, *overrides), tmp_path / "refused")
    embeds = tmp_path / "embeds.safetensors"
    assert prompts_main(["--base", str(folder), "--prompt", "sharp photo", "--max-sequence-length", "4", "--out", str(embeds)]) == 0
    trainer = Trainer(tsdsr_config(hr_dir, *overrides, f"model.prompt_embeddings={embeds}"), tmp_path / "run")
    written = load_file(str(embeds))
    assert torch.equal(trainer.method.conditioning["prompt_embeds"], written["prompt_embeds"])
    assert torch.equal(trainer.method.null_conditioning["pooled_prompt_embeds"], written["negative_pooled_prompt_embeds"])
    assert trainer.train() == "finished"
    exported = tmp_path / "run" / "model.safetensors"
    checkpoint = load_checkpoint(exported)
    assert checkpoint.base_configs is None and checkpoint.base_family == "sd3" and checkpoint.prediction_type == "flow"
    assert torch.equal(checkpoint.conditioning["prompt_embeds"], written["prompt_embeds"])
    out = tmp_path / "up"
    assert d3sr_main(["upscale", str(hr_dir / "img0.png"), "-o", str(out), "--model", str(exported), "--base", str(folder)]) == 0
    assert read_image(out / "img0.png").pixels.shape == (3, 256, 320)

    # The same model in the official TSD-SR folder (alpha folded into lora_B) gives the same image.
    official = tmp_path / "run" / "model_tsdsr"
    assert sorted(p.name for p in official.iterdir()) == ["pool_embeds.pt", "prompt_embeds.pt", "transformer.safetensors", "vae.safetensors"]
    assert all(k.startswith("transformer.") for k in load_file(str(official / "vae.safetensors")))
    official_b = load_file(str(official / "transformer.safetensors"))["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    ours_b = checkpoint.tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.default.weight"]
    assert ours_b.abs().max() > 0 and torch.allclose(official_b, ours_b * 8 / 4)  # alpha 8 at rank 4, folded into B
    image = read_image(hr_dir / "img0.png").pixels[None]
    options = checkpoint.defaults.updated(min_process_side=0)
    results = [
        Upscaler(build_generator(load_checkpoint(model), load_base(folder)), winograd=False).upscale(image, options)
        for model in (exported, official)
    ]
    assert max_difference(results[0], results[1]) <= IMAGE_REORDER, max_difference(results[0], results[1])


def test_dasm_weights_must_match_its_steps(hr_dir, tmp_path):
    with pytest.raises(ValueError, match="tsdsr.dasm.weights"):
        Trainer(tsdsr_config(hr_dir, "tsdsr.dasm.enabled=true", "tsdsr.dasm.steps=3"), tmp_path / "run")


def test_dasm_run_trains(hr_dir, tmp_path):
    trainer = Trainer(tsdsr_config(hr_dir, "tsdsr.dasm.enabled=true", "train.max_steps=1", "tsdsr.generator.lr=1e-3"), tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.method.named_trained_parameters().items()}
    assert trainer.train() == "finished"
    after = trainer.method.named_trained_parameters()
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("generator."))


def test_cli_trains_tsdsr_on_the_tiny_preset(hr_dir, tmp_path):
    out = tmp_path / "run"
    assert d3sr_main(["train", "--method", "tsdsr", "--preset", "tiny", "--data", str(hr_dir), "--max-steps", "1",
                      "--output-dir", str(out), "--set", "train.batch_size=1"]) == 0
    checkpoint = load_checkpoint(out / "model.safetensors")
    assert checkpoint.method == "tsdsr" and checkpoint.base_family == "sd3" and checkpoint.timestep == 1000
    assert checkpoint.base_configs["transformer"]["patch_size"] == 2 and checkpoint.defaults.tile_size == 64
    assert not (out / "model_kohya_unet_lora.safetensors").exists()


def test_tsdsr_folder_refuses_what_it_cannot_hold(tmp_path):
    from d3sr_core.checkpoints import write_tsdsr_dir
    from tiny_models import write_osediff_pkl, write_tsdsr_dir as write_tsdsr_dir_fixture

    write_osediff_pkl(tmp_path / "osediff.pkl")
    with pytest.raises(ValueError, match="not an SD3 flow model"):
        write_tsdsr_dir(load_checkpoint(tmp_path / "osediff.pkl"), tmp_path / "out")
    write_tsdsr_dir_fixture(tmp_path / "official")
    checkpoint = load_checkpoint(tmp_path / "official")
    checkpoint.tensors["transformer.pos_embed.proj.base_layer.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="fully trained weight"):
        write_tsdsr_dir(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()
