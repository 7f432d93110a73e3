"""The A1111 / Forge extension against the stand-in in tests/a1111_stub."""

import base64
import importlib.util
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3sr_cli.main import main as d3sr
from tiny_models import random_image, write_diffusers_base, write_osediff_pkl, write_sd3_base, write_tsdsr_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "a1111_extension" / "scripts"
STUB = Path(__file__).resolve().parent / "a1111_stub"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_models")
    (root / "D3SR").mkdir()
    write_osediff_pkl(root / "D3SR" / "osediff.pkl")
    write_tsdsr_dir(root / "D3SR" / "tsdsr")
    write_diffusers_base(root / "diffusers" / "tiny-sd2")
    write_sd3_base(root / "diffusers" / "tiny-sd3")
    return root


@pytest.fixture(scope="module")
def ext(models):
    """scripts/d3sr.py imported as the webui imports extension scripts, over the stand-in modules."""
    monkey = pytest.MonkeyPatch()
    monkey.setenv("D3SR_TEST_MODELS_DIR", str(models))
    monkey.syspath_prepend(str(STUB))
    for name in [n for n in sys.modules if n.split(".")[0] in ("modules", "gradio")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("d3sr_webui_script", SCRIPTS / "d3sr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from modules import script_callbacks, shared

    for callback in script_callbacks.ui_settings_callbacks:
        callback()
    shared.opts.d3sr_base_sd2 = "tiny-sd2"
    shared.opts.d3sr_base_sd3 = "tiny-sd3"
    yield module
    for name in [n for n in sys.modules if n.split(".")[0] in ("modules", "gradio")]:
        del sys.modules[name]
    monkey.undo()


def photo(height=24, width=32) -> Image.Image:
    return Image.fromarray((random_image(height, width)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_settings_are_registered(ext):
    from modules import shared

    assert {"d3sr_base_sd2", "d3sr_base_sd3", "d3sr_tile_size", "d3sr_vae_tile_size", "d3sr_keep_loaded"} <= set(shared.opts.data_labels)
    assert all(info.section == ("d3sr", "D3SR") for key, info in shared.opts.data_labels.items() if key.startswith("d3sr"))


def test_upscaler_lists_models_and_equals_the_command_line(ext, models, tmp_path):
    upscaler = ext.UpscalerD3SR(None)
    assert [(s.name, s.scale) for s in upscaler.scalers] == [("D3SR d3sr-small-x4", 4), ("D3SR osediff", 4), ("D3SR tsdsr", 4)]
    image = photo()
    image.save(tmp_path / "in.png")
    result = upscaler.do_upscale(image, upscaler.scalers[1].data_path)
    assert result.size == (128, 96)
    assert d3sr(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "cli"), "--model", str(models / "D3SR" / "osediff.pkl"),
                 "--base", str(models / "diffusers" / "tiny-sd2")]) == 0
    assert np.array_equal(np.asarray(result), np.asarray(Image.open(tmp_path / "cli" / "in.png")))
    # The webui's own loop: a x4 model asked for x2 runs once and resizes to the target.
    assert upscaler.upscale(image, 2, upscaler.scalers[1].data_path).size == (64, 48)


def test_bundled_model_needs_no_base(ext):
    upscaler = ext.UpscalerD3SR(None)
    assert ext.base_for(upscaler.scalers[0].data_path) is None
    assert upscaler.do_upscale(photo(16, 16), upscaler.scalers[0].data_path).size == (64, 64)


def test_tsdsr_model_takes_the_sd3_base_from_settings(ext):
    upscaler = ext.UpscalerD3SR(None)
    assert upscaler.do_upscale(photo(16, 16), upscaler.scalers[2].data_path).size == (64, 64)


def test_interrupt_returns_the_input_and_progress_is_reported(ext, monkeypatch):
    from modules import shared

    upscaler = ext.UpscalerD3SR(None)
    image = photo()
    shared.state.sampling_steps = 0
    upscaler.do_upscale(image, upscaler.scalers[0].data_path)
    assert shared.state.sampling_step == shared.state.sampling_steps > 0
    monkeypatch.setattr(shared.state, "interrupted", True)
    assert upscaler.do_upscale(image, upscaler.scalers[0].data_path) is image


def test_extras_script_changes_image_and_infotext(ext):
    from modules.scripts_postprocessing import PostprocessedImage

    script = ext.D3SRPostprocessing()
    controls = script.ui()
    assert set(controls) == {"enable", "model", "base", "scale", "tile_size", "color_fix", "seed"}
    pp = PostprocessedImage(photo())
    script.process(pp, enable=False, model="osediff")
    assert pp.image.size == (32, 24) and not pp.info
    script.process(pp, enable=True, model="osediff", base="tiny-sd2", scale=2, tile_size=0, color_fix="wavelet", seed=3)
    assert pp.image.size == (64, 48)
    assert pp.info == {"D3SR model": "osediff", "D3SR scale": 2, "D3SR colour fix": "wavelet", "D3SR seed": 3}


def test_api_route_answers_and_rejects_bad_requests(ext):
    from fastapi import HTTPException
    from modules import script_callbacks

    routes = {}

    class App:
        def add_api_route(self, path, endpoint, methods, response_model):
            routes[path] = endpoint

    for callback in script_callbacks.app_started_callbacks:
        callback(None, App())
    endpoint = routes["/d3sr/v1/upscale"]
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    answer = endpoint(ext.UpscaleRequest(image="data:image/png;base64," + encoded, model="osediff", scale=2))
    result = Image.open(io.BytesIO(base64.b64decode(answer.image)))
    assert result.size == (64, 48) and answer.info["width"] == 64
    from modules import shared

    shared.state.interrupted = True  # left over from an earlier job: a new request starts afresh
    again = endpoint(ext.UpscaleRequest(image=encoded, model="osediff", scale=2))
    assert Image.open(io.BytesIO(base64.b64decode(again.image))).size == (64, 48)
    for request, message in (
        (ext.UpscaleRequest(image="not base64!", model="osediff"), "image is not a base64-encoded image file"),
        (ext.UpscaleRequest(image=base64.b64encode(b"hello").decode(), model="osediff"), "image is not a base64-encoded image file"),
        (ext.UpscaleRequest(image=encoded, model="nope"), "model 'nope' is not one of ['d3sr-small-x4', 'osediff', 'tsdsr']"),
        (ext.UpscaleRequest(image=encoded, model="osediff", color_fix="lab"), "color_fix 'lab' is not one of"),
        (ext.UpscaleRequest(image=encoded, model="osediff", base="missing.safetensors"), "base model 'missing.safetensors' is not in"),
    ):
        with pytest.raises(HTTPException) as caught:
            endpoint(request)
        assert caught.value.status_code == 422 and message in caught.value.detail


INCOMPATIBLE = {
    r"\bgr\.\w+\.update\(": "gr.<Component>.update() is gone in gradio 4 (Forge); use gr.update()",
    r"\b_js\s*=": "_js= is js= in gradio 4",
    r"^\s*(from|import)\s+(backend|modules_forge)\b": "Forge-only backend",
    r"^\s*(from|import)\s+(ldm|sgm)\b": "the webui's SD model code",
    r"\bmodules\.sd_models\b|from modules import .*\bsd_models\b": "the webui's SD model code",
}


def test_scripts_use_only_calls_both_webuis_have():
    for path in [*SCRIPTS.glob("*.py"), ROOT / "a1111_extension" / "install.py", ROOT / "a1111_extension" / "preload.py"]:
        source = path.read_text()
        for pattern, why in INCOMPATIBLE.items():
            assert not re.search(pattern, source, re.MULTILINE), f"{path.name}: {why}"


def test_install_script_installs_only_what_is_missing_and_never_torch(monkeypatch):
    import runpy
    import types

    calls = []
    installed = {"transformers", "safetensors", "tqdm"}  # as a webui has them, pinned
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, description: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "a1111_extension" / "install.py"))
    assert calls == ['install "diffusers>=0.30"', 'install "peft>=0.13"', 'install "pypng"', f'install --no-deps -e "{ROOT}"']
    assert not any(re.search(r"\b(torch|pillow|numpy)\b", c, re.IGNORECASE) for c in calls)

    calls.clear()
    installed |= {"diffusers", "peft", "pypng", "d3sr_core"}
    runpy.run_path(str(ROOT / "a1111_extension" / "install.py"))
    assert calls == []
