"""Metrics export."""

from __future__ import annotations

from pydantic import Field

from ckd_ray.section import Section


class ObservabilityConfig(Section):
    """Custom metrics go through Ray's metrics pipeline (`ray.util.metrics`, exported with a
    `ray_` prefix on each node's metrics port) to Prometheus and the Grafana dashboards."""

    enabled: bool = True
    """Record the teacher-pool, student and data metrics."""
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    """Port of the local Ray's Prometheus endpoint (local Ray only; None = Ray's choice)."""
    gpu_poll_seconds: float = Field(5.0, gt=0.0)
    """Interval of the per-process GPU utilization/memory sampler (no-op without a GPU)."""
