"""Manifests and checkpoints carry the sha256 of what was written: a truncated or corrupted file
is refused with its path, never loaded in part; files from before checksums still load."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from ckd_ray.cascade.manifest import CorruptManifestError, Manifest
from ckd_ray.config import validate_config
from ckd_ray.train.checkpoint import (
    CHECKSUM_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    TrainState,
    read_state,
    write_checksums,
)


@pytest.fixture
def job(tmp_path):
    return validate_config({"name": "checksums", "data": {"benchmark_root": str(tmp_path / "kvqa")},
                            "storage": {"root": str(tmp_path / "runs")}})


@pytest.fixture
def manifest(job):
    manifest = Manifest.open(job.run_uri, job)
    manifest.roles["student"] = "runs/checksums/steps/00/model"
    manifest.record("00-s1-teacher_to_student-DFT", status="done", metrics={"val_loss": 5.73, "lr": 2e-3})
    return manifest


def _flip_a_byte(path, needle: bytes, replacement: bytes) -> None:
    data = path.read_bytes()
    assert data.count(needle) == 1
    path.write_bytes(data.replace(needle, replacement))


def test_manifest_round_trips_with_its_checksum(job, manifest):
    with open(manifest.uri) as file:
        assert len(json.load(file)["sha256"]) == 64
    reopened = Manifest.open(job.run_uri, job)
    assert (reopened.steps, reopened.roles) == (manifest.steps, manifest.roles)
    assert reopened.done("00-s1-teacher_to_student-DFT")


def test_corrupted_manifest_is_refused_with_its_path(job, manifest):
    from pathlib import Path

    _flip_a_byte(Path(manifest.uri), b'"done"', b'"dune"')  # still valid JSON: only the checksum sees it
    with pytest.raises(CorruptManifestError, match=f"{manifest.uri} does not match the sha256"):
        Manifest.open(job.run_uri, job)


def test_truncated_manifest_is_refused_with_its_path(job, manifest):
    from pathlib import Path

    path = Path(manifest.uri)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptManifestError, match=f"{manifest.uri} is not valid JSON.*truncated"):
        Manifest.open(job.run_uri, job)


def test_manifest_from_before_checksums_still_opens(job, manifest):
    from pathlib import Path

    path = Path(manifest.uri)
    data = json.loads(path.read_text())
    del data["sha256"]
    path.write_text(json.dumps(data, indent=2))
    reopened = Manifest.open(job.run_uri, job)
    assert reopened.steps == manifest.steps
    reopened.save()  # rewritten with a checksum
    assert "sha256" in json.loads(path.read_text())


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder as `write_checkpoint` leaves it: tensors, train state, then checksums."""
    directory = tmp_path / "step-0000003"
    (directory / "model").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({"w.exp_avg": torch.randn(64, 64, generator=generator)}, str(directory / OPTIMIZER_FILE))
    save_file({"w": torch.randn(64, 64, generator=generator)}, str(directory / "model" / "model.safetensors"))
    state = TrainState(step=3, epoch=0, batches_in_epoch=3, samples_seen=12, num_workers=1, micro_batch_size=4)
    (directory / STATE_FILE).write_text(state.to_json())
    write_checksums(directory)
    return directory, state


def test_checkpoint_checksums_cover_every_file(checkpoint):
    directory, state = checkpoint
    recorded = json.loads((directory / CHECKSUM_FILE).read_text())["sha256"]
    assert sorted(recorded) == ["model/model.safetensors", OPTIMIZER_FILE, STATE_FILE]
    assert read_state(directory) == state


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_file_is_refused_with_its_path(checkpoint, damage):
    directory, _ = checkpoint
    path = directory / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit of one weight: safetensors itself would load it
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-100]))
    else:
        path.unlink()
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        read_state(directory)


def test_checkpoint_from_before_checksums_still_loads(checkpoint):
    directory, state = checkpoint
    (directory / CHECKSUM_FILE).unlink()
    assert read_state(directory) == state


def test_a_file_added_beside_the_recorded_ones_is_not_an_error(checkpoint):
    directory, state = checkpoint
    (directory / ".metadata.json").write_text("{}")  # as a storage layer may add
    assert read_state(directory) == state


def _write_checkpoint(directory, step_id: str, step: int) -> TrainState:
    (directory / "model").mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    save_file({"w.exp_avg": torch.randn(8, 8, generator=generator)}, str(directory / OPTIMIZER_FILE))
    save_file({"w": torch.randn(8, 8, generator=generator)}, str(directory / "model" / "model.safetensors"))
    state = TrainState(step_id=step_id, step=step, epoch=0, batches_in_epoch=step, samples_seen=4 * step, num_workers=1,
                       micro_batch_size=4)
    (directory / STATE_FILE).write_text(state.to_json())
    write_checksums(directory)
    return state


@pytest.fixture
def run_folder(tmp_path):
    """A Train run folder as a two-step group leaves it (checkpoints kept: the last of step 00 and
    two of step 01): `<run>/<step id>/step-NNNNNNN`, each with its checksums."""
    run = tmp_path / "train"
    states = {}
    for step_id, step in [("00-a-PT", 20), ("01-a-FT", 10), ("01-a-FT", 20)]:
        states[(step_id, step)] = _write_checkpoint(run / step_id / f"step-{step:07d}", step_id, step)
    return run, states


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(run_folder):
    from ray.train import Checkpoint

    from ckd_ray.train.checkpoint import resume_checkpoint

    run, states = run_folder
    latest = run / "01-a-FT" / "step-0000020"
    (latest / "model" / "model.safetensors").write_bytes(b"cut")
    lines = []
    checkpoint, state = resume_checkpoint(Checkpoint(str(latest)), ["00-a-PT/", "01-a-FT/"], log=lines.append)
    assert checkpoint.path == str(run / "01-a-FT" / "step-0000010")
    assert state == states[("01-a-FT", 10)]
    assert len(lines) == 1 and str(latest / "model" / "model.safetensors") in lines[0] and checkpoint.path in lines[0]

    # The step's earlier checkpoint damaged too: the previous step's last one (that step is then
    # finished, and the damaged step starts over from its initial model).
    (run / "01-a-FT" / "step-0000010" / STATE_FILE).write_text("{}")
    checkpoint, state = resume_checkpoint(Checkpoint(str(latest)), ["00-a-PT/", "01-a-FT/"], log=lines.append)
    assert (checkpoint.path, state) == (str(run / "00-a-PT" / "step-0000020"), states[("00-a-PT", 20)])


def test_no_good_checkpoint_left_is_a_clear_error_naming_each(run_folder):
    from ray.train import Checkpoint

    from ckd_ray.train.checkpoint import resume_checkpoint

    run, _ = run_folder
    damaged = sorted(run.glob("*/step-*"))
    for directory in damaged:
        (directory / OPTIMIZER_FILE).write_bytes(b"")
    with pytest.raises(CorruptCheckpointError) as refused:
        resume_checkpoint(Checkpoint(str(damaged[-1])), ["00-a-PT/", "01-a-FT/"], log=lambda line: None)
    message = str(refused.value)
    assert all(str(directory / OPTIMIZER_FILE) in message for directory in damaged)
    assert "--set name=" in message


def test_a_good_latest_checkpoint_is_used_as_it_is(run_folder):
    from ray.train import Checkpoint

    from ckd_ray.train.checkpoint import resume_checkpoint

    run, states = run_folder
    lines = []
    latest = str(run / "01-a-FT" / "step-0000020")
    checkpoint, state = resume_checkpoint(Checkpoint(latest), ["00-a-PT/", "01-a-FT/"], log=lines.append)
    assert (checkpoint.path, state, lines) == (latest, states[("01-a-FT", 20)], [])


# --- signal cache parts: the marker records each part's sha256, checked as the part is read ------


@pytest.fixture
def cache_entry(ray_local, tmp_path):
    """A real cache entry written by Ray Data: two Parquet parts and the marker."""
    import ray.data

    from ckd_ray.teachers.cache import SignalCache

    cache = SignalCache(str(tmp_path / "cache"))
    rows = [{"sample_id": f"s{i:03d}", "sig": [float(i)] * 8} for i in range(64)]
    entry = cache.write(ray.data.from_items(rows, override_num_blocks=2), "t0-s0-d0", {})
    return cache, entry, rows


@pytest.mark.ray
def test_cache_entry_reads_back_through_its_checksums(cache_entry):
    cache, entry, rows = cache_entry
    assert len(entry["sha256"]) == 2
    read = sorted(cache.read("t0-s0-d0").take_all(), key=lambda row: row["sample_id"])
    assert [row["sample_id"] for row in read] == [row["sample_id"] for row in rows]


@pytest.mark.ray
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_part_is_refused_with_its_path(cache_entry, tmp_path, damage):
    cache, entry, _ = cache_entry
    part = tmp_path / "cache" / "t0-s0-d0" / entry["parts"] / sorted(entry["sha256"])[0]
    data = bytearray(part.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-200:]
    part.write_bytes(bytes(data))
    if damage == "truncate":  # without its footer the part fails the listing, which names it
        with pytest.raises(Exception, match=re.escape(str(part))):
            cache.read("t0-s0-d0").take_all()
        return
    with pytest.raises(Exception, match=f"signal cache part {part} does not match the sha256") as raised:
        cache.read("t0-s0-d0").take_all()
    assert "CorruptCacheEntry" in str(raised.value)  # Ray wraps the error of the read task


@pytest.mark.ray
def test_cache_entry_from_before_checksums_still_reads(cache_entry, tmp_path):
    from ckd_ray.teachers.cache import MARKER

    cache, entry, rows = cache_entry
    marker = tmp_path / "cache" / "t0-s0-d0" / MARKER
    marker.write_text(json.dumps({key: value for key, value in entry.items() if key != "sha256"}))
    assert len(cache.read("t0-s0-d0").take_all()) == len(rows)


@pytest.mark.ray
def test_cache_entry_missing_a_part_is_refused_before_any_read(cache_entry, tmp_path):
    from ckd_ray.teachers.cache import CorruptCacheEntry

    cache, entry, _ = cache_entry
    missing = sorted(entry["sha256"])[1]
    (tmp_path / "cache" / "t0-s0-d0" / entry["parts"] / missing).unlink()
    with pytest.raises(CorruptCacheEntry, match=f"missing: {missing}"):
        cache.read("t0-s0-d0")
