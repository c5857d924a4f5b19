"""`ray job submit` against a real `ray start --head` on loopback, exactly as the README shows."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real head node on loopback with its own ports and temp folder. Teardown ends only the
    processes of this cluster (their command lines name its temp folder): `ray stop` would end
    every Ray cluster on the machine, including the test session's."""
    # As after `source .venv/bin/activate`: the job's `python` is the one with the dependencies.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"  # the head's token auth; `ray job submit` finds the token itself
    dashboard_port = _free_port()
    temp_dir = Path("/tmp") / f"ckd-ray-head-{os.getpid()}-{dashboard_port}"  # socket paths must stay short
    command = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "8",
        "--temp-dir", str(temp_dir), "--include-dashboard", "true",
        "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        "--ray-client-server-port", str(_free_port()), "--disable-usage-stats",
    ]
    try:
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        for sig in ("TERM", "KILL"):
            subprocess.run(["pkill", f"-{sig}", "-f", str(temp_dir)], check=False)
            time.sleep(3)


def test_cascade_job_submitted_to_a_real_head(ray_head, kvqa_dir, tmp_path):
    address, env = ray_head
    runs = tmp_path / "runs"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "tiny_cascade.yaml"),
        "name": "submitted",
        "data": {"benchmark_root": str(kvqa_dir)},
        "storage": {"root": str(runs)},
        # One distillation step: the job runs a teacher pool, a Train worker group, evaluation and the report.
        "cascade": {"plan": None, "prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}]},
        "trainer": {"max_steps": 2, "micro_batch_size": 4, "num_workers": 1, "report_every": 1},
        "evaluation": {"max_samples": 16},
    }))
    result = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
         "python", "jobs/cascade_job.py", str(config)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    report = re.search(r"report: (\S+)", output)
    assert report, output[-2000:]
    assert Path(report.group(1)).exists()
    manifest = json.loads((runs / "submitted" / "manifest.json").read_text())
    assert [entry["status"] for entry in manifest["steps"].values()] == ["done"]
    assert Path(manifest["roles"]["student"], "model.safetensors").exists()


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
