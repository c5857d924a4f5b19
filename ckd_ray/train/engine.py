"""DeepSpeed wiring of the student: the module DeepSpeed wraps, its config, AdamW and the
warm-up + cosine schedule of seed 001. Runs inside a Ray Train worker, after Ray Train has set
up the process group (gloo on CPU, NCCL on GPU); DeepSpeed is imported here, never on the driver.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ckd_ray.losses import FeatureProjection
from ckd_ray.train.plan import OptimizerPlan, lr_factor, warmup_steps_for  # noqa: F401 (the schedule, here too)


class StudentWithProjection(nn.Module):
    """What DeepSpeed wraps: the student and, when the `feature` term is on, the learned
    teacher -> student feature projection. Both must live in the one engine so their gradients
    are reduced and their optimizer state is partitioned together. Only `student` is exported."""

    def __init__(self, student: nn.Module, projection: FeatureProjection | None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, **model_inputs):
        return self.student(**model_inputs)


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, grad_clip: float, zero_stage: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # Progress is reported through ray.train.report; keep DeepSpeed's own step log quiet.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def skip_shared_memory_op() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op
    (`deepspeed_shm_comm`) the first time it starts on a machine: about a minute of C++ build,
    and a build killed midway leaves a lock under the torch extensions folder that makes every
    later run wait forever. The op serves only DeepSpeed's inference all-reduce; training
    reduces through torch.distributed (gloo) either way, so it is marked unavailable before the
    backend starts, and nothing is built or locked."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def build_engine(module: StudentWithProjection, plan: OptimizerPlan, ds_config: dict, *, start_step: int = 0):
    """`deepspeed.initialize` with AdamW over the trainable parameters and the warm-up + cosine
    schedule, positioned at `start_step` (resume). DeepSpeed steps the schedule at each
    gradient-accumulation boundary."""
    import deepspeed

    skip_shared_memory_op()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.lr, weight_decay=plan.weight_decay)
    schedule = partial(lr_factor, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps)

    def make_scheduler(wrapped_optimizer):
        # last_epoch = start_step - 1 makes LambdaLR's first internal step land on start_step.
        for group in wrapped_optimizer.param_groups:
            group.setdefault("initial_lr", plan.lr)
        return torch.optim.lr_scheduler.LambdaLR(wrapped_optimizer, schedule, last_epoch=start_step - 1)

    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config
    )
    return engine, scheduler
