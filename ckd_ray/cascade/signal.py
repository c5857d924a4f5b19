"""Attaching a teacher's signal to a step's training data: a signal-cache hit, or one teacher
pool pass written to the cache (the pool lives only for that pass), run before the worker group
trains or beside it (`DeferredPass`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from ckd_ray import storage
from ckd_ray.config.job import JobConfig
from ckd_ray.teachers import SignalCache, SignalSpec, TeacherSource, add_teacher_stage, cache_key, spec_fingerprint, teacher_checkpoint_hash


def step_signal_spec(job: JobConfig, planned) -> SignalSpec:
    """The job's signal restricted to what this step's active loss terms read: fewer bytes on the
    wire, and a cache entry shared by every step that needs the same parts."""
    weights = planned.loss.weights
    signal = job.signal
    return signal.model_copy(update={
        "response_top_k": signal.response_top_k if weights.output > 0 else 0,
        "visual_top_k": signal.visual_top_k if weights.visual_kl > 0 else 0,
        "gram": signal.gram and weights.visual_relation > 0,
        "feature_layers": sorted(set(planned.loss.feature_layers.values())) if weights.feature > 0 else [],
        "attention_layers": sorted(set(planned.loss.attention_layers.values())) if weights.attention > 0 else [],
        "facts": signal.facts and weights.knowledge > 0,
    })


def shared_vocab(learner_uri: str, teacher_uri: str) -> int:
    """The vocabulary range both models' logits are compared over; a tokenizer mismatch is an
    error here, before any teacher actor or student worker starts."""
    from ckd_ray.models import shared_vocab_size
    from ckd_ray.models.folders import read_model_folder

    learner, teacher = read_model_folder(learner_uri), read_model_folder(teacher_uri)  # small files only
    return shared_vocab_size(learner.vocab_rows, teacher.vocab_rows, student_fingerprint=learner.tokenizer_fingerprint,
                             teacher_fingerprint=teacher.tokenizer_fingerprint, tokenizer_len=learner.tokenizer_length)


def attach_teacher_signal(job: JobConfig, planned, teacher_uri: str, learner_uri: str, dataset, data, log,
                          deferred: list | None = None, ticket_uri: str | None = None, ready=None):
    """(dataset with `sig_*` columns, the signal spec it carries, a description of the teacher
    pass for the manifest). With `deferred` (a list), the pass is not run here: a
    `DeferredPass` is appended, and the dataset returned reads the entry the pass names in its
    ticket (`ticket_uri`) once written (a worker waits for it; see
    `SignalCache.read_when_ready`). `ready` (deferred passes only) says whether the teacher's
    folder is complete (`export_ready`): a teacher the same worker group trains first has no
    weights yet, so no cache key either. The description is completed when the pass ends."""
    spec = step_signal_spec(job, planned)
    if not job.teacher_pool.use_cache:
        if ready is not None:
            raise ValueError("a streamed teacher (teacher_pool.use_cache false) cannot wait for its own training")
        log(f"[cascade]   {planned.step_id}: teacher pool {planned.teacher!r} streams its signal into training (cache off)")
        source = _source(job, planned, teacher_uri, shared_vocab(learner_uri, teacher_uri))
        return add_teacher_stage(dataset, source, spec, job.teacher_pool), spec, {"source": "teacher pool (streamed)"}
    cache = SignalCache(job.signal_cache_uri)
    teacher_pass: dict = {"source": "teacher pool"}

    def find_or_run() -> str:
        """The key of the step's entry: a cache hit, or one pass written to the cache."""
        vocab = shared_vocab(learner_uri, teacher_uri)
        key = cache_key(data.fingerprint(planned), teacher_checkpoint_hash(teacher_uri), spec_fingerprint(spec, vocab))
        teacher_pass["key"] = key
        if cache.lookup(key):
            log(f"[cascade]   {planned.step_id}: teacher signal from the cache ({key})")
            teacher_pass["source"] = "cache hit"
        else:
            _run_pass(job, planned, _source(job, planned, teacher_uri, vocab), spec, dataset, cache, key, teacher_pass, log)
        return key

    if deferred is None:
        return cache.read(find_or_run()), spec, teacher_pass
    storage.delete(ticket_uri)  # an earlier run's; before any worker waits for this one
    # The waiting workers get the pass's key, or its error.
    deferred.append(DeferredPass(partial(cache.run_ticketed, ticket_uri, find_or_run), planned.step_id, ready))
    return cache.read_when_ready(ticket_uri), spec, teacher_pass


def attach_fused_signal(job: JobConfig, planned, teacher_uris: dict[str, str], learner_uri: str, dataset, data, log,
                        deferred: list | None = None, ticket_uris: dict[str, str] | None = None, ready: dict | None = None):
    """A step with several teachers (`planned.teachers`): each teacher's signal attached as
    `attach_teacher_signal` attaches one (a cache hit, or its own pass: the entry a
    single-teacher step of the same data uses), the rows zipped in order: the first teacher's
    columns as they are, teacher i's `sample_id` and `sig_*` columns prefixed
    (`fused_column_prefix`; the decoder checks the sample ids agree). Returns (dataset, spec,
    {"source": ..., "teachers": {role: its pass}})."""
    if not job.teacher_pool.use_cache:
        raise ValueError(f"step {planned.step_id} fuses {list(planned.teachers)}: each teacher's pass is cached, so "
                         "teacher_pool.use_cache must be true")
    datasets, passes, spec = [], {}, None
    for role in planned.teachers:
        alone = replace(planned, teacher=role, teachers=(role,))
        attached, spec, passes[role] = attach_teacher_signal(
            job, alone, teacher_uris[role], learner_uri, dataset, data, log, deferred=deferred,
            ticket_uri=ticket_uris[role] if ticket_uris else None, ready=(ready or {}).get(role))
        datasets.append(attached)
    return zip_teacher_signals(datasets), spec, {"source": " + ".join(p.get("source", "?") for p in passes.values()), "teachers": passes}


def zip_teacher_signals(datasets: list):
    """The teachers' signal datasets of one step (same rows, same order) as one dataset."""
    from ckd_ray.teachers.signal import SIGNAL_PREFIX, fused_column_prefix

    def prefixed(table, prefix: str):
        names = [name for name in table.column_names if name == "sample_id" or name.startswith(SIGNAL_PREFIX)]
        return table.select(names).rename_columns([prefix + name for name in names])  # zero-copy

    zipped = datasets[0]
    for index, other in enumerate(datasets[1:], start=1):
        zipped = zipped.zip(other.map_batches(prefixed, fn_kwargs={"prefix": fused_column_prefix(index)}, batch_format="pyarrow"))
    return zipped


@dataclass
class DeferredPass:
    """A teacher pass to run beside the worker group (`TeacherPasses`)."""

    run: Callable[[], object]
    step_id: str
    ready: Callable[[], bool] | None = None
    """Whether its teacher exists yet (None: it does)."""
    started_at: float | None = None
    ended_at: float | None = None
    """Wall-clock times (time.time()) of the pass, once it has started / ended: the run report
    counts the training done while it ran."""

    def __call__(self) -> None:
        self.started_at = time.time()
        try:
            self.run()
        finally:
            self.ended_at = time.time()


def export_ready(export_uri: str) -> Callable[[], bool]:
    """Whether the model a worker group is training has been exported: its step summary is
    written after every other file of the export (`ckd_ray.train.loop.Reporter`)."""
    from ckd_ray.train.plan import STEP_SUMMARY_FILE

    return partial(storage.exists, storage.join(export_uri, STEP_SUMMARY_FILE))


def _source(job: JobConfig, planned, teacher_uri: str, vocab: int) -> TeacherSource:
    labels = {"job": job.name, "stage": planned.stage.label, "step": planned.kind, "pool": planned.teacher}
    spec = job.models[planned.teacher]
    return TeacherSource(teacher_uri, vocab, spec.trust_remote_code, spec.dtype, labels, job.observability.gpu_poll_seconds)


def _run_pass(job: JobConfig, planned, source: TeacherSource, spec: SignalSpec, dataset, cache: SignalCache, key: str,
              teacher_pass: dict, log) -> None:
    """One teacher pool pass over the step's data, written to the cache entry `key`."""
    log(f"[cascade]   {planned.step_id}: teacher pool {planned.teacher!r}, one pass over the step's data -> cache {key}")
    cache.clear_failure(key)  # an earlier run's failed pass; before anyone waits for this one
    start = time.perf_counter()
    entry = cache.write(add_teacher_stage(dataset, source, spec, job.teacher_pool), key,
                        {"teacher_uri": source.model_uri, "spec": spec.model_dump(mode="json"), "shared_vocab": source.shared_vocab_size})
    seconds = time.perf_counter() - start
    rate = entry["num_rows"] / seconds if seconds else 0.0
    log(f"[cascade]   {planned.step_id}: teacher pass, {entry['num_rows']} samples in {seconds:.1f} s ({rate:.1f} samples/s)")
    teacher_pass.update(samples=entry["num_rows"], seconds=round(seconds, 2), samples_per_s=round(rate, 2))
