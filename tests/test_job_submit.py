"""Local runs next to a real `ray start --head` on loopback (the README's `ray job submit` section
starts one). The submitted job itself is tested on two nodes: tests/reliability/test_cluster_job.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def ray_head(ray_cluster):
    """A real head node on loopback (8 logical CPUs, as the README starts it): (job API address, env)."""
    return ray_cluster.start_head(num_cpus=8), ray_cluster.env


LOCAL_NEXT_TO_HEAD = r"""
import ray
from ckd_ray.cascade.runner import connect_ray
from ckd_ray.config.job import RayConfig
connect_ray(RayConfig(num_cpus=3))
print("CPUS", ray.cluster_resources().get("CPU"))
"""


def test_local_run_next_to_a_running_head_starts_its_own_ray(ray_head):
    """After `ray start --head` (as the README's job-submit section does), a local run neither
    dies on `num_cpus` nor joins that head: it starts its own local Ray, sized by its config."""
    _, env = ray_head
    completed = subprocess.run([sys.executable, "-c", LOCAL_NEXT_TO_HEAD], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "CPUS 3.0" in completed.stdout  # the head has 8
