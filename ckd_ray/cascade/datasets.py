"""The datasets of each planned step: caption or instruction sources, the stage's curriculum
filter, the train/val splits, and the rejects file of each pass."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ckd_ray import storage
from ckd_ray.config.job import JobConfig

VALIDATION_SAMPLES = 256


@dataclass(frozen=True)
class StepReads:
    """The training records one step reads, in the order planned for them: each record's source
    label, ordinal in that source and hop level (a few bytes a record, planned on the driver)."""

    kind: str
    """`caption` or `instruct`."""
    labels: np.ndarray  # object [N]
    ordinals: np.ndarray  # int64 [N]
    hops: np.ndarray  # int [N]

    @property
    def num_records(self) -> int:
        return len(self.ordinals)

    def take(self, positions: np.ndarray) -> "StepReads":
        return StepReads(self.kind, self.labels[positions], self.ordinals[positions], self.hops[positions])

    def digest(self) -> str:
        """Identifies the records (not their order): a signal cache entry is reused only for these."""
        records = sorted(zip(self.labels.tolist(), self.ordinals.tolist()))
        return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]


def split_pool(pool_hops: np.ndarray, steps: Sequence[tuple[float, tuple[int, ...] | None]]) -> list[np.ndarray]:
    """Which positions of a pool each step reads (`cascade.disjoint_data`), each share in pool
    order. `pool_hops`: the hop level of each pool record, in the pool's seeded order; `steps`, in
    plan order: (the samples the step's budget consumes, the hop levels it allows or None for all).

    Consecutive steps that allow the same levels split every record of those levels in the pool,
    disjointly, in proportion to their budgets: six steps of 40 optimizer steps split a pool
    exactly as three of 80 do. A curriculum stage (hop 0, then <= 1, then all) reads every
    record of its levels, the earlier stages' included: the papers' cumulative curriculum, whose
    later stages keep training the earlier levels. Read without them (hop 0, then hop 1 alone,
    then hop 2 alone), a 0.35M student forgot hop 0 in the next stage: hop-0 accuracy 0.64 after
    stage 1, 0.11 after stage 2 (`ckd-ray experiment configs/kvqa_table.yaml`, 2026-12-06).
    Over the run the curriculum still sees the pool's distinct records per level, as end-to-end does."""
    shares: list[np.ndarray] = []
    start = 0
    while start < len(steps):
        levels = steps[start][1]
        stop = start + 1
        while stop < len(steps) and steps[stop][1] == levels:
            stop += 1
        positions = np.arange(len(pool_hops)) if levels is None else np.flatnonzero(np.isin(pool_hops, np.asarray(levels)))
        weights = np.cumsum([budget for budget, _ in steps[start:stop]], dtype=np.float64)
        bounds = np.rint(weights / weights[-1] * len(positions)).astype(np.int64)
        shares += [positions[a:b] for a, b in zip(np.concatenate([[0], bounds[:-1]]), bounds)]
        start = stop
    return shares


def plan_records(plan) -> tuple[np.ndarray, np.ndarray]:
    """(source labels, ordinals) of every record of a `ReadPlan`, in the order its tasks yield them."""
    labels, ordinals = [], []
    for task in plan.tasks:
        if "parts" in task:  # a shuffled task: its rows are its parts' records, permuted by `order`
            names = np.concatenate([np.full(len(part["ordinals"]), part["source"], dtype=object) for part in task["parts"]])
            labels.append(names[task["order"]])
        else:
            labels.append(np.full(len(task["ordinals"]), task["source"], dtype=object))
        ordinals.append(np.asarray(task["ordinals"], dtype=np.int64))
    if not ordinals:
        return np.array([], dtype=object), np.array([], dtype=np.int64)
    return np.concatenate(labels), np.concatenate(ordinals)


def distinct_samples(reads: Sequence[StepReads]) -> dict[str, int]:
    """Distinct records over `reads` (one learner's steps): captions, and instructions per hop
    level (`hop N`), as the experiment table shows them."""
    seen: dict[str, dict[tuple, int]] = {"caption": {}, "instruct": {}}
    for step in reads:
        seen[step.kind].update(zip(zip(step.labels.tolist(), step.ordinals.tolist()), step.hops.tolist()))
    out = {"captions": len(seen["caption"])}
    for level in sorted(set(seen["instruct"].values())):
        out[f"hop {level}"] = sum(1 for hop in seen["instruct"].values() if hop == level)
    return out


class StepData:
    """Builds `ray.data.Dataset`s for the steps of one job; the processor (tokenizer + image
    processor) is the benchmark's or the student's, loaded once."""

    def __init__(self, job: JobConfig, run_uri: str, catalogs: dict | None = None):
        self.job = job
        self.run_uri = run_uri
        data = job.data
        student = job.models["student"]
        # The student's own folder before the benchmark's: a composed or loaded model's tokenizer
        # and image processor must make its inputs (the benchmark's serve the tiny presets).
        if data.processor:
            self.processor_uri = data.processor
        elif student.path:
            self.processor_uri = student.path
        elif data.benchmark_root:
            self.processor_uri = storage.join(data.benchmark_root, "processor")
        else:
            raise ValueError("no processor folder: set data.processor, data.benchmark_root, or models.student.path")
        self._processor = None
        self._passes = {}
        self._catalogs: dict = {} if catalogs is None else catalogs  # one catalog pass per source (a caller may share it across jobs)
        self._validation: dict = {}
        self._rejects_book = None
        self._evaluation_sets: list | None = None
        self._evaluation_rows: list[dict] | None = None
        self._pool_reads: dict[str, StepReads] | None = None

    @property
    def rejects_book(self):
        """One actor collects the rejects of every pass of the job (the driver's shared one)."""
        if self._rejects_book is None:
            from ckd_ray.data.pipeline import shared_rejects_book

            self._rejects_book = shared_rejects_book()
        return self._rejects_book

    @property
    def processor(self):
        """The tokenizer and image processor of `processor_uri`, expanding an image to as many
        tokens as the student's vision tower makes; an image size the tower does not take is an
        error here, on the driver, not a shape error inside a worker."""
        if self._processor is None:
            from ckd_ray.data.processor import Processor
            from ckd_ray.models import num_image_tokens

            student = self._student_config()
            vision = student.vision_config
            processor = Processor.load(self.processor_uri, num_image_tokens(student))
            if processor.pixel_shape[1:] != (vision.image_size, vision.image_size):
                raise ValueError(
                    f"the image processor of {self.processor_uri} makes {processor.pixel_shape[1]}x{processor.pixel_shape[2]} "
                    f"images but the student's vision tower takes {vision.image_size}x{vision.image_size}: unset data.processor "
                    "(the student's own folder is used), or point it at a folder made for this student"
                )
            self._processor = processor
        return self._processor

    def _student_config(self):
        from transformers import LlavaConfig

        from ckd_ray.models import preset_config

        spec = self.job.models["student"]
        if spec.preset:
            return preset_config(spec.preset)
        return LlavaConfig.from_dict(json.loads(storage.read_bytes(storage.join(spec.path, "config.json"))))

    def _sources(self, planned, split: str | None = None):
        data = self.job.data
        sources = data.caption_sources() if planned.data_kind == "caption" else data.instruction_sources()
        if split is not None:
            sources = [s.model_copy(update={"split": split}) for s in sources]
        return sources

    def _hops(self, planned):
        return planned.stage.hop_levels if planned.data_kind == "instruct" else None

    def _build(self, name: str, sources, hops, shuffle: bool = True, metrics=None, limit: int | None = None,
               catalogs: dict | None = None, mix: bool = True):
        from ckd_ray.data.pipeline import build_student_dataset

        rejects_uri = storage.join(self.run_uri, "rejects", f"{name}.jsonl")
        student = build_student_dataset(sources, self.processor, self.job.data, rejects_uri=rejects_uri, hops=hops,
                                        shuffle=shuffle, mix=mix, metrics=metrics, catalogs=self._catalogs if catalogs is None else catalogs,
                                        rejects_book=self.rejects_book, limit=limit)
        self._passes[name] = student
        return student

    def train(self, planned):
        """(the step's training rows, how many) cut to what its optimizer steps can consume: with
        a step budget (`max_steps`) neither preprocessing nor the teacher pass touches more
        samples. The count comes from the read plan, not from a pass over the data (records
        rejected in preprocessing make a pass a little shorter than it says)."""
        from ckd_ray.observability.metrics import DataMetrics

        metrics = DataMetrics(self.job.name, planned.stage.label, planned.step.kind)  # the labels of the step's student metrics
        if self.job.cascade.disjoint_data:
            reads = self.step_reads(planned)
            sources = [s for s in self._sources(planned) if (reads.labels == s.label).any()]
            # The pipeline's own read plan over exactly the step's records (mixed already, in the pool).
            student = self._build(planned.step_id, sources, None, metrics=metrics, mix=False,
                                  catalogs=self._restricted_catalogs(sources, reads))
            return student.dataset, min(reads.num_records, student.num_records)
        needed = self.samples_needed(planned)
        student = self._build(planned.step_id, self._sources(planned), self._hops(planned), metrics=metrics, limit=needed)
        if needed is None:
            return student.dataset, student.num_records
        return student.dataset, min(needed, student.num_records)

    def samples_needed(self, planned) -> int | None:
        from ckd_ray.cascade.steps import samples_needed

        return samples_needed(self.job, planned.step)

    def step_reads(self, planned) -> StepReads:
        """The records a step of this job's plan reads with `cascade.disjoint_data` (see `planned_reads`)."""
        if self._pool_reads is None:
            from ckd_ray.cascade.plan import build_plan

            self._pool_reads = self.planned_reads(build_plan(self.job))
        if planned.step_id not in self._pool_reads:
            raise ValueError(f"step {planned.step_id} is not a step of job {self.job.name!r}'s plan: cascade.disjoint_data "
                             "splits the data over the job's own plan")
        return self._pool_reads[planned.step_id]

    def planned_reads(self, plan: list) -> dict[str, StepReads]:
        """The records each step of `plan` reads, planned on the driver without Ray (one catalog pass
        per source): with `cascade.disjoint_data`, each learner's share of its pool (`split_pool`);
        otherwise the first samples of the step's own pass that its budget needs (all of them
        without a budget; rejected records, which make a pass a little shorter, are not foreseen)."""
        from ckd_ray.cascade.steps import samples_per_optimizer_step, step_budget
        from ckd_ray.data.pipeline import plan_pass

        reads: dict[str, StepReads] = {}
        if not self.job.cascade.disjoint_data:
            for planned in plan:
                step = self._pass_reads(planned, plan_pass(self._sources(planned), self.job.data, hops=self._hops(planned),
                                                           catalogs=self._catalogs))
                needed = self.samples_needed(planned)
                reads[planned.step_id] = step if needed is None else step.take(np.arange(min(needed, step.num_records)))
            return reads
        groups: dict[tuple[str, str], list] = {}
        for planned in plan:
            groups.setdefault((planned.learner, planned.data_kind), []).append(planned)
        per_step = samples_per_optimizer_step(self.job)
        # The job's seed draws its pool (the seeds of an experiment see different samples); the
        # evaluation and validation samples stay those of data.shuffle_seed.
        pool_data = self.job.data.model_copy(update={"shuffle_seed": self.job.data.shuffle_seed + self.job.seed})
        for (learner, kind), steps in groups.items():
            budgets = []
            for planned in steps:
                max_steps, epochs = step_budget(self.job, planned.step)
                if max_steps is None:
                    raise ValueError(f"step {planned.step_id} has no step budget: cascade.disjoint_data needs trainer.max_steps "
                                     "or the step's max_steps")
                budgets.append(max_steps * per_step / epochs)
            order = self._pass_reads(steps[0], plan_pass(self._sources(steps[0]), pool_data, catalogs=self._catalogs))
            size = math.ceil(sum(budgets) - 1e-9)
            if size > order.num_records:
                raise ValueError(
                    f"the {kind} steps of {learner!r} consume {size} distinct samples at their budgets but the training data "
                    f"holds {order.num_records}: raise trainer.epochs (each step then passes over fewer samples more often) "
                    "or lower the steps' max_steps")
            pool = order.take(np.arange(size))
            shares = split_pool(pool.hops, [(budget, tuple(self._hops(p)) if self._hops(p) is not None else None)
                                            for budget, p in zip(budgets, steps)])
            for planned, positions in zip(steps, shares):
                if not len(positions):
                    raise ValueError(f"step {planned.step_id} gets no samples of {learner!r}'s pool: earlier steps read every "
                                     f"record of hop levels {self._hops(planned)} in it")
                reads[planned.step_id] = pool.take(positions)
        return reads

    def _pass_reads(self, planned, plan) -> StepReads:
        labels, ordinals = plan_records(plan)
        catalogs = {source.label: self._catalogs[source.model_dump_json()] for source in self._sources(planned)}
        hops = np.empty(len(ordinals), dtype=np.int64)
        for label, catalog in catalogs.items():
            mine = labels == label
            hops[mine] = catalog.hop[ordinals[mine]]
        return StepReads(planned.data_kind, labels, ordinals, hops)

    def _restricted_catalogs(self, sources, reads: StepReads) -> dict:
        """The sources' catalogs with only the step's records selectable: the others look like
        records of no split (and so does the source's own filter), so the pipeline's read plan,
        shuffle and rejects accounting run over exactly these records, with their true ordinals."""
        from ckd_ray.data.sources import SPLIT_CODES, UNLABELED, UNREADABLE

        restricted = {}
        for source in sources:
            key = source.model_dump_json()
            catalog = self._catalogs[key]
            chosen = np.zeros(catalog.num_records, dtype=bool)
            chosen[reads.ordinals[reads.labels == source.label]] = True
            split = np.where(catalog.split == UNREADABLE, UNREADABLE, SPLIT_CODES["train"])
            restricted[key] = replace(catalog, source=source.model_copy(update={"split": "train"}),
                                      split=np.where(chosen, split, UNLABELED).astype(catalog.split.dtype),
                                      hop=np.where(chosen, catalog.hop, 0).astype(catalog.hop.dtype))
        return restricted

    def validation(self, planned):
        """A fixed slice of the validation split (same sources and curriculum filter), read once
        per job for each such choice into numpy columns in the object store: every step that
        validates on it hands the workers the same reference (see `train.loop.validate`). The
        read runs as a Ray task, so it overlaps whatever the driver does next (a worker group's
        start); workers wait for it only when they validate."""
        import ray

        key = (planned.data_kind, tuple(self._hops(planned) or ()))
        if key not in self._validation:
            from ckd_ray.data.pipeline import stack_columns

            student = self._build(f"{planned.step_id}-val", self._sources(planned, "val"), self._hops(planned),
                                  limit=VALIDATION_SAMPLES)
            task = ray.remote(num_cpus=0)(stack_columns)
            self._validation[key] = task.remote(student.dataset)
        return self._validation[key]

    def evaluation_sets(self):
        """The sets evaluation reads (`ckd_ray.evaluate.sets`), resolved once per job on the
        driver: the first call raises ConfigError if a set selects no records (`run_cascade`
        makes it before Ray starts, so a bad evaluation never waits for the training)."""
        from ckd_ray.evaluate.sets import evaluation_sets

        if self._evaluation_sets is None:
            self._evaluation_sets = evaluation_sets(self.job, self.run_uri, self._catalogs)
        return self._evaluation_sets

    def evaluation_rows(self) -> list[dict]:
        """A deterministic shuffled prefix of each evaluation set (`evaluation.max_samples`), as
        rows for generation (read once per job), each with the benchmark's baseline answers where
        it has them; rows of `evaluation.sources` carry their set's name (`eval_set`) and what
        its scorer needs beyond `answer` (`pope_strategy`, VQAv2's `answers`)."""
        from ckd_ray.errors import ConfigError, Problem
        from ckd_ray.data.baselines import load_sample_baselines
        from ckd_ray.data.pipeline import build_student_dataset

        if self._evaluation_rows is not None:
            return self._evaluation_rows

        limit = self.job.evaluation.max_samples
        rows: list[dict] = []
        for evaluation_set in self.evaluation_sets():
            rejects_uri = storage.join(self.run_uri, "rejects", f"{evaluation_set.file_name}.jsonl")
            student = build_student_dataset(evaluation_set.sources, self.processor, self.job.data, catalogs=self._catalogs,
                                            rejects_book=self.rejects_book, limit=limit, rejects_uri=rejects_uri)
            taken = student.dataset.take_all()
            if not taken:  # possible only with data.max_reject_fraction 1
                student.close_rejects()
                raise ConfigError([Problem(evaluation_set.field, "preprocessing rejected every record it selects",
                                           f"see why in {rejects_uri}")], f"the evaluation of job {self.job.name!r}")
            rows += evaluation_set.label_rows(taken)
        # The bundled benchmark's no-model answers for these samples, so scores stand beside them.
        baselines = load_sample_baselines(self.job.data.benchmark_root)
        if baselines and all(str(row["sample_id"]) in baselines for row in rows):
            rows = [{**row, **baselines[str(row["sample_id"])]} for row in rows]
        self._evaluation_rows = rows
        return self._evaluation_rows

    def fingerprint(self, planned) -> str:
        """Identifies the rows a step trains on: a signal cache entry is only reused for these."""
        data = self.job.data.model_dump(mode="json", exclude={"preprocess_batch_size"})
        blob = json.dumps({
            "sources": [s.model_dump(mode="json") for s in self._sources(planned)],
            "hops": self._hops(planned),
            "limit": self.step_reads(planned).digest() if self.job.cascade.disjoint_data else self.samples_needed(planned),
            "data": data,
            "processor": self.processor_uri,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_rejects(self, planned) -> None:
        """Writes the step's rejects files; raises TooManyRejectsError over the threshold."""
        for name in (planned.step_id, f"{planned.step_id}-val"):
            student = self._passes.pop(name, None)
            if student is not None:
                student.close_rejects()

