"""The ComfyUI node classes against the stand-in in tests/comfy_stub (the real server is in test_comfyui_server.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import build_generator, load_checkpoint
from d3sr_core.options import PRESETS
from d3sr_core.pipeline import Upscaler
from bounds import IMAGE_REORDER, max_difference
from held_tensors import image_sized_tensors
from tiny_models import random_image, write_diffusers_base, write_osediff_pkl, write_sd3_base, write_tsdsr_dir

ROOT = Path(__file__).resolve().parent.parent
STUB = Path(__file__).resolve().parent / "comfy_stub"
HOST_MODULES = ("folder_paths", "comfy", "comfy_api")


def _forget_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in HOST_MODULES + ("d3sr_pack",):
            del sys.modules[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "d3sr").mkdir()
    write_osediff_pkl(root / "d3sr" / "osediff.pkl")
    write_tsdsr_dir(root / "d3sr" / "tsdsr")
    write_diffusers_base(root / "diffusers" / "tiny-sd2")
    write_sd3_base(root / "diffusers" / "tiny-sd3")
    (root / "checkpoints").mkdir()
    return root


@pytest.fixture(scope="module")
def pack(models):
    """The repository root imported as ComfyUI imports a custom node folder, over the stand-in host."""
    monkey = pytest.MonkeyPatch()
    monkey.setenv("D3SR_TEST_MODELS_DIR", str(models))
    monkey.syspath_prepend(str(STUB))
    _forget_modules()
    spec = importlib.util.spec_from_file_location("d3sr_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["d3sr_pack"] = module
    spec.loader.exec_module(module)
    yield module
    _forget_modules()
    monkey.undo()


def inputs_of(node):
    return {i.id: i for i in node.define_schema().inputs}


def test_mappings_and_tooltips(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == {"D3SRModelLoader", "D3SRUpscale", "D3SRColorFix"}
    for node in pack.NODE_CLASS_MAPPINGS.values():
        assert all(i.tooltip for i in node.define_schema().inputs), node


def test_loader_lists_models_and_bases(pack):
    loader = pack.NODE_CLASS_MAPPINGS["D3SRModelLoader"]
    assert inputs_of(loader)["model_name"].options == ["bundled/d3sr-small-x4.safetensors", "osediff.pkl", "tsdsr/transformer.safetensors"]
    bases = inputs_of(loader)["base_name"].options
    assert bases[0] == inputs_of(loader)["base_name"].widget["default"] and "self-contained" in bases[0]
    assert "diffusers/tiny-sd2" in bases and "diffusers/tiny-sd3" in bases


def test_bundled_model_loads_without_a_base_and_upscales(pack):
    nodes = pack.NODE_CLASS_MAPPINGS
    # base_name is left at its default (the graph's MODEL), which a self-contained model does not use.
    loaded = nodes["D3SRModelLoader"].execute("bundled/d3sr-small-x4.safetensors", inputs_of(nodes["D3SRModelLoader"])["base_name"].options[0], "fp32").args[0]
    image = random_image(24, 32, seed=3).movedim(1, -1)
    out = nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs(scale=4)).args[0]
    assert out.shape == (1, 96, 128, 3) and torch.isfinite(out).all()


def upscale_inputs(**changes):
    values = dict(scale=2, tile_size=-1, tile_overlap=-1, vae_tile_size=-1, color_fix="method default", vae_sample="mode", seed=0)
    return {**values, **changes}


@pytest.mark.parametrize("model_name, base_name", [("osediff.pkl", "diffusers/tiny-sd2"), ("tsdsr/transformer.safetensors", "diffusers/tiny-sd3")])
def test_upscale_node_equals_core(pack, models, model_name, base_name):
    nodes = pack.NODE_CLASS_MAPPINGS
    loaded = nodes["D3SRModelLoader"].execute(model_name, base_name, "auto").args[0]
    image = torch.cat([random_image(24, 32, seed=1), random_image(24, 32, seed=2)]).movedim(1, -1)  # [B, H, W, C]
    out = nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs()).args[0]
    assert out.shape == (2, 48, 64, 3)
    checkpoint_path = models / "d3sr" / model_name.replace("/transformer.safetensors", "")
    checkpoint = load_checkpoint(checkpoint_path)
    generator = build_generator(checkpoint, load_base(models / base_name))
    options = checkpoint.defaults.updated(scale=2, vae_sample="mode", seed=0)
    upscaler = Upscaler(generator, dtype="fp32")
    for index in range(2):
        expected = upscaler.upscale(image[index : index + 1].movedim(-1, 1), options)
        assert torch.equal(out[index : index + 1], expected.movedim(1, -1))


def test_progress_interrupt_and_oom_backoff(pack, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    nodes = pack.NODE_CLASS_MAPPINGS
    loaded = nodes["D3SRModelLoader"].execute("osediff.pkl", "diffusers/tiny-sd2", "fp32").args[0]
    image = random_image(24, 32).movedim(1, -1)
    nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs())
    bar = comfy.utils.BARS[-1]
    assert bar.values[-1] == bar.total and bar.values == sorted(bar.values)

    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs())

    tried = []
    real = Upscaler.upscale

    def fails_with_big_tiles(self, images, options, progress=None, out=None):
        tried.append(options.tile_size)
        if options.tile_size > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")  # before any work, like a failed allocation
        return real(self, images, options, progress, out)

    monkeypatch.setattr(Upscaler, "upscale", fails_with_big_tiles)
    out = nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs(tile_size=64)).args[0]
    assert tried == [64, 32, 16] and out.shape == (1, 48, 64, 3)


def test_loader_takes_the_base_from_the_graph(pack, models, monkeypatch, tmp_path):
    """A checkpoint loader's MODEL and VAE (ComfyUI keeps SD in the original key layout) serve as the base."""
    from types import SimpleNamespace

    from d3sr_core.backbones import sd2
    from tiny_models import tiny_unet, tiny_vae, write_base_config_dir, write_single_file

    config = write_base_config_dir(tmp_path / "config", sd2.SHIPPED_CONFIG_DIR, unet=tiny_unet(), vae=tiny_vae())
    monkeypatch.setattr(sd2, "SHIPPED_CONFIG_DIR", config)  # the tiny model stands in for SD 2.1-base
    write_single_file(tmp_path / "ldm.safetensors", tiny_unet(), tiny_vae())
    from safetensors.torch import load_file

    ldm = load_file(str(tmp_path / "ldm.safetensors"))
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    vae_sd = {k[len("first_stage_model."):]: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    graph_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=SimpleNamespace(state_dict=lambda: unet_sd)))
    graph_vae = SimpleNamespace(first_stage_model=SimpleNamespace(state_dict=lambda: vae_sd))
    from d3sr_core.checkpoints import convert_checkpoint

    embeds = load_base(models / "diffusers" / "tiny-sd2").encode_prompt("")["prompt_embeds"]
    convert_checkpoint(models / "d3sr" / "osediff.pkl", models / "d3sr" / "with_prompt.safetensors", prompt_embeds=embeds)
    nodes = pack.NODE_CLASS_MAPPINGS
    loader = nodes["D3SRModelLoader"]
    from_graph = loader.execute("with_prompt.safetensors", inputs_of(loader)["base_name"].options[0], "fp32", graph_model, graph_vae)
    from_folder = loader.execute("with_prompt.safetensors", "diffusers/tiny-sd2", "fp32")
    image = random_image(16, 24).movedim(1, -1)
    host_before = {k: v.clone() for k, v in {**unet_sd, **vae_sd}.items()}
    a = nodes["D3SRUpscale"].execute(from_graph.args[0], image, **upscale_inputs()).args[0]
    b = nodes["D3SRUpscale"].execute(from_folder.args[0], image, **upscale_inputs()).args[0]
    # The graph's base keeps its LoRA unmerged (no copy of the layers it touches), the folder's merges it: equal in
    # exact arithmetic, so they differ by summation order alone.
    assert max_difference(a, b) <= IMAGE_REORDER
    assert all(torch.equal(v, host_before[k]) for k, v in {**unet_sd, **vae_sd}.items())
    with pytest.raises(ValueError, match="needs its base model: pick it in base_name, or connect the MODEL and VAE"):
        loader.execute("with_prompt.safetensors", inputs_of(loader)["base_name"].options[0], "fp32", graph_model, None)


def host_module(state: dict) -> torch.nn.Module:
    """A host's model as ComfyUI holds one: modules whose parameters carry the file's names (Stability's, LDM's)."""
    root = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


def test_sd3_graph_base_borrows_the_host_weights_and_leaves_them_as_they_were(pack, models, monkeypatch, tmp_path):
    """The SD3 MODEL and VAE of the graph run TSD-SR without a second copy of their weights.

    A stand-in for the real-server case: ComfyUI's own checkpoint loader cannot load a tiny SD3 checkpoint, because it
    builds every SD-family VAE at full size (comfy/sd.py, VAE.__init__: ch 128, ch_mult 1, 2, 4, 4, two res blocks)
    whatever the file holds, so the tiny VAE's weights do not fit it. The stand-in holds the weights as ComfyUI does
    (Stability's MMDiT names, LDM VAE names, in the stored dtype); a host model's output is a function of its weights
    alone, so the weights being bit for bit what they were, in the same objects, dtype and device, is its output
    being the same before and after an upscale."""
    from types import SimpleNamespace

    from d3sr_core.backbones import sd3
    from test_sd3_single_file import transformer_to_stability, vae_to_ldm, write_stability_file
    from tiny_models import tiny_sd3_transformer, tiny_sd3_vae, write_base_config_dir

    config = write_base_config_dir(tmp_path / "config", sd3.SHIPPED_CONFIG_DIR, transformer=tiny_sd3_transformer(), vae=tiny_sd3_vae())
    monkeypatch.setattr(sd3, "SHIPPED_CONFIG_DIR", config)  # the tiny model stands in for SD3-medium
    transformer, vae = tiny_sd3_transformer().half(), tiny_sd3_vae().half()
    mmdit = host_module(transformer_to_stability(transformer))
    first_stage = host_module(vae_to_ldm(vae))
    graph_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=mmdit))
    graph_vae = SimpleNamespace(first_stage_model=first_stage)
    host = {**dict(mmdit.named_parameters()), **dict(first_stage.named_parameters())}  # the names do not overlap
    before = {k: (v, v.detach().clone()) for k, v in host.items()}
    (models / "checkpoints").mkdir(exist_ok=True)
    write_stability_file(models / "checkpoints" / "tiny_sd3.safetensors", transformer, vae)

    nodes = pack.NODE_CLASS_MAPPINGS
    loader = nodes["D3SRModelLoader"]
    from_graph = loader.execute("tsdsr/transformer.safetensors", inputs_of(loader)["base_name"].options[0], "fp32", graph_model, graph_vae).args[0]
    assert "tiny_sd3.safetensors" in pack_bases(pack)
    from_file = loader.execute("tsdsr/transformer.safetensors", "tiny_sd3.safetensors", "fp32").args[0]
    host_storage = {v.untyped_storage().data_ptr() for v in host.values()}
    held = [t for t in [*from_graph.generator.parameters(), *from_graph.generator.buffers()] if not t.is_meta]
    assert held and all(t.untyped_storage().data_ptr() not in host_storage for t in held)  # one copy: the host's
    image = random_image(16, 24).movedim(1, -1)
    a = nodes["D3SRUpscale"].execute(from_graph, image, **upscale_inputs()).args[0]
    b = nodes["D3SRUpscale"].execute(from_file, image, **upscale_inputs()).args[0]
    assert max_difference(a, b) <= IMAGE_REORDER  # unmerged (graph) against merged (file) LoRA: summation order
    after = {**dict(mmdit.named_parameters()), **dict(first_stage.named_parameters())}
    for name, (parameter, value) in before.items():
        now = after[name]
        assert now is parameter and now.dtype == torch.float16 and torch.equal(now, value), name
    with pytest.raises(ValueError, match="the connected MODEL is not SD3, but the model needs an SD3 base"):
        sd2_like = SimpleNamespace(model=SimpleNamespace(diffusion_model=host_module({"input_blocks.0.0.weight": torch.zeros(1)})))
        loader.execute("tsdsr/transformer.safetensors", inputs_of(loader)["base_name"].options[0], "fp32", sd2_like, graph_vae)


def pack_bases(pack) -> list:
    return sys.modules["d3sr_pack.nodes.model_folder"].list_bases()


def test_color_fix_node_keeps_alpha(pack):
    node = pack.NODE_CLASS_MAPPINGS["D3SRColorFix"]
    image = torch.rand(1, 32, 32, 4)
    reference = torch.full((1, 8, 8, 3), 0.25)
    out = node.execute(image, reference, "adain").args[0]
    assert out.shape == (1, 32, 32, 4) and torch.equal(out[..., 3], image[..., 3])
    assert abs(out[..., :3].mean().item() - 0.25) < 0.02


def test_missing_dependency_gives_an_explaining_node():
    code = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'diffusers':
            raise ModuleNotFoundError("No module named 'diffusers'", name='diffusers')
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(STUB)!r})
spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module; spec.loader.exec_module(module)
node = module.NODE_CLASS_MAPPINGS['D3SRMissingDependencies']
print(node.DESCRIPTION)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'diffusers' is missing" in result.stdout and "requirements.txt" in result.stdout


def test_trained_tsdsr_export_loads_in_the_node_with_no_base(pack, models, tmp_path):
    """What `d3sr train --method tsdsr --preset tiny` writes (an SD3 base embedded) loads and upscales as it is."""
    from training.config import load_config
    from training.methods import METHODS
    from training.trainer import Trainer

    hr = tmp_path / "hr"
    hr.mkdir()
    from PIL import Image

    Image.fromarray((random_image(64, 64, seed=5)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(hr / "a.png")
    config = load_config(preset="tiny", overrides=["method=tsdsr", f"data.hr_dir={hr}", "train.max_steps=1", "train.batch_size=1"],
                         method_defaults=METHODS["tsdsr"].defaults, other_sections=tuple(METHODS))
    Trainer(config, tmp_path / "run").train()
    target = models / "d3sr" / "tsdsr-tiny.safetensors"
    target.write_bytes((tmp_path / "run" / "model.safetensors").read_bytes())
    try:
        nodes = pack.NODE_CLASS_MAPPINGS
        base_default = inputs_of(nodes["D3SRModelLoader"])["base_name"].options[0]
        loaded = nodes["D3SRModelLoader"].execute("tsdsr-tiny.safetensors", base_default, "fp32").args[0]
        image = random_image(24, 32, seed=6)
        out = nodes["D3SRUpscale"].execute(loaded, image.movedim(1, -1), **upscale_inputs(scale=4)).args[0]
        checkpoint = load_checkpoint(target)
        from d3sr_core.checkpoints import embedded_base

        expected = Upscaler(build_generator(checkpoint, embedded_base(checkpoint)), dtype="fp32").upscale(
            image, checkpoint.defaults.updated(scale=4, vae_sample="mode", seed=0)
        )
        assert out.shape == (1, 96, 128, 3)
        assert max_difference(out, expected.movedim(1, -1)) <= IMAGE_REORDER
    finally:
        target.unlink()


def test_loader_validation_lets_a_self_contained_model_ignore_a_stale_base(pack):
    """A workflow made for another model still holds its base_name; the bundled model runs with it, others say why."""
    loader = pack.NODE_CLASS_MAPPINGS["D3SRModelLoader"]
    assert loader.validate_inputs("bundled/d3sr-small-x4.safetensors", "v2-1_512-ema-pruned.safetensors") is True
    assert loader.validate_inputs("osediff.pkl", "diffusers/tiny-sd2") is True
    assert loader.validate_inputs("tsdsr/", "diffusers/tiny-sd3") is True  # what older workflows hold
    message = loader.validate_inputs("osediff.pkl", "v2-1_512-ema-pruned.safetensors")
    assert isinstance(message, str) and "needs its base model" in message and "v2-1_512-ema-pruned.safetensors" in message
    assert "not in models/d3sr" in loader.validate_inputs("missing.safetensors", inputs_of(loader)["base_name"].options[0])
    with pytest.raises(ValueError, match="needs its base model: pick it in base_name, or connect"):
        loader.execute("osediff.pkl", inputs_of(loader)["base_name"].options[0], "fp32")


def test_nodes_are_found_by_search_and_explain_themselves(pack):
    for node in pack.NODE_CLASS_MAPPINGS.values():
        schema = node.define_schema()
        assert schema.description and {"super resolution", "osediff", "tsd-sr"} <= set(schema.search_aliases), schema.node_id
    seed = inputs_of(pack.NODE_CLASS_MAPPINGS["D3SRUpscale"])["seed"]
    assert seed.widget["control_after_generate"] == "fixed"  # not the frontend's "randomize" for a widget named seed
    tile = inputs_of(pack.NODE_CLASS_MAPPINGS["D3SRUpscale"])["tile_size"]
    assert tile.widget["default"] == -1 and "d3sr-small-x4 32" in tile.tooltip and "OSEDiff 96" in tile.tooltip


def test_models_folder_and_sample_image_are_placed_on_first_start(pack, models):
    import folder_paths

    assert (models / "d3sr").is_dir()
    placed = Path(folder_paths.get_input_directory()) / "d3sr_sample.png"
    assert placed.read_bytes() == (ROOT / "samples" / "chelsea_lr.png").read_bytes()
    placed.write_bytes(b"the user's own file")
    from nodes.model_folder import place_sample

    place_sample()
    assert placed.read_bytes() == b"the user's own file"  # never overwritten


def test_a_small_tile_size_works_with_the_default_overlap(pack):
    """tile_size 8 with tile_overlap -1: the overlap follows the tile (at most a third), not OSEDiff's 32."""
    nodes = pack.NODE_CLASS_MAPPINGS
    loaded = nodes["D3SRModelLoader"].execute("osediff.pkl", "diffusers/tiny-sd2", "fp32").args[0]
    out = nodes["D3SRUpscale"].execute(loaded, random_image(24, 32).movedim(1, -1), **upscale_inputs(tile_size=8)).args[0]
    assert out.shape == (1, 48, 64, 3)
    with pytest.raises(ValueError, match="tile_size=-2 is not allowed"):
        nodes["D3SRUpscale"].execute(loaded, random_image(24, 32).movedim(1, -1), **upscale_inputs(tile_size=-2))


def test_low_free_memory_parks_vae_tiles_on_disk_with_the_same_pixels(pack, monkeypatch):
    import comfy.model_management as mm

    nodes = pack.NODE_CLASS_MAPPINGS
    loaded = nodes["D3SRModelLoader"].execute("osediff.pkl", "diffusers/tiny-sd2", "fp32").args[0]
    image = random_image(24, 32, seed=4).movedim(1, -1)
    inputs = upscale_inputs(vae_tile_size=64)
    in_ram = nodes["D3SRUpscale"].execute(loaded, image, **inputs).args[0]
    monkeypatch.setattr(mm, "free_memory_bytes", 1024**2)  # 1 MiB free: the RAM store's estimate is far above half
    seen = []
    real_upscale = Upscaler.upscale_within_memory
    monkeypatch.setattr(Upscaler, "upscale_within_memory", lambda self, images, options, *a, **k: seen.append(options.vae_tile_store) or real_upscale(self, images, options, *a, **k))
    on_disk = nodes["D3SRUpscale"].execute(loaded, image, **inputs).args[0]
    assert seen == ["disk"] and max_difference(in_ram, on_disk) <= IMAGE_REORDER  # AdaIN's statistics summed by bands


def test_cancel_leaves_no_image_sized_tensor_behind_even_if_the_host_keeps_the_exception(pack):
    import comfy.model_management as mm

    nodes = pack.NODE_CLASS_MAPPINGS
    loaded = nodes["D3SRModelLoader"].execute("osediff.pkl", "diffusers/tiny-sd2", "fp32").args[0]
    image = random_image(40, 56, seed=7).movedim(1, -1)
    # min_process_side 512: what the core's frames hold as whole-image tensors; and the IMAGE output (scale 4)
    sizes = {(512, 717), (160, 224)}

    before = len(image_sized_tensors(sizes))
    calls = []

    def interrupt_late():
        calls.append(1)
        if len(calls) > 3:  # after the encoder has allocated its whole-image tensors
            raise mm.InterruptProcessingException()

    original = mm.throw_exception_if_processing_interrupted
    mm.throw_exception_if_processing_interrupted = interrupt_late
    try:
        with pytest.raises(mm.InterruptProcessingException) as kept:  # kept: the exception, as a host may keep it
            nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs(scale=4, vae_tile_size=256))
    finally:
        mm.throw_exception_if_processing_interrupted = original
    assert kept.value.__traceback__ is not None
    assert len(image_sized_tensors(sizes)) == before


def test_cancel_on_the_disk_store_removes_its_files_and_frees_the_image(pack, monkeypatch, tmp_path):
    """Low free RAM puts the run on disk; a Cancel mid-run leaves no scratch folder and no image-sized tensor (the
    IMAGE buffer included), even if the host keeps the exception."""
    import tempfile

    import comfy.model_management as mm

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(mm, "free_memory_bytes", 1024**2)
    nodes = pack.NODE_CLASS_MAPPINGS
    loaded = nodes["D3SRModelLoader"].execute("osediff.pkl", "diffusers/tiny-sd2", "fp32").args[0]
    image = random_image(40, 56, seed=7).movedim(1, -1)
    sizes = {(160, 224), (512, 717)}  # the output (scale 4) and the processing size (min_process_side 512)

    before, scratch, calls = len(image_sized_tensors(sizes)), [], []

    def interrupt_late():
        calls.append(1)
        if len(calls) > 3:  # the encoder has run on tiles read from the disk
            scratch.extend(tmp_path.glob("d3sr-vae-tiles-*"))
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt_late)
    with pytest.raises(mm.InterruptProcessingException) as kept:
        nodes["D3SRUpscale"].execute(loaded, image, **upscale_inputs(scale=4, vae_tile_size=128))
    assert kept.value.__traceback__ is not None
    assert scratch and not list(tmp_path.glob("d3sr-vae-tiles-*"))
    assert len(image_sized_tensors(sizes)) == before
