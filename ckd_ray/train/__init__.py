"""The student worker group: Ray Train + DeepSpeed training of planned steps on one worker
group, their checkpoints (safetensors + JSON) and the export of each trained student in the
Hugging Face format. Steps arrive resolved (`StepPlan`); the cascade resolves them.

The config tree imports `ckd_ray.train.config`, so the runner is imported lazily here (it
imports the config tree itself).
"""

from ckd_ray.lazy import lazy_exports

_EXPORTS = {
    "StepResult": "ckd_ray.train.run",
    "TrainStep": "ckd_ray.train.run",
    "run_steps": "ckd_ray.train.run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
