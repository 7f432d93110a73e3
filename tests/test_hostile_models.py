"""Hostile model files: every metadata field and every OSEDiff pickle field forged with wrong types and absurd
values, forged ranks, malformed base configs, integer tensors, odd adapter names, size limits, and model lists
that survive bad files. Every case ends in an output or in one sentence naming the file (and the field), with
no traceback, nothing written and no allocation beyond the limits."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import pytest
import torch
from a1111_routes import registered_routes
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from d3sr_core.backbones.sd2 import SHIPPED_CONFIG_DIR
from d3sr_core.checkpoints import (
    OneStepCheckpoint,
    listable_models,
    load_checkpoint,
    peek,
    read_header,
    save_checkpoint,
)
from d3sr_core.files import ModelFileError
from d3sr_core.image_io import ImageFileError
from d3sr_core.lora import AdapterSpec, add_adapters, lora_state_keys
from d3sr_core.loading import load_model
from d3sr_core.options import LimitError, UpscaleOptions
from d3sr_core.pipeline import Upscaler

MICRO_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)
MICRO_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 layers_per_block=1, norm_num_groups=4, sample_size=32)
ERRORS = (ModelFileError, ImageFileError, ValueError)
"""What a hostile input may end in: one sentence (LimitError and ConfigError are ValueErrors)."""
RSS_LIMIT_BYTES = 1_500_000_000
"""No case may raise the process's peak memory by more than this (a forged rank once asked for 14-29 GB)."""


def micro_checkpoint() -> OneStepCheckpoint:
    """A self-contained one-step checkpoint of a micro SD 2.x-shaped base (about 0.2 MB): two LoRA adapters, a
    fully trained conv_in, a stored prompt embedding; scale 2, no tiling, so an upscale takes milliseconds."""
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**MICRO_UNET), AutoencoderKL(**MICRO_VAE)
    base = {**{f"unet.{k}": v.clone() for k, v in unet.state_dict().items()},
            **{f"vae.{k}": v.clone() for k, v in vae.state_dict().items()}}
    configs = {"unet": json.loads(json.dumps(dict(unet.config))), "vae": json.loads(json.dumps(dict(vae.config))),
               "scheduler": json.loads((SHIPPED_CONFIG_DIR / "scheduler.json").read_text())}
    specs = [AdapterSpec("default", "unet", 2, 2.0, ("to_q",)), AdapterSpec("enc", "vae", 2, 4.0, ("encoder.conv_in",))]
    add_adapters(unet, specs[:1])
    add_adapters(vae, specs[1:])
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for component, model in (("unet", unet), ("vae", vae)):
        state = dict(model.named_parameters())
        for key in lora_state_keys(model):
            tensors[f"{component}.{key}"] = torch.randn(state[key].shape, generator=gen) * 0.1
    tensors["unet.conv_in.weight"] = base["unet.conv_in.weight"] + 0.01
    return OneStepCheckpoint(
        method="d3sr", base_family="sd2", prediction_type="epsilon", timestep=500, adapters=specs, tensors=tensors,
        conditioning={"prompt_embeds": torch.randn(1, 77, 8, generator=gen)},
        defaults=UpscaleOptions(scale=2, min_process_side=0, tile_size=0, vae_encoder_tile_size=0, vae_decoder_tile_size=0,
                                color_fix="none"),
        base_configs=configs, base_tensors=base,
    )


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    return save_checkpoint(micro_checkpoint(), tmp_path_factory.mktemp("micro") / "micro.safetensors")


def rewrite(source: Path, target: Path, *, metadata: dict | None = None, tensors: dict | None = None) -> Path:
    """``source`` written again as ``target`` with its metadata and tensors changed (``None`` values delete)."""
    with safe_open(str(source), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in (metadata or {}).items():
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    for key, value in (tensors or {}).items():
        state.pop(key, None) if value is None else state.__setitem__(key, value)
    save_file(state, str(target), metadata=meta)
    return target


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def attempt(model: Path, image: torch.Tensor | None = None, base=None, **limits) -> str:
    """Load ``model`` and upscale a small image with it, as a host does. Returns ``"output"``, or the error's one
    sentence; any other exception (a traceback in a host) propagates and fails the test."""
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) if image is None else image
    try:
        loaded = load_model(model, base)
        options = loaded.defaults.updated(**limits) if limits else loaded.defaults
        result = Upscaler(loaded.generator, winograd=False).upscale(image, options)
    except ERRORS as err:
        return str(err)
    assert torch.isfinite(result).all() and result.shape[-1] == image.shape[-1] * options.scale
    return "output"


def assert_sentence(message: str, *names: str) -> None:
    """One sentence: one line, ending in a full stop, naming each of ``names`` (the file, the field)."""
    assert message != "output", f"expected a refusal naming {names}, got an output"
    assert "\n" not in message and "Traceback" not in message, message
    assert message.rstrip().endswith((".", ".)")), message
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"


def written_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# field -> forged values (strings: metadata is all strings). Some forged values are still valid; those must load.
METADATA_FORGERIES = {
    "format_version": ["abc", "", "1.5", "-1", "99", "1e9", "[1]"],
    "method": ["", "../../etc", "a" * 300, "x y"],
    "base_family": ["", "sd9", "../x", "sd 2"],
    "prediction_type": ["", "x0", "EPSILON", "1"],
    "timestep": ["abc", "", "-5", "1e9", "99999999999", "5000", "2.5", "999"],
    "scale": ["abc", "", "0", "-1", "4.5", "10000", "1e9", "99999999999999", "17", "16"],
    "adapters": [
        "not json", "{}", "[1]", "null", '"x"', "[]",
        *(json.dumps([{**entry, **change}]) for entry in [{"name": "default", "component": "unet", "rank": 2, "alpha": 2.0,
                                                           "targets": ["to_q"]}]
          for change in [{"name": "a.b"}, {"name": "a/b"}, {"name": ""}, {"name": 5}, {"component": "text"},
                         {"rank": 100000000}, {"rank": "x"}, {"rank": 0}, {"rank": -2}, {"rank": 2.5}, {"rank": True},
                         {"rank": 3}, {"rank": 1}, {"alpha": "NaN"}, {"alpha": -1}, {"alpha": True}, {"alpha": 1e400},
                         {"targets": []}, {"targets": "to_q"}, {"targets": [1]}, {"targets": ["nothing_matches"]}]),
    ],
    "prompt_embedding": ["maybe", "false", ""],
    "defaults": ["not json", "[]", "null", '{"tile_size": "abc"}', '{"min_process_side": 1000000}',
                 '{"min_process_side": 1e6}', '{"color_fix": "bogus"}', '{"tile_size": -5}', '{"seed": "x"}',
                 '{"max_output_pixels": 1e15, "max_scale": 100000, "min_process_side": 0}', '{"tile_batch_size": 0}', '{"upsample": 3}',
                 '{"vae_encoder_tile_size": 13}', '{"tile_overlap": 99999}'],
    "base_configs": ["not json", '"a string"', "[1, 2]", "{}", "null", '{"unet": {}, "vae": {}, "scheduler": {}}'],
    "training_config": ["not json", "[1]", '"x"'],
}
SWEEP_PIXELS = 128 * 128
"""The sweep's output limit: a forged file that loads is upscaled at most this large (the default defaults would
process the 8 px test image at 512 x 512)."""
"""Every field of our metadata; ``base_configs`` gets more below (inner fields)."""


def metadata_cases():
    for field, values in METADATA_FORGERIES.items():
        for value in values:
            yield field, value
        yield field, None  # the field missing


def test_every_metadata_field_forged_ends_in_an_output_or_a_sentence_naming_file_and_field(micro_model, tmp_path, record_property):
    tried = held = 0
    outputs = []
    start = peak_rss()
    for index, (field, value) in enumerate(metadata_cases()):
        forged = rewrite(micro_model, tmp_path / f"forged{index}.safetensors", metadata={field: value})
        before = written_files(tmp_path)
        outcome = attempt(forged, max_output_pixels=SWEEP_PIXELS)
        tried += 1
        assert written_files(tmp_path) == before, f"{field}={value!r} wrote files"
        if outcome == "output":
            outputs.append((field, value))
        elif "raise max_output_pixels" in outcome and forged.name not in outcome:  # the request is refused, not the file
            assert_sentence(outcome, "raise max_output_pixels")
            outputs.append((field, value))
        else:
            # A missing optional field or a value that parses but does not fit later is named by field or by file.
            assert_sentence(outcome, forged.name)
            if field not in ("base_configs", "prompt_embedding", "adapters", "timestep", "base_family") or value is None:
                assert field in outcome or value is None, outcome
        held += 1
    assert peak_rss() - start < RSS_LIMIT_BYTES
    # Forgeries that are valid values must still load: the sweep would pass a loader that refuses everything.
    assert ("scale", "16") in outputs and ("timestep", "999") in outputs
    assert ("defaults", '{"max_output_pixels": 1e15, "max_scale": 100000, "min_process_side": 0}') in outputs
    assert ("training_config", None) in outputs
    assert not any(f == "scale" and v in ("17", "10000") for f, v in outputs)
    record_property("hostile_metadata", f"{held}/{tried}")
    print(f"metadata forgeries: {tried} tried, {held} held, {len(outputs)} loaded and upscaled")


@pytest.mark.parametrize("change, field", [
    (lambda c: "a string", "base_configs"),
    (lambda c: [1, 2], "base_configs"),
    (lambda c: {**c, "unet": "x"}, "unet"),
    (lambda c: {k: v for k, v in c.items() if k != "vae"}, "vae"),
    (lambda c: {**c, "vae": {**c["vae"], "norm_num_groups": 0}}, "norm_num_groups"),
    (lambda c: {**c, "unet": {**c["unet"], "block_out_channels": ["a", "b"]}}, "block_out_channels"),
    (lambda c: {**c, "unet": {**c["unet"], "in_channels": "four"}}, "in_channels"),
    (lambda c: {**c, "unet": {**c["unet"], "layers_per_block": 1000000000}}, "layers_per_block"),
    (lambda c: {**c, "unet": {**c["unet"], "block_out_channels": [8, 1e12]}}, "block_out_channels"),
    (lambda c: {**c, "vae": {**c["vae"], "block_out_channels": [8, 16]}}, "base_configs"),
    (lambda c: {**c, "unet": {**c["unet"], "down_block_types": ["NoSuchBlock", "DownBlock2D"]}}, "base_configs"),
    (lambda c: {**c, "scheduler": {**c["scheduler"], "num_train_timesteps": 10**12}}, "num_train_timesteps"),
    (lambda c: {**c, "scheduler": {**c["scheduler"], "num_train_timesteps": 100}}, "timestep"),
    (lambda c: {**c, "scheduler": {**c["scheduler"], "beta_start": "x"}}, "scheduler"),
    (lambda c: {**c, "scheduler": {**c["scheduler"], "beta_schedule": "cosine"}}, "scheduler"),
])
def test_malformed_base_configs_end_in_a_sentence(micro_model, tmp_path, change, field):
    with safe_open(str(micro_model), framework="pt") as f:
        configs = json.loads(f.metadata()["base_configs"])
    forged = rewrite(micro_model, tmp_path / "configs.safetensors", metadata={"base_configs": json.dumps(change(configs))})
    assert_sentence(attempt(forged), forged.name, field)


def test_forged_rank_is_refused_before_any_allocation(micro_model, tmp_path):
    start = peak_rss()
    adapters = json.loads(load_checkpoint(micro_model).metadata()["adapters"])
    for rank in (10**8, 3, 1):
        adapters[0]["rank"] = rank
        forged = rewrite(micro_model, tmp_path / f"rank{rank}.safetensors", metadata={"adapters": json.dumps(adapters)})
        message = attempt(forged)
        assert_sentence(message, forged.name)
        assert "rank" in message and "different base model" not in message, message
    assert peak_rss() - start < RSS_LIMIT_BYTES


def test_rank_mismatch_and_foreign_base_are_told_apart(micro_model, tmp_path):
    checkpoint = load_checkpoint(micro_model)
    key = next(k for k in checkpoint.tensors if ".lora_A.default." in k)
    a = checkpoint.tensors[key]
    # Same rank, wrong input width: the LoRA was made for another base.
    forged = rewrite(micro_model, tmp_path / "foreign.safetensors", tensors={key: torch.zeros(a.shape[0], a.shape[1] + 1)})
    assert_sentence(attempt(forged), forged.name, "different base model")
    # One tensor of another rank: the rank and the tensors disagree.
    forged = rewrite(micro_model, tmp_path / "mixed.safetensors", tensors={key: torch.zeros(a.shape[0] + 1, a.shape[1])})
    assert_sentence(attempt(forged), forged.name, "rank")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_integer_tensors_are_refused(micro_model, tmp_path, dtype):
    key = "unet.conv_in.weight"
    with safe_open(str(micro_model), framework="pt") as f:
        value = f.get_tensor(key)
    forged = rewrite(micro_model, tmp_path / "int.safetensors", tensors={key: value.to(dtype)})
    assert_sentence(attempt(forged), forged.name, key)


def test_unknown_adapter_tensors_and_missing_ones_are_named(micro_model, tmp_path):
    checkpoint = load_checkpoint(micro_model)
    key = next(k for k in checkpoint.tensors if ".lora_B.default." in k)
    forged = rewrite(micro_model, tmp_path / "missing.safetensors", tensors={key: None})
    assert_sentence(attempt(forged), forged.name, "lora_B")
    extra = key.replace(".default.", ".ghost.")
    forged = rewrite(micro_model, tmp_path / "ghost.safetensors", tensors={extra: checkpoint.tensors[key]})
    assert_sentence(attempt(forged), forged.name, "ghost")


# ---- OSEDiff .pkl ----------------------------------------------------------------------------------------------

PICKLE_FORGERIES = [None, "str", 1.5, -1, 0, 10**8, True, [], {}, [1, 2], {"a": 1}, torch.zeros(2)]


def test_every_osediff_field_forged_ends_in_a_sentence(tiny_base_dir, tmp_path, record_property):
    from tiny_models import write_osediff_pkl

    good = tmp_path / "good.pkl"
    saved = write_osediff_pkl(good)
    assert attempt(good, base=tiny_base_dir, max_output_pixels=2**20) == "output"
    tried = held = 0
    start = peak_rss()
    for field in list(saved):
        for value in PICKLE_FORGERIES + ["missing"]:
            forged = dict(saved)
            if value == "missing":
                del forged[field]
            else:
                forged[field] = value
            path = tmp_path / f"{field}.pkl"
            torch.save(forged, path)
            tried += 1
            outcome = attempt(path, base=tiny_base_dir, max_output_pixels=2**20)
            assert_sentence(outcome, path.name)
            assert field in outcome or (field.startswith("state_dict") and "weight" in outcome), outcome
            held += 1
    # Inside the state dicts: an integer tensor, a non-tensor, a rank that disagrees with rank_unet.
    key = next(k for k in saved["state_dict_unet"] if "lora_A" in k)
    for value in (torch.zeros(4, 2, dtype=torch.int32), "x", torch.zeros(9, saved["state_dict_unet"][key].shape[1])):
        path = tmp_path / "inner.pkl"
        torch.save({**saved, "state_dict_unet": {**saved["state_dict_unet"], key: value}}, path)
        tried += 1
        assert_sentence(attempt(path, base=tiny_base_dir), path.name)
        held += 1
    assert peak_rss() - start < RSS_LIMIT_BYTES
    record_property("hostile_pickle", f"{held}/{tried}")
    print(f"pickle forgeries: {tried} tried, {held} held")


def test_osediff_rank_1e8_is_one_sentence_without_allocating(tiny_base_dir, tmp_path):
    from tiny_models import write_osediff_pkl

    saved = write_osediff_pkl(tmp_path / "good.pkl")
    start = peak_rss()
    for rank in (10**8, 5):
        path = tmp_path / f"rank{rank}.pkl"
        torch.save({**saved, "rank_unet": rank}, path)
        message = attempt(path, base=tiny_base_dir)
        assert_sentence(message, path.name, "rank")
    assert peak_rss() - start < RSS_LIMIT_BYTES


# ---- limits ------------------------------------------------------------------------------------------------------

def test_scale_and_output_size_limits_are_checked_before_allocation_and_can_be_raised(micro_model):
    with pytest.raises(LimitError, match="max_scale=16; raise max_scale"):
        UpscaleOptions(scale=100000)
    assert UpscaleOptions(scale=20, max_scale=32).scale == 20
    loaded = load_model(micro_model)
    upscaler = Upscaler(loaded.generator, winograd=False)
    start = peak_rss()
    image = torch.rand(1, 3, 3, 2)
    with pytest.raises(LimitError, match="over the limit max_output_pixels=.*raise max_output_pixels"):
        upscaler.upscale(image, loaded.defaults.updated(scale=10000, max_scale=10**6))
    with pytest.raises(LimitError, match="processed at"):
        upscaler.upscale(image, loaded.defaults.updated(min_process_side=4096, max_output_pixels=4096**2))
    with pytest.raises(LimitError):
        upscaler.count_steps(3, 2, loaded.defaults.updated(scale=10000, max_scale=10**6))
    assert peak_rss() - start < RSS_LIMIT_BYTES
    small = loaded.defaults.updated(max_output_pixels=100)
    with pytest.raises(LimitError):
        upscaler.upscale(torch.rand(1, 3, 8, 8), small)
    assert upscaler.upscale(torch.rand(1, 3, 8, 8), small.updated(max_output_pixels=256)).shape == (1, 3, 16, 16)


def test_limits_come_from_the_user_never_from_a_model_file(micro_model, tmp_path):
    forged = rewrite(micro_model, tmp_path / "wide.safetensors",
                     metadata={"defaults": json.dumps({"max_output_pixels": 10**15, "max_scale": 10**6, "min_process_side": 0})})
    defaults = load_checkpoint(forged).defaults
    assert (defaults.max_scale, defaults.max_output_pixels) == (UpscaleOptions().max_scale, UpscaleOptions().max_output_pixels)
    assert "max_scale" not in load_checkpoint(forged).metadata()["defaults"]


# ---- model lists -------------------------------------------------------------------------------------------------

def bad_model_folder(folder: Path, micro_model: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = micro_model.read_bytes()
    files = {
        "good": folder / "good.safetensors",
        "truncated": folder / "truncated.safetensors",
        "bad_scale": folder / "bad_scale.safetensors",
        "empty": folder / "empty.pkl",
        "text": folder / "text.pth",
        "zip_cut": folder / "zip_cut.pt",
        "no_meta": folder / "no_meta.safetensors",
    }
    files["good"].write_bytes(data)
    files["truncated"].write_bytes(data[: len(data) // 2])
    rewrite(micro_model, files["bad_scale"], metadata={"scale": "four"})
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a model")
    torch.save({"a": torch.zeros(100)}, folder / "whole.pt")
    files["zip_cut"].write_bytes((folder / "whole.pt").read_bytes()[:-30])
    (folder / "whole.pt").unlink()
    save_file({"x": torch.zeros(1)}, str(files["no_meta"]))
    return files


def test_model_lists_keep_good_files_and_leave_bad_ones_out_with_one_log_line(micro_model, tmp_path, caplog):
    files = bad_model_folder(tmp_path / "models", micro_model)
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        listed = listable_models({name: path for name, path in files.items()})
    assert list(listed) == ["good"]
    assert listed["good"][1].scale == 2 and listed["good"][1].embeds_base
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(files) - 1
    for name, path in files.items():
        if name != "good":
            assert sum(path.name in w for w in warned) == 1, (name, warned)
            with pytest.raises(ModelFileError):
                read_header(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        listable_models({name: path for name, path in files.items()})
    assert not caplog.records  # once per file version, not at every list
    assert peek(files["good"]) == ("sd2", 2)


STUB = Path(__file__).resolve().parent / "a1111_stub"
SCRIPT = Path(__file__).resolve().parents[1] / "a1111_extension" / "scripts" / "d3sr.py"


@pytest.fixture
def webui(micro_model, tmp_path, monkeypatch):
    """The A1111 script over the stand-in webui, with a models/D3SR folder holding one good and six bad files."""
    import importlib.util
    import sys

    root = tmp_path / "webui"
    files = bad_model_folder(root / "D3SR", micro_model)
    monkeypatch.setenv("D3SR_TEST_MODELS_DIR", str(root))
    monkeypatch.syspath_prepend(str(STUB))
    purge = lambda: [sys.modules.pop(n) for n in [n for n in sys.modules if n.split(".")[0] in ("modules", "gradio")]]  # noqa: E731
    purge()
    spec = importlib.util.spec_from_file_location("d3sr_webui_hostile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from modules import script_callbacks

    for callback in script_callbacks.ui_settings_callbacks:
        callback()
    routes = registered_routes()
    module.route = routes["/d3sr/v1/upscale"]
    module.files = files
    yield module
    purge()


def test_a1111_upscaler_list_survives_bad_files(webui, caplog):
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        upscaler = webui.UpscalerD3SR()
    names = [s.name for s in upscaler.scalers]
    assert "D3SR good" in names
    assert not any(n == f"D3SR {k}" for k in webui.files if k != "good" for n in names)
    assert [s.scale for s in upscaler.scalers if s.name == "D3SR good"] == [2]
    assert "good" in webui.list_models() and "truncated" not in webui.list_models()


def _encoded(image, format="PNG", **save) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def _png_bomb(width: int, height: int) -> str:
    """A valid small PNG whose IHDR claims ``width x height`` (CRC fixed): a decompression bomb's header."""
    import base64
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return base64.b64encode(bytes(data)).decode()


def test_a1111_route_answers_422_for_bombs_and_limits_and_honours_exif(webui):
    from fastapi import HTTPException
    from PIL import Image
    import base64
    import io

    from modules import shared

    photo = Image.new("RGB", (6, 4), (200, 30, 30))
    for request, words in (
        (webui.UpscaleRequest(image=_png_bomb(50000, 50000), model="good"), "pixels"),
        (webui.UpscaleRequest(image=_encoded(photo), model="good", scale=10000), "max_scale"),
        (webui.UpscaleRequest(image=_encoded(photo), model="truncated"), "truncated"),
    ):
        with pytest.raises(HTTPException) as caught:
            webui.route(request)
        assert caught.value.status_code == 422 and words in caught.value.detail, caught.value.detail
        assert "\n" not in caught.value.detail
    shared.opts.data["d3sr_max_output_megapixels"] = 20 / 2**20
    with pytest.raises(HTTPException) as caught:
        webui.route(webui.UpscaleRequest(image=_encoded(photo), model="good", scale=2))
    assert caught.value.status_code == 422 and "max_output_pixels" in caught.value.detail
    shared.opts.data["d3sr_max_output_megapixels"] = 1
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    answer = webui.route(webui.UpscaleRequest(image=_encoded(photo, "JPEG", exif=exif.tobytes()), model="good", scale=2))
    assert Image.open(io.BytesIO(base64.b64decode(answer.image))).size == (8, 12)


def test_a_refused_pickle_names_the_objection_without_torchs_unsafe_advice(tmp_path):
    from d3sr_core.files import ModelFileError, read_pickle

    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(ModelFileError) as refused:
        read_pickle(junk, "an OSEDiff checkpoint")
    message = str(refused.value)
    assert "junk.pkl was refused" in message and "Unsupported operand" in message
    assert "weights_only" not in message and "\n" not in message
