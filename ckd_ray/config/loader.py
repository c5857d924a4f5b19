"""YAML files + `--set a.b=c` overrides -> a validated JobConfig, or one error listing every
problem (field, what is wrong, how to fix it) before any cluster work starts."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ckd_ray import storage
from ckd_ray.config.job import JobConfig
from ckd_ray.errors import ConfigError, Problem  # noqa: F401 (the config API names them here too)


def read_yaml(path: str | Path, _extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict. `extends: other.yaml` (relative to the file) is read first and
    this file's keys are deep-merged over it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "file not found", "give the path of a YAML file (see configs/)")]) from None
    except IsADirectoryError:
        raise ConfigError([Problem(str(path), "is a folder", "give the path of a YAML file (see configs/)")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not UTF-8 text (byte {exc.start})", "save the file as UTF-8")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(str(path), f"not valid YAML: {exc}", "fix the YAML syntax")]) from None
    except RecursionError:
        raise ConfigError([Problem(str(path), "nested too deeply to read", "fix the YAML structure")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "top level is not a mapping", "write `key: value` pairs")])
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError([Problem(f"{path}: extends", f"must be a file name, got {parent!r}", "write `extends: other.yaml`")])
        seen = (*_extended_by, path.resolve())
        if (path.parent / parent).resolve() in seen:
            chain = " -> ".join(str(p) for p in (*seen, path.parent / parent))
            raise ConfigError([Problem(f"{path}: extends", f"forms a cycle ({chain})", "remove one of the `extends:` lines")])
        data = deep_merge(read_yaml(path.parent / parent, seen), data)
    return data


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict, assignment: str) -> None:
    """Applies `a.b.c=value` in place; the value is parsed as YAML (`3` is an int, `[1, 2]` a
    list, `null` None); list items are addressed by index (`cascade.stages.0.teacher=ta`)."""
    if "=" not in assignment:
        raise ConfigError([Problem(assignment, "override is not of the form key=value", "write --set a.b=value")])
    dotted, _, text = assignment.partition("=")
    parts = dotted.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError([Problem(".".join(parts[: i + 1]), "is a value, not a section", "override the value itself")])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError([Problem(dotted.strip(), f"value {text!r} is not valid YAML ({problem})",
                                   "quote it, e.g. --set 'a.b=\"text\"'")]) from None
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        fix = f"use an index below {len(node)}" if node else "the list is empty: set the whole list, e.g. --set a.b=[...]"
        raise ConfigError([Problem(".".join(path), f"no list item {part!r}", fix)])
    return int(part)


def load_config(paths: list[str | Path] | str | Path, overrides: list[str] = (), base: str | Path | None = None) -> JobConfig:
    """The files merged in order, then the `--set` overrides, validated; relative paths resolve
    against `base` (default: the current directory)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict = {}
    for path in paths:
        raw = deep_merge(raw, read_yaml(path))
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source=", ".join(str(p) for p in paths) or "config", base=base)


def validate_config(raw: dict, source: str = "config", base: str | Path | None = None) -> JobConfig:
    """Validates each top-level section on its own (so one bad section does not hide another's
    problems), then checks the sections against each other; relative paths resolve against
    `base` (default: the current directory)."""
    from ckd_ray.config.checks import check_consistency

    if not isinstance(raw, dict):
        raise ConfigError([Problem(source, f"top level is a {type(raw).__name__}, not a mapping", "write `key: value` pairs")], source)
    problems: list[Problem] = []
    sections: dict[str, Any] = {}
    fields = JobConfig.model_fields
    for key in raw:
        if key not in fields:
            problems.append(_unknown_key(str(key), list(fields)))
    for name, field in fields.items():
        if name not in raw:
            if field.is_required():
                problems.append(Problem(name, "required section is missing", f"add a `{name}:` section"))
            continue
        try:
            # Each section is validated on its own, so every section's problems are found.
            sections[name] = _section_adapter(name).validate_python(raw[name])
        except ValidationError as exc:
            problems += problems_from(exc, prefix=(name,))
    if not problems:
        try:  # the model's own validators, e.g. `seed: true` refused as a number
            config = JobConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(problems_from(exc), source) from None
        problems += check_consistency(config)
        if not problems:
            return resolve_paths(config, Path(base).resolve() if base else Path.cwd())
    else:
        # Cross-section checks still run on the sections that did validate.
        partial = JobConfig.model_construct(**{**_defaults(), **sections})
        defaulted = {n for n, f in fields.items() if n not in raw and not f.is_required()}  # a missing required one is not valid
        problems += check_consistency(partial, valid_sections=set(sections) | defaulted)
    raise ConfigError(problems, source)


def _section_adapter(name: str):
    from pydantic import TypeAdapter

    field = JobConfig.model_fields[name]
    return TypeAdapter(typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)


def _defaults() -> dict[str, Any]:
    return {name: field.get_default(call_default_factory=True) for name, field in JobConfig.model_fields.items() if not field.is_required()}


def problems_from(exc: ValidationError, prefix: tuple = ()) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        loc = prefix + loc if loc[: len(prefix)] != prefix else loc
        field = ".".join(str(p) for p in loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(JobConfig, loc[:-1])
            known = list(parent.model_fields) if parent else []
            problems.append(_unknown_key(field, known, str(loc[-1])))
        elif kind == "value_error":
            message = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
            # A section's validator lists its problems as "; "-separated "what: fix" parts, each
            # naming its own dotted field first when it knows a more precise one.
            for part in message.split("; "):
                where, problem_field = part, field
                first = part.split(" ", 1)[0].removesuffix(":")
                if first.startswith(f"{field}.") and " " in part:
                    problem_field, where = first, part[len(first):].removeprefix(":").strip()
                what, sep, fix = where.partition(": ")
                problems.append(Problem(problem_field, what if sep else where, fix))
        elif kind == "missing":
            problems.append(Problem(field, "required but not set", f"add `{loc[-1]}`"))
        else:
            got = storage.redact(repr(err.get("input")))[:200]
            problems.append(Problem(field, f"{err['msg'].lower()} (got {got})", _fix_for(kind, err)))
    return problems


def _fix_for(kind: str, err: dict) -> str:
    ctx = err.get("ctx", {})
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"give a value {err['msg'].removeprefix('Input should be ')}"
    if kind == "literal_error":
        return f"use one of {ctx.get('expected')}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a {kind.split('_')[0]}" if kind.split("_")[0] in ("int", "float", "bool", "string", "list", "dict") else "give a value of the documented type"
    return ""


def _unknown_key(field: str, known: list[str], key: str | None = None) -> Problem:
    key = key or field
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    fix = f"did you mean `{close[0]}`?" if close else f"remove it; known keys: {', '.join(known)}"
    return Problem(field, "unknown key", fix)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class found by walking `loc` (field names, dict keys, list indices) from `model`."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
        else:
            origin, args = typing.get_origin(current), typing.get_args(current)
            if origin in (list, tuple) and args:
                current = args[0]
            elif origin is dict and args:
                current = args[1]
            else:
                return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strips Optional / unions down to their one model type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(models) == 1:
            return models[0]
        if len(others) == 1:
            return others[0]
    return annotation


def resolve_paths(job: JobConfig, base: Path) -> JobConfig:
    """Every local path of the config made absolute against `base` (the directory the command
    runs in), once, at load: a path then means the same in Tune trials, Train workers, Ray Data
    tasks and a submitted job, whose working directories all differ. `s3://` URIs and absolute
    paths stay as they are; `extends:` is relative to the file that names it (see `read_yaml`)."""
    from ckd_ray import storage

    def absolute(value: str | None) -> str | None:
        if value is None or storage.is_s3(value) or Path(value).is_absolute():
            return value
        return str((base / value).resolve())

    def source(spec):
        return spec.model_copy(update={"uri": absolute(spec.uri), "image_root": absolute(spec.image_root)})

    data = job.data.model_copy(update={
        "benchmark_root": absolute(job.data.benchmark_root),
        "processor": absolute(job.data.processor),
        "captions": [source(s) for s in job.data.captions],
        "instructions": [source(s) for s in job.data.instructions],
    })
    evaluation = job.evaluation.model_copy(update={"sources": [
        spec.model_copy(update={"uri": absolute(spec.uri), "image_root": absolute(spec.image_root),
                                "annotations": absolute(spec.annotations)})
        for spec in job.evaluation.sources
    ]})
    models = {role: spec.model_copy(update={"path": absolute(spec.path)}) for role, spec in job.models.items()}
    storage_config = job.storage.model_copy(update={"root": absolute(job.storage.root),
                                                    "signal_cache": absolute(job.storage.signal_cache)})
    return job.model_copy(update={"data": data, "evaluation": evaluation, "models": models, "storage": storage_config})
