"""How students and teachers are evaluated after each stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ray import storage
from ckd_ray.section import Section
from ckd_ray.data.config import SPLITS
from ckd_ray.data.eval_sets import POPE_STRATEGIES, SCIENCEQA_SPLITS


class EvaluationSourceConfig(Section):
    """One evaluation set apart from the training data, in its published layout (local or s3://).
    It is read into LLaVA-style records (see `ckd_ray.data.eval_sets`) and scored like the
    training data's held-out split."""

    format: Literal["llava", "pope", "scienceqa", "vqav2"]
    """`llava`: LLaVA-1.5 JSON/JSONL records or Parquet rows, as in data.instructions; `pope`:
    POPE's `coco_pope_{random,popular,adversarial}.json`; `scienceqa`: ScienceQA's
    `problems.json`, its problems with an image (ScienceQA-IMG); `vqav2`: VQAv2's questions file
    with its annotations file."""

    uri: str
    """`llava`: the JSON/JSONL file, or a Parquet file or folder; `pope`: the folder holding its
    three files; `scienceqa`: problems.json; `vqav2`: v2_OpenEnded_mscoco_<split>_questions.json."""

    image_root: str | None = None
    """Folder or `.zip` holding the images the records name (local or s3://): COCO's val2014
    images for POPE and VQAv2 val2014, ScienceQA's image folder (`<split>/<pid>/image.png`);
    unset for a `llava` Parquet source (its rows hold the images)."""

    split: str | None = None
    """`llava`: keep only records whose `split` key is this (train, val or test; unset: every
    record); `pope`: one strategy, random, popular or adversarial (unset: all three, whose mean F1
    POPE reports); `scienceqa`: train, val or test (required); `vqav2`: the COCO split of the
    files and image names, e.g. val2014 (required)."""

    annotations: str | None = None
    """`vqav2` only (required there): v2_mscoco_<split>_annotations.json, the answers (local or s3://)."""

    name: str | None = None
    """Name in rejects, scores and file names; defaults to the format and split (`vqav2-val2014`),
    or for `llava` the file or folder name of `uri`."""

    @property
    def label(self) -> str:
        """The source's name: `name`, or the default `name` describes."""
        if self.name:
            return self.name
        if self.format == "llava":
            return self.uri.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.format}-{self.split}" if self.split else self.format

    @property
    def llava_format(self) -> Literal["llava_json", "parquet"]:
        """How a `llava` source is read: JSON for a `.json`/`.jsonl` file, else Parquet."""
        return "llava_json" if self.uri.lower().endswith((".json", ".jsonl")) else "parquet"

    def problems(self, field: str) -> list[str]:
        """What is wrong or missing for this format, each as "<field>.<key> ...: <fix>"."""
        problems = []
        allowed = {"llava": SPLITS, "pope": POPE_STRATEGIES, "scienceqa": SCIENCEQA_SPLITS}.get(self.format)
        if self.split is None and self.format in ("scienceqa", "vqav2"):
            example = "test (the paper's), val or train" if self.format == "scienceqa" else "val2014"
            problems.append(f"{field}.split is not set: set the {self.format} split to evaluate, e.g. {example}")
        elif self.split is not None and allowed is not None and self.split not in allowed:
            unset = {"llava": ", or remove it to keep every record", "pope": ", or remove it to read all three"}.get(self.format, "")
            problems.append(f"{field}.split {self.split!r} is not a {self.format} split: use one of {', '.join(allowed)}{unset}")
        if self.format == "vqav2" and self.annotations is None:
            problems.append(f"{field}.annotations is not set: set it to the v2_mscoco_<split>_annotations.json of the questions")
        if self.format != "vqav2" and self.annotations is not None:
            problems.append(f"{field}.annotations is set but only format vqav2 reads it: remove it")
        parquet = self.format == "llava" and self.llava_format == "parquet"
        if self.image_root is None and not parquet:
            problems.append(f"{field}.image_root is not set: set it to the folder or .zip holding the images "
                            f"that {storage.redact(self.uri)} names")
        if self.image_root is not None and parquet:
            problems.append(f"{field}.image_root is set but {storage.redact(self.uri)} is read as Parquet (images in the "
                            "rows): remove image_root, or point uri at a .json/.jsonl file")
        return problems + storage.scheme_problems(field, {"uri": self.uri, "image_root": self.image_root,
                                                          "annotations": self.annotations})


class EvaluationConfig(Section):
    """Evaluation after each stage (generation, greedy): on `sources` where listed, else on the
    held-out `split` of the job's instruction data."""

    sources: list[EvaluationSourceConfig] = Field(default_factory=list)
    """Evaluation sets apart from the training data (POPE, ScienceQA-IMG, VQAv2, LLaVA records),
    each evaluated on its own; empty: the instruction data's `split`."""
    split: str = "test"
    """Split of the instruction data evaluated when `sources` is empty."""
    max_samples: int | None = Field(600, ge=1)
    """Evaluate at most this many samples (a deterministic shuffled prefix) of the instruction
    data's split, or of each of `sources`; None = all of them."""
    batch_size: int = Field(64, ge=1)
    """Prompts generated together."""
    max_new_tokens: int = Field(8, ge=1)
    """Answer length limit (benchmark answers are a word or a letter)."""
    latency_runs: int = Field(3, ge=1)
    """Timed repetitions of a single-prompt generation for the latency figure."""
    concurrent: int = Field(2, ge=1)
    """Models scored side by side on CPU, each in its own process (with a GPU, one at a time);
    their latencies are timed one model at a time after all have generated, so no latency
    figure is taken while another model runs."""

    @model_validator(mode="after")
    def _check_sources(self) -> "EvaluationConfig":
        problems: list[str] = []
        if self.split not in SPLITS:
            problems.append(f"evaluation.split {self.split!r} is not a split of the instruction data: use one of {', '.join(SPLITS)}")
        for i, source in enumerate(self.sources):
            problems += source.problems(f"evaluation.sources[{i}]")
        labels = [s.label for s in self.sources]
        for label in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"evaluation.sources has two sources named {label!r}: give each a distinct `name`")
        if problems:
            raise ValueError("; ".join(problems))
        return self
