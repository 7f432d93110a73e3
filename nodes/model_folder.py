"""The ``models/d3sr`` folder, registered with ComfyUI's ``folder_paths`` (``extra_model_paths.yaml`` can add more)."""

import logging
import os
import shutil

import folder_paths

from d3sr_core.checkpoints import listable_models
from d3sr_core.loading import bundled_models

FOLDER = "d3sr"
MODEL_SUFFIXES = {".safetensors", ".pkl", ".pt", ".pth"}
TSDSR_FILES = ("transformer.safetensors", "vae.safetensors")
BUNDLED = "bundled/"
"""Prefix of the models shipped inside the package, listed first (the first is the loader's default)."""
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "chelsea_lr.png")
SAMPLE_INPUT = "d3sr_sample.png"
"""The name the pack's sample photo gets in ComfyUI's input folder, where the first example workflow loads it."""
log = logging.getLogger("d3sr")


def register_model_folder() -> None:
    """Register ``models/d3sr`` (and create it, so users see where their models go)."""
    folder = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, folder)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, MODEL_SUFFIXES)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:  # a read-only install still loads; the models list just stays empty
        log.warning("D3SR: could not create %s (%s).", folder, err.strerror or err)


def place_sample() -> None:
    """Copy the pack's sample photo into ComfyUI's input folder as ``d3sr_sample.png`` if it is not there, so the
    first example workflow runs on a fresh install as it is. A file of that name the user put there is kept."""
    target = os.path.join(folder_paths.get_input_directory(), SAMPLE_INPUT)
    if os.path.exists(target) or not os.path.isfile(SAMPLE):
        return
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(SAMPLE, target)
    except OSError as err:
        log.warning("D3SR: could not place the sample image in %s (%s).", target, err.strerror or err)


def list_models() -> list[str]:
    """The bundled models (``bundled/<file>``), then the model files, with a TSD-SR folder
    (``name/transformer.safetensors`` + ``name/vae.safetensors``) listed by its transformer file
    ``name/transformer.safetensors`` (a name that the frontend's missing-model check can find in the folder)."""
    names = [n.replace(os.sep, "/") for n in folder_paths.get_filename_list(FOLDER)]  # Windows lists with "\\"
    folders = {n.rsplit("/", 1)[0] for n in names if "/" in n and n.rsplit("/", 1)[1] == TSDSR_FILES[0]}
    singles = [n for n in names if not (n.rsplit("/", 1)[0] in folders and "/" in n)]
    bundled = [BUNDLED + path.name for path in bundled_models().values()]
    return bundled + readable(sorted(singles + [f"{f}/{TSDSR_FILES[0]}" for f in folders]))


def readable(names: list[str]) -> list[str]:
    """The names whose file header reads (``d3sr_core.checkpoints.listable_models``); each other one is left out
    with one log line. Never raises: a bad file must not break the loader node's list."""
    candidates = {}
    for name in names:
        try:
            candidates[name] = model_path(name)
        except (OSError, ValueError) as err:
            log.warning("D3SR: left out of the model list: %s (%s).", name, err)
    try:
        return list(listable_models(candidates))
    except Exception as err:  # noqa: BLE001 - the host's list must survive anything
        log.warning("D3SR: the models in models/%s could not be listed (%s).", FOLDER, err)
        return []


def tsdsr_folder_name(name: str) -> str | None:
    """``name`` of a TSD-SR folder from a listed ``name/transformer.safetensors`` or an older workflow's ``name/``."""
    if name.endswith("/"):
        return name[:-1]
    if name.endswith("/" + TSDSR_FILES[0]):
        return name[: -len(TSDSR_FILES[0]) - 1]
    return None


def model_path(name: str) -> str:
    if name.startswith(BUNDLED):
        found = {path.name: path for path in bundled_models().values()}
        if name[len(BUNDLED):] not in found:
            raise FileNotFoundError(f"the bundled model {name!r} is not installed with this d3sr.")
        return str(found[name[len(BUNDLED):]])
    folder = tsdsr_folder_name(name)
    if folder is not None:
        return os.path.dirname(folder_paths.get_full_path_or_raise(FOLDER, os.path.join(folder, TSDSR_FILES[0])))
    return folder_paths.get_full_path_or_raise(FOLDER, name)


DIFFUSION_MODELS = "diffusion_models/"
"""Prefix of the base list's entries from ``models/diffusion_models`` (an SD3 MMDiT alone, which needs a VAE file)."""


def _file_list(folder: str) -> list[str]:
    """``folder_paths``' list of a model folder, empty when this ComfyUI has no such folder."""
    return folder_paths.get_filename_list(folder) if folder in folder_paths.folder_names_and_paths else []


def list_bases() -> list[str]:
    """Single-file checkpoints from ``models/checkpoints``, ``.safetensors`` from ``models/diffusion_models``
    (``diffusion_models/<name>``) and diffusers folders from ``models/diffusers``."""
    files = folder_paths.get_filename_list("checkpoints")
    files += [DIFFUSION_MODELS + n for n in _file_list("diffusion_models") if n.endswith(".safetensors")]
    folders = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            folders += [f"diffusers/{d}" for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "model_index.json")) or os.path.isdir(os.path.join(root, d, "vae"))]
    return files + folders


def list_base_vaes() -> list[str]:
    """``.safetensors`` VAE files from ``models/vae``, for a base from ``models/diffusion_models``."""
    return [n for n in _file_list("vae") if n.endswith(".safetensors")]


def base_vae_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise("vae", name)


def base_path(name: str) -> str:
    if name.startswith(DIFFUSION_MODELS):
        return folder_paths.get_full_path_or_raise("diffusion_models", name[len(DIFFUSION_MODELS):])
    if name.startswith("diffusers/"):
        folder = name[len("diffusers/"):]
        if not folder or folder in (".", "..") or "/" in folder or "\\" in folder or os.path.isabs(folder):
            raise FileNotFoundError(f"the diffusers folder {folder!r} is not a folder name inside models/diffusers.")
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, folder)
            if os.path.isdir(path) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(root):
                return path
        raise FileNotFoundError(f"the diffusers folder {folder!r} is not in any models/diffusers path.")
    return folder_paths.get_full_path_or_raise("checkpoints", name)
