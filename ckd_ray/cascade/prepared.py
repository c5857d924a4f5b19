"""Teachers prepared once: the preparation (PT, FT) of each teacher role as a run of its own,
named after the role and a digest of what it computes (`<storage.root>/prepared-<role>-<digest>`).
Every later job with the same model, data and recipe for that role (a rerun with other student
settings, another plan that uses the same teacher, each seed and row of an experiment) finds the
run finished and starts from its checkpoint instead of training the role again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckd_ray import storage
from ckd_ray.cascade.manifest import Manifest, ManifestMismatchError, config_hash
from ckd_ray.config.job import JobConfig
from ckd_ray.config.loader import validate_config

# Runs a job's plan (`ckd_ray.cascade.runner.run_cascade`, given by the caller).
RunJob = Callable[..., object]

# Sections a preparation run does not read: changing them (a student's loss, the signal, the
# student's own step budget) keeps the digest, so the prepared teachers are reused.
_NOT_READ_BY_PREPARATION = ("signal", "loss", "teacher_pool", "tune", "observability")


@dataclass
class Prepared:
    """One role's preparation run: its job and its manifest."""

    role: str
    job: JobConfig
    manifest: Manifest

    @property
    def model_uri(self) -> str:
        return self.manifest.roles[self.role]

    @property
    def evaluation_name(self) -> str:
        return f"prepare-{self.role} ({self.role})"


def preparation_config(raw: dict, role: str, seed: int | None = None) -> dict:
    """The run that prepares `role` of the job `raw` (its `cascade.role_prep_steps` or
    `teacher_prep_steps`, no teacher), named `prepared-<role>-<digest of that run's config>`. The
    run holds only the student and that role, so another role's model does not enter the digest."""
    from ckd_ray.config.cascade import CascadeConfig

    raw = {key: value for key, value in raw.items() if key not in _NOT_READ_BY_PREPARATION}
    if seed is not None:
        raw["seed"] = seed
    models = raw.get("models", {})
    raw["models"] = {name: spec for name, spec in models.items() if name in ("student", role)}
    cascade = CascadeConfig.model_validate({key: value for key, value in raw.get("cascade", {}).items()
                                            if key in ("teacher_prep_steps", "role_prep_steps")})
    steps = [step.model_dump(exclude_none=True) for step in cascade.prep_steps(role)]
    # The student's budget is not the teacher's: a trainer setting every preparation step overrides is not read.
    unread = [key for key in ("max_steps", "epochs") if all(step.get(key) for step in steps)]
    raw["trainer"] = {key: value for key, value in raw.get("trainer", {}).items() if key not in unread}
    raw["cascade"] = {"prepare_teachers": False, "stages": [{"name": f"prepare-{role}", "learner": role, "steps": steps}]}
    raw["name"] = f"prepared-{role}"
    digest = config_hash(validate_config(_by_content(raw)))[:10]  # what the run computes
    raw["name"] = f"prepared-{role}-{digest}"
    return raw


def _by_content(raw: dict) -> dict:
    """`raw` with each model folder named by a hash of its content instead of its path: the same
    folder reached by another path (a submitted job reads Ray's upload of the working directory)
    is the same model."""
    from ckd_ray.teachers.cache import teacher_checkpoint_hash

    models = {}
    for role, spec in raw.get("models", {}).items():
        path = spec.get("path") if isinstance(spec, dict) else None
        models[role] = {**spec, "path": f"content-{teacher_checkpoint_hash(path)}"} if path and storage.exists(path) else spec
    return {**raw, "models": models}


def prepare_once(raw: dict, roles, log=print, seed: int | None = None, *, run: RunJob) -> dict[str, Prepared]:
    """Each of `roles` of the job `raw` prepared by its own run (`preparation_config`), or found
    finished by an earlier command (a run's manifest skips every done step). `run` runs a
    preparation that is not finished (`ckd_ray.cascade.runner.run_cascade`: the runner sits above
    this module, which it calls to find its teachers)."""
    from ckd_ray.cascade.plan import build_plan

    prepared = {}
    for role in roles:
        prep = validate_config(preparation_config(raw, role, seed))
        try:
            manifest = Manifest.open(prep.run_uri, prep)
        except ManifestMismatchError:  # the same models by content, reached by other paths
            manifest = Manifest.read(prep.run_uri)
        finished = all(manifest.done(planned.step_id) for planned in build_plan(prep))
        if finished and f"prepare-{role} ({role})" in manifest.evaluations:
            log(f"[cascade] {role} prepared by an earlier run: {prep.run_uri}")
        else:
            log(f"[cascade] preparing {role} once, for this and later runs: {prep.run_uri}")
            run(prep, log=log)
            manifest = Manifest.open(prep.run_uri, prep)
        prepared[role] = Prepared(role, prep, manifest)
    return prepared


def with_prepared_teachers(job: JobConfig, roles: list[str], log=print, copy_scores: bool = True, *, run: RunJob) -> JobConfig:
    """`job` with each of `roles` replaced by its checkpoint from its shared preparation run (and
    no preparation of its own). With `copy_scores` the prepared teachers' scores are copied into
    the job's manifest (`copy_teacher_scores`), so its report shows them beside the students."""
    raw = job.model_dump(mode="json", exclude_defaults=True)
    prepared = prepare_once(raw, roles, log, run=run)
    models = dict(raw.get("models", {}))
    for role, done in prepared.items():
        spec = job.models[role].model_dump(mode="json", exclude_defaults=True, exclude={"preset", "path", "prepare"})
        models[role] = {**spec, "path": done.model_uri}
    raw["models"] = models
    raw["cascade"] = {**raw.get("cascade", {}), "prepare_teachers": False, "share_prepared_teachers": False}
    ready = validate_config(raw)
    if copy_scores:
        copy_teacher_scores(ready, prepared.values())
    return ready


def copy_teacher_scores(job: JobConfig, prepared) -> None:
    """A job scores the teachers of its stages (for knowledge preservation); prepared ones were
    scored by their own run on the same samples when the evaluation and data settings are the
    same, so the job's manifest starts with those scores and does not score them again."""
    manifest = Manifest.open(job.run_uri, job)
    changed = False
    for done in prepared:
        if job.evaluation != done.job.evaluation or job.data != done.job.data:
            continue
        if done.evaluation_name not in manifest.evaluations and done.evaluation_name in done.manifest.evaluations:
            manifest.evaluations[done.evaluation_name] = {**done.manifest.evaluations[done.evaluation_name], "seconds": 0.0}
            changed = True
    if changed:
        manifest.save()


def job_as_run(job: JobConfig, log=print, copy_scores: bool = False, *, run: RunJob) -> JobConfig:
    """The job as `run_cascade` runs it (and so as its manifest identifies it): with
    `share_prepared_teachers`, its teacher roles replaced by their prepared checkpoints (prepared
    now if no earlier run did; Ray must be connected then)."""
    from ckd_ray.cascade.plan import teacher_roles_to_prepare

    shared = teacher_roles_to_prepare(job) if job.cascade.share_prepared_teachers else []
    return with_prepared_teachers(job, shared, log=log, copy_scores=copy_scores, run=run) if shared else job
