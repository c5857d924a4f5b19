"""The metrics API: no-ops without Ray, what each recorder records (names, labels, values) and,
inside real Ray actors, that Ray's metric classes accept every label set. That the values reach
Prometheus is tests/test_observability_prometheus.py's job."""

from __future__ import annotations

import logging
import math
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from ckd_ray.observability import metrics
from ckd_ray.observability import (
    ALL_METRICS, CascadeMetrics, DataMetrics, GpuSampler, StudentMetrics, TeacherPoolMetrics, exported_name,
)

ROOT = Path(__file__).resolve().parents[1]


class RecordedMetric:
    """Stands in for one Ray metric object and keeps what was recorded into it."""

    def __init__(self, spec):
        self.spec, self.calls = spec, []

    def inc(self, value, tags):
        self.calls.append(("inc", value, dict(tags)))

    def set(self, value, tags):
        self.calls.append(("set", value, dict(tags)))

    def observe(self, value, tags):
        self.calls.append(("observe", value, dict(tags)))


@pytest.fixture
def recorded(monkeypatch):
    """Every recorder writes into RecordedMetric objects, keyed by metric name."""
    store: dict[str, RecordedMetric] = {}

    def fake_metric(spec):
        store.setdefault(spec.name, RecordedMetric(spec))
        return store[spec.name]

    monkeypatch.setattr(metrics, "_metric", fake_metric)
    monkeypatch.setattr(metrics, "_alive_here", type(metrics._alive_here)())
    return store


def test_exported_names_follow_rays_prometheus_naming():
    names = {spec.name: exported_name(spec) for spec in ALL_METRICS}
    assert names["ckd_teacher_samples_total"] == "ray_ckd_teacher_samples_total"  # not _total_total
    assert names["ckd_teacher_batch_latency_seconds"] == "ray_ckd_teacher_batch_latency_seconds"
    assert names["ckd_student_loss"] == "ray_ckd_student_loss"
    assert exported_name(metrics.MetricSpec("x_seconds", "counter", "", ())) == "ray_x_seconds_total"
    assert len(names) == len(ALL_METRICS), "metric names are unique"
    assert all(spec.name.endswith("_total") for spec in ALL_METRICS if spec.kind == "counter")


def test_recorders_are_noops_without_ray():
    """In a fresh process: without Ray imported, and with Ray imported but not initialized."""
    script = """
import sys
from ckd_ray.observability import *
from ckd_ray.observability import metrics

def record_everything():
    pool = TeacherPoolMetrics("j", "ta", "dft", "ta")
    pool.record_batch(8, 0.1, 4096); pool.actor_started(); pool.set_actors_alive(2); pool.actor_stopped()
    worker = StudentMetrics("j", "ta", "dft", "0")
    worker.record_step(0.1, 0.01, 256, {"task": 1.0, "total": 1.0}, 1e-3); worker.record_checkpoint(2.0)
    data = DataMetrics("j", "ta", "dft"); data.record_samples(10); data.record_rejects(1, "missing_image")
    cascade = CascadeMetrics("j"); cascade.step_started("ta", "dft", 0, 3); cascade.step_finished("ta", "dft", 5.0)
    GpuSampler("teacher", "j", 0.1).start().stop()

record_everything()
assert "ray" not in sys.modules, "recording must not import Ray"
import ray
record_everything()
assert not ray_connected() and metrics._metrics == {}
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_teacher_pool_metrics(recorded):
    pool = TeacherPoolMetrics("job1", "ta", "dft", "ta-pool")
    tags = {"job": "job1", "stage": "ta", "step": "dft", "pool": "ta-pool"}
    pool.record_batch(num_samples=8, latency_s=0.25, signal_bytes=6_291_456)
    assert recorded["ckd_teacher_samples_total"].calls == [("inc", 8.0, tags)]
    assert recorded["ckd_teacher_batches_total"].calls == [("inc", 1.0, tags)]
    assert recorded["ckd_teacher_batch_latency_seconds"].calls == [("observe", 0.25, tags)]
    assert recorded["ckd_teacher_signal_bytes_total"].calls == [("inc", 6_291_456.0, tags)]

    pool.actor_started()
    TeacherPoolMetrics("job1", "ta", "dft", "ta-pool").actor_started()  # a second recorder, same pool
    pool.actor_stopped()
    pool.actor_stopped()
    pool.actor_stopped()  # one too many: the count stays at 0
    assert [c[1] for c in recorded["ckd_teacher_actors_alive"].calls] == [1, 2, 1, 0, 0]
    pool.set_actors_alive(4)
    assert recorded["ckd_teacher_actors_alive"].calls[-1] == ("set", 4.0, tags)


def test_student_metrics(recorded):
    worker = StudentMetrics("job1", "teacher", "dft", worker="3")
    tags = {"job": "job1", "stage": "teacher", "step": "dft", "worker": "3"}
    worker.record_step(step_time_s=0.5, data_wait_s=0.1, num_tokens=4096,
                       loss_terms={"task": 2.5, "output": 0.75, "total": 3.25}, lr=2e-5)
    assert recorded["ckd_student_step_seconds"].calls == [("observe", 0.5, tags)]
    assert recorded["ckd_student_step_seconds_total"].calls == [("inc", 0.5, tags)]
    assert recorded["ckd_student_data_wait_seconds_total"].calls == [("inc", 0.1, tags)]
    assert recorded["ckd_student_tokens_total"].calls == [("inc", 4096.0, tags)]
    assert recorded["ckd_student_steps_total"].calls == [("inc", 1.0, tags)]
    assert recorded["ckd_student_loss"].calls == [
        ("set", 2.5, {**tags, "term": "task"}), ("set", 0.75, {**tags, "term": "output"}),
        ("set", 3.25, {**tags, "term": "total"})]
    assert recorded["ckd_student_lr"].calls == [("set", 2e-5, tags)]
    assert "ckd_student_fusion_weight" not in recorded or not recorded["ckd_student_fusion_weight"].calls
    worker.record_step(step_time_s=0.5, data_wait_s=0.1, num_tokens=4096, loss_terms={"total": 1.0}, lr=2e-5,
                       fusion_weights={("output", "ta"): 0.25, ("output", "teacher"): 0.75})
    assert recorded["ckd_student_fusion_weight"].calls == [
        ("set", 0.25, {**tags, "term": "output", "teacher": "ta"}), ("set", 0.75, {**tags, "term": "output", "teacher": "teacher"})]
    worker.record_checkpoint(12.5)
    assert recorded["ckd_student_checkpoint_seconds"].calls == [("set", 12.5, tags)]


def test_counters_skip_zero_negative_and_nan(recorded):
    """Ray rejects increments <= 0, and one NaN would poison a counter for good."""
    worker = StudentMetrics("j", "s", "t", "0")
    worker.record_step(0.2, 0.0, 0, {"total": math.nan}, 0.0)  # no wait, no tokens this step
    assert "ckd_student_data_wait_seconds_total" not in recorded
    assert "ckd_student_tokens_total" not in recorded
    assert recorded["ckd_student_step_seconds_total"].calls[0][1] == 0.2
    assert math.isnan(recorded["ckd_student_loss"].calls[0][1])  # a gauge may show the NaN
    DataMetrics("j", "s", "t").record_rejects(-1, "x")
    DataMetrics("j", "s", "t").record_samples(math.inf)
    assert "ckd_data_rejected_total" not in recorded and "ckd_data_samples_total" not in recorded


def test_data_and_cascade_metrics(recorded):
    data = DataMetrics("job1", "ta", "dpt")
    data.record_samples(200)
    data.record_rejects(3, reason="missing_image")
    step = {"job": "job1", "stage": "ta", "step": "dpt"}
    assert recorded["ckd_data_samples_total"].calls == [("inc", 200.0, step)]
    assert recorded["ckd_data_rejected_total"].calls == [("inc", 3.0, {**step, "reason": "missing_image"})]

    cascade = CascadeMetrics("job1")
    cascade.step_started("ta", "dpt", index=0, total=6)
    cascade.step_finished("ta", "dpt", seconds=90.0)
    assert recorded["ckd_cascade_step_index"].calls == [("set", 0.0, {"job": "job1"})]
    assert recorded["ckd_cascade_steps_total"].calls == [("set", 6.0, {"job": "job1"})]
    assert recorded["ckd_cascade_step_running"].calls == [("set", 1.0, step), ("set", 0.0, step)]
    assert recorded["ckd_cascade_steps_completed_total"].calls == [("inc", 1.0, step)]
    assert recorded["ckd_cascade_step_seconds"].calls == [("set", 90.0, step)]


def test_recorders_pickle_into_actors():
    pool = pickle.loads(pickle.dumps(TeacherPoolMetrics("j", "s", "t", "p")))
    assert pool._tags == {"job": "j", "stage": "s", "step": "t", "pool": "p"}


@pytest.mark.ray
def test_every_tag_set_is_accepted_by_rays_metrics_in_an_actor(ray_local):
    """Ray checks tag keys at record time; record through every recorder inside a real actor."""
    ray = ray_local

    @ray.remote(num_cpus=0.1)
    class Recorder:
        def record(self):
            from ckd_ray.observability import metrics as m

            pool = m.TeacherPoolMetrics("j", "s", "t", "p")
            pool.record_batch(2, 0.01, 10)
            pool.actor_started()
            pool.set_actors_alive(1)
            m.StudentMetrics("j", "s", "t", "0").record_step(0.1, 0.01, 5, {"task": 1.0}, 1e-3, fusion_weights={("output", "ta"): 0.5})
            m.StudentMetrics("j", "s", "t", "0").record_checkpoint(1.0)
            m.DataMetrics("j", "s", "t").record_rejects(1, "bad")
            m.DataMetrics("j", "s", "t").record_samples(1)
            m.CascadeMetrics("j").step_started("s", "t", 0, 1)
            m.CascadeMetrics("j").step_finished("s", "t", 1.0)
            sampler = m.GpuSampler("teacher", "j", 0.1)
            sampler._recorder._set(m.GPU_UTILIZATION, 50.0, gpu="0")  # as sample() would, without a GPU
            sampler._recorder._set(m.GPU_MEMORY, 1e9, gpu="0")
            return sorted(m._metrics)

    actor = Recorder.remote()
    assert ray.get(actor.record.remote()) == sorted(spec.name for spec in ALL_METRICS)
    ray.kill(actor)


class FakeNvml(types.ModuleType):
    """pynvml's calls GpuSampler uses, for a machine with 4 GPUs; GPU 3 is a MIG slice (no utilization)."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.initialized = 0
        self.uuids = {f"GPU-{i}": i for i in range(4)}

    def nvmlInit(self):
        self.initialized += 1

    def nvmlShutdown(self):
        self.initialized -= 1

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < 4:
            raise self.NVMLError("invalid index")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self.uuids[uuid]

    def nvmlDeviceGetIndex(self, handle):
        return handle

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle == 3:
            raise self.NVMLError("not supported")
        return types.SimpleNamespace(gpu=10 * (handle + 1), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=(handle + 1) * 2**30, total=24 * 2**30, free=0)


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


@pytest.mark.parametrize(("visible", "indices"), [
    (None, ["0", "1", "2", "3"]), ("2", ["2"]), ("GPU-1,3", ["1", "3"]), ("", []),
])
def test_gpu_sampler_reads_the_gpus_this_process_sees(recorded, fake_nvml, monkeypatch, visible, indices):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    sampler = GpuSampler("student", "job1", interval_s=3600)
    sampler._handles = metrics._visible_gpus()
    readings = sampler.sample()
    expected = [(i, None if i == "3" else 10.0 * (int(i) + 1), (int(i) + 1) * 2**30) for i in indices]
    assert readings == expected
    tags = {"job": "job1", "role": "student"}
    assert recorded.get("ckd_gpu_memory_used_bytes", RecordedMetric(None)).calls == [
        ("set", float(used), {**tags, "gpu": i}) for i, _, used in expected]
    assert all(call[2]["gpu"] != "3" for call in recorded.get("ckd_gpu_utilization_percent", RecordedMetric(None)).calls)


def test_gpu_sampler_thread_starts_samples_and_stops(recorded, fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    sampler = GpuSampler("teacher", "job1", interval_s=0.01).start()
    assert sampler._thread is not None and sampler._thread.daemon
    deadline = time.monotonic() + 10
    while "ckd_gpu_utilization_percent" not in recorded and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler._thread is None and fake_nvml.initialized == 0
    assert recorded["ckd_gpu_utilization_percent"].calls[0] == ("set", 10.0, {"job": "job1", "role": "teacher", "gpu": "0"})


def test_gpu_sampler_without_nvml_does_nothing_and_logs_once(recorded, monkeypatch, caplog):
    broken = types.ModuleType("pynvml")

    def no_library():
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = no_library
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    monkeypatch.setattr(metrics, "_nvml_missing_logged", False)
    with caplog.at_level(logging.DEBUG, logger=metrics.__name__):
        for _ in range(3):
            sampler = GpuSampler("teacher", "j").start()
            assert sampler._thread is None
            sampler.stop()
    assert len([r for r in caplog.records if "NVML unavailable" in r.message]) == 1
    assert recorded == {}
