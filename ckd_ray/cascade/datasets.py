"""The datasets of each planned step: caption or instruction sources, the stage's curriculum
filter, the train/val splits, and the rejects file of each pass."""

from __future__ import annotations

import hashlib
import json

from ckd_ray import storage
from ckd_ray.config.job import JobConfig

VALIDATION_SAMPLES = 256


class StepData:
    """Builds `ray.data.Dataset`s for the steps of one job; the processor (tokenizer + image
    processor) is the benchmark's or the student's, loaded once."""

    def __init__(self, job: JobConfig, run_uri: str):
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
        self._catalogs: dict = {}  # one catalog pass per source for the whole job
        self._validation: dict = {}
        self._rejects_book = None
        self._evaluation_sets: list | None = None
        self._evaluation_rows: list[dict] | None = None

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

    def _build(self, name: str, sources, hops, shuffle: bool = True, metrics=None, limit: int | None = None):
        from ckd_ray.data.pipeline import build_student_dataset

        rejects_uri = storage.join(self.run_uri, "rejects", f"{name}.jsonl")
        student = build_student_dataset(sources, self.processor, self.job.data, rejects_uri=rejects_uri, hops=hops,
                                        shuffle=shuffle, metrics=metrics, catalogs=self._catalogs,
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
        needed = self.samples_needed(planned)
        student = self._build(planned.step_id, self._sources(planned), self._hops(planned), metrics=metrics, limit=needed)
        if needed is None:
            return student.dataset, student.num_records
        return student.dataset, min(needed, student.num_records)

    def samples_needed(self, planned) -> int | None:
        from ckd_ray.cascade.steps import samples_needed

        return samples_needed(self.job, planned.step)

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
        from ckd_ray.config.loader import ConfigError, Problem
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
            "limit": self.samples_needed(planned),
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

