"""Local runs next to a real `ray start --head` on loopback (the README's `ray job submit` section
starts one). The submitted job itself is tested on two nodes: tests/reliability/test_cluster_job.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def ray_head(ray_cluster):
    """A real head node on loopback (8 logical CPUs, as the README starts it): (job API address, env)."""
    return ray_cluster.start_head(num_cpus=8), ray_cluster.env


LOCAL_NEXT_TO_HEAD = r"""
import ray
from ckd_ray.cascade.session import connect_ray
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


# A library entry point called unconnected must refuse at once; connected through `connect_ray`, the
# same process starts its own Ray and reads a few samples through the Ray Data pipeline.
STALE_ADDRESS_PROBE = r"""
import sys, time
from pathlib import Path
from ckd_ray.errors import RayNotConnectedError
from ckd_ray.data.config import DataConfig
from ckd_ray.data.pipeline import build_student_dataset
from ckd_ray.data.processor import Processor

root, dead = Path(sys.argv[1]), sys.argv[2]
config = DataConfig(benchmark_root=str(root))
processor = Processor.load(str(root / "processor"), num_image_tokens=16)
sources = [s.model_copy(update={"split": "val"}) for s in config.instruction_sources()]
started = time.monotonic()
try:
    build_student_dataset(sources, processor, config, rejects_uri=sys.argv[3] + "/a.jsonl", limit=8)
except RayNotConnectedError as err:
    print(f"REFUSED in {time.monotonic() - started:.1f} s: {err}")

import ray
from ckd_ray.cascade.session import connect_ray
from ckd_ray.config.job import RayConfig
connect_ray(RayConfig(num_cpus=2))
address = ray.get_runtime_context().gcs_address
assert not address.endswith(":" + dead), address
student = build_student_dataset(sources, processor, config, rejects_uri=sys.argv[3] + "/b.jsonl", limit=8)
print("ROWS", sum(len(b["input_ids"]) for b in student.dataset.iter_batches(batch_size=4, batch_format="numpy")))
"""


def test_a_stale_address_file_of_a_dead_head_neither_hangs_nor_is_joined(kvqa_dir, tmp_path, free_ports, random_preset_models):
    """A head killed without `ray stop` leaves Ray's address file naming it. Ray's implicit
    `ray.init()` retries that dead address for minutes; the package never relies on it: a library
    call with no Ray connected says so at once, `connect_ray` starts a Ray of its own, and a short
    `ckd-ray cascade` runs through. The file is planted in a Ray temp folder of this test's own
    (RAY_TMPDIR, short: Ray's socket paths must fit), never the user's /tmp/ray."""
    import tempfile

    (dead,) = free_ports(1)  # nothing listens there
    ray_tmp = tempfile.mkdtemp(prefix="ckd-stale-", dir="/tmp")
    try:
        os.makedirs(f"{ray_tmp}/ray")
        with open(f"{ray_tmp}/ray/ray_current_cluster", "w") as f:
            f.write(f"127.0.0.1:{dead}")
        # As a user's shell has it: Ray's auto-connect on (the suite turns it off), no RAY_ADDRESS.
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_AUTO_CONNECT")}
        env["RAY_TMPDIR"] = ray_tmp
        probe = subprocess.run([sys.executable, "-c", STALE_ADDRESS_PROBE, str(kvqa_dir), str(dead), str(tmp_path)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-3000:]
        assert "REFUSED in" in probe.stdout and "connect_ray" in probe.stdout, probe.stdout
        assert float(probe.stdout.split("REFUSED in ")[1].split(" s")[0]) < 5
        assert "ROWS 8" in probe.stdout, probe.stdout

        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({
            "extends": str(REPO / "configs" / "tiny_cascade.yaml"),
            "name": "stale",
            "data": {"benchmark_root": str(kvqa_dir)},
        "models": random_preset_models,
            "storage": {"root": str(tmp_path / "runs")},
            "cascade": {"prepare_teachers": False, "plan": None, "stages": [{"teacher": "teacher", "steps": ["SFT"]}],
                        "student_alone": False},
            "trainer": {"max_steps": 2, "micro_batch_size": 4, "num_workers": 1, "report_every": 1, "checkpoint_every": 2},
            "evaluation": {"max_samples": 4},
            "ray": {"num_cpus": 4},
        }))
        cascade = subprocess.run([str(Path(sys.executable).parent / "ckd-ray"), "cascade", str(config)],
                                 env=env, capture_output=True, text=True, timeout=480)
        output = cascade.stdout + cascade.stderr
        assert cascade.returncode == 0, output[-4000:]
        assert f":{dead}" not in output, output[-4000:]
        assert (tmp_path / "runs" / "stale" / "report.md").exists()
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
