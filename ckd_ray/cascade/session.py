"""The run session: what every command that works on a job's run folder opens first, written once
(`run_cascade`, `ckd-ray tune`, `ckd-ray eval`): the storage and model-folder checks, the
evaluation sets (a set that selects nothing is refused before Ray starts), Ray, the shared prepared
teachers swapped in (`ckd_ray.cascade.prepared`), the manifest, the step data and the initial
checkpoints.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from ckd_ray import storage
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.manifest import Manifest
from ckd_ray.cascade.plan import build_plan
from ckd_ray.cascade.prepared import RunJob, job_as_run
from ckd_ray.config.cascade import CONTROL_ROLE
from ckd_ray.config.job import JobConfig, RayConfig
# torch and transformers are loaded with the module, before Ray is joined. Loaded after, in a job
# submitted with `ray job submit`, libtorch failed to load (`Intel oneMKL FATAL ERROR: Cannot load
# libtorch_cpu.so`, exit 2) and transformers' import stopped on a working directory that was no
# longer there (`FileNotFoundError` in `Path("src").resolve()`): both imports were implicit in the
# runner until the planner stopped importing torch.
from ckd_ray.models.builder import build_preset, save_model


@dataclass
class RunSession:
    """A job's run folder, opened: everything a command needs before its first step."""

    job: JobConfig
    """The job as its run records it (with `share_prepared_teachers`, the teacher roles are the
    prepared checkpoints); its manifest is opened with this job."""
    run_uri: str
    manifest: Manifest
    data: StepData
    ray_started: float
    """`time.perf_counter()` when Ray was joined, less any teacher preparation this command ran
    (a preparation is a run of its own, with its own report): a command's compute share counts from here."""


def open_run(job: JobConfig, *, run: RunJob, log=print, folder: str | None = None, check_evaluation: bool = True,
             build_initial: bool = True, copy_scores: bool = False, metrics: bool = True,
             log_to_driver: bool = True) -> RunSession:
    """Opens `job`'s run folder (or its `folder` inside it, e.g. "tune") for a command. `run` runs
    a preparation that no earlier command finished (`ckd_ray.cascade.runner.run_cascade`).
    `check_evaluation`: resolve the evaluation sets before Ray starts. `build_initial`: record
    the initial checkpoint of each role the plan uses in the manifest (a preset is built once).
    `copy_scores`: the prepared teachers' scores start the job's manifest. `metrics`: Ray exports
    metrics on `observability.metrics_export_port`."""
    raise_storage_problems(job)
    check_model_folders(job)
    catalogs: dict = {}  # one catalog pass per source, shared by both StepData below
    if check_evaluation:  # a set that selects nothing is a config problem, found before Ray starts
        StepData(job, job.run_uri, catalogs).evaluation_sets()
    started = time.perf_counter()
    connect_ray(job.ray, metrics_export_port=job.observability.metrics_export_port if metrics else None,
                log_to_driver=log_to_driver)
    quiet_data_progress()
    preparing = time.perf_counter()
    job = job_as_run(job, log=log, copy_scores=copy_scores, run=run)
    started += time.perf_counter() - preparing
    run_uri = storage.join(job.run_uri, folder) if folder else job.run_uri
    manifest = Manifest.open(run_uri, job)
    data = StepData(job, run_uri, catalogs)
    if build_initial:
        plan = build_plan(job)
        roles = {p.learner for p in plan} | {t for p in plan for t in p.teachers} | {"student"}
        initial_checkpoints(job, manifest, data.processor_uri, run_uri, log, roles=roles)
    return RunSession(job, run_uri, manifest, data, started)


# Ray Train's controller polls its workers every 2 s by default, and a worker's next report waits
# for the previous one to be collected: with a report every few optimizer steps of a small
# model, the poll interval, not training, sets the pace.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# Run in every worker before its first task; jobs/runtime_env.yaml names it for submitted jobs.
WORKER_SETUP_HOOK = "ckd_ray.cascade.worker_setup.restore_sigint_handler"


def connect_ray(settings: RayConfig, *, metrics_export_port: int | None = None, log_to_driver: bool = True) -> None:
    """Joins the cluster named by the config or RAY_ADDRESS (set inside `ray job submit`), or
    starts a new local Ray sized by `ray.num_cpus`: a new one even when a `ray start` cluster
    runs on this machine (or a dead one left its address file behind), so a laptop run never
    joins, or waits for, a cluster it did not ask for (`ray.address: auto` joins that one).
    `log_to_driver=False` keeps worker output in Ray's session logs instead of echoing it."""
    import ray

    if ray.is_initialized():
        return
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    runtime_env = {"env_vars": TRAIN_ENV, "worker_process_setup_hook": WORKER_SETUP_HOOK}
    kwargs = {"address": "local", "num_cpus": settings.num_cpus, "runtime_env": runtime_env, "log_to_driver": log_to_driver}
    if settings.object_store_memory_mb:
        kwargs["object_store_memory"] = settings.object_store_memory_mb * 2**20
    if metrics_export_port:
        kwargs["_metrics_export_port"] = metrics_export_port
    ray.init(**kwargs)


def check_model_folders(job: JobConfig) -> None:
    """Every role's model folder (s3:// too) exists, is in the Llava layout, and can teach or
    learn from the roles it meets: checked from the folders' small files before Ray starts, so a
    pair that cannot be distilled fails in seconds, not after a teacher pool has loaded."""
    from ckd_ray.config.checks import model_folder_problems
    from ckd_ray.errors import ConfigError

    problems = model_folder_problems(job, at_start=True)
    if problems:
        raise ConfigError(problems, "the job's model folders")


def raise_storage_problems(job: JobConfig) -> None:
    """ConfigError, before Ray starts, if the job's data or models are missing or its S3 buckets
    do not answer (see `ckd_ray.config.checks.check_storage`)."""
    from ckd_ray.config.checks import check_storage
    from ckd_ray.errors import ConfigError

    problems = check_storage(job)
    if problems:
        raise ConfigError(problems, f"the data and storage of job {job.name!r}")


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars interleave with the step lines of a cascade; the
    runner prints one line per step and per report instead."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def initial_checkpoints(job: JobConfig, manifest: Manifest, processor_uri: str, run_uri: str, log, roles=None) -> None:
    """Every role the plan uses starts from a model directory: presets are built (seeded) and
    saved into the run folder once; given paths are used as they are."""
    for offset, (role, spec) in enumerate(sorted(job.models.items())):
        if role in manifest.roles or (roles is not None and role not in roles):
            continue
        if spec.path:
            manifest.roles[role] = spec.path
            continue
        uri = storage.join(run_uri, "models", f"{role}-init")
        with tempfile.TemporaryDirectory() as tmp:
            model = build_preset(spec.preset, seed=job.seed * 1000 + offset)
            save_model(model, tmp, storage.download_dir(processor_uri))
            storage.upload_dir(tmp, uri)
        manifest.roles[role] = uri
        log(f"[cascade] built {spec.preset} for role {role!r} -> {uri}")
    if job.cascade.student_alone and CONTROL_ROLE not in manifest.roles:
        manifest.roles[CONTROL_ROLE] = manifest.roles["student"]  # the control starts where the student does
    manifest.save()


