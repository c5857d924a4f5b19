"""The student worker group: Ray Train + DeepSpeed training of one cascade step, its checkpoints
(safetensors + JSON) and the export of the trained student in the Hugging Face format.

The config tree imports `ckd_ray.train.config`, so the runner is imported lazily here (it
imports the config tree itself).
"""

_EXPORTS = {
    "StepResult": "ckd_ray.train.run",
    "export_student": "ckd_ray.train.run",
    "plan_step": "ckd_ray.train.run",
    "run_step": "ckd_ray.train.run",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
