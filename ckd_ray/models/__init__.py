"""The model family: presets, loading from a directory or s3://, freeze policies, vocabulary alignment.

The names below load on first use: `ckd_ray.models.config` and `.presets` (read by the config
tree and its checks) are imported without torch and transformers."""

from ckd_ray.lazy import lazy_exports

_EXPORTS = {
    "FREEZE_POLICIES": ".builder",
    "ModelSpec": ".config",
    "PRESETS": ".presets",
    "REAL_PRESETS": ".presets",
    "TINY_PRESETS": ".presets",
    "VocabularyMismatchError": ".builder",
    "apply_freeze": ".builder",
    "build_preset": ".builder",
    "count_parameters": ".builder",
    "load_model": ".builder",
    "load_spec": ".builder",
    "num_image_tokens": ".builder",
    "preset_config": ".builder",
    "save_model": ".builder",
    "shared_vocab_size": ".builder",
    "vocab_fingerprint": ".builder",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
