"""D3SR one-step diffusion SR in AUTOMATIC1111 1.10 and Forge: an upscaler (Extras, Hires fix, SD upscale,
/sdapi/v1/upscalers), an Extras-tab script, a settings section and an API route.

Only webui hooks are used (upscaler, postprocessing, settings, state, devices); the webui's own SD model is never
touched, so any checkpoint may be loaded there. The model math is d3sr_core's.
"""

import base64
import binascii
import io
import logging
import os
import sys

import gradio as gr
from fastapi import HTTPException
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel

from modules import devices, script_callbacks, scripts_postprocessing, shared
from modules.call_queue import queue_lock
from modules.ui_components import InputAccordion
from modules.upscaler import Upscaler, UpscalerData

try:
    from d3sr_core.checkpoints import embeds_base, listable_models, peek
    from d3sr_core.color import COLOR_FIXES
    from d3sr_core.host_options import DEFAULT, host_options, with_tile_store
    from d3sr_core.image_io import from_pil, output_levels, pil_from_levels
    from d3sr_core.loading import ModelCache, bundled_models
    from d3sr_core.memory import free_memory, released_after_run
    from d3sr_core.options import DEFAULT_MAX_OUTPUT_PIXELS, DEFAULT_MAX_SCALE, UpscaleOptions
    from d3sr_core.pipeline import Upscaler as OneStepUpscaler, processing_size
except ImportError as _missing:
    _repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    raise ImportError(
        f"D3SR is off: the Python package {getattr(_missing, 'name', None) or 'd3sr_core'!r} is missing from the webui's "
        f"Python because install.py did not run (--skip-install and --skip-prepare-environment skip it); start the webui "
        f"once without those flags, or run: {sys.executable} -m pip install --no-deps -e {_repository}"
    ) from None

MODEL_SUFFIXES = (".safetensors", ".pkl", ".pt", ".pth")
METHOD_DEFAULT = "method default"
FROM_SETTINGS = "from settings"
CACHE = ModelCache()


class Interrupted(Exception):
    """The user pressed Interrupt or Skip: stop between tiles."""


def model_dir() -> str:
    return getattr(shared.cmd_opts, "d3sr_models_path", None) or os.path.join(shared.models_path, "D3SR")


def list_models() -> dict[str, str]:
    """Display name -> path: the bundled models first, then the model files (and TSD-SR folders) in the models folder
    whose header reads (a file that does not is left out with one log line; this never raises)."""
    return {name: path for name, (path, _) in _listed().items()}


def _listed() -> dict:
    found = {name: str(path) for name, path in bundled_models().items()}
    root = model_dir()
    try:
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    except OSError as err:
        logging.getLogger("d3sr").warning("d3sr: %s cannot be listed (%s).", root, err.strerror)
        names = []
    for name in names:
        path = os.path.join(root, name)
        if name.endswith(MODEL_SUFFIXES) or os.path.isfile(os.path.join(path, "transformer.safetensors")):
            found[os.path.splitext(name)[0] if os.path.isfile(path) else name] = path
    return listable_models(found)


def list_bases() -> dict[str, str]:
    """Display name -> path of single files in models/Stable-diffusion and folders in models/diffusers."""
    found = {}
    checkpoints = getattr(shared.cmd_opts, "ckpt_dir", None) or os.path.join(shared.models_path, "Stable-diffusion")
    diffusers = os.path.join(shared.models_path, "diffusers")
    for root, wanted in ((checkpoints, os.path.isfile), (diffusers, os.path.isdir)):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if wanted(os.path.join(root, name)) and (wanted is os.path.isdir or name.endswith((".safetensors", ".ckpt"))):
                    found[name] = os.path.join(root, name)
    return found


def base_for(model_path: str, choice: str = FROM_SETTINGS) -> str | None:
    """The base model path for ``model_path``: none for a self-contained model, else the user's choice or setting."""
    if embeds_base(model_path):
        return None
    if choice != FROM_SETTINGS:
        bases = list_bases()
        if choice not in bases:
            raise ValueError(f"base model {choice!r} is not in models/Stable-diffusion or models/diffusers.")
        return bases[choice]
    family, _ = peek(model_path)
    setting = "d3sr_base_sd3" if family == "sd3" else "d3sr_base_sd2"
    value = getattr(shared.opts, setting, "")
    if not value:
        raise ValueError(f"{os.path.basename(model_path)} needs a {family} base model: set it in Settings > D3SR.")
    return list_bases().get(value, value)  # a list name, or a full path


def dtype_name(device) -> str:
    if device.type == "cpu" or getattr(shared.cmd_opts, "no_half", False):
        return "fp32"
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(devices.dtype), "fp32")


def limits() -> dict[str, int]:
    """The size limits from Settings > D3SR (the largest scale; the most output megapixels)."""
    megapixels = shared.opts.data.get("d3sr_max_output_megapixels") or DEFAULT_MAX_OUTPUT_PIXELS / 2**20
    return {"max_scale": int(shared.opts.data.get("d3sr_max_scale") or DEFAULT_MAX_SCALE),
            "max_output_pixels": int(float(megapixels) * 2**20)}


def upscale_image(image: Image.Image, model_path: str, base: str = FROM_SETTINGS, *, scale=None, tile_size=DEFAULT,
                  tile_overlap=DEFAULT, color_fix=METHOD_DEFAULT, seed=0) -> Image.Image:
    """``image`` upscaled by the one-step model at ``model_path``; the input itself if the user interrupts.
    Options and the size limits are checked before the model loads and before anything is allocated. Tile values
    as in every host (d3sr_core.host_options): -1 the setting (whose -1 is the model's default), 0 off, else a size.
    The VAE tile store follows the free memory; memory is handed back after an interrupt or an error."""
    setting = lambda key: int(shared.opts.data.get(key, DEFAULT))  # noqa: E731
    request = dict(
        tile_size=setting("d3sr_tile_size") if tile_size == DEFAULT else int(tile_size),
        tile_overlap=int(tile_overlap),
        vae_tile_size=setting("d3sr_vae_tile_size"),
        scale=scale,
        color_fix=None if color_fix == METHOD_DEFAULT else color_fix,
        seed=int(seed),
        **limits(),
    )
    header_scale = peek(model_path)[1]
    processing_size(image.height, image.width, host_options(UpscaleOptions(scale=header_scale), **request))
    loaded = CACHE.get(model_path, base_for(model_path, base))
    options = host_options(loaded.defaults, loaded.generator.vae_scale_factor, **request)
    processing_size(image.height, image.width, options)  # the model's own defaults (min_process_side) too
    device = devices.get_device_for("d3sr")
    pixels = from_pil(image).pixels[None]
    options = with_tile_store(options, loaded.generator.vae, *pixels.shape[-2:], free_memory(device))

    def progress(done, total):
        if shared.state.interrupted or shared.state.skipped:
            raise Interrupted
        shared.state.sampling_steps, shared.state.sampling_step = total, done

    try:
        with released_after_run():
            upscaler = OneStepUpscaler(loaded.generator, device=device, dtype=dtype_name(device))
            # 8-bit levels, filled by the core (band by band with the disk store): the result is never a float image.
            out = output_levels(image.height * options.scale, image.width * options.scale, pixels.shape[1])
            upscaler.upscale_within_memory(pixels, options, progress, devices.torch_gc, out=out)
            return pil_from_levels(out[0])
    except Interrupted:
        return image
    except BaseException:
        out = None  # a caller that keeps the exception keeps this frame, but not the result buffer
        raise
    finally:
        loaded.generator.to("cpu")
        if not shared.opts.data.get("d3sr_keep_loaded", True):
            CACHE.clear()
        devices.torch_gc()


class UpscalerD3SR(Upscaler):
    """Every model in models/D3SR as a webui upscaler, at its trained scale."""

    def __init__(self, dirname=None):
        self.name = "D3SR"
        self.user_path = dirname
        self.model_path = dirname or model_dir()
        super().__init__()
        # Built inside the webui's load_upscalers, which has no try/except: a bad file must not take the others down.
        try:
            listed = _listed()
        except Exception as err:  # noqa: BLE001 - the host's list must survive anything
            logging.getLogger("d3sr").warning("d3sr: the D3SR models could not be listed (%s).", err)
            listed = {}
        self.scalers = [UpscalerData(f"D3SR {name}", path, self, header.scale) for name, (path, header) in listed.items()]

    def do_upscale(self, img, selected_model):
        return upscale_image(img, selected_model)


class D3SRPostprocessing(scripts_postprocessing.ScriptPostprocessing):
    name = "D3SR one-step SR"
    order = 1050

    def ui(self):
        models = list(list_models())
        with InputAccordion(False, label="D3SR one-step diffusion SR") as enable:
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=models, value=models[0] if models else None)
                base = gr.Dropdown(label="Base model", choices=[FROM_SETTINGS, *list_bases()], value=FROM_SETTINGS)
            with gr.Row():
                scale = gr.Slider(minimum=1, maximum=8, step=1, value=4, label="Scale")
                tile_size = gr.Slider(minimum=-1, maximum=512, step=1, value=DEFAULT, label="Latent tile (-1: the setting, 0: off)")
                color_fix = gr.Dropdown(label="Colour fix", choices=[METHOD_DEFAULT, *COLOR_FIXES], value=METHOD_DEFAULT)
                seed = gr.Number(label="Seed", value=0, precision=0)
        return {"enable": enable, "model": model, "base": base, "scale": scale, "tile_size": tile_size,
                "color_fix": color_fix, "seed": seed}

    def process(self, pp, enable=False, model=None, base=FROM_SETTINGS, scale=4, tile_size=DEFAULT, color_fix=METHOD_DEFAULT, seed=0):
        if not enable or not model:
            return
        models = list_models()
        if model not in models:
            raise ValueError(f"D3SR model {model!r} is not in {model_dir()}.")
        pp.image = upscale_image(pp.image, models[model], base, scale=int(scale), tile_size=int(tile_size),
                                 color_fix=color_fix, seed=seed)
        pp.info["D3SR model"] = model
        pp.info["D3SR scale"] = int(scale)
        pp.info["D3SR colour fix"] = color_fix
        pp.info["D3SR seed"] = int(seed)


def on_ui_settings():
    section = ("d3sr", "D3SR")
    options = {
        "d3sr_base_sd2": shared.OptionInfo("", "SD 2.x base (OSEDiff, D3SR): a file in models/Stable-diffusion, a folder in models/diffusers, or a path", section=section),
        "d3sr_base_sd3": shared.OptionInfo("", "SD3-medium base (TSD-SR): a file in models/Stable-diffusion (sd3_medium.safetensors, with or without text encoders), a folder in models/diffusers, or a path", section=section),
        "d3sr_tile_size": shared.OptionInfo(DEFAULT, "Latent tile size (-1: the model's default, 0: off)", gr.Slider, {"minimum": -1, "maximum": 512, "step": 1}, section=section),
        "d3sr_vae_tile_size": shared.OptionInfo(DEFAULT, "VAE tile size in pixels, a multiple of 8 (-1: the model's default, 0: off)", gr.Slider, {"minimum": -1, "maximum": 4096, "step": 1}, section=section),
        "d3sr_keep_loaded": shared.OptionInfo(True, "Keep the last model in memory between images", section=section),
        "d3sr_max_scale": shared.OptionInfo(DEFAULT_MAX_SCALE, "Largest scale accepted (requests above it are refused)", gr.Number, {"precision": 0}, section=section),
        "d3sr_max_output_megapixels": shared.OptionInfo(DEFAULT_MAX_OUTPUT_PIXELS / 2**20, "Most output megapixels accepted (larger requests are refused before anything is allocated)", gr.Number, section=section),
    }
    for key, info in options.items():
        info.category_id = "postprocessing"  # A1111 1.7+ and Forge group sections by category; none is "Uncategorized"
        shared.opts.add_option(key, info)


class UpscaleRequest(BaseModel):
    image: str
    model: str
    base: str = FROM_SETTINGS
    scale: int = 4
    tile_size: int = DEFAULT
    tile_overlap: int = DEFAULT
    color_fix: str = METHOD_DEFAULT
    seed: int = 0


class UpscaleResponse(BaseModel):
    image: str
    info: dict


def api_upscale(request: UpscaleRequest) -> UpscaleResponse:
    """POST /d3sr/v1/upscale: a base64 image in, the upscaled PNG (base64) out; errors are one sentence (HTTP 422)."""
    models = list_models()
    if request.model not in models:
        raise HTTPException(status_code=422, detail=f"model {request.model!r} is not one of {sorted(models)}.")
    if request.color_fix not in (METHOD_DEFAULT, *COLOR_FIXES):
        raise HTTPException(status_code=422, detail=f"color_fix {request.color_fix!r} is not one of {[METHOD_DEFAULT, *COLOR_FIXES]}.")
    try:
        data = base64.b64decode(request.image.split(",", 1)[-1], validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image)  # as the command line reads files
    except Image.DecompressionBombError as err:
        raise HTTPException(status_code=422, detail=f"image has too many pixels to decode safely ({err}).") from None
    except (binascii.Error, ValueError):
        raise HTTPException(status_code=422, detail="image is not valid base64 (a data: URL prefix is allowed).") from None
    except (UnidentifiedImageError, OSError, SyntaxError):  # PIL's own text shows its BytesIO object's repr
        raise HTTPException(status_code=422, detail="image is base64 but not an image file the webui can read (PNG, JPEG, WebP, ...).") from None
    if image.width == 0 or image.height == 0:
        raise HTTPException(status_code=422, detail=f"image has no pixels ({image.width}x{image.height}).")
    # Like the webui's own routes: one job at a time, and a fresh job state (begin() clears an old interrupt).
    with queue_lock:
        shared.state.begin(job="d3sr")
        shared.state.job_count, shared.state.job_no = 1, 0  # begin() leaves -1, and /sdapi/v1/progress divides by it
        try:
            result = upscale_image(image, models[request.model], request.base, scale=request.scale,
                                   tile_size=request.tile_size, tile_overlap=request.tile_overlap,
                                   color_fix=request.color_fix, seed=request.seed)
            interrupted = shared.state.interrupted or shared.state.skipped
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        finally:
            shared.state.end()
    if interrupted:
        raise HTTPException(status_code=409, detail="the upscale was interrupted before it finished.")
    buffer = io.BytesIO()
    result.save(buffer, format="PNG")
    info = {"model": request.model, "scale": request.scale, "width": result.width, "height": result.height}
    return UpscaleResponse(image=base64.b64encode(buffer.getvalue()).decode(), info=info)


def on_app_started(_demo, app):
    app.add_api_route("/d3sr/v1/upscale", api_upscale, methods=["POST"], response_model=UpscaleResponse)
    ensure_listed()


def ensure_listed() -> None:
    """Put the D3SR upscalers in ``shared.sd_upscalers`` if the webui's list left them out. A1111 1.10 and Forge build
    the list from every ``Upscaler`` subclass, so they are there already; reForge's main branch builds it from a fixed
    list of its own classes (``modules/modelloader.py: load_upscalers``), so Extras, Hires fix and
    /sdapi/v1/upscalers would not know them (extra-single-image answered 500)."""
    upscalers = getattr(shared, "sd_upscalers", None)
    if upscalers is None or any(isinstance(u.scaler, UpscalerD3SR) for u in upscalers):
        return
    upscalers.extend(UpscalerD3SR(getattr(shared.cmd_opts, "d3sr_models_path", None)).scalers)


def _wrap_load_upscalers() -> None:
    """After every run of the webui's ``load_upscalers`` (at start and on Reload UI), :func:`ensure_listed`."""
    try:
        from modules import modelloader
    except ImportError:
        return
    original = modelloader.load_upscalers
    if getattr(original, "d3sr_wrapped", False):
        return

    def load_upscalers(*args, **kwargs):
        result = original(*args, **kwargs)
        ensure_listed()
        return result

    load_upscalers.d3sr_wrapped = True
    modelloader.load_upscalers = load_upscalers


_wrap_load_upscalers()
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
