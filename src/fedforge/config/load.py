"""Reading a configuration: a TOML file plus ``--set key=value`` overrides, validated up
front into a :class:`RunConfig`, with one readable line per problem; and writing one back."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from fedforge.config.run import RunConfig
from fedforge.config.system import RuntimeConfig, device_problem, ray_installed
from fedforge.config.workload import user_code
from fedforge.core.errors import ConfigError


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            section: Any = model
            for part in err["loc"][:-1]:
                section = _section_type(section.model_fields[str(part)].annotation)
            allowed = ", ".join(section.model_fields)
            msg = f"unknown key; allowed keys here: {allowed}"
        elif err["type"] == "value_error":
            # Our own validators' messages name the key and the fix; a cross-field
            # (model-level) error's input is the whole raw configuration: never print it.
            text = str(err.get("ctx", {}).get("error", msg))
            if text.startswith(key) or not err["loc"] or isinstance(err.get("input"), dict):
                lines.append(f"  {text}")
                continue
            msg = text
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _section_type(annotation: Any) -> Any:
    """The section model of a field's annotation (an optional section's, e.g. ``[rl]``)."""
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is read as TOML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    *sections, leaf = key.strip().split(".")
    node = raw
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = _parse_value(value.strip())


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (or the defaults), apply ``overrides``, validate; raise ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except IsADirectoryError:
            raise ConfigError(
                f"{path} is a directory, not a configuration file (to continue the run in a "
                f"run directory: fedforge run --resume {path})"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the configuration file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, RunConfig)) from None
    problems = runtime_problems(config.runtime)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
    return with_project_dir(config, Path(path).parent if path is not None else Path.cwd())


def with_project_dir(config: RunConfig, directory: Path) -> RunConfig:
    """``config`` with ``project_dir`` set to ``directory`` (absolute) when it names code or
    data files and leaves it unset, so a run directory's copy resolves them from anywhere; a
    relative ``project_dir`` is taken relative to ``directory``."""
    data = config.data
    names_files = bool(user_code(config) or data.sites or data.test)
    if config.project_dir is None and not names_files:
        return config
    root = directory / (config.project_dir or ".")
    return config.model_copy(update={"project_dir": str(root.resolve())})


def runtime_problems(runtime: RuntimeConfig) -> list[str]:
    """What this machine cannot do of ``runtime`` (checked where a run is configured, not when
    a configuration is parsed: a deployed client parses the server's)."""
    problems = []
    if runtime.backend == "ray" and not ray_installed():
        problems.append(
            "runtime.backend: 'ray' needs Ray, which is not installed; "
            "pip install 'fedforge[ray]' or pick another backend"
        )
    if runtime.device is not None:
        problem = device_problem(runtime.device)
        if problem:
            problems.append(f"runtime.device: {problem}")
    return problems


def to_toml(config: RunConfig) -> str:
    import tomli_w

    # TOML has no null: keys left at None ("decide automatically") are omitted.
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
