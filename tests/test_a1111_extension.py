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

from a1111_routes import registered_routes
from d3sr_cli.main import main as d3sr
from held_tensors import image_sized_tensors
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

    routes = registered_routes()
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
        (ext.UpscaleRequest(image="not base64!", model="osediff"), "image is not valid base64"),
        (ext.UpscaleRequest(image=base64.b64encode(b"hello").decode(), model="osediff"), "image is base64 but not an image file"),
        (ext.UpscaleRequest(image=encoded, model="nope"), "model 'nope' is not one of ['d3sr-small-x4', 'osediff', 'tsdsr']"),
        (ext.UpscaleRequest(image=encoded, model="osediff", color_fix="lab"), "color_fix 'lab' is not one of"),
        (ext.UpscaleRequest(image=encoded, model="osediff", base="missing.safetensors"), "base model 'missing.safetensors' is not in"),
    ):
        with pytest.raises(HTTPException) as caught:
            endpoint(request)
        assert caught.value.status_code == 422 and message in caught.value.detail
        assert "BytesIO" not in caught.value.detail and " at 0x" not in caught.value.detail


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


def test_settings_sit_in_a_category(ext):
    from modules import shared

    assert all(getattr(info, "category_id", None) == "postprocessing"
               for key, info in shared.opts.data_labels.items() if key.startswith("d3sr"))


def test_reforge_fixed_upscaler_list_gets_the_d3sr_upscalers_once(ext):
    """reForge main builds shared.sd_upscalers from its own classes only: the extension adds its entries after."""
    from modules import modelloader, shared

    modelloader.load_upscalers()
    names = [u.name for u in shared.sd_upscalers]
    assert "D3SR d3sr-small-x4" in names and "D3SR osediff" in names
    modelloader.load_upscalers()  # Reload UI runs it again
    ext.ensure_listed()
    assert [u.name for u in shared.sd_upscalers] == names


def test_api_job_progress_is_never_negative(ext, monkeypatch):
    from modules import shared

    routes = registered_routes()
    seen = []
    real = ext.OneStepUpscaler.upscale_within_memory

    def watching(self, images, options, progress=None, free_cache=None, out=None):
        def spy(done, total):
            progress(done, total)
            seen.append(shared.state.progress())
        return real(self, images, options, spy, free_cache, out)

    monkeypatch.setattr(ext.OneStepUpscaler, "upscale_within_memory", watching)
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    routes["/d3sr/v1/upscale"](ext.UpscaleRequest(image=base64.b64encode(buffer.getvalue()).decode(), model="osediff", scale=2))
    assert seen and all(0 <= value <= 1 for value in seen) and seen == sorted(seen)


def test_tile_values_mean_the_same_as_in_every_host(ext, monkeypatch):
    """-1: the setting (whose -1 is the model's default); 0: off; a small tile gets an overlap that fits it."""
    from modules import shared

    captured = []
    real = ext.OneStepUpscaler.upscale_within_memory
    monkeypatch.setattr(ext.OneStepUpscaler, "upscale_within_memory",
                        lambda self, images, options, *a, **k: captured.append(options) or real(self, images, options, *a, **k))
    models = ext.list_models()
    ext.upscale_image(photo(), models["osediff"], "tiny-sd2", scale=2)
    ext.upscale_image(photo(), models["osediff"], "tiny-sd2", scale=2, tile_size=0)
    ext.upscale_image(photo(), models["osediff"], "tiny-sd2", scale=2, tile_size=8)
    monkeypatch.setitem(shared.opts.data, "d3sr_tile_size", 16)
    ext.upscale_image(photo(), models["osediff"], "tiny-sd2", scale=2)
    assert [(o.tile_size, o.tile_overlap) for o in captured] == [(96, 32), (0, 32), (8, 2), (16, 5)]


def test_missing_core_is_one_sentence(tmp_path):
    """With --skip-install the core is absent: the script's import says why, in one sentence, with the fix."""
    import subprocess

    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'd3sr_core':
            raise ModuleNotFoundError("No module named 'd3sr_core'", name='d3sr_core')
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(STUB)!r})
import runpy
try:
    runpy.run_path({str(SCRIPTS / 'd3sr.py')!r})
except ImportError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message = result.stdout.strip()
    assert message.startswith("D3SR is off: the Python package 'd3sr_core' is missing") and "--skip-install" in message
    assert message.count(". ") == 0 and "pip install --no-deps -e" in message


def load_installer(monkeypatch, state, breaks):
    """install.py as a module over a simulated webui: ``state`` (distribution -> version) is what is installed,
    ``breaks(state)`` the imports that fail there; pip is simulated, newest candidate first."""
    import types

    releases = {"peft": ["0.13.2", "0.15.2", "0.17.1"], "diffusers": ["0.30.0", "0.35.2"], "pypng": ["0.20220715.0"]}
    calls = []

    def run_pip(command, description):
        calls.append(command)
        match = re.match(r'install "([\w.-]+)(>=([\w.]+))?(,<([\w.]+))?" -c "(.+)"', command)
        if match:
            name, ceiling, constraints = match.group(1), match.group(5), open(match.group(6)).read()
            assert f"{name}==" not in constraints and "torch==" in constraints  # everything else pinned
            fits = [v for v in releases[name] if not ceiling or ins.parse_version(v) < ins.parse_version(ceiling)]
            state[name] = fits[-1]
        elif command.startswith("install --no-deps") and "==" in command:
            for name, version in re.findall(r'"([\w.-]+)==([\w.]+)"', command):
                state[name] = version

    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in state
    launch.run_pip = run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    spec = importlib.util.spec_from_file_location("d3sr_installer", ROOT / "a1111_extension" / "install.py")
    ins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ins)  # not __main__: nothing runs yet
    monkeypatch.setattr(ins, "installed_versions", lambda: dict(state))
    monkeypatch.setattr(ins, "working_imports", lambda statements: set(statements) - breaks(state))
    monkeypatch.setattr(ins.subprocess, "run", lambda args, **kw: [state.pop(n, None) for n in args[5:]])
    return ins, calls


def test_install_picks_a_peft_the_pinned_accelerate_imports_with_and_changes_nothing_else(monkeypatch):
    """reForge: peft missing, accelerate pinned old; the newest peft would break diffusers' UNet import."""
    state = {"torch": "2.3.1", "accelerate": "0.21.0", "diffusers": "0.30.0", "transformers": "4.40.0",
             "safetensors": "0.4.2", "numpy": "1.26.2", "pillow": "9.5.0", "tqdm": "4.66.1", "pypng": "0.20220715.0"}
    pinned = {k: v for k, v in state.items()}

    def breaks(s):
        if "peft" in s and ins.parse_version(s["peft"]) >= (0, 17):
            return {"peft", "from diffusers import UNet2DConditionModel"}
        return set()

    ins, calls = load_installer(monkeypatch, state, breaks)
    ins.main()
    assert state["peft"] == "0.15.2"  # the newest that imports beside accelerate 0.21
    assert {k: state[k] for k in pinned} == pinned  # no pinned package moved
    assert not any(re.search(r"\btorch\b", c) for c in calls if "-c" not in c)


def test_install_enforces_the_floors_and_leaves_satisfied_packages_alone(monkeypatch):
    state = {"torch": "2.3.1", "accelerate": "0.30.0", "diffusers": "0.27.2", "peft": "0.13.2", "transformers": "4.44.0",
             "safetensors": "0.4.2", "numpy": "1.26.2", "pillow": "10.2.0", "tqdm": "4.66.1", "pypng": "0.20220715.0",
             "pyyaml": "6.0.1", "d3sr": "0.1.0"}
    ins, calls = load_installer(monkeypatch, state, lambda s: set())
    monkeypatch.setattr(sys.modules["launch"], "is_installed", lambda name: name in state or name == "d3sr_core")
    ins.main()
    assert state["diffusers"] == "0.35.2" and len(calls) == 1 and calls[0].startswith('install "diffusers>=0.30"')


def serve_stand_in_webui(ext, tamper=0):
    """A stand-in webui over HTTP for tests/manual_webui_check.py: /sdapi/v1/upscalers and /sdapi/v1/extra-single-image
    read and answer the fields of Forge's and A1111's modules/api (UpscalerItem; ExtrasSingleImageRequest's image,
    upscaler_1, upscaling_resize) and run the extension's upscaler through the webui's Upscaler.upscale loop;
    /d3sr/v1/upscale is the extension's route. ``tamper`` levels are added to extra-single-image's pixels."""
    import http.server
    import json
    import threading

    route = registered_routes()["/d3sr/v1/upscale"]

    def encode(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            scalers = ext.UpscalerD3SR(None).scalers
            self.answer([{"name": s.name, "model_name": None, "model_path": s.data_path, "model_url": None, "scale": s.scale}
                         for s in scalers])

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/d3sr/v1/upscale":
                return self.answer(route(ext.UpscaleRequest(**body)).model_dump())
            scaler = next(s for s in ext.UpscalerD3SR(None).scalers if s.name == body["upscaler_1"])
            image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
            result = scaler.scaler.upscale(image, body["upscaling_resize"], scaler.data_path)
            pixels = np.clip(np.asarray(result).astype(int) + tamper, 0, 255).astype(np.uint8)
            self.answer({"image": encode(Image.fromarray(pixels)), "html_info": ""})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_manual_webui_check_passes_on_the_stand_in_and_catches_a_wrong_image(ext):
    import manual_webui_check as check

    server = serve_stand_in_webui(ext)
    try:
        lines = check.check_api(f"http://127.0.0.1:{server.server_port}", tolerance=1, wait=5)
    finally:
        server.shutdown()
    assert len(lines) == 3 and all(line.startswith("ok: ") for line in lines), lines
    assert "448x296, within 0 level(s)" in lines[1]
    server = serve_stand_in_webui(ext, tamper=3)
    try:
        with pytest.raises(check.CheckFailed, match="extra-single-image differs from d3sr upscale by up to 3 levels"):
            check.check_api(f"http://127.0.0.1:{server.server_port}", tolerance=1, wait=5)
    finally:
        server.shutdown()


def test_manual_webui_check_names_every_package_install_py_moved():
    import manual_webui_check as check

    before = {"accelerate": "0.21.0", "peft": "0.10.0", "torch": "2.3.1"}
    after = {"accelerate": "0.21.0", "peft": "0.15.2", "d3sr": "0.1.0"}
    assert check.moved_packages(before, after) == {"peft": ("0.10.0", "0.15.2"), "torch": ("2.3.1", None)}
    assert check.moved_packages(before, {**before, "pypng": "0.20220715.0"}) == {}


def test_manual_webui_check_runs_install_py_as_the_launcher_does(tmp_path):
    """The install check over a webui folder whose launch.py is a stand-in (this environment already has what the core
    needs, so install.py must not call pip): the extension is linked, install.py imports the webui's launch module
    from the webui folder, and no package moves."""
    import manual_webui_check as check

    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "launch.py").write_text(
        "import importlib.util\n"
        "def is_installed(name):\n    return importlib.util.find_spec(name) is not None\n"
        "def run_pip(command, desc=None):\n    raise RuntimeError('pip was called: ' + command)\n"
    )
    lines = check.check_install(webui, sys.executable)
    assert (webui / "extensions" / "d3sr").resolve() == (ROOT / "a1111_extension").resolve()
    assert any(line.startswith("ok: no package of the webui moved") for line in lines), lines
    assert not any("pip was called" in line for line in lines), lines
    (webui / "extensions" / "d3sr").unlink()
    (webui / "extensions" / "d3sr").mkdir()
    with pytest.raises(check.CheckFailed, match="is not a link to"):
        check.check_install(webui, sys.executable)


def test_interrupt_on_the_disk_store_removes_its_files_and_frees_the_image(ext, monkeypatch, tmp_path):
    """Low free RAM puts the run on disk; Interrupt mid-run returns the input, leaves no scratch folder and no
    image-sized tensor."""
    import tempfile

    import torch
    from modules import shared

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ext, "free_memory", lambda device: 1024**2)
    monkeypatch.setitem(shared.opts.data, "d3sr_vae_tile_size", 128)  # tiles enough for an interrupt mid-run
    models = ext.list_models()
    image = photo(40, 56)
    sizes = {(80, 112), (512, 717)}  # the output (scale 2) and the processing size (min_process_side 512)

    before, scratch, stores = len(image_sized_tensors(sizes)), [], []
    real = ext.OneStepUpscaler.upscale_within_memory

    def interrupting(self, images, options, progress=None, free_cache=None, out=None):
        stores.append(options.vae_tile_store)

        def late(done, total):
            if done > 3:
                scratch.extend(tmp_path.glob("d3sr-vae-tiles-*"))
                monkeypatch.setattr(shared.state, "interrupted", True)
            progress(done, total)
        return real(self, images, options, late, free_cache, out)

    monkeypatch.setattr(ext.OneStepUpscaler, "upscale_within_memory", interrupting)
    assert ext.upscale_image(image, models["osediff"], "tiny-sd2", scale=2) is image
    assert stores == ["disk"] and scratch and not list(tmp_path.glob("d3sr-vae-tiles-*"))
    assert len(image_sized_tensors(sizes)) == before


def test_tsdsr_runs_on_an_sd3_single_file_in_models_stable_diffusion(ext, models, monkeypatch, tmp_path):
    """The SD3 base setting takes Stability's single file (here the tiny SD3 in that layout, with the tiny configs
    standing in for the shipped SD3-medium ones); the image equals the one on the same weights as a diffusers folder."""

    from modules import shared

    from d3sr_core.backbones import sd3
    from test_sd3_single_file import write_stability_file
    from tiny_models import tiny_sd3_transformer, tiny_sd3_vae, write_base_config_dir

    config = write_base_config_dir(tmp_path / "config", sd3.SHIPPED_CONFIG_DIR, transformer=tiny_sd3_transformer(), vae=tiny_sd3_vae())
    monkeypatch.setattr(sd3, "SHIPPED_CONFIG_DIR", config)
    (models / "Stable-diffusion").mkdir(exist_ok=True)
    write_stability_file(models / "Stable-diffusion" / "tiny_sd3.safetensors", tiny_sd3_transformer(), tiny_sd3_vae())
    upscaler = ext.UpscalerD3SR(None)
    image = photo(16, 16)
    from_folder = np.asarray(upscaler.do_upscale(image, upscaler.scalers[2].data_path))
    shared.opts.d3sr_base_sd3 = "tiny_sd3.safetensors"
    try:
        from_file = np.asarray(upscaler.do_upscale(image, upscaler.scalers[2].data_path))
    finally:
        shared.opts.d3sr_base_sd3 = "tiny-sd3"
    assert from_file.shape == (64, 64, 3) and np.array_equal(from_file, from_folder)
