"""The base class every component's config section derives from."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    """A node of the config tree: unknown keys are errors, types are checked, and values are
    re-validated on assignment so `--set` overrides and programmatic edits go through the same
    checks as YAML. Numbers written as strings are read as numbers (PyYAML reads `1e-3` as a
    string), but a boolean is never a number and only `true`/`false` are booleans: `num_workers:
    true` or `use_gpu: "no"` are errors, not 1 and True."""

    model_config = ConfigDict(
        extra="forbid",
        strict=False,
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
        frozen=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value, info: ValidationInfo):
        kind = _scalar_type(cls.model_fields[info.field_name].annotation)
        if value is None:  # allowed or refused by the field's own type (`bool | None` allows it)
            return value
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}: write a number")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}: write true or false")
        return value


def _scalar_type(annotation) -> type | None:
    """int, float or bool for a field of that type (optional or not), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = others[0] if len(others) == 1 else None
    return annotation if annotation in (int, float, bool) else None
