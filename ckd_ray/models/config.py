"""Which model a role (student, teacher assistant, teacher) uses."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from ckd_ray import storage
from ckd_ray.section import Section


class ModelSpec(Section):
    """A LLaVA-style VLM: either a named preset built from config classes, or a Hugging Face
    directory (local path or s3:// URI) holding config.json, safetensors weights and the
    tokenizer / image processor files."""

    preset: str | None = None
    """Name of a built-in preset (tiny-student, tiny-ta, tiny-teacher, small-teacher); mutually exclusive with path."""
    path: str | None = None
    """Hugging Face model directory, local or s3://bucket/prefix; mutually exclusive with preset."""
    trust_remote_code: bool = False
    """Allow the directory's own Python code to run when loading. Off unless you trust the source."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype when loaded: auto is bfloat16 on GPU and float32 on CPU."""
    prepare: bool | None = None
    """Whether a teacher role is first trained with cascade.teacher_prep_steps (TinyLLaVA's PT,
    FT): None prepares presets only (a folder is taken as trained); set true for a folder from
    `ckd-ray models compose`, whose connector is new. cascade.prepare_teachers: false skips all."""

    @property
    def needs_preparation(self) -> bool:
        return self.prepare if self.prepare is not None else self.preset is not None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of `preset` (a built-in tiny model) or `path` (a model directory)")
        if self.path is not None:
            storage.uri_scheme(self.path)  # raises ValueError naming the scheme and the accepted ones
        return self

    @property
    def source(self) -> str:
        return f"preset:{self.preset}" if self.preset else str(self.path)
