"""Teachers prepared once: the preparation (PT, FT) of a job's teacher roles as a run of its own,
named after a digest of what it computes (`<storage.root>/teachers-<digest>`). Every later job
with the same teachers, data and recipe (a rerun with other student settings, each seed and row
of an experiment) finds that run finished and uses its checkpoints instead of training them again.
"""

from __future__ import annotations

from ckd_ray.cascade.manifest import Manifest, config_hash
from ckd_ray.config.job import JobConfig
from ckd_ray.config.loader import validate_config

# Sections a preparation run does not read: changing them (a student's loss, the signal, the
# student's own step budget) keeps the digest, so the prepared teachers are reused.
_NOT_READ_BY_PREPARATION = ("signal", "loss", "teacher_pool", "tune", "observability")


def preparation_config(raw: dict, roles: list[str] | tuple[str, ...], seed: int | None = None) -> dict:
    """The run that prepares `roles` of the job `raw` (its `cascade.teacher_prep_steps`, one stage
    per role, no teacher), named `teachers-<digest of that run's config>`."""
    from ckd_ray.cascade.config import CascadeConfig

    raw = {key: value for key, value in raw.items() if key not in _NOT_READ_BY_PREPARATION}
    if seed is not None:
        raw["seed"] = seed
    cascade = CascadeConfig.model_validate({key: value for key, value in raw.get("cascade", {}).items()
                                            if key in ("teacher_prep_steps", "role_prep_steps")})
    steps = {role: [step.model_dump(exclude_none=True) for step in cascade.prep_steps(role)] for role in roles}
    every = [step for role_steps in steps.values() for step in role_steps]
    # The student's budget is not the teachers': a trainer setting every preparation step overrides is not read.
    unread = [key for key in ("max_steps", "epochs") if all(step.get(key) for step in every)]
    raw["trainer"] = {key: value for key, value in raw.get("trainer", {}).items() if key not in unread}
    raw["cascade"] = {"prepare_teachers": False,
                      "stages": [{"name": f"prepare-{role}", "learner": role, "steps": steps[role]} for role in roles]}
    raw["name"] = "teachers"
    digest = config_hash(validate_config(raw))[:10]  # what the run computes, as its manifest identifies it
    raw["name"] = f"teachers-{digest}"
    return raw


def prepare_teachers_once(prep: JobConfig, log=print) -> Manifest:
    """Runs the preparation job `prep` (a `preparation_config`), or finds it finished by an earlier
    command (its manifest skips every done step); returns its manifest."""
    from ckd_ray.cascade.runner import run_cascade

    manifest = Manifest.open(prep.run_uri, prep)  # refuses a folder of another config
    if all(manifest.done(step_id) for step_id in _step_ids(prep)):
        log(f"[cascade] teachers prepared by an earlier run: {prep.run_uri}")
        return manifest
    log(f"[cascade] preparing the teachers once, for this and later runs: {prep.run_uri}")
    run_cascade(prep, log=log)
    return Manifest.open(prep.run_uri, prep)


def with_prepared_teachers(job: JobConfig, roles: list[str], log=print, copy_scores: bool = True) -> tuple[JobConfig, JobConfig]:
    """`job` with each of `roles` replaced by its checkpoint from the shared preparation run (and
    no preparation of its own), and that run's job. With `copy_scores` the prepared teachers'
    scores are copied into the job's manifest (`copy_teacher_scores`), so its report shows them
    beside the students."""
    raw = job.model_dump(mode="json", exclude_defaults=True)
    prep = validate_config(preparation_config(raw, roles))
    prepared = prepare_teachers_once(prep, log)
    models = dict(raw.get("models", {}))
    for role in roles:
        spec = job.models[role].model_dump(mode="json", exclude_defaults=True, exclude={"preset", "path", "prepare"})
        models[role] = {**spec, "path": prepared.roles[role]}
    raw["models"] = models
    raw["cascade"] = {**raw.get("cascade", {}), "prepare_teachers": False, "share_prepared_teachers": False}
    ready = validate_config(raw)
    if copy_scores:
        copy_teacher_scores(ready, prep, prepared, roles)
    return ready, prep


def copy_teacher_scores(job: JobConfig, prep: JobConfig, prepared: Manifest, roles) -> None:
    """A job scores the teachers of its stages (for knowledge preservation); prepared ones were
    scored by their own run on the same samples when the evaluation and data settings are the
    same, so the job's manifest starts with those scores and does not score them again."""
    if job.evaluation != prep.evaluation or job.data != prep.data:
        return
    manifest = Manifest.open(job.run_uri, job)
    names = [f"prepare-{role} ({role})" for role in roles]
    if all(name in manifest.evaluations for name in names):
        return
    for name in names:
        if name in prepared.evaluations:
            manifest.evaluations.setdefault(name, {**prepared.evaluations[name], "seconds": 0.0})
    manifest.save()


def _step_ids(job: JobConfig) -> list[str]:
    from ckd_ray.cascade.plan import build_plan

    return [planned.step_id for planned in build_plan(job)]
