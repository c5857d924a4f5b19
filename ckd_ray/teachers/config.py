"""What a teacher adds to each batch, and how its actor pool is sized and placed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckd_ray.config.base import Section


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
