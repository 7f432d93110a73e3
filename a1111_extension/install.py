"""Run by the A1111 / Forge launcher: installs d3sr_core without touching the webui's torch.

From the repository this folder lives in (the usual case: `extensions/d3sr` links to `<repo>/a1111_extension`),
else the pinned release. Dependencies come from the repository's requirements.txt, which does not name torch.
"""

import os

import launch

PINNED_RELEASE = "d3sr==0.1.0"
here = os.path.dirname(os.path.realpath(__file__))
repository = os.path.dirname(here)
requirements = os.path.join(repository, "requirements.txt")

if not launch.is_installed("d3sr_core"):
    if os.path.isdir(os.path.join(repository, "d3sr_core")) and os.path.isfile(requirements):
        launch.run_pip(f'install -r "{requirements}"', "requirements for D3SR")
        launch.run_pip(f'install --no-deps -e "{repository}"', "D3SR")
    else:
        launch.run_pip(f"install --no-deps {PINNED_RELEASE}", "D3SR")
        launch.run_pip("install diffusers peft transformers safetensors einops pypng", "requirements for D3SR")
