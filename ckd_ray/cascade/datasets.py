"""The datasets of each planned step: caption or instruction sources, the stage's curriculum
filter, the train/val splits, and the rejects file of each pass."""

from __future__ import annotations

import hashlib
import json
import math

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
        if data.processor:
            self.processor_uri = data.processor
        elif data.benchmark_root:
            self.processor_uri = storage.join(data.benchmark_root, "processor")
        elif student.path:
            self.processor_uri = student.path
        else:
            raise ValueError("no processor folder: set data.processor, data.benchmark_root, or models.student.path")
        self._processor = None
        self._passes = {}

    @property
    def processor(self):
        if self._processor is None:
            from ckd_ray.data.processor import Processor

            self._processor = Processor.load(self.processor_uri, self._num_image_tokens())
        return self._processor

    def _num_image_tokens(self) -> int:
        from transformers import LlavaConfig

        from ckd_ray.models import num_image_tokens, preset_config

        spec = self.job.models["student"]
        if spec.preset:
            return num_image_tokens(preset_config(spec.preset))
        config = json.loads((storage.download_dir(spec.path) / "config.json").read_text())
        return num_image_tokens(LlavaConfig.from_dict(config))

    def _sources(self, planned, split: str | None = None):
        data = self.job.data
        sources = data.caption_sources() if planned.data_kind == "caption" else data.instruction_sources()
        if split is not None:
            sources = [s.model_copy(update={"split": split}) for s in sources]
        return sources

    def _hops(self, planned):
        return planned.stage.hop_levels if planned.data_kind == "instruct" else None

    def _build(self, name: str, sources, hops, shuffle: bool = True, metrics=None):
        from ckd_ray.data.pipeline import build_student_dataset

        rejects_uri = storage.join(self.run_uri, "rejects", f"{name}.jsonl")
        student = build_student_dataset(sources, self.processor, self.job.data, rejects_uri=rejects_uri, hops=hops,
                                        shuffle=shuffle, metrics=metrics)
        self._passes[name] = student
        return student.dataset

    def train(self, planned):
        """The step's training rows, cut to what its optimizer steps can consume: with a step
        budget (`max_steps`) neither preprocessing nor the teacher pass touches more samples."""
        from ckd_ray.observability.metrics import DataMetrics

        metrics = DataMetrics(self.job.name, planned.stage.label, planned.step.kind)  # the labels of the step's student metrics
        dataset = self._build(planned.step_id, self._sources(planned), self._hops(planned), metrics=metrics)
        needed = self.samples_needed(planned)
        return dataset if needed is None else dataset.limit(needed)

    def samples_needed(self, planned) -> int | None:
        trainer = self.job.trainer
        max_steps = planned.step.max_steps or trainer.max_steps
        if max_steps is None:
            return None
        epochs = planned.step.epochs or trainer.epochs
        per_step = trainer.micro_batch_size * trainer.num_workers * trainer.grad_accum
        # `epochs` passes over N samples give epochs * N / per_step optimizer steps.
        return math.ceil(max_steps * per_step / epochs)

    def validation(self, planned):
        """A fixed slice of the validation split (same sources and curriculum filter)."""
        dataset = self._build(f"{planned.step_id}-val", self._sources(planned, "val"), self._hops(planned))
        return dataset.limit(VALIDATION_SAMPLES)

    def evaluation_rows(self) -> list[dict]:
        """A deterministic shuffled prefix of the held-out split, as rows for generation."""
        from ckd_ray.data.pipeline import build_student_dataset

        limit = self.job.evaluation.max_samples
        sources = [s.model_copy(update={"split": self.job.evaluation.split}) for s in self.job.data.instruction_sources()]
        student = build_student_dataset(sources, self.processor, self.job.data,
                                        rejects_uri=storage.join(self.run_uri, "rejects", "evaluation.jsonl"))
        dataset = student.dataset if limit is None else student.dataset.limit(limit)
        return dataset.take_all()

    def fingerprint(self, planned) -> str:
        """Identifies the rows a step trains on: a signal cache entry is only reused for these."""
        data = self.job.data.model_dump(mode="json", exclude={"batch_size", "eval_batch_size", "preprocess_batch_size"})
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
