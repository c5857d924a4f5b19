"""The model family: presets, loading from a directory or s3://, freeze policies, vocabulary alignment."""

from ckd_ray.models.builder import (
    FREEZE_POLICIES,
    VocabularyMismatchError,
    apply_freeze,
    build_preset,
    count_parameters,
    load_model,
    load_spec,
    num_image_tokens,
    preset_config,
    save_model,
    shared_vocab_size,
    vocab_fingerprint,
)
from ckd_ray.models.config import ModelSpec
from ckd_ray.models.presets import PRESETS, REAL_PRESETS, TINY_PRESETS

__all__ = [
    "FREEZE_POLICIES", "PRESETS", "REAL_PRESETS", "TINY_PRESETS", "ModelSpec", "VocabularyMismatchError",
    "apply_freeze", "build_preset", "count_parameters", "load_model", "load_spec", "num_image_tokens",
    "preset_config", "save_model", "shared_vocab_size", "vocab_fingerprint",
]
