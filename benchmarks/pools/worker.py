"""What runs inside the student workers during the teacher-pool benchmark.

* `CoResidentTeacher`: the baseline other distillation tools use (TRL GKD, DistillKit, the
  LLaVA-KD scripts, OpenRLHF KD): the teacher loaded in the student worker's own process and run
  inside every training step. Written for this benchmark, not offered as a training mode; it
  runs the same `TeacherForward` as the pool's actors, so both make the same signal.
* `SignalMeter`: the step's signal decoder, counting the signal bytes and samples it decodes.
* `bench_worker`: the worker loop of the benchmark's groups: the real `run_one_step` per step,
  each step's shard opened only when the step begins, and the worker's peak memory per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ckd_ray.teachers.pool import TeacherSource, load_teacher_forward
from ckd_ray.teachers.signal import signal_nbytes


class CoResidentTeacher:
    """The teacher of `source` in the calling process (the student worker): `__call__(batch)`
    adds the signal of `spec` to a batch, as a pool actor would. `also_resident`: further
    co-resident teachers kept loaded but not run, as a co-resident cascade holds its TA and
    teacher together. Pickles as its description only: each worker loads its own copy (`load`)."""

    def __init__(self, source: TeacherSource, spec, also_resident: tuple["CoResidentTeacher", ...] = ()):
        self.source, self.spec, self.also_resident = source, spec, also_resident
        self.forward_pass = None
        self.load_s = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "forward_pass": None}

    def load(self, device) -> None:
        """Loads the teacher once per process (later steps of the group reuse it), and the ones
        it keeps beside it (a no-op for those an earlier step loaded)."""
        for other in self.also_resident:
            other.load(device)
        if self.forward_pass is not None:
            return
        started = time.perf_counter()
        self.forward_pass = load_teacher_forward(self.source, self.spec, device)
        self.load_s = time.perf_counter() - started

    def __call__(self, batch: dict) -> dict:
        return {**batch, **self.forward_pass(batch)}


class SignalMeter:
    """Decodes a batch's teacher signal like the step's own decoder (`decode`), counting the
    signal bytes and samples it sees; with `attach` (a `CoResidentTeacher`), the signal is
    first made here, inside the training step."""

    def __init__(self, decode, attach: CoResidentTeacher | None = None):
        self.decode, self.attach = decode, attach
        self.signal_bytes = 0
        self.samples = 0

    def __call__(self, batch: dict, device):
        if self.attach is not None:
            batch = self.attach(batch)  # the teacher's forward, on the student's time
        self.signal_bytes += signal_nbytes(batch)
        self.samples += len(batch["input_ids"])
        return self.decode(batch, device=device)


class PeakPrivateMemory:
    """Samples this process's anonymous resident memory (RssAnon: its heap, models, optimizer
    state, activations; not the shared libraries, nor the object store's shared pages it has
    read) every `interval_s` on a thread, keeping the peak (Linux)."""

    def __init__(self, interval_s: float = 0.02):
        import threading

        self.peak_bytes = self.read()
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="peak-private-memory", daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status: the peak memory figure needs Linux")

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_bytes = max(self.peak_bytes, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak_bytes, self.read())


def bench_worker(config: dict, session=None) -> None:
    """Ray Train entry point: the steps of `config["steps"]` ((StepPlan, SignalMeter) pairs, as
    `train_worker` takes them) one after the other. Unlike `train_worker`, a step's shard is
    opened only when the step begins: reading the next step's first batch during this one would
    run the next teacher pool beside the step being measured. Writes a JSON record per step and
    rank to `config["records_dir"]`: peak private memory during the step (and peak GPU memory),
    signal bytes and samples decoded, and the co-resident teacher's load time."""
    import torch

    from ckd_ray.train.loop import ShardPrefetch, ray_train_session, run_one_step

    session = session or ray_train_session()
    events = config.get("events")
    for index, (plan, meter) in enumerate(config["steps"]):
        if meter.attach is not None:
            meter.attach.load(session.device)  # once per group; it stays resident, so every step's peak holds it
        memory = PeakPrivateMemory()
        if session.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(session.device)
        data = ShardPrefetch(session, f"train-{index}", plan)

        def emit(kind: str, payload: dict, step_id: str = plan.step_id) -> None:
            if events is not None and session.rank == 0:
                events.put((kind, step_id, {**payload, "at": time.time()}))

        run_one_step(plan, meter, None, data, session, emit)
        record = {"step_id": plan.step_id, "rank": session.rank, "peak_private_bytes": memory.stop(),
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated(session.device) if session.device.type == "cuda" else 0,
                  "signal_bytes": meter.signal_bytes, "samples": meter.samples,
                  "teacher_load_s": meter.attach.load_s if meter.attach is not None else 0.0}
        Path(config["records_dir"], f"{plan.step_id}.rank{session.rank}.json").write_text(json.dumps(record))
