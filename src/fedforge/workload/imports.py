"""Loading your code by import path: ``"module:attribute"`` names a module beside the
configuration (in ``project_dir``) or any installed module, and an attribute of it.

A module found in the project directory wins over an installed one of the same name, and a
module of that name imported earlier from elsewhere (another project) is imported afresh.
Every module loaded from a project is remembered, so runtimes that ship code to other
processes (Ray) send it by value. Errors are one line: the key, the path and what went wrong
(with the file and line for an exception raised while importing)."""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from types import ModuleType

from fedforge.core.errors import ConfigError, FedforgeError

PROJECT_MODULES: dict[str, ModuleType] = {}  # modules loaded from a project directory


def load_object(path: str, project_dir: Path | None, key: str) -> object:
    """The attribute ``path`` (``"module:attribute"``, the attribute possibly dotted) names;
    ``key`` is the configuration key that named it, for the error message."""
    module_name, _, attribute = path.partition(":")
    module = import_module(module_name.strip(), project_dir, f"{key} = {path!r}")
    obj: object = module
    for part in attribute.strip().split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", module_name)
            raise ConfigError(f"{key} = {path!r}: {where} has no {attribute!r}") from None
    return obj


def import_module(name: str, project_dir: Path | None, what: str) -> ModuleType:
    """Import ``name`` from ``project_dir`` when it is there, else from the installed ones."""
    local = _project_file(name, project_dir)
    if local is not None:
        assert project_dir is not None
        root = str(project_dir.resolve())
        if root not in sys.path:
            sys.path.insert(0, root)
        cached = sys.modules.get(name)
        if cached is not None and Path(getattr(cached, "__file__", "") or "") != local:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            where = f" in {project_dir} or" if project_dir is not None else ""
            raise ConfigError(f"{what}: no module {name!r}{where} installed") from None
        raise ConfigError(f"{what}: importing {name!r} failed: {_one_line(exc)}") from None
    except Exception as exc:
        raise ConfigError(f"{what}: importing {name!r} failed: {_one_line(exc)}") from None
    if local is not None:
        PROJECT_MODULES[name] = module
    return module


def _project_file(name: str, project_dir: Path | None) -> Path | None:
    """The file of module ``name`` inside ``project_dir`` (a module or a package), if any."""
    if project_dir is None:
        return None
    base = project_dir.resolve().joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _one_line(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line being the innermost frame of the error."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def call_user(
    function: object, what: str, *args: object, error: type[FedforgeError] = ConfigError
) -> object:
    """Call user code; any exception but fedforge's own becomes one ``error`` line naming
    ``what`` and where it was raised."""
    if not callable(function):
        raise ConfigError(f"{what} is not callable (got {type(function).__name__})")
    try:
        return function(*args)
    except FedforgeError:
        raise
    except Exception as exc:
        raise error(f"{what} failed: {_one_line(exc)}") from None
