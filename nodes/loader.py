"""Load a one-step SR model with its base model (a file or folder, or the graph's own MODEL and VAE)."""

from dataclasses import dataclass

from comfy_api.latest import io

from d3sr_core.backbones import load_base
from d3sr_core.backbones.resshift import load_resshift_base
from d3sr_core.backbones.sd2 import sd2_base_from_ldm_state_dict
from d3sr_core.backbones.sd3 import MMDIT_PROBE_KEY, sd3_base_from_stability_state
from d3sr_core.backbones.base import FAMILIES
from d3sr_core.checkpoints import build_generator, embedded_base, embeds_base, load_checkpoint, peek
from d3sr_core.files import ModelFileError
from d3sr_core.generator import OneStepGenerator
from d3sr_core.options import DTYPES, UpscaleOptions

from .schema import SEARCH_ALIASES, schema
from .model_folder import TSDSR_FILES, base_path, base_vae_path, list_base_vaes, list_bases, list_models, model_path, tsdsr_folder_name

D3SR_MODEL = io.Custom("D3SR_MODEL")
NO_BASE = "(none: the model is self-contained, or use the model and vae inputs)"
"""The base list's first entry and default: nothing to pick for a self-contained model such as the bundled one;
for other models, the MODEL and VAE connected to the loader."""
VAE_IN_BASE = "(the base's own VAE)"
"""The base VAE list's first entry and default: a checkpoint or diffusers folder brings its VAE; a file from
models/diffusion_models (an MMDiT alone) needs one from models/vae."""


@dataclass
class LoadedModel:
    """What flows along a D3SR_MODEL link: the built generator and its method's defaults."""

    generator: OneStepGenerator
    defaults: UpscaleOptions
    precision: str
    host_models: tuple = ()
    """The graph's MODEL and VAE patchers whose weights the generator borrows: loaded with ComfyUI's own memory
    management before each upscale."""


def graph_state_dict(model, vae) -> dict:
    """A ComfyUI SD 2.x MODEL and VAE as one state dict in the original single-file key layout (views, no copies)."""
    model_type = getattr(getattr(model.model, "model_type", None), "name", "EPS")
    if model_type != "EPS":
        raise ValueError(f"the connected MODEL predicts {model_type}; SD 2.x one-step SR models need epsilon prediction (SD 2.1-base).")
    state = {"model.diffusion_model." + k: v for k, v in model.model.diffusion_model.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in vae.first_stage_model.state_dict().items()})
    return state


def is_graph_sd3(model) -> bool:
    """Whether a ComfyUI MODEL is an MMDiT (SD3), which ComfyUI keeps in Stability's names."""
    return MMDIT_PROBE_KEY in model.model.diffusion_model.state_dict()


def graph_base(model, vae, family: str):
    """The connected MODEL and VAE as a base that borrows their tensors (one copy of the weights in memory)."""
    source = "the connected MODEL and VAE"
    if is_graph_sd3(model) != (family == "sd3"):
        raise ValueError(f"the connected MODEL is {'SD3' if is_graph_sd3(model) else 'not SD3'}, but the model needs an {FAMILIES.get(family, family)} base.")
    if family == "sd3":
        read_mmdit = model.model.diffusion_model.state_dict
        read_vae = vae.first_stage_model.state_dict
        return sd3_base_from_stability_state(read_mmdit(), read_vae(), source, borrowed=(read_mmdit, read_vae))
    return sd2_base_from_ldm_state_dict(graph_state_dict(model, vae), source, borrowed=lambda: graph_state_dict(model, vae))


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="D3SRModelLoader",
            display_name="Load One-Step SR Model (D3SR)",
            category="loaders",
            description="Loads a one-step diffusion SR model (OSEDiff, TSD-SR, D3SR, TAD-SR) onto its base model. The "
            "bundled d3sr-small-x4 is self-contained: it runs as it is, with no base.",
            search_aliases=[*SEARCH_ALIASES, "upscale model", "load sr model"],
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=list_models(),
                    tooltip="One-step SR weights: the bundled default model, or from models/d3sr a d3sr .safetensors, an "
                    "OSEDiff .pkl, or a TSD-SR folder.",
                ),
                io.Combo.Input(
                    "base_name",
                    options=[NO_BASE, *list_bases()],
                    default=NO_BASE,
                    tooltip="The base the weights were trained on: SD 2.1-base for OSEDiff, SD3-medium for TSD-SR "
                    "(sd3_medium.safetensors from models/checkpoints, an MMDiT from models/diffusion_models with base_vae, or "
                    "a diffusers folder). Self-contained models (the bundled one, and what d3sr train writes) need none and "
                    "ignore this. The first entry also means: use the MODEL and VAE of a checkpoint loader, without a second "
                    "copy of their weights.",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(DTYPES),
                    default="auto",
                    tooltip="auto: on a CPU bf16 where it is native (AVX512-BF16, AMX), else fp32; bf16 or fp16 on a GPU as ComfyUI prefers. fp16 keeps the VAE in fp32.",
                ),
                io.Combo.Input(
                    "base_vae",
                    options=[VAE_IN_BASE, *list_base_vaes()],
                    default=VAE_IN_BASE,
                    optional=True,
                    tooltip="The VAE for a base from models/diffusion_models (an SD3 MMDiT file holds no VAE): a file from models/vae.",
                ),
                io.Model.Input("model", optional=True, tooltip="SD 2.x or SD3 MODEL to use as the base (with base_name at its first entry). Not needed for self-contained models."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE that goes with model."),
            ],
            outputs=[D3SR_MODEL.Output(display_name="d3sr_model")],
        )

    @classmethod
    def validate_inputs(cls, model_name, base_name):
        """ComfyUI checks these two combos here instead of against its lists: a self-contained model runs whatever
        base_name a workflow still holds from another model (say a base that is not installed)."""
        models = list_models()
        folder = tsdsr_folder_name(model_name)
        if model_name not in models and not (folder and f"{folder}/{TSDSR_FILES[0]}" in models):  # "name/": older workflows
            try:  # a file that is there but not listed: say what is wrong with it
                peek(model_path(model_name))
            except (ModelFileError, OSError) as err:
                if not isinstance(err, FileNotFoundError):
                    return str(err).strip().splitlines()[0]
            return f"model_name {model_name!r} is not in models/d3sr; choose one of {models}."
        if base_name == NO_BASE or base_name in list_bases():
            return True
        try:
            if embeds_base(model_path(model_name)):
                return True
        except (ModelFileError, OSError):
            return True  # the loader itself says what is wrong with the file
        return f"base_name {base_name!r} is not in models/checkpoints, models/diffusion_models or models/diffusers; {model_name} needs its base model."

    @classmethod
    def execute(cls, model_name, base_name, precision, model=None, vae=None, base_vae=VAE_IN_BASE) -> io.NodeOutput:
        checkpoint = load_checkpoint(model_path(model_name))
        host_models = ()
        if checkpoint.base_configs is not None:  # self-contained: no other base fits it
            base = embedded_base(checkpoint)
        elif base_name == NO_BASE:
            if model is None or vae is None:
                raise ValueError(
                    f"{model_name} needs its base model: pick it in base_name, or connect the MODEL and VAE of a checkpoint loader."
                )
            base = graph_base(model, vae, checkpoint.base_family)
            host_models = tuple(m for m in (model, getattr(vae, "patcher", None)) if m is not None)
        elif checkpoint.base_family == "resshift":  # an official ResShift / TAD-SR UNet: its base is the VQ-f4 file
            base = load_resshift_base(base_path(base_name))
        else:
            vae_path = None if base_vae in (None, VAE_IN_BASE) else base_vae_path(base_vae)
            base = load_base(base_path(base_name), load_text_encoder=not checkpoint.conditioning, vae_path=vae_path)
        # A borrowed base keeps its LoRA unmerged: merging would copy every layer LoRA touches (for TSD-SR nearly all).
        generator = build_generator(checkpoint, base, merge_lora=not host_models)
        return io.NodeOutput(LoadedModel(generator, checkpoint.defaults, precision, host_models))
