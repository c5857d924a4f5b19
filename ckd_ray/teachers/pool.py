"""Teacher actor pools: each teacher runs in its own Ray actors, sized and placed apart from the
student worker group, so no process ever holds a teacher and the student together.

`TeacherActor` loads its model once and then answers `__call__(batch) -> batch` as a Ray Data
actor-pool stage, or `forward(batch)` as a plain Ray actor (for what Ray Data does not serve,
such as scoring student-generated answers). `add_teacher_stage` is the one place a pool is sized
and placed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ckd_ray.teachers.config import SignalSpec, TeacherPoolConfig


@dataclass(frozen=True)
class TeacherSource:
    """Which teacher to load: a model directory (local or s3://) and how to load it."""

    model_uri: str
    shared_vocab_size: int
    trust_remote_code: bool = False
    dtype: str = "auto"
    labels: dict[str, str] = field(default_factory=dict)
    """Metric tags: job, stage, step, pool."""
    gpu_poll_seconds: float = 5.0
    """Interval of the actor's GPU utilization/memory sampler (idle without a GPU)."""


class TeacherActor:
    """A frozen teacher: loads once (eval mode, no grad, bf16 on GPU), adds the compressed signal
    of `spec` to every batch it is given, and counts batches, latency and signal bytes."""

    def __init__(self, source: TeacherSource, spec: SignalSpec, max_buckets: int = 1):
        from ckd_ray.observability.metrics import GpuSampler, TeacherPoolMetrics

        self.forward_pass = load_teacher_forward(source, spec, max_buckets=max_buckets)
        self.metrics = TeacherPoolMetrics(**_metric_tags(source.labels))
        self.metrics.actor_started()
        self.gpu_sampler = GpuSampler("teacher", source.labels.get("job", ""), source.gpu_poll_seconds).start()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ckd_ray.teachers.signal import signal_nbytes

        start = time.perf_counter()
        signal = self.forward_pass(batch)
        self.metrics.record_batch(len(batch["input_ids"]), time.perf_counter() - start, signal_nbytes(signal))
        return {**batch, **signal}

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self(batch)

    def __del__(self):
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.actor_stopped()
        sampler = getattr(self, "gpu_sampler", None)
        if sampler is not None:
            sampler.stop()


def load_teacher_forward(source: TeacherSource, spec: SignalSpec, device=None, max_buckets: int = 1):
    """The frozen teacher of `source` as a `TeacherForward` for `spec`, on `device` (default: the
    GPU when there is one): bf16 on GPU unless `source.dtype` says otherwise; each batch's
    forward in at most `max_buckets` groups of rows of similar length (`ckd_ray.models.buckets`)."""
    import torch

    from ckd_ray.models.builder import load_model, resolve_dtype
    from ckd_ray.teachers.forward import TeacherForward

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Attention maps need eager attention (SDPA does not return them): only when requested.
    model = load_model(
        source.model_uri,
        attn_implementation="eager" if spec.attention_layers else "sdpa",
        dtype=resolve_dtype(source.dtype, device.type == "cuda"),
        trust_remote_code=source.trust_remote_code,
    ).to(device)
    return TeacherForward(model, spec, source.shared_vocab_size, max_buckets=max_buckets)


def _metric_tags(labels: dict[str, str]) -> dict[str, str]:
    return {key: str(labels.get(key, "")) for key in ("job", "stage", "step", "pool")}


def add_teacher_stage(dataset, source: TeacherSource, spec: SignalSpec, pool: TeacherPoolConfig):
    """Appends the teacher as an actor-pool stage of `dataset`: `pool.min_actors` to
    `pool.max_actors` actors with `pool.num_gpus` / `pool.num_cpus` each. An actor that dies is
    restarted and its batch retried: Ray Data creates pool actors with unlimited restarts and
    task retries, and a retried batch replaces the lost one, so no sample is lost or repeated."""
    from ray.data import ActorPoolStrategy

    return dataset.map_batches(
        TeacherActor,
        fn_constructor_kwargs={"source": source, "spec": spec, "max_buckets": pool.length_buckets},
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        batch_size=pool.batch_size,
        batch_format="numpy",
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        resources=pool.resources or None,
    )

