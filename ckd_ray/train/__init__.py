"""The student worker group: Ray Train + DeepSpeed training of planned steps on one worker
group, their checkpoints (safetensors + JSON) and the export of each trained student in the
Hugging Face format. Steps arrive resolved (`StepPlan`); the cascade resolves them.

The config tree imports `ckd_ray.train.config`, so the runner is imported lazily here (it
imports the config tree itself).
"""

_EXPORTS = {
    "StepResult": "ckd_ray.train.run",
    "TrainStep": "ckd_ray.train.run",
    "run_steps": "ckd_ray.train.run",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
