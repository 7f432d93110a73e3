"""A manual check of the A1111 / Forge extension in a real webui: Forge, reForge or A1111 1.10.

No registry carries a webui tree, so CI runs the extension against the stand-in in tests/a1111_stub; this script is
the check in the real thing, run by hand (pytest does not collect it: its name does not start with ``test_``).
Run it with this repository's Python (the one ``d3sr`` is installed in); the webui keeps its own.

1. ``install``: on a webui checkout where the extension was never installed, with the webui stopped::

       python tests/manual_webui_check.py install --webui ~/stable-diffusion-webui-forge

   links ``a1111_extension`` into ``extensions/d3sr``, lists the webui Python's packages (``pip list``), runs
   ``install.py`` exactly as the launcher does (the webui's Python, ``PYTHONPATH`` = the webui folder, from that
   folder), lists them again and fails if any package that was there changed version or went away. Packages
   added for D3SR are listed. ``--python`` names the webui's Python when it is not ``venv/bin/python``.

2. ``api``: start the webui with its API on the CPU in full precision (the pixels are then those of the command line
   on the CPU): ``./webui.sh --api --use-cpu all --no-half --skip-torch-cuda-test`` (``webui-user.bat`` on Windows),
   then::

       python tests/manual_webui_check.py api --url http://127.0.0.1:7860

   checks that ``D3SR d3sr-small-x4`` is in ``GET /sdapi/v1/upscalers``, that ``POST /sdapi/v1/extra-single-image``
   with it upscales the bundled sample (cropped to 112 x 74, so that x4 is a multiple of 8 and the webui's rounding
   of upscaler sizes to multiples of 8 changes nothing) to 448 x 296, and that the result, and that of the
   extension's own ``POST /d3sr/v1/upscale``, equal ``d3sr upscale`` on the same image within ``--tolerance``
   8-bit levels (default 1: two float32 runs that differ only in summation order stay within
   tests/bounds.py's IMAGE_REORDER, a sixteenth of a level, so their 8-bit values differ by at most one; a webui on
   a GPU in half precision needs a larger tolerance). ``--wait S`` waits up to S seconds for the webui to answer.

Each failed check is one line starting with ``FAIL``; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = ROOT / "a1111_extension"
SAMPLE = ROOT / "samples" / "chelsea_lr.png"
UPSCALER = "D3SR d3sr-small-x4"
ROUTE_MODEL = "d3sr-small-x4"
SCALE = 4
CHECK_SIZE = (112, 74)
"""The sample's size (112 x 75) cropped to an even height: x4 is then a multiple of 8 on both sides."""


class CheckFailed(Exception):
    """One check did not hold; the message says which and why."""


def installed_packages(python: str) -> dict[str, str]:
    """Distribution name (lower case) -> version in ``python``'s environment, from ``pip list``."""
    result = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise CheckFailed(f"{python} -m pip list failed: {result.stderr.strip()[-500:]}")
    return {entry["name"].lower(): entry["version"] for entry in json.loads(result.stdout)}


def moved_packages(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """The packages of ``before`` whose version changed or that are gone in ``after``: name -> (before, after)."""
    return {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}


def webui_python(webui: Path, given: str | None) -> str:
    if given:
        return given
    for candidate in (webui / "venv" / "bin" / "python", webui / "venv" / "Scripts" / "python.exe"):
        if candidate.is_file():
            return str(candidate)
    raise CheckFailed(f"no venv/bin/python in {webui}; give the webui's Python with --python.")


def link_extension(webui: Path) -> Path:
    """``extensions/d3sr`` -> this repository's ``a1111_extension`` (made if absent; refused if it is another)."""
    if not (webui / "launch.py").is_file() or not (webui / "modules").is_dir():
        raise CheckFailed(f"{webui} is not a webui checkout (no launch.py and modules/).")
    link = webui / "extensions" / "d3sr"
    if link.exists() or link.is_symlink():
        if link.resolve() != EXTENSION.resolve():
            raise CheckFailed(f"{link} exists and is not a link to {EXTENSION}; move it away first.")
        return link
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(EXTENSION, target_is_directory=True)
    return link


def check_install(webui: Path, python: str) -> list[str]:
    """Run install.py as the launcher does; returns the report lines (raises on a moved package)."""
    link = link_extension(webui)
    before = installed_packages(python)
    report = []
    if "d3sr" in before:
        report.append("note: d3sr was installed before, so install.py had little to do; use a webui that never had it")
    env = {**os.environ, "PYTHONPATH": f"{webui}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([python, str(link / "install.py")], cwd=webui, env=env, capture_output=True, text=True,
                            timeout=3600)
    report += [f"install.py: {line}" for line in (result.stdout + result.stderr).strip().splitlines()[-20:]]
    if result.returncode != 0:
        raise CheckFailed(f"install.py ended with status {result.returncode}:\n" + "\n".join(report))
    after = installed_packages(python)
    moved = moved_packages(before, after)
    if moved:
        raise CheckFailed("install.py changed the webui's packages: " + ", ".join(
            f"{name} {old} -> {new or 'removed'}" for name, (old, new) in sorted(moved.items())))
    added = sorted(set(after) - set(before))
    report.append(f"ok: no package of the webui moved ({len(before)} checked); added: {', '.join(added) or 'none'}")
    imported = subprocess.run([python, "-c", "import d3sr_core.pipeline"], capture_output=True, text=True, cwd=webui)
    if imported.returncode != 0:
        raise CheckFailed(f"d3sr_core does not import in the webui's Python: {imported.stderr.strip()[-500:]}")
    report.append("ok: d3sr_core imports in the webui's Python")
    return report


def request(url: str, body: dict | None = None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise CheckFailed(f"{url} answered HTTP {err.code}: {err.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CheckFailed(f"{url} did not answer ({err}); is the webui running with --api?") from None


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            request(url, timeout=10)
            return
        except CheckFailed:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str, what: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1])))
    if image.format != "PNG":
        raise CheckFailed(f"{what} came back as {image.format}, not PNG; set the webui's image file format to png.")
    return image.convert("RGB")


def cli_result(image) -> "np.ndarray":
    """``d3sr upscale`` with the bundled model on the CPU in fp32, in this process."""
    import numpy as np

    from d3sr_cli.main import main as d3sr

    with tempfile.TemporaryDirectory() as folder:
        image.save(Path(folder) / "check.png")
        if d3sr(["upscale", str(Path(folder) / "check.png"), "-o", str(Path(folder) / "out"), "--device", "cpu",
                 "--dtype", "fp32"]) != 0:
            raise CheckFailed("d3sr upscale failed on the check image (see its message above).")
        with open(Path(folder) / "out" / "check.png", "rb") as f:
            from PIL import Image

            return np.asarray(Image.open(f).convert("RGB")).astype(int)


def compare(result, expected, what: str, tolerance: int) -> str:
    import numpy as np

    size = (SCALE * CHECK_SIZE[0], SCALE * CHECK_SIZE[1])
    if result.size != size:
        raise CheckFailed(f"{what} gave {result.size[0]}x{result.size[1]}, expected {size[0]}x{size[1]}.")
    difference = int(np.abs(np.asarray(result).astype(int) - expected).max())
    if difference > tolerance:
        raise CheckFailed(f"{what} differs from d3sr upscale by up to {difference} levels (tolerance {tolerance}).")
    return f"ok: {what} gives {size[0]}x{size[1]}, within {difference} level(s) of d3sr upscale"


def check_api(url: str, tolerance: int, wait: float) -> list[str]:
    from PIL import Image

    url = url.rstrip("/")
    wait_for(url + "/sdapi/v1/upscalers", wait)
    names = [entry["name"] for entry in request(url + "/sdapi/v1/upscalers")]
    if UPSCALER not in names:
        raise CheckFailed(f"{UPSCALER!r} is not in /sdapi/v1/upscalers ({len(names)} upscalers: {', '.join(names[:12])}, ...); "
                          "was the webui restarted after the install?")
    report = [f"ok: {UPSCALER!r} is in /sdapi/v1/upscalers"]
    image = Image.open(SAMPLE).convert("RGB").crop((0, 0, *CHECK_SIZE))
    expected = cli_result(image)
    extras = request(url + "/sdapi/v1/extra-single-image", {
        "image": png_base64(image), "upscaler_1": UPSCALER, "upscaling_resize": SCALE, "resize_mode": 0,
        "show_extras_results": True,
    })
    report.append(compare(decoded(extras["image"], "extra-single-image"), expected, "extra-single-image", tolerance))
    route = request(url + "/d3sr/v1/upscale", {"image": png_base64(image), "model": ROUTE_MODEL, "scale": SCALE})
    report.append(compare(decoded(route["image"], "/d3sr/v1/upscale"), expected, "/d3sr/v1/upscale", tolerance))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="install the extension into a webui checkout; no package may move")
    install.add_argument("--webui", required=True, type=Path, help="the webui checkout (Forge, reForge, A1111 1.10)")
    install.add_argument("--python", help="the webui's Python (default: WEBUI/venv/bin/python)")
    api = sub.add_parser("api", help="check the upscaler list, extra-single-image and the route of a running webui")
    api.add_argument("--url", default="http://127.0.0.1:7860", help="the running webui (started with --api)")
    api.add_argument("--tolerance", type=int, default=1, help="largest difference to d3sr upscale, in 8-bit levels")
    api.add_argument("--wait", type=float, default=0, help="seconds to wait for the webui to answer")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            webui = args.webui.expanduser().resolve()
            lines = check_install(webui, webui_python(webui, args.python))
        else:
            lines = check_api(args.url, args.tolerance, args.wait)
    except CheckFailed as failure:
        print(f"FAIL: {failure}")
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
