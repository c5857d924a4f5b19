"""The root job config: it only composes the components' own sections."""

from __future__ import annotations

from pydantic import Field, field_validator

from ckd_ray import storage
from ckd_ray.config.cascade import CascadeConfig
from ckd_ray.section import Section
from ckd_ray.data.config import DataConfig
from ckd_ray.evaluate.config import EvaluationConfig
from ckd_ray.losses.config import LossConfig
from ckd_ray.models.config import ModelSpec
from ckd_ray.observability.config import ObservabilityConfig
from ckd_ray.teachers.config import SignalSpec, TeacherPoolConfig
from ckd_ray.train.config import TrainerConfig
from ckd_ray.config.tune import TuneConfig


def _check_uri(value: str | None) -> str | None:
    if value is not None:
        storage.uri_scheme(value)  # raises ValueError naming the scheme and the accepted ones
    return value


class RayConfig(Section):
    """Which Ray cluster runs the job."""

    address: str | None = None
    """None starts a local Ray; "auto" joins the cluster this machine belongs to (ray job submit)."""
    num_cpus: int | None = Field(8, ge=1)
    """Logical CPUs of a local Ray. More than the cores, so a teacher pool and a 2-worker student
    group are not starved on a small machine; ignored when joining a cluster."""
    object_store_memory_mb: int | None = Field(None, ge=64)
    """Object store size of a local Ray (None = Ray's default)."""


class StorageConfig(Section):
    """Where outputs go: a local path or s3://bucket/prefix."""

    root: str = "runs"
    """Root of every run's outputs: manifest, checkpoints, report, rejects."""
    signal_cache: str | None = None
    """Teacher signal cache (Parquet); default <root>/signal-cache."""

    _root = field_validator("root")(classmethod(lambda cls, v: _check_uri(v)))
    _cache = field_validator("signal_cache")(classmethod(lambda cls, v: _check_uri(v)))


class JobConfig(Section):
    """A cascade distillation job. YAML files in configs/ are overrides of this tree."""

    name: str = "ckd"
    """Job name: the run folder under storage.root and the metrics' `job` label."""
    seed: int = 0
    """Seed of model initialisation, data shuffling and training."""
    models: dict[str, ModelSpec] = {"student": ModelSpec(preset="tiny-student")}
    """Roles (student, ta, teacher, ...) and the model each one is."""
    data: DataConfig
    """Datasets and preprocessing (required: every job reads data)."""
    signal: SignalSpec = Field(default_factory=SignalSpec)
    """What the teacher pool sends per sample."""
    teacher_pool: TeacherPoolConfig = Field(default_factory=TeacherPoolConfig)
    """Teacher actor pool sizing and placement."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """Loss of distillation steps (stages and steps may override)."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Student worker group."""
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    """Stages and steps."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Evaluation after each stage."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """Search over loss weights and temperature."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Output locations."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Cluster to run on."""
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    """Metrics export."""

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage.root, self.name)

    @property
    def signal_cache_uri(self) -> str:
        return self.storage.signal_cache or storage.join(self.storage.root, "signal-cache")
