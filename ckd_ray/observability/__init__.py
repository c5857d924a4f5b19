"""Metrics of the teacher pools, student workers, data pipeline and cascade, exported through Ray's
Prometheus endpoint (importing this package does not import Ray)."""

from ckd_ray.observability.metrics import (
    ALL_METRICS,
    CascadeMetrics,
    DataMetrics,
    GpuSampler,
    MetricSpec,
    StudentMetrics,
    TeacherPoolMetrics,
    exported_name,
    ray_connected,
)

__all__ = [
    "ALL_METRICS", "CascadeMetrics", "DataMetrics", "GpuSampler", "MetricSpec", "StudentMetrics",
    "TeacherPoolMetrics", "exported_name", "ray_connected",
]
