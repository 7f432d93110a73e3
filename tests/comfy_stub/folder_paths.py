"""Stand-in for ComfyUI's folder_paths, rooted at D3SR_TEST_MODELS_DIR (set by the tests)."""

import os

models_dir = os.environ.get("D3SR_TEST_MODELS_DIR", "/nonexistent/models")
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths = {
    "checkpoints": ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions),
    "diffusers": ([os.path.join(models_dir, "diffusers")], {"folder"}),
    "diffusion_models": ([os.path.join(models_dir, "diffusion_models")], supported_pt_extensions),
    "vae": ([os.path.join(models_dir, "vae")], supported_pt_extensions),
}


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    paths, extensions = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path not in paths:
        paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    paths, extensions = folder_names_and_paths[folder_name]
    found = []
    for root in paths:
        for dirpath, _, files in os.walk(root, followlinks=True):
            for f in files:
                if not extensions or os.path.splitext(f)[1].lower() in extensions:
                    found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(set(found))


def get_full_path_or_raise(folder_name, filename):
    for root in folder_names_and_paths[folder_name][0]:
        path = os.path.join(root, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")


def get_input_directory():
    return os.path.join(os.path.dirname(models_dir), "input")
