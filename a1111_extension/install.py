"""Run by the A1111 / Forge launcher: installs d3sr_core without touching the webui's own pins (torch, Pillow,
numpy, ...): only packages that are missing are installed, and d3sr_core itself with --no-deps.

d3sr_core comes from the repository this folder lives in (the usual case: `extensions/d3sr` links to
`<repo>/a1111_extension`), else from the pinned release.
"""

import os

import launch

PINNED_RELEASE = "d3sr==0.1.0"
MISSING_ONLY = {  # distribution -> requirement; Forge already pins diffusers, peft and transformers itself
    "diffusers": "diffusers>=0.30",
    "peft": "peft>=0.13",
    "transformers": "transformers>=4.40",
    "safetensors": "safetensors>=0.4",
    "pypng": "pypng",
    "tqdm": "tqdm",
}

here = os.path.dirname(os.path.realpath(__file__))
repository = os.path.dirname(here)

for distribution, requirement in MISSING_ONLY.items():
    if not launch.is_installed(distribution):
        launch.run_pip(f'install "{requirement}"', f"{distribution} for D3SR")
if not launch.is_installed("d3sr_core"):
    if os.path.isfile(os.path.join(repository, "d3sr_core", "__init__.py")):
        launch.run_pip(f'install --no-deps -e "{repository}"', "D3SR")
    else:
        launch.run_pip(f"install --no-deps {PINNED_RELEASE}", "D3SR")
