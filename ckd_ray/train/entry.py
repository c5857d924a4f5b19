"""The function Ray Train's controller is handed, in a module that imports nothing heavy.

The controller unpickles the train function and its config before it starts the workers. By
reference, `train_worker` would import `ckd_ray.train.loop` there, and with it torch,
transformers and the losses (about 3 CPU-s, on the path of every worker group's start), for a
process that never trains. So the function and the steps it trains travel as bytes, unpickled
in the workers only; the rest of the config (the events queue, the validation rows' ObjectRefs)
stays as it is, for Ray to serialize as it does.
"""

from __future__ import annotations

from collections.abc import Callable

PACKED = "_packed_loop"


def pack(worker_loop: Callable[[dict], None], config: dict) -> dict:
    """`config` with `worker_loop` and its `steps` (when there are) folded into bytes, for `run_packed`."""
    from ray import cloudpickle

    rest = dict(config)
    steps = rest.pop("steps", None)
    return {**rest, PACKED: cloudpickle.dumps((worker_loop, steps))}


def run_packed(config: dict) -> None:
    """Ray Train entry point of a `pack`ed config: calls its worker loop with the config as it was."""
    from ray import cloudpickle

    rest = dict(config)
    worker_loop, steps = cloudpickle.loads(rest.pop(PACKED))
    worker_loop(rest if steps is None else {**rest, "steps": steps})
