"""Names a package exports but imports on first use (PEP 562), so that importing one light module
of a package (a config section, the planner) does not load what its siblings need (torch, Ray)."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """The package's module-level `__getattr__`: `exports` maps each name to the module that holds
    it, absolute (`ckd_ray.train.run`) or relative to `package` (`.builder`)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name], package), name)

    return __getattr__
