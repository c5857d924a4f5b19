"""Ray Tune search over loss weights and temperature, per cascade stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckd_ray.config.base import Section


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


class TuneConfig(Section):
    """How `ckd-ray tune` searches. Keys of `space` are loss-term names (alpha..epsilon accepted)
    or `temperature`; in joint mode they are prefixed by the stage index ("1.output")."""

    mode: Literal["per_stage", "joint"] = "per_stage"
    """per_stage: tune stage 1, fix its best, then stage 2; joint: one space over all stages."""
    space: dict[str, SearchDimension] = {}
    """The searched dimensions."""
    num_samples: int = Field(4, ge=1)
    """Trials per search."""
    max_steps_per_trial: int = Field(20, ge=1)
    """Optimizer steps of each trial's short student run (the ASHA budget)."""
    grace_period: int = Field(1, ge=1)
    """ASHA: reports before a trial can be stopped."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA: fraction 1/reduction_factor of trials promoted per rung."""
    metric: str = "val_loss"
    """Reported metric the search optimizes."""
    metric_mode: Literal["min", "max"] = "min"
    """Minimize or maximize the metric."""
    searcher: Literal["optuna", "random"] = "optuna"
    """Optuna TPE (falls back to random when optuna is not installed) or random search."""
    max_concurrent_trials: int = Field(1, ge=1)
    """Trials running at once (each holds a student worker group)."""
