"""``fedforge new NAME --template TEMPLATE``: a runnable project from a template folder.

A template is a folder beside this file. Its files are copied into the new project with
``{{name}}`` replaced by the project's name; files whose names start with ``_`` are not
copied: ``_sample.py`` (optional) writes the project's sample data with ``write(project)``,
and its docstring's first line describes the template (``fedforge new --list``). Adding a
template is adding a folder: a ``fedforge.toml``, ``models.py``, ``data.py``, a ``README.md``
and a ``test_project.py`` that the project's users run with pytest.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fedforge.core.errors import FedforgeError

HERE = Path(__file__).resolve().parent
SAMPLE = "_sample.py"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def templates() -> dict[str, str]:
    """Every template's name and one-line description."""
    out = {}
    for folder in sorted(p for p in HERE.iterdir() if p.is_dir() and not p.name.startswith("_")):
        sample = folder / SAMPLE
        text = sample.read_text() if sample.exists() else ""
        doc = re.match(r'\s*"""(.*?)(\n|""")', text)
        out[folder.name] = doc.group(1).strip() if doc else ""
    return out


def create(template: str, project: Path) -> list[Path]:
    """Write ``template`` into the new directory ``project``; return the files written."""
    available = templates()
    if template not in available:
        raise FedforgeError(
            f"no template {template!r}; choose one of: {', '.join(available)} "
            "(fedforge new --list describes them)"
        )
    name = project.name
    if not NAME.match(name):
        raise FedforgeError(
            f"{name!r} is not a project name: use letters, digits, '_', '-' and '.'"
        )
    if project.exists() and (not project.is_dir() or any(project.iterdir())):
        raise FedforgeError(f"{project} already exists and is not empty: choose another name")
    source = HERE / template
    written = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or any(part.startswith("_") for part in relative.parts):
            continue
        target = project / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text().replace("{{name}}", name))
        written.append(target)
    sample = source / SAMPLE
    if sample.exists():
        written += _write_sample(sample, template, project)
    return written


def _write_sample(sample: Path, template: str, project: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location(f"_fedforge_template_{template}", sample)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files: list[Path] = module.write(project)
    return files
