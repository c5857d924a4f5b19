"""The base class every component's config section derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A node of the config tree: unknown keys are errors, types are checked, nothing is coerced
    silently (a string is never turned into a number), and values are re-validated on assignment
    so `--set` overrides and programmatic edits go through the same checks as YAML."""

    model_config = ConfigDict(
        extra="forbid",
        strict=False,
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
        frozen=False,
    )
