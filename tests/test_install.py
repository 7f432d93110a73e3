"""What a fresh clone and the registries read: the README's commands are CI's, and the package metadata is complete."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text().splitlines()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMPORT_NAMES = {"pillow": "PIL", "pypng": "png", "pyyaml": "yaml"}


def fenced_commands(section: str) -> list[str]:
    """The lines of the ```bash blocks in the README section whose heading is ``section``."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```bash\n(.*?)```", body, re.S) for line in block.strip().splitlines()]


def test_readme_install_main_job_and_tests_are_what_ci_runs():
    install, main_job, tests = fenced_commands("From a fresh clone")
    assert install.startswith("python3 -m venv .venv") and "pip install" in install
    assert main_job == "d3sr upscale samples/chelsea_lr.png -o out/"
    assert tests == "python -m pytest -q"
    for command in (install, main_job, tests):
        assert command in CI, f"{command!r} is in the README but .ci/run does not run it"


def requirement_names(requirements) -> dict[str, str]:
    return {re.split(r"[<>=!~ ;\[]", r, 1)[0].lower(): r for r in requirements}


def test_requirements_txt_equals_the_package_dependencies_without_torch():
    declared = requirement_names(PYPROJECT["project"]["dependencies"])
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert requirement_names(lines) == {k: v for k, v in declared.items() if k != "torch"}


def imported_top_modules(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_declared_dependency_is_imported_by_the_library_or_the_command_line():
    used = imported_top_modules(ROOT / "d3sr_core") | imported_top_modules(ROOT / "d3sr_cli")
    for name in requirement_names(PYPROJECT["project"]["dependencies"]):
        assert IMPORT_NAMES.get(name, name) in used, f"{name} is declared but never imported"


def test_registry_metadata_and_license():
    repository = PYPROJECT["project"]["urls"]["Repository"]
    assert repository.startswith("https://github.com/")
    owner_name = repository.removeprefix("https://github.com/")
    assert PYPROJECT["project"]["urls"]["Issues"] == repository + "/issues"
    assert PYPROJECT["tool"]["comfy"]["Icon"] == f"https://raw.githubusercontent.com/{owner_name}/main/icon.png"
    assert (ROOT / "icon.png").is_file()
    # No public repository exists yet: the README says the address is a placeholder, wherever it names it.
    assert f"`{repository}`, is a **placeholder**" in " ".join(README.split())
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
