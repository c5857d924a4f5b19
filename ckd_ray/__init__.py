"""ckd_ray: cascaded knowledge distillation of vision-language models on Ray.

    from ckd_ray import load_config, run_cascade
    job = load_config(["configs/tiny_cascade.yaml"], ["trainer.max_steps=20"])
    result = run_cascade(job)
    print(result.report_uri, result.student_uri)

`run_tune(job)` searches the loss weights and temperatures of the job's `tune:` section.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "ckd_ray.config",
    "run_cascade": "ckd_ray.cascade.runner",
    "run_tune": "ckd_ray.tune.runner",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy: `import ckd_ray` stays cheap (no Ray, torch or transformers until a run starts).
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
