"""The contract between the driver and the training workers: one step resolved into a `StepPlan`
(its optimizer schedule an `OptimizerPlan`), built on the driver without torch, DeepSpeed or Ray
Train, and read by the worker loop (`ckd_ray.train.loop`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckd_ray.losses.config import LossConfig

if TYPE_CHECKING:
    from ckd_ray.losses import TeacherSignalBatch

# decode_signal(batch of numpy columns, device=...) -> the losses' TeacherSignalBatch
SignalDecoder = Callable[..., "TeacherSignalBatch"]

# Next to an exported student: the step's report history, phases and final checkpoint name.
STEP_SUMMARY_FILE = "ckd_step.json"


@dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer schedule of one step, resolved on the driver."""

    lr: float
    """Peak learning rate."""
    weight_decay: float
    total_steps: int
    """Optimizer steps of the whole step (the cosine reaches 0 here)."""
    warmup_steps: int


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up from 0, then cosine
    decay to 0 at `total_steps`. The same convention as the Hugging Face Trainer that TinyLLaVA
    and LLaVA-KD train with, so the first update of a warm-up runs at lr 0."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


@dataclass(frozen=True)
class StepPlan:
    """Everything a worker needs to run one training step, resolved on the driver."""

    step_id: str
    """Stable name of the step (the manifest's key); checkpoints record it."""
    label: str
    """Names the step in progress lines, e.g. "ta->student/DPT"."""
    export_uri: str
    """Where the trained student is exported (a Hugging Face directory, local or s3://)."""
    checkpoint_prefix: str
    """Prefix of the step's checkpoint folders inside the worker group's run folder ("" or "<step_id>/")."""
    job_name: str
    stage: str
    kind: str
    init_model_uri: str
    """Hugging Face directory (local or s3://) the step starts from."""
    trust_remote_code: bool
    freeze_policy: str
    loss: LossConfig
    """The effective loss, weights resolved."""
    optimizer: OptimizerPlan
    micro_batch_size: int
    length_buckets: int
    """Each micro-batch's forward runs in at most this many groups of rows of similar length."""
    grad_accum: int
    grad_clip: float
    zero_stage: int
    bf16: bool
    num_workers: int
    batches_per_epoch: int
    """Micro-batches in each worker's shard of one epoch, as planned (it sizes the lr schedule;
    the data position follows the shard itself, see `micro_batches`)."""
    report_every: int
    checkpoint_every: int
    seed: int
    teacher_hidden_size: int | None
    """Width of the teacher features the projection maps from (only with the `feature` term)."""
    has_validation: bool
    """A "val" dataset is attached: validate at the end of the step."""
    await_signal: Callable[[], None] | None = None
    """Blocks until the step's teacher signal exists (its pass runs on the driver while the
    group trains earlier steps); None when it existed before the group started."""

    @property
    def total_steps(self) -> int:
        return self.optimizer.total_steps
