"""What a teacher adds to each batch, and how its actor pool is sized and placed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ray.section import Section


class SignalSpec(Section):
    """The compressed teacher signal requested for a step. Everything here crosses the object
    store per sample, so request only what the active loss terms read."""

    response_top_k: int = Field(64, ge=0)
    """Top-k teacher logits (+ tail log-mass) per response position, for `output`; 0 = not sent."""
    visual_top_k: int = Field(64, ge=0)
    """Top-k teacher logits (+ tail log-mass) per visual position, for `visual_kl`; 0 = not sent."""
    gram: bool = True
    """Send the teacher's visual Gram matrix Z Z^T, for `visual_relation`."""
    feature_layers: list[int] = []
    """Teacher hidden-state indices sent for `feature` (0 = embeddings, i = after block i)."""
    attention_layers: list[int] = []
    """Teacher layers whose cross-modal attention (text queries -> visual keys) is sent, for `attention`."""
    attention_head_groups: int = Field(1, ge=1)
    """Teacher heads are averaged into this many groups before sending (1 = head mean)."""
    facts: bool = False
    """Send the teacher's distribution over each sample's candidate facts, for `knowledge`."""
    value_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype of logits, Gram, attention and features on the wire."""
    version: Literal[1, 2] = 1
    """Signal format (`ckd_ray/teachers/packed.py`): 1 = dense [L, K] top-k rows with int32 ids
    and the full Gram; 2 = rows only where a term reads, per-token k, bit-packed ids, the Gram
    as one triangle (several hundred times fewer bytes than 1 at Qwen2.5 scale)."""
    tail_mass: float = Field(0.0, ge=0.0, lt=1.0)
    """Version 2: per token, the smallest k (at most the configured top-k) whose left-out T = 1
    probability mass is at most this; 0 keeps the configured k for every token."""
    tail_samples: int = Field(0, ge=0, le=65535)
    """Version 2: tokens drawn per position from the teacher's distribution outside its top-k,
    for an unbiased forward-KL estimate (importance weights, as RS-KD); 0 = none."""

    @model_validator(mode="after")
    def _packed_options_need_version_2(self) -> "SignalSpec":
        wrong = [f"{name}={getattr(self, name)}" for name in ("tail_mass", "tail_samples") if getattr(self, name) and self.version == 1]
        if wrong:
            raise ValueError(f"{' and '.join(wrong)} are options of signal version 2, but signal.version is 1: "
                             "set signal.version: 2, or set them to 0")
        return self


class TeacherPoolConfig(Section):
    """One Ray actor pool per teacher pass; the passes of a worker group's steps run
    `concurrent_passes` at a time, before the group trains on them."""

    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per teacher actor (fractions share a GPU)."""
    num_cpus: float = Field(1.0, gt=0.0)
    """CPUs per teacher actor."""
    min_actors: int = Field(1, ge=1)
    """Actors the pool starts with."""
    max_actors: int = Field(1, ge=1)
    """Actors the pool may grow to under load."""
    batch_size: int = Field(16, ge=1)
    """Samples per teacher forward."""
    length_buckets: int = Field(3, ge=1, le=16)
    """Each batch's forward runs in at most this many groups of rows of similar length, each
    trimmed to its own longest row: the padded batch's signal without computing most of its
    padding (`ckd_ray.models.buckets`). 1: one forward over the padded batch."""
    resources: dict[str, float] = {}
    """Custom Ray resources per actor, e.g. {teacher_gpu: 1} so actors land on the teacher node
    type of cluster/autoscaler-aws.yaml (empty: any node with the CPUs/GPUs)."""
    concurrent_passes: int = Field(2, ge=1)
    """Teacher passes (each its own pool of min..max actors) run at once when a segment of steps
    needs several: passes of one segment never depend on each other. 1 runs them one by one."""
    overlap_training: bool = False
    """Run a segment's teacher passes beside its worker group (which starts at once; each step
    waits only for its own pass) instead of before it. Pays where teachers have their own GPUs
    or nodes; on a small CPU machine the passes and the training share the same cores (measured
    slower on 2 cores: benchmarks/RESULTS.md)."""
    use_cache: bool = True
    """Write each teacher pass to the signal cache and train from it (Tune trials and resubmitted
    jobs reuse it); false streams the signal straight into training."""
