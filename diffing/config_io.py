"""Config files, `--set` overrides, user-facing config errors and the generated reference
(docs/configuration.md), shared by every entrypoint. The configs themselves: diffing/config.py."""

from __future__ import annotations

import datetime
import json
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML without timestamps: a date (`store: 2024-06-01`) stays the string typed, as in `--set`,
    instead of a date object no config field takes (nor JSON holds)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def plain_data(data: Any, where: str) -> Any:
    """A deep copy of config data as JSON holds it; a value JSON has no form for (YAML's !!binary,
    a set) is a ConfigError naming `where`."""
    try:
        return json.loads(json.dumps(data))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}; give strings, numbers, booleans, lists and mappings only") from None


# ----------------------------------------------------------------------------------------------
# Loading and overrides, shared by every entrypoint.


def _coerce(value: str) -> Any:
    """`--set key=value` values: YAML scalars and flow lists (ints, floats, bools, null, [a, b]).
    What YAML would read as a string (or a date) stays exactly as typed, so a '#' in a path is
    not a comment; `None` means null as `null` does."""
    if value.strip() == "None":
        return None
    try:
        parsed = _yaml(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str | datetime.date) and value.strip()[:1] not in ("'", '"'):
        return value.strip()
    return parsed


def _split(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r} (e.g. --set train.lr=1e-3)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if "" in parts:
        raise ValueError(
            f"--set {key.strip()!r}: a key part is empty (a stray '.'?); e.g. --set train.lr=1e-3"
        )
    return parts, raw


def _put(out: dict[str, Any], parts: list[str], value: Any) -> None:
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {'.'.join(parts)}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (returns a new dict)."""
    out = plain_data(data, "config")
    for item in overrides:
        parts, raw = _split(item)
        _put(out, parts, _coerce(raw))
    return out


def validate_with_overrides(
    validate: Callable[[dict[str, Any]], T], data: dict[str, Any], overrides: list[str] | tuple[str, ...]
) -> T:
    """``validate(apply_overrides(data, overrides))``; where a field wants a string and the override
    read as a number, a bool or null (`--set judge.model_id=1.10`), the value is retried as typed."""
    merged = apply_overrides(data, overrides)
    try:
        return validate(merged)
    except ValidationError as e:
        typed = {".".join(parts): raw for parts, raw in map(_split, overrides)}
        locs = {".".join(map(str, err["loc"])) for err in e.errors() if err["type"] == "string_type"}
        retry = [k for k in locs if k in typed and isinstance(_coerce(typed[k]), int | float | bool | None)]
        if not retry:
            raise
        for key in retry:
            _put(merged, key.split("."), typed[key].strip())
        return validate(merged)


def _sub_config(ann) -> type[BaseModel] | None:
    """The sub-config a field holds: `X` or `X | None`; None for a leaf, a list or a mapping."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    models = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and typing.get_origin(ann) not in (list, tuple, dict) else None


def unknown_override_keys(cls: type[BaseModel], overrides: Sequence[str]) -> list[str]:
    """Keys of `--set KEY=VALUE` overrides that name no field of `cls`, walking sub-configs (also
    optional ones); a key reaching a leaf, list or mapping is not checked further. For a check
    before anything expensive runs (a preset's model builds, a cluster job)."""

    bad = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        model = cls
        for part in key.split("."):
            if part not in model.model_fields:
                bad.append(key)
                break
            model = _sub_config(model.model_fields[part].annotation)
            if model is None:
                break
    return bad


def _read_json(p: Path, text: str) -> Any:
    """A .json config (a saved RUN/pipeline.json) read as JSON, not as YAML's reading of it (which
    turns 1e+20 into a string and refuses some characters JSON strings may hold); YAML written into
    a .json file is still read."""
    try:
        return json.loads(text) if text.strip() else {}
    except (json.JSONDecodeError, RecursionError) as e:
        try:
            return _yaml(text) or {}
        except yaml.YAMLError:
            where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise ConfigError(f"config file {p}: JSON error{where}: {getattr(e, 'msg', e)}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON config file as a mapping; a missing file, a directory or a syntax error is a
    ConfigError naming the file (and the line)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give the YAML/JSON file inside it")
    try:
        text = p.read_text()
        data = _read_json(p, text) if p.suffix.lower() == ".json" else (_yaml(text) or {})
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}: YAML error{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    data = plain_data(data, f"config file {p}")
    _warn_paths_beside(data, p)
    return data


def paths_beside(data: Any, config: Path) -> list[tuple[str, str, str]]:
    """[(field, value, path)]: relative paths in a config that do not exist from the current
    directory (where crossdiff reads them) but do next to the config file: a config written to be
    run from its own folder. Hub ids (org/name) are not paths unless such a folder is there."""
    try:
        base, here = config.resolve().parent, Path.cwd().resolve()
    except OSError:  # the current directory was removed: nothing to compare against
        return []
    if base == here:
        return []
    out: list[tuple[str, str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif (
            isinstance(value, str)
            and value.strip()
            and "://" not in value
            and not value.startswith(("/", "~"))
            and "\n" not in value
            and len(value) < 1024
        ):
            try:
                if (base / value).exists() and not Path(value).exists():
                    out.append((where, value, os.path.relpath(base / value)))
            except (OSError, ValueError):  # not a path at all (a NUL, a name too long)
                pass

    walk(data, "")
    return out


def _warn_paths_beside(data: dict[str, Any], config: Path) -> None:
    from diffing.logs import get_logger

    for field, value, beside in paths_beside(data, config):
        get_logger("config").warning(
            "config.relative_path",
            field=field,
            value=value,
            note=f"relative paths are read from the current directory ({Path.cwd()}), where {value!r} "
            f"does not exist; next to {config} it does: give {beside!r}, an absolute path, or run from "
            "the config's folder",
        )


def load_config(
    cls: type[BaseModel], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
):
    """Read a YAML/JSON config file (optional), apply overrides, validate. Errors name the field."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    try:
        return validate_with_overrides(cls.model_validate, data, overrides)
    except (ValidationError, ValueError) as e:
        msg = format_validation_error(e)
        stages = {"harvest", "fit", "analyze", "label"} & set(data)
        if stages and not stages & set(cls.model_fields):  # a pipeline config given to a stage command
            msg += (
                f"\n(this file nests stage sections {sorted(stages)}: it is a pipeline config; run "
                "`crossdiff pipeline --config FILE`, or give this command one section's fields)"
            )
        raise ConfigError(msg) from None


class ConfigError(ValueError):
    """A config problem with a message meant for the user (field name and fix)."""


def format_validation_error(e: Exception) -> str:
    if not isinstance(e, ValidationError):
        return str(e)
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (see docs/configuration.md)"
        lines.append(f"{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_reference(models: dict[str, type[BaseModel]] | None = None) -> str:
    """Markdown reference of every config field (docs/configuration.md is generated from this)."""
    if models is None:
        from diffing.config import AnalysisConfig, FitConfig

        models = {"fit": FitConfig, "analyze": AnalysisConfig}
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic configs (`crossdiff config-docs`); do not edit by hand.",
        "Set fields in a YAML file (`--config FILE`) or one by one (`--set section.field=value`).",
        "A `.json` file is read as JSON (a run's saved `pipeline.json` reruns as it was; infinity, "
        '"no limit", is saved as `"Infinity"`); in YAML a date such as `2024-06-01` stays the text typed.',
        "",
    ]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        rows, subs = [], []
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((ann, f"{prefix}{name}."))
                continue
            items = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if typing.get_origin(ann) in (list, tuple) and items:  # a list of sub-configs (harvest.models)
                subs.append((items[0], f"{prefix}{name}[]."))
            elif (opt := _sub_config(ann)) is not None:  # an optional one (`analyze_task`): row and section
                subs.append((opt, f"{prefix}{name}."))
            default = (
                "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            )
            ann = _unannotated(ann)
            typ = ann.__name__ if isinstance(ann, type) else re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(ann))
            cells = [f"`{prefix}{name}`", f"`{typ}`", f"`{default}`", field.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            out.extend(["| field | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for sub, p in subs:
            out.extend([f"### `{p[:-1]}`", ""])
            walk(sub, p)

    for title, cls in models.items():
        out.extend([f"## `{title}` ({cls.__name__})", ""])
        walk(cls, "")
    return "\n".join(out)


def _unannotated(ann):
    """`PathOrURL | None` as the reader knows it (`str | None`), not its validator's repr."""
    import functools
    import operator

    if typing.get_origin(ann) is typing.Annotated:
        return _unannotated(typing.get_args(ann)[0])
    if "Annotated" in str(ann) and typing.get_origin(ann) in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_unannotated(a) for a in typing.get_args(ann)])
    return ann
