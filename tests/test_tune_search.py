"""A real Ray Tune search on CPU: two stages, ASHA, trials on the cached teacher signal."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from ckd_ray import storage
from ckd_ray.config import load_config, validate_config
from ckd_ray.cascade.datasets import StepData
from ckd_ray.cascade.session import initial_checkpoints
from ckd_ray.cascade.manifest import Manifest
from ckd_ray.tune.report import RESULTS_CSV
from ckd_ray.tune.runner import _search, run_tune
from ckd_ray.tune.space import plan_searches

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _job(kvqa_dir, root: Path, **tune):
    return validate_config({
        "name": "tune-e2e",
        "seed": 0,
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}, "teacher": {"preset": "tiny-teacher"}},
        "data": {"benchmark_root": str(kvqa_dir), "max_length": 128},
        # bottom-up (TA -> S, then T -> S), one distillation step per stage, teachers as built
        "cascade": {"prepare_teachers": False,
                    "stages": [{"teacher": "ta", "steps": ["DFT"]}, {"teacher": "teacher", "steps": ["DFT"]}]},
        "signal": {"response_top_k": 8, "visual_top_k": 8, "gram": True},
        "teacher_pool": {"num_cpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 16},
        "trainer": {"num_workers": 1, "zero_stage": 0, "micro_batch_size": 4, "lr": {"DFT": 3.0e-3},
                    "max_steps": 4, "warmup_ratio": 0.0, "report_every": 2},
        "storage": {"root": str(root)},
        "tune": {
            "mode": "per_stage", "num_samples": 4, "max_steps_per_trial": 4, "max_concurrent_trials": 2,
            # One ASHA rung at step 2: a trial below the best quarter of those recorded there stops.
            "grace_period": 2, "reduction_factor": 4,
            "space": {"alpha": {"low": 0.05, "high": 2.0, "log": True}, "beta": {"low": 0.05, "high": 2.0, "log": True},
                      "temperature": {"choices": [1.0, 4.0]}},
            **tune,
        },
    })


def test_per_stage_search_reuses_one_teacher_pass_per_stage(ray_local, kvqa_dir, tmp_path):
    job = _job(kvqa_dir, tmp_path / "runs")
    lines: list[str] = []
    outcome = run_tune(job, log=lines.append)

    assert [o.search.name for o in outcome.searches] == ["stage 1", "stage 2"]
    for search in outcome.searches:
        assert len(search.rows) == 4
        assert all(row["status"] != "failed" for row in search.rows), [row["error"] for row in search.rows]
        # The teacher pool ran once for the stage (before its search); every trial read the cache.
        assert search.signal["driver_teacher_passes"] == 1
        assert search.signal["trial_teacher_passes"] == 0
        assert search.signal["trial_cache_hits"] == 4
    # Stage 1 was then trained in full with its best values: again from the cache.
    assert outcome.searches[0].signal["driver_cache_hits"] == 1
    cache = storage.parse(job.signal_cache_uri).path
    assert len(list(Path(cache).glob("*/_COMPLETE.json"))) == 2

    rows = [row for search in outcome.searches for row in search.rows]
    stopped = [row for row in rows if row["status"] == "stopped early"]
    assert stopped, "ASHA stopped no trial"
    assert all(row["steps"] < job.tune.max_steps_per_trial for row in stopped)
    finished = [row for row in rows if row["status"] == "finished"]
    assert all(row["steps"] == 4 and row["val_loss"] > 0 for row in finished)
    assert sum(line.startswith("[tune stage") and "step" in line for line in lines) >= len(rows)

    tune_dir = Path(storage.parse(outcome.tune_uri).path)
    with open(tune_dir / RESULTS_CSV) as handle:
        table = list(csv.DictReader(handle))
    assert sorted((r["search"], r["trial_id"]) for r in table) == sorted((r["search"], r["trial_id"]) for r in rows)
    assert {r["status"] for r in table} >= {"finished", "stopped early"}

    best = load_config(tune_dir / "best_config.yaml")
    assert best.name == "tune-e2e-tuned"
    for stage_index, stage in enumerate(best.cascade.stages):
        values = outcome.best_values[stage_index]
        assert stage.loss.weights.task == pytest.approx(values["task"])
        assert stage.loss.weights.output == pytest.approx(values["output"])
        assert stage.loss.temperature == values["temperature"]
        best_row = min((r for r in outcome.searches[stage_index].rows if r["status"] == "finished"), key=lambda r: r["val_loss"])
        assert best_row["values"][f"{stage_index + 1}.output"] == pytest.approx(values["output"])

    report = (tune_dir / "tune_report.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report):
        assert (tune_dir / image).stat().st_size > 0
    assert len(re.findall(r"\.png\)", report)) == 2


def test_a_failing_trial_is_reported_and_the_search_goes_on(ray_local, kvqa_dir, tmp_path):
    # Without the cache each trial asks the teacher itself; a learner directory that does not
    # exist makes every trial raise before training.
    job = _job(kvqa_dir, tmp_path / "runs", num_samples=2)
    job = job.model_copy(update={"teacher_pool": job.teacher_pool.model_copy(update={"use_cache": False})})
    tune_uri = storage.join(job.run_uri, "tune")
    data = StepData(job, tune_uri)
    manifest = Manifest.open(tune_uri, job)
    initial_checkpoints(job, manifest, data.processor_uri, tune_uri, print)
    roles = {**manifest.roles, "student": str(tmp_path / "missing-student")}
    lines = []
    outcome = _search(job, plan_searches(job)[0], roles, data, tune_uri, lines.append)
    assert [row["status"] for row in outcome.rows] == ["failed", "failed"]
    assert all(row["error"] for row in outcome.rows)
    assert outcome.best_values is None
    # The console's line for the first failure names the cause, not only that a trial failed.
    (first,) = [line for line in lines if " failed: " in line][:1]
    assert "missing-student" in first, lines


@pytest.mark.stage2
def test_a_five_weight_search_over_the_hop_stages_writes_a_best_config_the_cascade_accepts(ray_local, kvqa_dir, tmp_path):
    """configs/tiny_tune_weights.yaml in small, its joint mode: beta..epsilon and T of each hop
    stage of the progressive plan in one search (alpha fixed). The per-stage mode's search
    machinery is the first test's; `--run-best` (the tuned cascade beside the untuned one) is
    the README test's `ckd-ray tune configs/tiny_tune.yaml --run-best`."""
    from click.testing import CliRunner

    from ckd_ray.cli import main

    raw = load_config(Path(__file__).parent.parent / "configs" / "tiny_tune_weights.yaml").model_dump(mode="json", exclude_defaults=True)
    job = validate_config({
        **raw,
        "name": "five-weights",
        "models": {role: {"preset": f"tiny-{role}"} for role in ("student", "ta", "teacher")},
        "data": {**raw["data"], "benchmark_root": str(kvqa_dir)},
        "cascade": {"plan": "progressive", "prepare_teachers": False},
        "teacher_pool": {"num_cpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 16},
        "trainer": {"num_workers": 1, "zero_stage": 0, "micro_batch_size": 4, "max_steps": 2, "warmup_ratio": 0.0, "report_every": 1},
        "evaluation": {"max_samples": 8, "latency_runs": 1, "max_new_tokens": 2},
        "tune": {**raw["tune"], "mode": "joint", "num_samples": 2, "max_steps_per_trial": 2, "grace_period": 1},
        "storage": {"root": str(tmp_path / "runs")},
    })
    outcome = run_tune(job, log=lambda _: None, log_to_driver=False)

    (search,) = outcome.searches
    assert len(search.rows) == 2 and all(row["status"] != "failed" for row in search.rows)
    assert {key for row in search.rows for key in row["values"]} == {
        f"{stage}.{name}" for stage in (1, 2, 3) for name in ("output", "feature", "knowledge", "attention", "temperature")}
    tune_dir = Path(storage.parse(outcome.tune_uri).path)
    best_path = tune_dir / "best_config.yaml"
    best = load_config(best_path)
    for stage_index, stage in enumerate(best.cascade.stages):
        values = outcome.best_values[stage_index]
        assert stage.loss.weights.task == 1.0  # alpha is not searched
        assert (stage.loss.weights.feature, stage.loss.weights.knowledge) == (pytest.approx(values["feature"]), pytest.approx(values["knowledge"]))
        assert stage.hop_levels == [[0], [0, 1], [0, 1, 2]][stage_index]
    checked = CliRunner().invoke(main, ["config", "check", str(best_path)])
    assert checked.exit_code == 0 and "OK: job 'five-weights-tuned'" in checked.output
