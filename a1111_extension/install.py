"""Run by the A1111 / Forge / reForge launcher: installs what d3sr_core needs without breaking the webui.

1. What the core needs comes from the repository's requirements.txt (the same floors pip sees; torch is the
   webui's). A package that is there at or above its floor is left alone.
2. A package that is missing or below its floor is installed with every other installed distribution pinned to its
   current version (a pip constraints file), so pip picks a version the webui's pinned packages accept and changes
   nothing else.
3. Metadata is not enough (reForge: the newest peft declared a pinned accelerate fine, then failed to import with
   it, and diffusers' UNet import and a builtin extension broke), so after installing, the webui's own imports and
   ours are tried in a fresh Python. If one that worked before fails, the changed packages go back to their old
   versions (or are removed if they were not there) and the next older release line is tried, a few times at most.
4. d3sr itself goes in with --no-deps from the repository this folder lives in (else the pinned release).

If nothing works, the webui keeps every package it had and the extension says in one sentence what is missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

import launch

PINNED_RELEASE = "d3sr==0.1.0"
FALLBACK_REQUIREMENTS = ["diffusers>=0.30", "peft>=0.13", "transformers>=4.40", "safetensors>=0.4", "numpy>=1.24",
                         "pillow>=9.5", "pypng>=0.20220715", "tqdm>=4.60", "pyyaml>=6"]
"""requirements.txt of this release, for an extension folder installed without its repository."""
HOST_IMPORTS = ["torch", "transformers", "accelerate", "diffusers", "from diffusers import UNet2DConditionModel",
                "from diffusers import AutoencoderKL", "peft", "safetensors", "PIL", "numpy"]
"""Imports the webui (or a builtin extension) relies on, tried before and after installing."""
IMPORT_NAMES = {"pillow": "PIL", "pypng": "png", "pyyaml": "yaml"}
"""Distribution -> the module it installs, where they differ."""
OUR_IMPORTS = ["from d3sr_core.pipeline import Upscaler", "from d3sr_core.checkpoints import load_checkpoint"]
MAX_TRIES = 4
"""Release lines tried per package, newest first, before giving up and restoring what was there."""

here = os.path.dirname(os.path.realpath(__file__))
repository = os.path.dirname(here)


def parse_version(text: str) -> tuple:
    """A comparable version: the leading numbers (``"0.13.2rc1"`` -> ``(0, 13, 2)``)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


def requirements() -> dict[str, str]:
    """Distribution name (lower case) -> floor (``""`` for none), from requirements.txt or the fallback list."""
    path = os.path.join(repository, "requirements.txt")
    lines = open(path).read().splitlines() if os.path.isfile(path) else FALLBACK_REQUIREMENTS
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, floor = re.match(r"([A-Za-z0-9_.\-]+)\s*(>=\s*([\w.]+))?", line).group(1, 0, 3)
            found[name.lower()] = floor or ""
    return found


def installed_versions() -> dict[str, str]:
    """Distribution name (lower case) -> installed version, for the Python the webui runs."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name:
            versions[name] = dist.version
    return versions


def needed(floors: dict[str, str], installed: dict[str, str]) -> list[str]:
    """The distributions that are missing or below their floor."""
    return [name for name, floor in floors.items()
            if name not in installed or (floor and parse_version(installed[name]) < parse_version(floor))]


def working_imports(statements: list[str]) -> set[str]:
    """Which of ``statements`` run in a fresh Python (each on its own, so one failure hides no other)."""
    code = "import sys\nok = []\n" + "".join(
        f"try:\n    {s if s.startswith('from ') else 'import ' + s}\n    ok.append({s!r})\nexcept Exception:\n    pass\n"
        for s in statements
    ) + "print('\\n'.join(ok))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return set(result.stdout.split("\n")) & set(statements)


def constraints_file(installed: dict[str, str], free: set[str]) -> str:
    """A pip constraints file pinning every installed distribution except ``free`` to its version."""
    handle, path = tempfile.mkstemp(prefix="d3sr-constraints-", suffix=".txt")
    with os.fdopen(handle, "w") as f:
        f.writelines(f"{name}=={version}\n" for name, version in sorted(installed.items()) if name not in free)
    return path


def restore(before: dict[str, str], after: dict[str, str]) -> None:
    """Put back what changed between ``before`` and ``after``: old versions reinstalled, new packages removed."""
    changed = [f'"{n}=={v}"' for n, v in before.items() if after.get(n) != v]
    added = [n for n in after if n not in before]
    if changed:
        launch.run_pip(f"install --no-deps {' '.join(changed)}", "the packages D3SR changed, as they were")
    if added:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *added], capture_output=True, timeout=600)


def install_within_host(name: str, floor: str) -> bool:
    """Install ``name`` at ``floor`` or above, newest release line first, keeping every other installed package
    and every import that worked. Returns whether a version that imports was found."""
    before = installed_versions()
    own = IMPORT_NAMES.get(name, name)
    baseline = working_imports(HOST_IMPORTS) | {own}
    ceiling = None
    for _ in range(MAX_TRIES):
        spec = name + (f">={floor}" if floor else "") + (f",<{ceiling}" if ceiling else "")
        constraints = constraints_file(before, {name})
        try:
            launch.run_pip(f'install "{spec}" -c "{constraints}"', f"{name} for D3SR")
        except Exception as err:  # noqa: BLE001 - pip found no version the webui's pins accept
            print(f"D3SR: pip found no {spec} that the webui's installed packages accept ({err}).")
            return False
        finally:
            os.unlink(constraints)
        after = installed_versions()
        if name in after and working_imports([*HOST_IMPORTS, own]) >= baseline:
            return True
        print(f"D3SR: {name} {after.get(name)} broke an import that worked before; putting the old packages back.")
        ceiling = after.get(name)
        restore(before, after)
        if not ceiling:
            return False
    return False


def main() -> None:
    floors = requirements()
    missing = needed(floors, installed_versions())
    failed = [name for name in missing if not install_within_host(name, floors[name])]
    if not launch.is_installed("d3sr_core"):
        if os.path.isfile(os.path.join(repository, "d3sr_core", "__init__.py")):
            launch.run_pip(f'install --no-deps -e "{repository}"', "D3SR")
        else:
            launch.run_pip(f"install --no-deps {PINNED_RELEASE}", "D3SR")
    if failed:
        print(f"D3SR: {', '.join(failed)} could not be installed without breaking the webui's packages; the webui keeps "
              f"its own, and D3SR may not load (see its message).")
    elif not working_imports(OUR_IMPORTS) >= set(OUR_IMPORTS):
        print("D3SR: d3sr_core is installed but does not import beside the webui's packages; D3SR will say why when it loads.")


if __name__ == "__main__":  # the launcher runs this file as a script
    main()
