"""The Ray Data pipeline: the same rows as the single-process loop, a shuffle that is the same for the
same seed, curriculum filters, and rejects collected across tasks with the threshold failing the job."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ckd_ray.data.config import DataConfig, SourceConfig
from ckd_ray.data.pipeline import build_student_dataset, iter_plain_batches
from ckd_ray.data.processor import Processor
from ckd_ray.data.rejects import TooManyRejectsError
from ckd_ray.observability.metrics import DataMetrics
from test_data_readers import BAD_REASONS, _bad_dataset

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def processor(kvqa_dir):
    return Processor.load(kvqa_dir / "processor", num_image_tokens=16)


def collect(batches) -> dict[str, np.ndarray]:
    batches = list(batches)
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def val_sources(config: DataConfig, kind: str = "instructions") -> list[SourceConfig]:
    sources = config.instruction_sources() if kind == "instructions" else config.caption_sources()
    return [s.model_copy(update={"split": "val"}) for s in sources]


def test_ray_pipeline_rows_equal_the_plain_loop(ray_local, kvqa_dir, processor, tmp_path):
    config = DataConfig(benchmark_root=str(kvqa_dir), records_per_read_task=256, preprocess_batch_size=128)
    student = build_student_dataset(val_sources(config), processor, config, rejects_uri=str(tmp_path / "ray.jsonl"), shuffle=False)
    assert student.num_records == 1376 and len(student.plan.tasks) == 6  # read in parallel tasks
    from_ray = collect(student.dataset.iter_batches(batch_size=256, batch_format="numpy"))
    plain = collect(iter_plain_batches(val_sources(config), processor, config, rejects_uri=str(tmp_path / "plain.jsonl"), shuffle=False))
    assert from_ray.keys() == plain.keys()
    for column, values in plain.items():
        np.testing.assert_array_equal(from_ray[column], values, err_msg=column)
    summary = student.close_rejects()
    assert (summary.num_records, summary.num_rejected) == (1376, 0)
    assert (tmp_path / "ray.jsonl").read_text() == ""

    # Limited to a few samples, the pass reads the first task only (no reject allowed: no spare).
    exact = config.model_copy(update={"max_reject_fraction": 0.0})
    short = build_student_dataset(val_sources(exact), processor, exact, rejects_uri=str(tmp_path / "short.jsonl"), shuffle=False, limit=100)
    assert len(short.read_plan.tasks) == 1 and short.read_plan.num_records == 100
    first = collect(short.dataset.iter_batches(batch_size=256, batch_format="numpy"))
    for column, values in plain.items():
        np.testing.assert_array_equal(first[column], values[:100], err_msg=column)


def test_ray_workers_read_s3_json_and_zip_into_the_same_rows(ray_local, s3_bucket, kvqa_dir, processor, tmp_path):
    import zipfile

    from ckd_ray import storage

    zip_path = tmp_path / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for png in sorted((kvqa_dir / "images").glob("*.png")):
            archive.write(png, png.name)
    s3 = f"s3://{s3_bucket}/kvqa"
    storage.write_bytes(f"{s3}/instructions.json", (kvqa_dir / "instructions.json").read_bytes())
    storage.write_bytes(f"{s3}/images.zip", zip_path.read_bytes())
    config = DataConfig(benchmark_root=str(kvqa_dir), records_per_read_task=512)
    remote = SourceConfig(uri=f"{s3}/instructions.json", image_root=f"{s3}/images.zip", split="test")
    # Read tasks run in Ray workers: ranged GETs of the JSON, member reads of the zip; rejects to S3.
    student = build_student_dataset([remote], processor, config, rejects_uri=f"{s3}/run/rejects.jsonl", shuffle=False)
    from_s3 = collect(student.dataset.iter_batches(batch_size=256, batch_format="numpy"))
    local = [s.model_copy(update={"split": "test"}) for s in config.instruction_sources()]
    plain = collect(iter_plain_batches(local, processor, config, rejects_uri=str(tmp_path / "plain.jsonl"), shuffle=False))
    for column, values in plain.items():
        np.testing.assert_array_equal(from_s3[column], values, err_msg=column)
    assert student.close_rejects().num_rejected == 0
    assert storage.read_bytes(f"{s3}/run/rejects.jsonl") == b""


def test_ray_shuffle_is_deterministic_by_seed_and_respects_curriculum(ray_local, kvqa_dir, processor, tmp_path):
    def run(seed: int, hops=None, kind="captions") -> dict[str, np.ndarray]:
        config = DataConfig(benchmark_root=str(kvqa_dir), shuffle_seed=seed, records_per_read_task=64)
        student = build_student_dataset(val_sources(config, kind), processor, config, rejects_uri=str(tmp_path / f"{seed}.jsonl"), hops=hops)
        return collect(student.dataset.iter_batches(batch_size=64, batch_format="numpy"))

    first, again, other = (run(seed)["sample_id"].tolist() for seed in (0, 0, 1))
    assert first == again
    assert first != other and sorted(first) == sorted(other) and first != sorted(first)

    stage = run(0, hops=(0, 1), kind="instructions")
    counts = json.loads((kvqa_dir / "summary.json").read_text())["counts"]
    assert len(stage["hop"]) == counts["  hop 0"]["val"] + counts["  hop 1"]["val"]
    assert set(stage["hop"].tolist()) == {0, 1}


def test_ray_rejects_reach_one_file_and_the_threshold_fails_the_job(ray_local, kvqa_dir, processor, tmp_path):
    good = [r for r in json.loads((kvqa_dir / "instructions.json").read_text()) if r["split"] == "val"][:40]
    raw = _bad_dataset(kvqa_dir, tmp_path, good)
    (tmp_path / "data.json").write_bytes(b"[\n" + b",\n".join(raw.values()) + b"\n]")
    source = SourceConfig(uri=str(tmp_path / "data.json"), image_root=str(tmp_path / "images"), name="bad-set")
    # Small read tasks and batches: rejects arrive from several tasks at once.
    config = DataConfig(benchmark_root=str(kvqa_dir), max_reject_fraction=0.5, records_per_read_task=8, preprocess_batch_size=4)
    tally, metrics = tallied_data_metrics(ray_local, "job", "stage", "DFT")
    student = build_student_dataset([source], processor, config, rejects_uri=str(tmp_path / "rejects.jsonl"), metrics=metrics)
    rows = student.dataset.take_all()
    assert sorted(r["sample_id"] for r in rows) == sorted(r["id"] for r in good)
    # The dashboards' data panels: every preprocessing task counted what it kept and rejected.
    counts = ray_local.get(tally.counts.remote())
    assert counts.pop(("ckd_data_samples_total", "")) == len(good)
    assert counts == {("ckd_data_rejected_total", reason): n for reason, n in Counter(BAD_REASONS.values()).items()}
    summary = student.close_rejects()
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert summary.num_rejected == len(rejects) == len(BAD_REASONS)
    assert {k: next(r for r in rejects if f'"id": "{k}"' in r["record"])["reason"] for k in BAD_REASONS} == BAD_REASONS
    # A second pass over the same dataset rejects the same records: counted once, not twice.
    student.dataset.take_all()
    assert student.close_rejects().num_rejected == len(BAD_REASONS)

    # A pass limited to n samples reads only a prefix of the plan, and still gives the same first n
    # good samples as the whole pass: the prefix has room for every reject the threshold allows.
    for limit in (1, 12, 30):
        short = build_student_dataset([source], processor, config, rejects_uri=str(tmp_path / f"short{limit}.jsonl"), limit=limit)
        assert [r["sample_id"] for r in short.dataset.take_all()] == [r["sample_id"] for r in rows[:limit]]
        assert short.read_plan.num_records == min(limit + int(0.5 * len(raw)), len(raw))

    strict = config.model_copy(update={"max_reject_fraction": 0.05})
    failing = build_student_dataset([source], processor, strict, rejects_uri=str(tmp_path / "strict.jsonl"))
    with pytest.raises(TooManyRejectsError) as raised:  # raised in a task, re-raised on the driver
        failing.dataset.take_all()
    message = str(raised.value)
    assert raised.value.num_rejected > 0.05 * len(raw) and "records rejected" in message
    assert "data.max_reject_fraction=0.05" in message and str(tmp_path / "strict.jsonl") in message
    assert (tmp_path / "strict.jsonl").read_text()



def tallied_data_metrics(ray, *labels: str):
    """DataMetrics whose increments also reach a Ray actor that sums them per metric and reason,
    so the test can read back what the preprocessing tasks recorded. (Defined in a function, so
    Ray pickles the classes by value: workers cannot import this test module.)"""

    class Tally:
        def __init__(self):
            self.totals = Counter()

        def add(self, name: str, value: float, reason: str) -> None:
            self.totals[name, reason] += value

        def counts(self) -> dict:
            return dict(self.totals)

    class TalliedDataMetrics(DataMetrics):
        def __init__(self, tally, *labels: str):
            super().__init__(*labels)
            self.tally = tally

        def _inc(self, spec, value, **extra):
            super()._inc(spec, value, **extra)
            if value > 0:
                ray.get(self.tally.add.remote(spec.name, value, extra.get("reason", "")))

    tally = ray.remote(Tally).remote()
    return tally, TalliedDataMetrics(tally, *labels)
