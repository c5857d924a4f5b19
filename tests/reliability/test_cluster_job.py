"""`ray job submit` of the tiny cascade onto a two-node cluster on loopback, as a new user would
run it (README, "`ray job submit`"): a head started as the README starts it, one more node
joined with `ray start --address`, the teacher pool and the student workers pinned to different
nodes by custom resources, and the signal cache on S3 (moto with authentication on). A healthy
run logs no errors, and the S3 credentials it used appear nowhere: not in the job's output, the
run's files, its log, the cache on S3, or Ray's session logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# What a log of a healthy run never holds: a traceback, an error Ray printed for a task nobody
# waited on (the 'Handlers' object is not callable case), an ERROR-level line.
ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|Unhandled error|\bERROR\b|\w+Error: ")


def _ray_json(*args: str, address: str, env: dict) -> list[dict]:
    done = subprocess.run([RAY, *args, "--address", address, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout)


def _files_holding(root: Path, needle: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def test_job_on_two_nodes_logs_no_error_and_never_shows_its_s3_credentials(ray_cluster, authenticated_s3, kvqa_dir, tmp_path,
                                                                             random_preset_models):
    s3 = authenticated_s3
    ray_cluster.env.update(s3.env())  # the nodes' processes, the job among them, inherit the credentials
    address = ray_cluster.start_head(num_cpus=8, resources={"student_node": 4})  # as the README starts it, plus a label
    ray_cluster.add_node(num_cpus=2, resources={"teacher_node": 4})
    runs = tmp_path / "runs"
    cache = f"s3://{s3.bucket}/two-nodes-cache"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "tiny_cascade.yaml"),
        "name": "submitted",
        "data": {"benchmark_root": str(kvqa_dir)},
        "models": random_preset_models,
        "storage": {"root": str(runs), "signal_cache": cache},
        # One distillation step: a teacher pass on the teacher node, then the student's worker group.
        "cascade": {"plan": None, "prepare_teachers": False, "stages": [{"teacher": "teacher", "steps": ["DFT"]}], "student_alone": False},
        "teacher_pool": {"resources": {"teacher_node": 1}},
        "trainer": {"max_steps": 3, "micro_batch_size": 4, "num_workers": 1, "report_every": 1, "resources": {"student_node": 1}},
        "evaluation": {"max_samples": 16},
    }))
    result = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
         "python", "jobs/cascade_job.py", str(config)],
        env=ray_cluster.env, capture_output=True, text=True, timeout=900,
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

    # The pool ran on the teacher node and the student worker on the head, as the resources say.
    nodes = {node["node_id"]: node for node in _ray_json("list", "nodes", address=address, env=ray_cluster.env)}
    teacher_node = next(nid for nid, node in nodes.items() if "teacher_node" in node["resources_total"])
    actors = _ray_json("list", "actors", "--detail", "--limit", "10000", address=address, env=ray_cluster.env)
    placed = {(f'{actor["class_name"]} {actor.get("repr_name") or ""}', actor["node_id"]) for actor in actors}
    teacher_actors = {nid for name, nid in placed if "TeacherActor" in name}
    train_workers = {nid for name, nid in placed if name.startswith("RayTrainWorker")}
    assert teacher_actors == {teacher_node}, placed
    assert train_workers and teacher_node not in train_workers, placed

    # A healthy run logs no errors: the job's output and the run's own log file.
    logs = sorted((runs / "submitted" / "logs").glob("driver-*.log"))
    assert logs, "the run wrote no log file"
    for name, text in [("job output", output), *((str(path), path.read_text(errors="replace")) for path in logs)]:
        errors = [line for line in text.splitlines() if ERROR_LINE.search(line)]
        assert not errors, f"{name} has {len(errors)} error lines, e.g.:\n" + "\n".join(errors[:5])

    # The credentials appear nowhere: job output, run folder, the cache on S3, Ray's session logs.
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.access_key_id,
                          aws_secret_access_key=s3.secret_access_key)
    cache_objects = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="two-nodes-cache/")
                     for obj in page.get("Contents", [])]
    assert any(key.endswith(".parquet") for key in cache_objects), cache_objects  # the run did use S3
    for secret in (s3.secret_access_key, s3.access_key_id):
        assert secret not in output
        assert _files_holding(runs, secret) == []
        assert _files_holding(Path(ray_cluster.temp_dir), secret) == []
        leaked = [key for key in cache_objects if secret.encode() in client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()]
        assert leaked == []
