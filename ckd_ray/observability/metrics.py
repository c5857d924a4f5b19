"""Custom metrics of the teacher pools, the student group, the data pipeline and the cascade,
exported through Ray's metrics pipeline (`ray.util.metrics`).

On a node's Prometheus endpoint Ray prefixes every name with `ray_`, and Counters end in `_total`
(a name that already ends so is kept): `ckd_teacher_samples_total` is scraped as
`ray_ckd_teacher_samples_total`. Label names are stable, the dashboards in dashboards/ use them:
job, stage, step, pool, worker, role, term, reason, gpu. Ray adds its own (WorkerId, NodeAddress,
SessionName, ...), and Prometheus adds `instance`; dashboards aggregate those away.

A recorder is bound to its label values and cheap to build anywhere (it pickles into actors).
Ray's metric objects are created on first use, and only in a process connected to Ray; elsewhere
(before `ray.init`, in unit tests, in a process without Ray) every call is a no-op.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections import Counter as _Tally
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Seconds; wide enough for a 5 ms tiny-model batch and a 2-minute 7B teacher batch alike.
LATENCY_BOUNDARIES_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its name in `ray.util.metrics` (Prometheus adds `ray_`), kind and labels."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


_POOL = ("job", "stage", "step", "pool")
_WORKER = ("job", "stage", "step", "worker")
_STEP = ("job", "stage", "step")

TEACHER_SAMPLES = MetricSpec("ckd_teacher_samples_total", "counter", "Samples the teacher pool has answered.", _POOL)
TEACHER_BATCHES = MetricSpec("ckd_teacher_batches_total", "counter", "Batches the teacher pool has answered.", _POOL)
TEACHER_LATENCY = MetricSpec(
    "ckd_teacher_batch_latency_seconds", "histogram", "Teacher forward time of one batch, signal compression included.",
    _POOL, LATENCY_BOUNDARIES_S,
)
TEACHER_ACTORS = MetricSpec(
    "ckd_teacher_actors_alive", "gauge", "Teacher actors alive (sum over processes).", _POOL
)
TEACHER_SIGNAL_BYTES = MetricSpec(
    "ckd_teacher_signal_bytes_total", "counter", "Bytes of compressed teacher signal put into the object store.", _POOL
)
STUDENT_STEP = MetricSpec(
    "ckd_student_step_seconds", "histogram", "Wall time of one optimizer step, data wait included.",
    _WORKER, LATENCY_BOUNDARIES_S,
)
STUDENT_STEP_TOTAL = MetricSpec(
    "ckd_student_step_seconds_total", "counter", "Wall time of all steps, data wait included.", _WORKER
)
STUDENT_DATA_WAIT = MetricSpec(
    "ckd_student_data_wait_seconds_total", "counter", "Time the student waited for its next batch.", _WORKER
)
STUDENT_TOKENS = MetricSpec("ckd_student_tokens_total", "counter", "Tokens the student trained on.", _WORKER)
STUDENT_STEPS = MetricSpec("ckd_student_steps_total", "counter", "Optimizer steps taken.", _WORKER)
STUDENT_LOSS = MetricSpec(
    "ckd_student_loss", "gauge", "Last value of each loss term (term=total for the weighted sum).", _WORKER + ("term",)
)
STUDENT_LR = MetricSpec("ckd_student_lr", "gauge", "Learning rate of the last step.", _WORKER)
STUDENT_FUSION_WEIGHT = MetricSpec(
    "ckd_student_fusion_weight", "gauge",
    "A fused step's mean per-token weight of each teacher in each fused term, over the last step.", _WORKER + ("term", "teacher"),
)
STUDENT_CHECKPOINT = MetricSpec(
    "ckd_student_checkpoint_seconds", "gauge", "Time the last checkpoint took to save.", _WORKER
)
DATA_SAMPLES = MetricSpec("ckd_data_samples_total", "counter", "Records preprocessed and kept.", _STEP)
DATA_REJECTED = MetricSpec(
    "ckd_data_rejected_total", "counter", "Records skipped, by reason (also written to the rejects file).",
    _STEP + ("reason",),
)
CASCADE_COMPLETED = MetricSpec(
    "ckd_cascade_steps_completed_total", "counter", "Cascade steps finished by this job run.", _STEP
)
CASCADE_INDEX = MetricSpec(
    "ckd_cascade_step_index", "gauge", "0-based position in the plan of the step started last.", ("job",)
)
CASCADE_PLANNED = MetricSpec("ckd_cascade_steps_total", "gauge", "Steps in the cascade plan.", ("job",))
CASCADE_RUNNING = MetricSpec(
    "ckd_cascade_step_running", "gauge", "1 while the step runs, 0 once it has finished.", _STEP
)
CASCADE_SECONDS = MetricSpec("ckd_cascade_step_seconds", "gauge", "Wall time of the finished step.", _STEP)
GPU_UTILIZATION = MetricSpec(
    "ckd_gpu_utilization_percent", "gauge", "NVML utilization of a GPU this process sees.", ("job", "role", "gpu")
)
GPU_MEMORY = MetricSpec(
    "ckd_gpu_memory_used_bytes", "gauge", "NVML memory used on a GPU this process sees.", ("job", "role", "gpu")
)

ALL_METRICS = (
    TEACHER_SAMPLES, TEACHER_BATCHES, TEACHER_LATENCY, TEACHER_ACTORS, TEACHER_SIGNAL_BYTES,
    STUDENT_STEP, STUDENT_STEP_TOTAL, STUDENT_DATA_WAIT, STUDENT_TOKENS, STUDENT_STEPS, STUDENT_LOSS, STUDENT_LR, STUDENT_FUSION_WEIGHT,
    STUDENT_CHECKPOINT, DATA_SAMPLES, DATA_REJECTED,
    CASCADE_COMPLETED, CASCADE_INDEX, CASCADE_PLANNED, CASCADE_RUNNING, CASCADE_SECONDS,
    GPU_UTILIZATION, GPU_MEMORY,
)


def exported_name(spec: MetricSpec) -> str:
    """The name Prometheus sees (histograms add _bucket, _sum and _count to it)."""
    suffix = "_total" if spec.kind == "counter" and not spec.name.endswith("_total") else ""
    return f"ray_{spec.name}{suffix}"


_metrics: dict[str, object] = {}
_metrics_lock = threading.Lock()


def ray_connected() -> bool:
    """True in a driver after `ray.init` and in every Ray worker; never imports Ray itself."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _metric(spec: MetricSpec):
    """This process's Ray metric object for `spec`, created on first use; None without Ray."""
    if not ray_connected():
        return None
    with _metrics_lock:
        metric = _metrics.get(spec.name)
        if metric is None:
            from ray.util import metrics as ray_metrics

            if spec.kind == "counter":
                metric = ray_metrics.Counter(spec.name, spec.description, spec.tag_keys)
            elif spec.kind == "gauge":
                metric = ray_metrics.Gauge(spec.name, spec.description, spec.tag_keys)
            else:
                metric = ray_metrics.Histogram(spec.name, spec.description, list(spec.boundaries), spec.tag_keys)
            _metrics[spec.name] = metric
        return metric


class _Recorder:
    """Holds the label values of one metric family and records into Ray's metrics."""

    def __init__(self, **tags: str):
        self._tags = {key: str(value) for key, value in tags.items()}

    def _tags_with(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {**self._tags, **{key: str(value) for key, value in extra.items()}} if extra else self._tags

    def _inc(self, spec: MetricSpec, value: float, **extra: str) -> None:
        value = float(value)
        # Ray rejects increments <= 0, and one NaN would poison the counter for good.
        if not (value > 0.0 and math.isfinite(value)):
            return
        metric = _metric(spec)
        if metric is not None:
            metric.inc(value, self._tags_with(extra))

    def _set(self, spec: MetricSpec, value: float, **extra: str) -> None:
        metric = _metric(spec)
        if metric is not None:
            metric.set(float(value), self._tags_with(extra))

    def _observe(self, spec: MetricSpec, value: float, **extra: str) -> None:
        metric = _metric(spec)
        if metric is not None:
            metric.observe(float(value), self._tags_with(extra))


# Teacher actors alive in this process, per pool: actor_started/actor_stopped keep the gauge in step
# with it even when several recorders share a pool. Each process exports its own series, and Ray
# drops a dead process's gauges, so `sum` over processes counts the live actors.
_alive_here: _Tally[tuple[str, ...]] = _Tally()
_alive_lock = threading.Lock()


class TeacherPoolMetrics(_Recorder):
    """Teacher pool throughput, latency, actors alive and bytes shipped. Samples/s is
    `rate(ray_ckd_teacher_samples_total[...])` in PromQL.

    Count actors one way per pool: each actor calls `actor_started()`/`actor_stopped()` in its own
    process, or the process that sizes the pool calls `set_actors_alive(n)`, not both.
    """

    def __init__(self, job: str, stage: str, step: str, pool: str):
        super().__init__(job=job, stage=stage, step=step, pool=pool)

    def record_batch(self, num_samples: int, latency_s: float, signal_bytes: int) -> None:
        """One batch answered: its sample count, forward latency and compressed signal size."""
        self._inc(TEACHER_SAMPLES, num_samples)
        self._inc(TEACHER_BATCHES, 1)
        self._observe(TEACHER_LATENCY, latency_s)
        self._inc(TEACHER_SIGNAL_BYTES, signal_bytes)

    def set_actors_alive(self, n: int) -> None:
        """The pool's size as its owner sees it."""
        self._set(TEACHER_ACTORS, n)

    def actor_started(self) -> None:
        """Call in the actor's own process once its model is loaded."""
        self._set(TEACHER_ACTORS, self._count_here(+1))

    def actor_stopped(self) -> None:
        """Call in the actor's own process when it shuts down cleanly."""
        self._set(TEACHER_ACTORS, self._count_here(-1))

    def _count_here(self, delta: int) -> int:
        key = tuple(self._tags.values())
        with _alive_lock:
            _alive_here[key] = max(0, _alive_here[key] + delta)
            return _alive_here[key]


class StudentMetrics(_Recorder):
    """One student worker's step time, data wait, tokens, loss terms, learning rate and checkpoint
    time. Tokens/s is `rate(ray_ckd_student_tokens_total[...])`; the share of time spent waiting for
    data is `rate(ray_ckd_student_data_wait_seconds_total) / rate(ray_ckd_student_step_seconds_total)`.
    """

    def __init__(self, job: str, stage: str, step: str, worker: str):
        super().__init__(job=job, stage=stage, step=step, worker=worker)

    def record_step(
        self, step_time_s: float, data_wait_s: float, num_tokens: int, loss_terms: Mapping[str, float], lr: float,
        fusion_weights: Mapping[tuple[str, str], float] | None = None,
    ) -> None:
        """One optimizer step. `step_time_s` is its whole wall time, the `data_wait_s` spent waiting
        for the batch included; `loss_terms` maps each term (task, output, ..., total) to its value;
        `fusion_weights` (a fused step's) maps (term, teacher role) to the teacher's mean weight."""
        self._observe(STUDENT_STEP, step_time_s)
        self._inc(STUDENT_STEP_TOTAL, step_time_s)
        self._inc(STUDENT_DATA_WAIT, data_wait_s)
        self._inc(STUDENT_TOKENS, num_tokens)
        self._inc(STUDENT_STEPS, 1)
        for term, value in loss_terms.items():
            self._set(STUDENT_LOSS, float(value), term=term)
        for (term, teacher), value in (fusion_weights or {}).items():
            self._set(STUDENT_FUSION_WEIGHT, float(value), term=term, teacher=teacher)
        self._set(STUDENT_LR, lr)

    def record_checkpoint(self, seconds: float) -> None:
        """Time one checkpoint took to save (local or s3://)."""
        self._set(STUDENT_CHECKPOINT, seconds)


class DataMetrics(_Recorder):
    """Records kept and rejected by preprocessing, rejects by reason."""

    def __init__(self, job: str, stage: str, step: str):
        super().__init__(job=job, stage=stage, step=step)

    def record_samples(self, n: int) -> None:
        """`n` records passed preprocessing."""
        self._inc(DATA_SAMPLES, n)

    def record_rejects(self, n: int, reason: str) -> None:
        """`n` records were skipped for `reason` (a short stable word: missing_image, no_response, ...)."""
        self._inc(DATA_REJECTED, n, reason=reason)


class CascadeMetrics(_Recorder):
    """Progress of a cascade job through its plan of stages x steps; recorded by the driver."""

    def __init__(self, job: str):
        super().__init__(job=job)

    def step_started(self, stage: str, step: str, index: int, total: int) -> None:
        """Step `index` (0-based) of `total` planned steps begins."""
        self._set(CASCADE_INDEX, index)
        self._set(CASCADE_PLANNED, total)
        self._set(CASCADE_RUNNING, 1, stage=stage, step=step)

    def step_finished(self, stage: str, step: str, seconds: float) -> None:
        """The step has finished (its manifest entry is written) after `seconds` of wall time."""
        self._inc(CASCADE_COMPLETED, 1, stage=stage, step=step)
        self._set(CASCADE_SECONDS, seconds, stage=stage, step=step)
        self._set(CASCADE_RUNNING, 0, stage=stage, step=step)


_nvml_missing_logged = False


class GpuSampler:
    """A daemon thread exporting NVML utilization and used memory of the GPUs this process sees
    (CUDA_VISIBLE_DEVICES, as Ray sets it for a GPU actor), labelled with the process's role
    (teacher or student) and the GPU's NVML index. Values are per device: processes sharing a GPU
    report the same numbers, so dashboards take `max` per GPU.

    Without NVML or without a visible GPU it does nothing: no thread, no error, one debug log.
    """

    def __init__(self, role: str, job: str, interval_s: float = 5.0):
        self._recorder = _Recorder(job=job, role=role)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list[tuple[str, object]] = []

    def start(self) -> GpuSampler:
        """Starts sampling when a GPU is visible; returns self."""
        if self._thread is not None:
            return self
        self._handles = _visible_gpus()
        if self._handles:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ckd-gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread (waits up to one interval) and releases NVML."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5.0)
        self._thread = None
        self._handles = []
        import pynvml

        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass

    def sample(self) -> list[tuple[str, float | None, int | None]]:
        """Reads and exports every visible GPU once: (gpu index, utilization %, used bytes); a value
        NVML cannot give (MIG slices have no utilization) is None and not exported."""
        import pynvml

        readings = []
        for index, handle in self._handles:
            try:
                utilization = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            try:
                used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            except pynvml.NVMLError:
                used = None
            if utilization is not None:
                self._recorder._set(GPU_UTILIZATION, utilization, gpu=index)
            if used is not None:
                self._recorder._set(GPU_MEMORY, used, gpu=index)
            readings.append((index, utilization, used))
        return readings

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a sampler must never take its actor down
                logger.debug("GPU sampling failed", exc_info=True)
            self._stop.wait(self._interval_s)


def _visible_gpus() -> list[tuple[str, object]]:
    """(NVML index, handle) of each GPU in CUDA_VISIBLE_DEVICES (all when unset); [] without NVML.
    Initializes NVML when it finds a GPU (GpuSampler.stop shuts it down)."""
    global _nvml_missing_logged
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no package, no driver library, no device: the normal CPU case
        if not _nvml_missing_logged:
            logger.debug("NVML unavailable, GPU metrics off: %s", exc)
            _nvml_missing_logged = True
        return []
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            ids = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            ids = [item.strip() for item in visible.split(",") if item.strip()]
        handles = []
        for gpu_id in ids:
            if gpu_id.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
            else:  # GPU-<uuid> or MIG-<uuid>
                handle = pynvml.nvmlDeviceGetHandleByUUID(gpu_id)
            handles.append((str(pynvml.nvmlDeviceGetIndex(handle)), handle))
    except pynvml.NVMLError as exc:
        logger.debug("NVML could not list the visible GPUs, GPU metrics off: %s", exc)
        handles = []
    if not handles:
        pynvml.nvmlShutdown()
    return handles
