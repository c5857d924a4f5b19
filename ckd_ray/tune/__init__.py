"""Ray Tune search over the loss weights and temperature of each cascade stage (`run_tune` in
`ckd_ray.tune.runner`), each trial a short student run on the cached teacher signal."""

from ckd_ray.config.tune import SearchDimension, TuneConfig

__all__ = ["SearchDimension", "TuneConfig"]
