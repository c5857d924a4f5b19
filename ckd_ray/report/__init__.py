"""Run reports: a Markdown page per job with tables and PNG plots, next to its manifest."""

from ckd_ray.report.markdown import write_report

__all__ = ["write_report"]
