"""Attaching a teacher's signal to a step's training data: a signal-cache hit, or one teacher
pool pass written to the cache (the pool lives only for that pass)."""

from __future__ import annotations

import time

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
                          deferred: list | None = None):
    """(dataset with `sig_*` columns, the signal spec it carries, a description of the teacher
    pass for the manifest). With `deferred` (a list), a pass the cache does not hold yet is not
    run here: a callable that runs it is appended, and the dataset returned reads the cache
    entry once the pass has written it (a worker waits for it; see `SignalCache.read`). The
    description is completed when the pass ends."""
    spec = step_signal_spec(job, planned)
    vocab = shared_vocab(learner_uri, teacher_uri)
    labels = {"job": job.name, "stage": planned.stage.label, "step": planned.kind, "pool": planned.teacher}
    source = TeacherSource(teacher_uri, vocab, job.models[planned.teacher].trust_remote_code,
                           job.models[planned.teacher].dtype, labels, job.observability.gpu_poll_seconds)
    if not job.teacher_pool.use_cache:
        log(f"[cascade]   {planned.step_id}: teacher pool {planned.teacher!r} streams its signal into training (cache off)")
        return add_teacher_stage(dataset, source, spec, job.teacher_pool), spec, {"source": "teacher pool (streamed)"}
    cache = SignalCache(job.signal_cache_uri)
    key = cache_key(data.fingerprint(planned), teacher_checkpoint_hash(teacher_uri), spec_fingerprint(spec, vocab))
    if cache.lookup(key):
        log(f"[cascade]   {planned.step_id}: teacher signal from the cache ({key})")
        return cache.read(key), spec, {"source": "cache hit", "key": key}
    teacher_pass = {"source": "teacher pool", "key": key}

    def run_pass() -> None:
        log(f"[cascade]   {planned.step_id}: teacher pool {planned.teacher!r}, one pass over the step's data -> cache {key}")
        start = time.perf_counter()
        entry = cache.write(add_teacher_stage(dataset, source, spec, job.teacher_pool), key,
                            {"teacher_uri": teacher_uri, "spec": spec.model_dump(mode="json"), "shared_vocab": vocab})
        seconds = time.perf_counter() - start
        rate = entry["num_rows"] / seconds if seconds else 0.0
        log(f"[cascade]   {planned.step_id}: teacher pass, {entry['num_rows']} samples in {seconds:.1f} s ({rate:.1f} samples/s)")
        teacher_pass.update(samples=entry["num_rows"], seconds=round(seconds, 2), samples_per_s=round(rate, 2))

    cache.clear_failure(key)  # an earlier run's failed pass; before anyone waits for this one
    if deferred is not None:
        deferred.append(run_pass)
        return cache.read(key, when_written=True), spec, teacher_pass
    run_pass()
    return cache.read(key), spec, teacher_pass
