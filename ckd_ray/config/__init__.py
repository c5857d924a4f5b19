"""One typed config tree (`JobConfig`), loaded from YAML with `--set` overrides and validated up front.

Component sections import `ckd_ray.section` only; the root tree is imported lazily here so
that components never import each other through this package.
"""

from ckd_ray.lazy import lazy_exports

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
__getattr__ = lazy_exports(__name__, _EXPORTS)
