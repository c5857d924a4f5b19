"""Ray Tune search over loss weights and temperature, per cascade stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ray.section import Section


class SearchDimension(Section):
    """One searched value: a uniform or log-uniform range, or a list of choices."""

    low: float | None = None
    """Lower bound of a range."""
    high: float | None = None
    """Upper bound of a range."""
    log: bool = False
    """Sample the range log-uniformly."""
    choices: list[float] | None = None
    """Explicit values instead of a range."""

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchDimension":
        if self.choices is not None and (self.low is not None or self.high is not None):
            raise ValueError("both `choices` and `low`/`high` are set: keep the choices or the range")
        if self.choices is not None and not self.choices:
            raise ValueError("`choices` is empty: list at least one value")
        if self.choices is not None and self.log:
            raise ValueError("`log` applies to a range, not to choices: remove `log`, or give low and high")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0 (got {self.low}): raise `low`, or set log: false")
        return self


class TuneConfig(Section):
    """How `ckd-ray tune` searches. Keys of `space` are loss-term names (alpha..epsilon accepted)
    or `temperature`; a key prefixed by a stage number ("2.output") applies to that stage only, a
    bare key to every stage that distills. Each trial is a short student run of the stage's
    distillation steps on the cached teacher signal."""

    mode: Literal["per_stage", "joint"] = "per_stage"
    """per_stage: tune stage 1, run it with its best values, then tune stage 2 from there; joint:
    one search whose trials run every stage's distillation steps in turn."""
    space: dict[str, SearchDimension] = {}
    """The searched dimensions."""
    num_samples: int = Field(4, ge=1)
    """Trials per search."""
    max_steps_per_trial: int = Field(20, ge=1)
    """Optimizer steps of each distillation step a trial runs (ASHA's budget, max_t)."""
    grace_period: int = Field(1, ge=1)
    """ASHA: optimizer steps a trial runs before it can be stopped; trials report this often."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA: fraction 1/reduction_factor of trials promoted per rung."""
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    """Validation metric the search optimizes, measured at the end of each trial."""
    metric_mode: Literal["min", "max"] = "min"
    """Minimize or maximize the metric."""
    searcher: Literal["optuna", "random"] = "optuna"
    """Optuna TPE (falls back to random when optuna is not installed) or random search."""
    max_concurrent_trials: int = Field(1, ge=1)
    """Trials running at once (each holds a student worker group)."""

    @model_validator(mode="after")
    def _consistent(self) -> "TuneConfig":
        expected = {"val_loss": "min", "val_accuracy": "max"}[self.metric]
        if self.metric_mode != expected:
            raise ValueError(f"metric {self.metric} with metric_mode {self.metric_mode} would pick the worst trial: "
                             f"set metric_mode: {expected}")
        if self.grace_period > self.max_steps_per_trial:
            raise ValueError(f"grace_period {self.grace_period} exceeds max_steps_per_trial {self.max_steps_per_trial}, "
                             "so ASHA could never stop a trial: lower grace_period")
        return self
