"""One typed config tree (`JobConfig`), loaded from YAML with `--set` overrides and validated up front.

Component sections import `ckd_ray.section` only; the root tree is imported lazily here so
that components never import each other through this package.
"""

_EXPORTS = {
    "JobConfig": "ckd_ray.config.job",
    "RayConfig": "ckd_ray.config.job",
    "StorageConfig": "ckd_ray.config.job",
    "ConfigError": "ckd_ray.errors",
    "Problem": "ckd_ray.errors",
    "apply_override": "ckd_ray.config.loader",
    "load_config": "ckd_ray.config.loader",
    "read_yaml": "ckd_ray.config.loader",
    "validate_config": "ckd_ray.config.loader",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
