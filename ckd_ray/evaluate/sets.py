"""The sets a job is evaluated on, as sources of the data pipeline, resolved on the driver (no
Ray needed, so before it starts): each of `evaluation.sources` (a published layout is converted
into LLaVA JSON lines in the run folder, `eval-sets/evaluation-<name>.jsonl`, which the pipeline then reads
like any source), or, when none is listed, the instruction data restricted to `evaluation.split`.

A set that selects no records (a split no record has, an empty file) is a ConfigError naming the
field and the fix: never an empty evaluation, nor one that fails on `rows[0]` after training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckd_ray import storage
from ckd_ray.data.config import SourceConfig
from ckd_ray.data.eval_sets import RECORD_FIELDS, EvaluationSetError, read_pope, read_scienceqa, read_vqav2
from ckd_ray.data.llava_json import iter_json_records
from ckd_ray.data.sources import SPLIT_CODES, SourceCatalog, catalog_source
from ckd_ray.errors import ConfigError, Problem
from ckd_ray.evaluate.config import EvaluationSourceConfig

if TYPE_CHECKING:  # the job's shape only: the config tree sits above this package
    from ckd_ray.config.job import JobConfig


@dataclass(frozen=True)
class EvaluationSet:
    """The sources of one evaluation pass. `name`: the evaluation source's name, put on each of
    its rows as `eval_set` (None for the instruction data's split); `field`: the config field
    messages name; `record_fields`: its records carry `RECORD_FIELDS` to put on the rows."""

    name: str | None
    field: str
    sources: list[SourceConfig]
    record_fields: bool = False

    @property
    def file_name(self) -> str:
        """The file name (no extension) of the set's rejects, and of its converted records."""
        return set_file_name(self.name)

    def label_rows(self, rows: list[dict]) -> list[dict]:
        """`rows` (preprocessed, for generation) with the set's name and their records' scorer
        fields, read back from the converted file for these rows only."""
        if self.name is None:
            return rows
        fields: dict[str, dict] = {}
        if self.record_fields:
            wanted = {str(row["sample_id"]) for row in rows}
            fs, path = storage.arrow_filesystem(self.sources[0].uri)
            with fs.open_input_stream(path) as stream:
                for record in iter_json_records(stream, name=self.sources[0].uri):
                    if record.value is not None and str(record.value.get("id")) in wanted:
                        fields[str(record.value["id"])] = {k: record.value[k] for k in RECORD_FIELDS if k in record.value}
        return [{**row, "eval_set": self.name, **fields.get(str(row["sample_id"]), {})} for row in rows]


def set_file_name(name: str | None) -> str:
    """`evaluation`, or `evaluation-<name>` with what a file name cannot hold replaced."""
    return "evaluation" if name is None else f"evaluation-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}"


def evaluation_sets(job: JobConfig, run_uri: str, catalogs: dict | None = None) -> list[EvaluationSet]:
    """The job's evaluation sets; ConfigError listing every set that selects no records or cannot
    be read. `catalogs`: the pipeline's catalog cache (see `plan_pass`), so a source catalogued
    here is not catalogued again when it is read."""
    if not job.evaluation.sources:
        return [_instruction_split(job, catalogs)]
    sets, problems = [], []
    for i, spec in enumerate(job.evaluation.sources):
        field = f"evaluation.sources[{i}]"
        try:
            sets.append(_source_set(spec, field, run_uri, catalogs))
        except EvaluationSetError as err:
            problems.append(Problem(f"{field}.{err.key}", err.what, err.fix))
        except (OSError, ValueError) as err:  # unreadable, not JSON lines, not Parquet
            problems.append(Problem(f"{field}.uri", f"cannot be read: {storage.redact(str(err))}", "fix the path or the file"))
    if problems:
        raise ConfigError(problems, f"the evaluation sets of job {job.name!r}")
    return sets


def _source_set(spec: EvaluationSourceConfig, field: str, run_uri: str, catalogs: dict | None) -> EvaluationSet:
    if spec.format == "llava":
        source = SourceConfig(uri=spec.uri, format=spec.llava_format, image_root=spec.image_root, split=spec.split, name=spec.label)
        catalog = _catalog(source, catalogs)
        if not catalog.select(None).any():
            if spec.split is None:
                raise EvaluationSetError("uri", f"{storage.redact(spec.uri)} holds no records", "point it at a file with records")
            raise EvaluationSetError("split", f"no record of {storage.redact(spec.uri)} has split {spec.split!r}",
                                     _split_fix(catalog, "set split: to one of them, or remove it to evaluate every record",
                                                "remove split to evaluate every record"))
        return EvaluationSet(spec.label, field, [source])
    if spec.format == "pope":
        records = read_pope(spec.uri, spec.split)
    elif spec.format == "scienceqa":
        records = read_scienceqa(spec.uri, spec.split)
    else:
        records = read_vqav2(spec.uri, spec.annotations, spec.split)
    converted = storage.join(run_uri, "eval-sets", f"{set_file_name(spec.label)}.jsonl")
    storage.write_bytes(converted, "".join(json.dumps(record) + "\n" for record in records).encode())
    source = SourceConfig(uri=converted, image_root=spec.image_root, name=spec.label)
    return EvaluationSet(spec.label, field, [source], record_fields=True)


def _instruction_split(job: JobConfig, catalogs: dict | None) -> EvaluationSet:
    """Without `evaluation.sources`: the instruction data's records of `evaluation.split`; each
    source must have some (the pipeline refuses a source without)."""
    split = job.evaluation.split
    sources = job.data.eval_sources(split)
    problems = []
    for source in sources:
        catalog = _catalog(source, catalogs)
        if not catalog.select(None).any():
            problems.append(Problem(
                "evaluation.split", f"no record of the instruction source {source.label!r} ({storage.redact(source.uri)}) has split {split!r}",
                _split_fix(catalog, "set evaluation.split to one of them, or list evaluation.sources",
                           "list evaluation.sources") + " (sets apart from the training data, e.g. POPE, ScienceQA-IMG, VQAv2)",
            ))
    if problems:
        raise ConfigError(problems, f"the evaluation of job {job.name!r}")
    return EvaluationSet(None, "evaluation.split", sources)


def _catalog(source: SourceConfig, catalogs: dict | None) -> SourceCatalog:
    key = source.model_dump_json()  # the key `plan_pass` looks a source up by
    if catalogs is None:
        return catalog_source(source)
    if key not in catalogs:
        catalogs[key] = catalog_source(source)
    return catalogs[key]


def _split_fix(catalog: SourceCatalog, with_splits: str, without_splits: str) -> str:
    """The fix for a split no record has: the splits the records have, or that they have none."""
    names = {code: name for name, code in SPLIT_CODES.items()}
    found = sorted({names[code] for code in set(catalog.split.tolist()) if code in names})
    if found:
        return f"its records have the splits {', '.join(found)}: {with_splits}"
    return f"its records have no `split` key (LLaVA-1.5's instruction data has none): {without_splits}"
