"""The student's dataset as a Ray Data pipeline:

    catalog + read plan   driver, one streaming pass per source (sources.py)
      -> read             a Ray Data source, one CPU task per planned group of records: raw
                          record bytes + image bytes, in the shuffled order the driver planned
                          (seeded by data.shuffle_seed; no all-to-all exchange, so the first
                          batch arrives after one read task, not after a pass over everything)
      -> preprocess       map_batches, CPU tasks: tokens, masks, pixel values, facts (preprocess.py)
      -> [teacher stage]  the caller appends `student.dataset.map_batches(<teacher pool>, ...)`
      -> Ray Train        `datasets={"train": ...}`; workers read `ray.train.get_dataset_shard`

Curriculum stages (seed 000) are lists of allowed hop levels, passed as `hops`; mixing weights come
from each source's `weight`. `iter_plain_batches` runs the same stages in one process, without Ray:
the reference the Ray pipeline is tested and benchmarked against.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ckd_ray.data.config import DataConfig, SourceConfig
from ckd_ray.errors import require_ray
from ckd_ray.data.preprocess import InputLimits, preprocess_rows
from ckd_ray.data.processor import Processor
from ckd_ray.data.rejects import RejectsBook, RejectsLog, RejectSummary
from ckd_ray.data.sources import READ_COLUMNS, ReadPlan, catalog_source, plan_reads, read_task_rows

if TYPE_CHECKING:
    import ray

    from ckd_ray.observability.metrics import DataMetrics

# Seed 000's progressive curriculum: visual-text alignment only, then single-hop facts, then all.
PROGRESSIVE_CURRICULUM: tuple[tuple[int, ...], ...] = ((0,), (0, 1), (0, 1, 2))


def plan_pass(
    sources: Sequence[SourceConfig],
    config: DataConfig,
    *,
    hops: Sequence[int] | None = None,
    mix: bool = True,
    shuffle: bool = True,
    catalogs: dict | None = None,
) -> ReadPlan:
    """Catalogs `sources` (one streaming pass each, on the caller; reused from `catalogs`, a dict
    the caller keeps, when a source was catalogued before) and plans the read tasks of a pass."""
    if not sources:
        raise ValueError("no data sources given: list data.captions / data.instructions, or set data.benchmark_root")
    found = []
    for source in sources:
        key = source.model_dump_json()
        if catalogs is None or key not in catalogs:
            catalog = catalog_source(source)
            if catalogs is None:
                found.append(catalog)
                continue
            catalogs[key] = catalog
        found.append(catalogs[key])
    return plan_reads(found, hops=hops, mix=mix, seed=config.shuffle_seed, records_per_task=config.records_per_read_task,
                      shuffle=shuffle, shuffle_block_records=config.shuffle_block_records)


@dataclass
class StudentDataset:
    """A preprocessed `ray.data.Dataset` with the column contract of `preprocess.py`, and the log
    its preprocessing tasks send rejects to.

    Preprocessing tasks fail the pipeline with `TooManyRejectsError` as soon as the rejects can no
    longer stay under `data.max_reject_fraction` of `num_records`. After a full pass, call
    `close_rejects()` to write the rejects file and get the counts."""

    dataset: "ray.data.Dataset"
    plan: ReadPlan
    """The whole pass's plan (its `num_records` is the reject fraction's denominator)."""
    rejects_book: "ray.actor.ActorHandle"
    """A RejectsBook actor (shared by the passes of a job)."""
    rejects_uri: str
    read_plan: ReadPlan | None = None
    """What the dataset reads: `plan`, or its prefix when the pass is limited."""

    @property
    def num_records(self) -> int:
        return self.plan.num_records

    def close_rejects(self) -> RejectSummary:
        """Writes the rejects file; raises `TooManyRejectsError` if the pass went over the threshold."""
        import ray

        return ray.get(self.rejects_book.close.remote(self.rejects_uri)).raise_if_exceeded()


def build_student_dataset(
    sources: Sequence[SourceConfig],
    processor: Processor,
    config: DataConfig,
    *,
    rejects_uri: str,
    hops: Sequence[int] | None = None,
    shuffle: bool = True,
    mix: bool = True,
    metrics: "DataMetrics | None" = None,
    catalogs: dict | None = None,
    rejects_book: "ray.actor.ActorHandle | None" = None,
    limit: int | None = None,
) -> StudentDataset:
    """Builds the lazy read -> preprocess pipeline over `sources`.

    `hops`: the curriculum stage's allowed hop levels (None: all). `shuffle`: the read plan's
    shuffle seeded by `data.shuffle_seed` (see `plan_reads`): the same order on every run and every
    execution of the dataset. `mix`: subsample sources to their `weight` shares. `catalogs`: a
    dict that keeps source catalogs across calls (one catalog pass per source per job).
    `rejects_uri`: the JSONL file (local or s3://) that rejected records go to, next to the run's
    outputs; `rejects_book`: the RejectsBook actor that collects them (default: this process's
    shared one, `shared_rejects_book`).
    `metrics`: where preprocessing tasks count kept and rejected records (by reason) for the
    dashboards. `limit`: the dataset is the pass's first `limit` samples (see `read_prefix`).
    Append a teacher stage with `student.dataset.map_batches(...)`."""
    import ray

    require_ray("build_student_dataset")
    plan = plan_pass(sources, config, hops=hops, mix=mix, shuffle=shuffle, catalogs=catalogs)
    read = plan if limit is None else plan.prefix(read_prefix(limit, plan.num_records, config.max_reject_fraction))
    if rejects_book is None:
        rejects_book = shared_rejects_book()
    ray.get(rejects_book.open.remote(rejects_uri, plan.num_records, config.max_reject_fraction))
    # One block per planned task: Ray Data would otherwise split each task's output into many
    # tiny blocks (its minimum block count), which costs seconds before the first batch.
    dataset = ray.data.read_datasource(_planned_datasource(read), override_num_blocks=len(read.tasks))
    dataset = dataset.map_batches(
        _preprocess_batch,
        batch_size=config.preprocess_batch_size,
        batch_format="numpy",
        fn_kwargs={"processor": processor, "limits": InputLimits.from_config(config), "rejects_book": rejects_book,
                   "rejects_uri": rejects_uri, "metrics": metrics},
    )
    # Keep block order through the map stages, so the shuffled order is the order consumers see.
    dataset.context.execution_options.preserve_order = True
    if limit is not None:
        dataset = dataset.limit(limit)
    return StudentDataset(dataset, plan, rejects_book, rejects_uri, read)


def read_prefix(limit: int, num_records: int, max_reject_fraction: float) -> int:
    """How many planned records a pass of `limit` samples reads: `limit` plus as many as may be
    rejected before the pass fails (`max_reject_fraction` of the whole pass). Unless the pass
    fails, that prefix holds at least `limit` good samples, the same first `limit` that reading
    every record would give; and the few samples a short step needs no longer cost a read and
    preprocessing of every task of a large split (nor a worker process for each)."""
    return min(num_records, limit + int(max_reject_fraction * num_records))


_SHARED_BOOK: dict[tuple[str, str], "ray.actor.ActorHandle"] = {}


def shared_rejects_book():
    """This process's RejectsBook in the Ray cluster it is connected to: one actor for every pass
    it builds (each pass keeps its own log in it, by rejects file), not an actor process each. It
    takes no CPU slot (it only counts)."""
    import ray

    require_ray("shared_rejects_book")
    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    if key not in _SHARED_BOOK:
        _SHARED_BOOK.clear()  # a book of an earlier cluster or job is gone with it
        _SHARED_BOOK[key] = ray.remote(RejectsBook).options(num_cpus=0).remote()
    return _SHARED_BOOK[key]


def _planned_datasource(plan: ReadPlan):
    """A Ray Data source with one read task per planned group of records: each task reads one slice
    of one file (one ranged GET on S3) and the images its records name."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlannedRecords(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(_estimated_bytes(task) for task in plan.tasks)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            # The plan fixes the tasks (exact record groups); `parallelism` is only a hint.
            return [
                ReadTask(
                    functools.partial(_read_blocks, task),
                    BlockMetadata(
                        num_rows=len(task["ordinals"]),
                        size_bytes=_estimated_bytes(task),
                        exec_stats=None,
                        input_files=tuple(task.get("uris", [task.get("uri")])),
                    ),
                )
                for task in plan.tasks
            ]

    return PlannedRecords()


def _estimated_bytes(task: dict) -> int:
    if "parts" in task:
        return sum(_estimated_bytes(part) for part in task["parts"])
    if "byte_ranges" in task:
        return int((task["byte_ranges"][:, 1] - task["byte_ranges"][:, 0]).sum() * 2)  # + images
    return 4096 * len(task["ordinals"])


def _read_blocks(task: dict) -> list:
    return [read_task_rows(task)]


def _preprocess_batch(rows: dict[str, np.ndarray], processor: Processor, limits: InputLimits, rejects_book, rejects_uri: str,
                      metrics=None):
    import ray

    samples, rejects, truncated = preprocess_rows(rows, processor, limits)
    if metrics is not None:
        metrics.record_samples(0 if samples is None else len(samples["input_ids"]))
        for reason, count in Counter(reject.reason for reject in rejects).items():
            metrics.record_rejects(count, reason)
    if rejects or truncated:
        summary = ray.get(rejects_book.add.remote(rejects_uri, rejects, truncated))  # small: rejects carry a truncated repr
        summary.raise_if_exceeded()  # fails the pipeline, and with it the job that consumes it
    if samples is not None:
        yield samples


def iter_plain_batches(
    sources: Sequence[SourceConfig],
    processor: Processor,
    config: DataConfig,
    *,
    rejects_uri: str,
    hops: Sequence[int] | None = None,
    shuffle: bool = True,
    mix: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """The same stages as `build_student_dataset` in one process: same records, same columns, same
    rejects, in the same order (the shuffle is the read plan's).
    Holds all read rows (encoded records and images) in memory, so it is for tests, debugging and
    benchmarks, not for a 665k-record set.

    Batches have up to `data.preprocess_batch_size` rows (fewer where records were rejected). The
    rejects file is written when the iteration ends; `TooManyRejectsError` is raised then, or as soon
    as the threshold can no longer be met."""
    import pyarrow as pa

    plan = plan_pass(sources, config, hops=hops, mix=mix, shuffle=shuffle)
    log = RejectsLog(rejects_uri, plan.num_records, config.max_reject_fraction)
    limits = InputLimits.from_config(config)
    table = pa.concat_tables([read_task_rows(task) for task in plan.tasks])
    for start in range(0, table.num_rows, config.preprocess_batch_size):
        chunk = table.slice(start, config.preprocess_batch_size)
        rows = {name: np.asarray(chunk.column(name).to_pylist(), dtype=object) for name in READ_COLUMNS}
        samples, rejects, truncated = preprocess_rows(rows, processor, limits)
        if rejects or truncated:
            log.add(rejects, truncated).raise_if_exceeded()
        if samples is not None:
            yield samples
    log.close().raise_if_exceeded()


def stack_columns(dataset: "ray.data.Dataset") -> dict[str, np.ndarray]:
    """A small dataset's rows as one numpy array per column, in order (e.g. validation rows
    shipped to the workers through the object store)."""
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches:
        return {}
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
