"""The student worker group: Ray Train + DeepSpeed settings shared by every step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ray.section import Section

StepKind = Literal["PT", "FT", "DPT", "SFT", "DFT"]
# Seed 001 (LLaVA-KD settings): DPT lr 1e-3, SFT/DFT 2e-5; TinyLLaVA PT/FT the same per phase.
DEFAULT_LR: dict[str, float] = {"PT": 1e-3, "FT": 2e-5, "DPT": 1e-3, "SFT": 2e-5, "DFT": 2e-5}


class TrainerConfig(Section):
    """How the student trains: worker group size, DeepSpeed, optimizer schedule, reporting."""

    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); false trains on CPU with gloo."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """Logical CPUs each worker reserves."""
    resources: dict[str, float] = {}
    """Custom Ray resources per worker, e.g. {student_gpu: 1} so the worker group lands on the
    student node type of cluster/autoscaler-aws.yaml (empty: any node with the CPUs/GPUs)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage 0-3."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU (fp16 is not supported on CPU)."""
    micro_batch_size: int = Field(8, ge=1)
    """Samples per worker per forward."""
    length_buckets: int = Field(3, ge=1, le=16)
    """Each micro-batch's forward runs in at most this many groups of rows of similar length, each
    trimmed to its own longest row: the padded batch's loss and gradients without computing most
    of its padding (on the benchmark's instructions about 1.4x faster a step at 3 than at 1;
    `ckd_ray.models.buckets`, benchmarks/RESULTS.md). 1: one forward over the padded batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient-norm clip; 0 disables."""
    lr: dict[StepKind, float] = dict(DEFAULT_LR)
    """Peak learning rate per step type (AdamW, cosine decay after warm-up)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Fraction of a step's optimizer steps spent warming up linearly (seed 001: 3e-2)."""
    epochs: float = Field(1.0, gt=0.0)
    """Passes over the step's data (fractions allowed)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop a step after this many optimizer steps (overrides epochs when smaller)."""
    report_every: int = Field(10, ge=1)
    """Optimizer steps between metric reports."""
    checkpoint_every: int = Field(100, ge=1)
    """Optimizer steps between checkpoints (one is always written at the end)."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts from the last checkpoint before the step fails."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept per step; older ones are deleted from storage."""

    @property
    def uses_bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    @model_validator(mode="after")
    def _bf16_needs_zero(self) -> "TrainerConfig":
        # Without ZeRO, DeepSpeed trains bf16 weights through its fp16-style optimizer, whose
        # state has no per-parameter view to checkpoint as safetensors; ZeRO-1 has one and
        # communicates no more than plain data parallelism.
        if self.zero_stage == 0 and self.uses_bf16:
            raise ValueError(
                "zero_stage 0 cannot train in bf16 (precision bf16, or auto on GPU): "
                "set trainer.zero_stage to 1 or more, or trainer.precision: fp32"
            )
        return self
