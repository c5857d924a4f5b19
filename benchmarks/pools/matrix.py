"""The teacher-pool benchmark's driver side: model folders, one job config per run, the runs of
each variant built through the system's own step preparation, the worker groups that train them,
and the figures read back (see `__init__` for what is compared and how).

Worker groups: the variants whose student workers hold no teacher ((b), (c), (d), and the
streamed pool's gap-closing settings) share one group per teacher; each co-resident variant
gets a group of its own, so a teacher loaded into a worker process never inflates another
variant's memory. Each group starts with a short warm-up step that is not measured (the
group's first DeepSpeed build and the start of its dataset coordinators land there).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.pools.table import RunFigures
from benchmarks.pools.worker import CoResidentTeacher, SignalMeter, bench_worker

ROLES = {"student": "tiny-student", "tiny-ta": "tiny-ta", "tiny-teacher": "tiny-teacher", "small-teacher": "small-teacher"}
CASCADE_NOTE = "cascade: TA runs, TA + teacher both loaded"
WARMUP_STEPS = 2
# A streamed pool reaches the student one block at a time, and Ray Train's equal split holds a
# block back until the other worker can be given as many rows: with the data pipeline's
# defaults (2,048 records a read task, preprocessing batches of 256) a run this size is one or
# two blocks, so the student would wait for the whole pass. Every run here reads and
# preprocesses STREAM_BLOCK records at a time, one optimizer step's worth, so a streamed pool's
# output reaches the student as it is made; the first gap setting shows the defaults.
STREAM_BLOCK = 32
STREAM_DATA = {"records_per_read_task": STREAM_BLOCK, "preprocess_batch_size": STREAM_BLOCK}
# The streamed pool's settings tried on the larger teacher, where one actor cannot keep up.
GAP_SETTINGS = (
    ("the data pipeline's default blocks (2,048 / 256 records)", {}, "bfloat16",
     {"records_per_read_task": 2048, "preprocess_batch_size": 256}),
    ("autoscaling 1-2 actors", {"min_actors": 1, "max_actors": 2}, "bfloat16", {}),
    ("2 actors", {"min_actors": 2, "max_actors": 2}, "bfloat16", {}),
    ("2 actors, pool batch 32", {"min_actors": 2, "max_actors": 2, "batch_size": 32}, "bfloat16", {}),
    ("fp32 signal", {}, "float32", {}),
)

@dataclass(frozen=True)
class Scale:
    """Sizes of the matrix: optimizer steps per run for each teacher (workers x micro-batch
    samples each), runs per variant, whether the streamed pool's gap-closing settings run, and
    the hardware settings of every run (`trainer` / `teacher_pool` / `signal` overrides)."""

    steps: dict[str, int]
    runs: int = 3
    gap_settings: bool = True
    micro_batch_size: int = 16
    num_workers: int = 2
    max_length: int = 128
    trainer: dict = field(default_factory=dict)
    teacher_pool: dict = field(default_factory=dict)
    signal: dict = field(default_factory=lambda: {"response_top_k": 16, "visual_top_k": 16, "gram": True})
    model_dtype: str = "auto"


@dataclass
class PlannedRun:
    """A run ready for its worker group, and what the driver measured before the group started."""

    variant: str
    teacher: str
    note: str
    train_step: object
    """A `ckd_ray.train.run.TrainStep` whose decoder is a `SignalMeter`."""
    pass_s: float = 0.0
    pass_actors: int = 0
    measured: bool = True
    cache_entry: tuple[str, str] | None = None
    """(cache root, key) of a (c) run's teacher pass."""


class TeacherActorCounter:
    """Samples, on a thread, how many teacher actor processes of this Ray are alive (workers
    under its raylet whose process title names `TeacherActor`), keeping the most seen per label."""

    def __init__(self, interval_s: float = 0.25):
        import psutil
        import ray

        self._raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
        self.label: str | None = None
        self.most: dict[str, int] = {}
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="teacher-actor-counter", daemon=True)
        self._thread.start()

    def count(self) -> int:
        import psutil

        alive = 0
        try:
            children = self._raylet.children(recursive=True)
        except psutil.Error:  # a child exited during the walk: count again next round
            return 0
        for proc in children:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and "TeacherActor" in " ".join(proc.cmdline()):
                    alive += 1
            except psutil.Error:  # exited while we looked
                continue
        return alive

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            label = self.label
            if label is not None:
                self.most[label] = max(self.most.get(label, 0), self.count())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class PoolBenchmark:
    """Builds and runs the matrix in one Ray session (started by the caller)."""

    def __init__(self, work: Path, benchmark_root: Path, scale: Scale, log=print, actors: TeacherActorCounter | None = None):
        self.work, self.benchmark_root, self.scale, self.log = work, benchmark_root, scale, log
        self.models: dict[str, str] = {}
        self.actors = actors or TeacherActorCounter()
        self._data: dict[str, object] = {}

    def build_models(self) -> None:
        """A folder per role with random weights (throughput and memory do not depend on them)."""
        from ckd_ray.models import build_preset, save_model

        for seed, (role, preset) in enumerate(ROLES.items()):
            out = self.work / "models" / role
            if not (out / "config.json").exists():
                save_model(build_preset(preset, seed=seed), out, self.benchmark_root / "processor")
            self.models[role] = str(out)

    def job(self, teacher: str, name: str, *, max_steps: int, pool: dict | None = None, use_cache: bool = False,
            value_dtype: str = "bfloat16", data: dict | None = None):
        from ckd_ray.config import validate_config

        return validate_config({
            "name": name,
            "seed": 0,
            "models": {"student": {"path": self.models["student"], "dtype": self.scale.model_dtype},
                       "teacher": {"path": self.models[teacher], "dtype": self.scale.model_dtype}},
            "data": {"benchmark_root": str(self.benchmark_root), "max_length": self.scale.max_length, **STREAM_DATA,
                     **(data or {})},
            "cascade": {"prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}]},
            "signal": {**self.scale.signal, "value_dtype": value_dtype},
            "teacher_pool": {"num_cpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 16, **self.scale.teacher_pool,
                             **(pool or {}), "use_cache": use_cache},
            "trainer": {"num_workers": self.scale.num_workers, "micro_batch_size": self.scale.micro_batch_size,
                        "zero_stage": 2, "max_steps": max_steps, "epochs": 1, "warmup_ratio": 0.0,
                        "report_every": max_steps, "checkpoint_every": 100_000, "max_failures": 0, "lr": {"DFT": 2.0e-3},
                        **self.scale.trainer},
            "storage": {"root": str(self.work / "runs"), "signal_cache": str(self.work / "signal-cache" / name)},
            "ray": {"num_cpus": 8},
        })

    def _step_data(self, job):
        """One StepData per run length and data settings (it sizes each run's data from the
        job's step budget)."""
        from ckd_ray.cascade.datasets import StepData

        key = (job.trainer.max_steps, job.data.records_per_read_task, job.data.preprocess_batch_size)
        if key not in self._data:
            self._data[key] = StepData(job, job.run_uri)
        return self._data[key]

    def plan(self, variant: str, teacher: str, run_id: str, *, note: str = "", max_steps: int | None = None,
             pool: dict | None = None, value_dtype: str = "bfloat16", data: dict | None = None,
             coresident: CoResidentTeacher | None = None, precomputed=None, measured: bool = True) -> PlannedRun:
        """One run of `variant`: (a) with `coresident` as the step's teacher, (b) streamed, (c)
        with its own teacher pass into a fresh cache (run here, timed), (d) on `precomputed`
        (a dataset of rows that carry their signal)."""
        from ckd_ray.cascade.plan import build_plan
        from ckd_ray.cascade.signal import step_signal_spec
        from ckd_ray.cascade.steps import default_signal_decoder, plan_step, prepare_step
        from ckd_ray.train.run import TrainStep

        max_steps = max_steps or self.scale.steps[teacher]
        job = self.job(teacher, run_id, max_steps=max_steps, pool=pool, use_cache=variant == "c", value_dtype=value_dtype,
                       data=data)
        data = self._step_data(job)
        (planned,) = build_plan(job)
        export_uri = str(self.work / "exports" / run_id)
        if variant in ("b", "c"):
            self.actors.label = f"{run_id}/pass"
            prepared = prepare_step(job, planned, data, init_model_uri=self.models["student"], teacher_uri=self.models[teacher],
                                    vocab_learner_uri=self.models["student"], export_uri=export_uri,
                                    checkpoint_prefix=f"{run_id}/", log=self.log, with_validation=False)
            self.actors.label = None
            step = prepared.train_step
            plan = dataclasses.replace(step.plan, step_id=run_id)
            run = PlannedRun(variant, teacher, note, TrainStep(plan, step.train_dataset, None, SignalMeter(step.decode_signal)),
                             measured=measured)
            if variant == "c":
                run.pass_s = prepared.driver_phases["teacher_pass"]
                run.pass_actors = self.actors.most.get(f"{run_id}/pass", 0)
                run.cache_entry = (job.signal_cache_uri, prepared.teacher_pass["key"])
            return run
        if variant == "a":
            dataset, num_rows = data.train(planned)
        else:
            dataset, num_rows = precomputed, self.scale.steps[teacher] * self.scale.micro_batch_size * self.scale.num_workers
        plan = plan_step(job, planned.stage, planned.step, init_model_uri=self.models["student"], num_train_samples=num_rows,
                         export_uri=export_uri, step_id=run_id, checkpoint_prefix=f"{run_id}/")
        decode = default_signal_decoder(job, plan.loss.attention_layers, step_signal_spec(job, planned))
        meter = SignalMeter(decode, attach=coresident if variant == "a" else None)
        return PlannedRun(variant, teacher, note, TrainStep(plan, dataset, None, meter), measured=measured)

    def teacher_source(self, role: str):
        from ckd_ray.cascade.signal import shared_vocab
        from ckd_ray.teachers import TeacherSource

        return TeacherSource(self.models[role], shared_vocab(self.models["student"], self.models[role]))

    def signal_spec(self, teacher: str):
        from ckd_ray.cascade.plan import build_plan
        from ckd_ray.cascade.signal import step_signal_spec

        job = self.job(teacher, "spec", max_steps=1)
        (planned,) = build_plan(job)
        return step_signal_spec(job, planned)

    def run_group(self, name: str, runs: list[PlannedRun]) -> list[RunFigures]:
        """Trains `runs` in order on one worker group; the figures of the measured ones."""
        from ckd_ray.train.run import run_steps

        records_dir = self.work / "records" / name
        records_dir.mkdir(parents=True, exist_ok=True)
        ids = [run.train_step.plan.step_id for run in runs]
        done = 0

        def on_event(kind: str, step_id: str, payload: dict) -> None:
            nonlocal done
            if kind == "done":
                done += 1
                self.actors.label = ids[done] if done < len(ids) else None

        self.log(f"[pools] worker group {name}: {', '.join(ids)}")
        self.actors.label = ids[0]
        trainer = self.job(runs[0].teacher, name, max_steps=1).trainer
        results = run_steps(trainer, [run.train_step for run in runs], storage_uri=str(self.work / "groups"), name=name,
                            max_failures=0, worker_loop=bench_worker, loop_config={"records_dir": str(records_dir)},
                            on_event=on_event)
        self.actors.label = None
        figures = []
        for run, result in zip(runs, results):
            if not run.measured:
                continue
            ranks = [json.loads(p.read_text()) for p in sorted(records_dir.glob(f"{result_id(run)}.rank*.json"))]
            phases = result.phases
            plan = run.train_step.plan
            figures.append(RunFigures(
                variant=run.variant, teacher=run.teacher, note=run.note,
                samples=result.num_steps * plan.micro_batch_size * plan.num_workers * plan.grad_accum,
                first_batch_s=phases.get("first_batch_wait", 0.0),
                train_s=phases.get("training", 0.0) + phases.get("data_wait", 0.0),
                data_wait_s=phases.get("data_wait", 0.0),
                pass_s=run.pass_s,
                peak_private_bytes=max(r["peak_private_bytes"] for r in ranks),
                peak_gpu_bytes=max(r["peak_gpu_bytes"] for r in ranks),
                actors_max=max(self.actors.most.get(plan.step_id, 0), run.pass_actors),
                signal_bytes_per_sample=sum(r["signal_bytes"] for r in ranks) / max(sum(r["samples"] for r in ranks), 1),
            ))
            self.log(f"[pools]   {plan.step_id}: {figures[-1].samples_per_s:.1f} samples/s, "
                     f"{figures[-1].wait_share:.0%} waiting, first batch {figures[-1].first_batch_s:.1f} s, "
                     f"peak private memory {figures[-1].peak_private_bytes / 2**20:.0f} MiB")
        return figures


def result_id(run: PlannedRun) -> str:
    return run.train_step.plan.step_id


def run_matrix(bench: PoolBenchmark) -> list[RunFigures]:
    """Every variant for each teacher, in one Ray session: see the module docstring."""
    from ckd_ray.teachers import SignalCache

    scale = bench.scale
    figures: list[RunFigures] = []
    for teacher in scale.steps:
        # (c) first: its passes run on the driver, and (d) trains on the first one's entry.
        cached = [bench.plan("c", teacher, f"{teacher}-c{i}") for i in range(scale.runs)]
        cache_uri, key = cached[0].cache_entry
        precomputed = SignalCache(cache_uri).read(key).materialize()
        runs = [bench.plan("d", teacher, f"{teacher}-warmup", max_steps=WARMUP_STEPS, precomputed=precomputed, measured=False)]
        for i in range(scale.runs):  # interleaved, so that the variants share the machine's moods
            runs += [bench.plan("b", teacher, f"{teacher}-b{i}"), cached[i], bench.plan("d", teacher, f"{teacher}-d{i}", precomputed=precomputed)]
        if scale.gap_settings and teacher == list(scale.steps)[-1]:
            for index, (note, pool, dtype, data) in enumerate(GAP_SETTINGS):
                runs.append(bench.plan("b", teacher, f"{teacher}-b-gap{index}", note=note, pool=pool, value_dtype=dtype, data=data))
        figures += bench.run_group(f"{teacher}-pools", runs)

        spec = bench.signal_spec(teacher)
        resident = CoResidentTeacher(bench.teacher_source(teacher), spec)
        runs = [bench.plan("a", teacher, f"{teacher}-a-warmup", max_steps=WARMUP_STEPS, coresident=resident, measured=False)]
        runs += [bench.plan("a", teacher, f"{teacher}-a{i}", coresident=resident) for i in range(scale.runs)]
        if teacher == list(scale.steps)[-1] and "tiny-ta" in bench.models:
            # A co-resident cascade holds the TA and the teacher in the student worker; the TA's stage runs.
            cascade = CoResidentTeacher(bench.teacher_source("tiny-ta"), spec, also_resident=(resident,))
            runs.append(bench.plan("a", teacher, f"{teacher}-a-cascade", note=CASCADE_NOTE, coresident=cascade))
        figures += bench.run_group(f"{teacher}-coresident", runs)
    return figures
