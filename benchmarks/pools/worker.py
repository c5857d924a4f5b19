"""What runs inside the student workers during the teacher-pool benchmark.

* `CoResidentTeacher`: the baseline other distillation tools use (TRL GKD, DistillKit, the
  LLaVA-KD scripts, OpenRLHF KD): the teacher loaded in the student worker's own process and run
  inside every training step. Written for this benchmark, not offered as a training mode; it
  runs the same `TeacherForward` as the pool's actors, so both make the same signal.
* `SignalMeter`: the step's signal decoder, counting the signal bytes and samples it decodes.
* `bench_worker`: the worker loop of the benchmark's groups: the real `run_one_step` per step,
  each step's shard opened only when the step begins, and the worker's peak RSS per step.
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


def reset_peak_rss() -> None:
    """Resets this process's peak resident set size (VmHWM) to its current RSS (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def bench_worker(config: dict, session=None) -> None:
    """Ray Train entry point: the steps of `config["steps"]` ((StepPlan, SignalMeter) pairs, as
    `train_worker` takes them) one after the other. Unlike `train_worker`, a step's shard is
    opened only when the step begins: reading the next step's first batch during this one would
    run the next teacher pool beside the step being measured. Writes a JSON record per step and
    rank to `config["records_dir"]`: peak RSS during the step, signal bytes and samples decoded,
    and the co-resident teacher's load time."""
    from ckd_ray.train.loop import ShardPrefetch, ray_train_session, run_one_step

    session = session or ray_train_session()
    events = config.get("events")
    for index, (plan, meter) in enumerate(config["steps"]):
        if meter.attach is not None:
            meter.attach.load(session.device)  # before the reset: the loaded teacher stays resident
        reset_peak_rss()
        data = ShardPrefetch(session, f"train-{index}", plan.micro_batch_size)

        def emit(kind: str, payload: dict, step_id: str = plan.step_id) -> None:
            if events is not None and session.rank == 0:
                events.put((kind, step_id, {**payload, "at": time.time()}))

        run_one_step(plan, meter, None, data, session, emit)
        record = {"step_id": plan.step_id, "rank": session.rank, "peak_rss_bytes": peak_rss_bytes(),
                  "signal_bytes": meter.signal_bytes, "samples": meter.samples,
                  "teacher_load_s": meter.attach.load_s if meter.attach is not None else 0.0}
        Path(config["records_dir"], f"{plan.step_id}.rank{session.rank}.json").write_text(json.dumps(record))
