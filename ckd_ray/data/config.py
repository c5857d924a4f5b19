"""The `data:` section of the job config: where records come from and how they become model inputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ray import storage
from ckd_ray.section import Section

SPLITS = ("train", "val", "test")


class SourceConfig(Section):
    """One data source: a LLaVA-1.5 JSON (or JSONL) file with its images, or Parquet with image bytes."""

    uri: str
    """LLaVA JSON/JSONL file, or a Parquet file or folder of `*.parquet` files (local path or s3://)."""

    format: Literal["llava_json", "parquet"] = "llava_json"
    """`llava_json`: a JSON list (or JSONL) of LLaVA-1.5 records; `parquet`: rows with an image-bytes column."""

    image_root: str | None = None
    """Folder or `.zip` holding the images that `llava_json` records name (local or s3://); unused for Parquet."""

    weight: float = Field(default=1.0, gt=0)
    """Share of this source in the mixed dataset, relative to the other sources' weights."""

    split: Literal["train", "val", "test"] | None = None
    """Keep only records whose `split` key equals this; None keeps every record."""

    name: str | None = None
    """Name used in rejects and metrics; defaults to the file or folder name of `uri`."""

    @property
    def label(self) -> str:
        """The source's name: `name`, or the last component of `uri`."""
        return self.name or self.uri.rstrip("/").rsplit("/", 1)[-1]


class DataConfig(Section):
    """Sources for each training step, and how records become the student's fixed-length inputs."""

    benchmark_root: str | None = None
    """Output folder of `ckd-ray data build-kvqa` (local or s3://); supplies every source not listed explicitly."""

    captions: list[SourceConfig] = Field(default_factory=list)
    """Caption sources for the connector-only steps (PT, DPT); empty: the benchmark's captions."""

    instructions: list[SourceConfig] = Field(default_factory=list)
    """Instruction sources for the steps that train the LLM (FT, SFT, DFT); empty: the benchmark's instructions."""

    processor: str | None = None
    """Folder (local or s3://) with the tokenizer and image processor; None: the student's folder
    when models.student.path is set (a composed or loaded model brings its own), else the benchmark's."""

    caption_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of the benchmark's training captions in the mix of the instruction steps (FT, SFT,
    DFT), as LLaVA-1.5's instruction mix holds captioning data. Without it, training on questions
    alone makes a model forget how to caption, so a prepared teacher's signal for the caption steps
    (DPT) is noise and a student's second caption step starts from a model that cannot caption.
    0: instructions only. Applies to the benchmark's sources (`benchmark_root`, no listed
    `instructions`); evaluation never reads the captions."""

    max_length: int = Field(default=128, ge=8)
    """Tokens per sample after the image placeholder is expanded; shorter samples are right-padded."""

    over_length: Literal["truncate", "reject"] = "truncate"
    """Over-long samples: `truncate` drops prompt text from the left (never image or response tokens); `reject` skips them."""

    max_reject_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    """The job fails when more than this fraction of the records it reads are rejected."""

    shuffle_seed: int = 0
    """Seed of the deterministic shuffle (the read plan's order) and of the mixing draws."""

    shuffle_block_records: int = Field(default=1, ge=1)
    """Consecutive JSON records that stay together in the shuffle: 1 is a full permutation (a
    ranged read per record, like the image reads); larger blocks mean fewer, larger reads on an
    object store and a coarser shuffle. Parquet shuffles whole row groups."""

    preprocess_batch_size: int = Field(default=256, ge=1)
    """Records per preprocessing task batch (tokenization and image transform)."""

    records_per_read_task: int = Field(default=2048, ge=1)
    """Consecutive records one read task handles; the number of read tasks is the record count over this."""

    max_facts: int = Field(default=8, ge=1)
    """Candidate facts kept per sample (`fact_token_ids` rows); further facts are not used."""

    max_fact_tokens: int = Field(default=12, ge=1)
    """Tokens kept per fact verbalization (`fact_token_ids` columns)."""

    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    """Images declaring more pixels (width x height, read from the header) are rejected before
    decoding, so a decompression bomb cannot exhaust a preprocessing task's memory."""

    @model_validator(mode="after")
    def _check_sources(self) -> "DataConfig":
        problems = storage.scheme_problems("data", {"benchmark_root": self.benchmark_root, "processor": self.processor})
        if self.benchmark_root is None:
            for kind in ("captions", "instructions"):
                if not getattr(self, kind):
                    problems.append(
                        f"data.{kind} is empty and data.benchmark_root is not set: set data.benchmark_root "
                        f"to the output of `ckd-ray data build-kvqa`, or list data.{kind} sources"
                    )
        for kind in ("captions", "instructions"):
            sources: list[SourceConfig] = getattr(self, kind)
            labels = [s.label for s in sources]
            for label in sorted({x for x in labels if labels.count(x) > 1}):
                problems.append(f"data.{kind} has two sources named {label!r}: give each a distinct `name`")
            for i, source in enumerate(sources):
                field = f"data.{kind}[{i}]"
                if source.format == "llava_json" and source.image_root is None:
                    problems.append(
                        f"{field}.image_root is not set: set it to the folder or .zip holding the images "
                        f"that {storage.redact(source.uri)} names"
                    )
                if source.format == "parquet" and source.image_root is not None:
                    problems.append(
                        f"{field}.image_root is set but {field}.format is parquet (images are in the rows): "
                        "remove image_root, or set format: llava_json"
                    )
                problems += storage.scheme_problems(field, {"uri": source.uri, "image_root": source.image_root})
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def caption_sources(self) -> list[SourceConfig]:
        """The caption sources: `captions` if listed, else the benchmark's train-split captions."""
        return list(self.captions) or [self._benchmark_source("captions", "train")]

    def instruction_sources(self) -> list[SourceConfig]:
        """The instruction sources: `instructions` if listed, else the benchmark's train-split
        instructions, mixed with its captions when `caption_share` > 0."""
        if self.instructions:
            return list(self.instructions)
        questions = self._benchmark_source("instructions", "train")
        if not self.caption_share:
            return [questions]
        return [questions.model_copy(update={"weight": 1.0 - self.caption_share}),
                self._benchmark_source("captions", "train").model_copy(update={"weight": self.caption_share})]

    def eval_sources(self, split: str) -> list[SourceConfig]:
        """The instruction data restricted to `split` (evaluation.split), for evaluation: the listed
        `instructions`, or the benchmark's questions (never its captions)."""
        sources = list(self.instructions) or [self._benchmark_source("instructions", split)]
        return [s.model_copy(update={"split": split}) for s in sources]

    def _benchmark_source(self, kind: str, split: str) -> SourceConfig:
        root = str(self.benchmark_root)
        return SourceConfig(
            uri=storage.join(root, f"{kind}.json"),
            image_root=storage.join(root, "images"),
            split=split,
            name=f"kvqa-{kind}",
        )
