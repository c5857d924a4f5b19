"""The tune section, its search spaces, the best config it writes and the results table (no Ray)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from ckd_ray.config import ConfigError, load_config, validate_config
from ckd_ray.tune.checks import check_tune
from ckd_ray.tune.report import RESULTS_CSV, write_tune_report
from ckd_ray.tune.runner import SearchOutcome, best_config
from ckd_ray.tune.space import Search, plan_searches, signal_step, stage_values, trial_step, tuned_stage
from ckd_ray.cascade.plan import build_plan

CONFIGS = Path(__file__).parent.parent / "configs"


def _raw(**tune) -> dict:
    return {
        "name": "tune-unit",
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}, "teacher": {"preset": "tiny-teacher"}},
        "data": {"benchmark_root": "data/kvqa"},
        "cascade": {"plan": "bottom_up", "prepare_teachers": False},
        "signal": {"response_top_k": 8, "visual_top_k": 8},
        "tune": {"space": {"beta": {"low": 0.1, "high": 2.0, "log": True}, "temperature": {"choices": [1.0, 2.0]}}, **tune},
    }


def test_bare_keys_apply_to_every_distilling_stage_and_aliases_resolve():
    job = validate_config(_raw())
    searches = plan_searches(job)
    assert [s.name for s in searches] == ["stage 1", "stage 2"]
    assert list(searches[0].dims) == ["1.output", "1.temperature"]
    assert searches[1].terms(1) == {"output"}


def test_prefixed_key_overrides_the_bare_one_for_its_stage_and_joint_merges_stages():
    raw = _raw(mode="joint")
    raw["tune"]["space"]["2.temperature"] = {"choices": [4.0]}
    job = validate_config(raw)
    (search,) = plan_searches(job)
    assert search.name == "joint" and search.stage_indices == (0, 1)
    assert search.dims["1.temperature"].choices == [1.0, 2.0]
    assert search.dims["2.temperature"].choices == [4.0]
    assert stage_values({"1.output": 0.5, "2.output": 1.5, "2.temperature": 4.0}, 1) == {"output": 1.5, "temperature": 4.0}


def test_trial_values_reach_the_step_loss_but_not_the_signal_spec():
    job = validate_config(_raw())
    planned = next(p for p in build_plan(job) if p.kind == "DFT")
    tuned = trial_step(planned, {"output": 0.25, "temperature": 2.0}, job.loss)
    assert tuned.loss.weights.output == 0.25 and tuned.loss.temperature == 2.0
    assert tuned.loss.weights.visual_kl == 1.0  # unsearched terms keep the LLaVA-KD default
    assert tuned.step_id == planned.step_id and tuned.step.kind == "DFT"
    # A trial that turns a searched term off still reads the signal every trial shares.
    off = trial_step(planned, {"output": 0.0}, job.loss)
    assert signal_step(off, {"output"}).loss.weights.output > 0


def test_step_level_loss_override_is_tuned_too():
    job = validate_config(_raw())
    stage = job.cascade.resolved_stages()[0].model_copy(deep=True)
    stage.steps[2].loss = job.loss.model_copy()
    tuned = tuned_stage(job.loss, stage, {"output": 0.3})
    assert tuned.loss.weights.output == 0.3 and tuned.steps[2].loss.weights.output == 0.3
    assert tuned.steps[0].loss is None


def test_best_config_writes_each_stage_loss_and_loads(tmp_path):
    job = validate_config(_raw())
    raw = best_config(job, {0: {"output": 0.4, "temperature": 2.0}, 1: {"output": 1.7, "temperature": 1.0}})
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    best = load_config(path)
    assert best.name == "tune-unit-tuned" and best.cascade.plan is None
    stages = best.cascade.stages
    assert [s.teacher for s in stages] == ["ta", "teacher"]
    assert [s.loss.weights.output for s in stages] == [0.4, 1.7]
    assert [s.loss.temperature for s in stages] == [2.0, 1.0]
    assert [p.step_id for p in build_plan(best)] == [p.step_id for p in build_plan(job)]


def test_best_config_loads_the_teachers_the_search_prepared(tmp_path):
    raw = _raw()
    raw["cascade"]["prepare_teachers"] = True
    raw["models"]["teacher"]["dtype"] = "float32"
    job = validate_config(raw)
    assert [p.step_id for p in build_plan(job) if p.stage_index < 0], "the job prepares its teachers"
    prepared = {"ta": str(tmp_path / "prep" / "ta"), "teacher": str(tmp_path / "prep" / "teacher")}
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(best_config(job, {0: {"output": 0.4}}, prepared), sort_keys=False))
    best = load_config(path)
    assert {role: best.models[role].path for role in prepared} == prepared
    assert best.models["teacher"].dtype == "float32" and best.models["student"].preset == "tiny-student"
    # The cascade starts from the prepared teachers: nothing to prepare, the same stages.
    def stages(plan):
        return [(p.stage_index, p.learner, p.teacher, p.step.kind) for p in plan]

    assert stages(build_plan(best)) == [s for s in stages(build_plan(job)) if s[0] >= 0]


@pytest.mark.parametrize(
    ("tune", "field", "words"),
    [
        ({"metric": "val_accuracy"}, "tune", "metric_mode: max"),
        ({"grace_period": 30, "max_steps_per_trial": 10}, "tune", "lower grace_period"),
        ({"space": {"output": {"low": 0.0, "high": 1.0, "log": True}}}, "tune.space.output", "low > 0"),
        ({"space": {"output": {"choices": [1.0], "low": 0.1}}}, "tune.space.output", "choices"),
    ],
)
def test_bad_tune_section_names_the_field_and_fix(tune, field, words):
    raw = _raw()
    raw["tune"].update(tune)
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    problem = next(p for p in info.value.problems if p.field == field)
    assert words in f"{problem.message} {problem.fix}"


def test_search_checks_name_every_problem_at_once():
    raw = _raw(mode="joint")
    raw["cascade"] = {"plan": "top_down", "prepare_teachers": False}
    raw["tune"]["space"]["delta"] = {"low": 0.1, "high": 1.0}  # seed 000's knowledge weight; signal.facts is off
    problems = {p.field: p for p in check_tune(validate_config(raw))}
    assert "signal.facts is false" in problems["tune.space.delta"].message
    assert "per_stage" in problems["tune.mode"].fix
    empty = validate_config({**_raw(), "tune": {"space": {}}})
    assert [p.field for p in check_tune(empty)] == ["tune.space"]


def test_prefix_on_a_stage_without_distillation_is_a_problem():
    raw = _raw()
    raw["cascade"] = {"prepare_teachers": False, "stages": [{"steps": ["SFT"]}, {"teacher": "teacher", "steps": ["DFT"]}]}
    raw["tune"]["space"] = {"1.output": {"low": 0.1, "high": 1.0}, "2.output": {"low": 0.1, "high": 1.0}}
    problems = check_tune(validate_config(raw))
    assert [p.field for p in problems] == ["tune.space.1.output"]


def test_shipped_tune_config_passes_the_search_checks():
    job = load_config(CONFIGS / "tiny_tune.yaml")
    assert check_tune(job) == []
    assert [s.name for s in plan_searches(job)] == ["stage 1", "stage 2"]


def test_the_five_weight_search_fixes_alpha_and_searches_the_other_four_per_hop_stage():
    job = load_config(CONFIGS / "tiny_tune_weights.yaml")
    assert check_tune(job) == []
    searches = plan_searches(job)
    assert [s.name for s in searches] == ["stage 1", "stage 2", "stage 3"]
    assert [s.stage.hop_levels for s in build_plan(job) if s.distills][-1] == [0, 1, 2]
    for search in searches:
        (stage,) = search.stage_indices
        assert search.terms(stage) == {"output", "feature", "knowledge", "attention"}  # task (alpha) keeps its value
    assert set(searches[0].dims) == {"1.output", "1.feature", "1.knowledge", "1.attention", "1.temperature"}
    values = stage_values({"1.output": 2.0, "1.feature": 0.1, "1.knowledge": 0.2, "1.attention": 3.0, "1.temperature": 2.0}, 0)
    loss = tuned_stage(job.loss, job.cascade.resolved_stages()[0], values).loss
    assert loss.weights.task == 1.0 and (loss.weights.output, loss.weights.attention, loss.temperature) == (2.0, 3.0, 2.0)


def test_searching_every_weight_of_a_stage_is_refused_with_the_fix(tmp_path):
    raw = yaml.safe_load((CONFIGS / "tiny_tune_weights.yaml").read_text())
    raw["extends"] = str(CONFIGS / raw["extends"])
    raw["tune"]["space"]["alpha"] = {"low": 0.1, "high": 4.0, "log": True}
    path = tmp_path / "five-weights.yaml"
    path.write_text(yaml.safe_dump(raw))
    problems = check_tune(load_config(path))
    assert [p.field for p in problems] == ["tune.space"] * 3
    assert "only rescales the loss" in problems[0].message and "remove alpha" in problems[0].fix


def test_results_table_keeps_failed_and_stopped_trials(tmp_path):
    job = validate_config(_raw())
    search = plan_searches(job)[0]
    rows = [
        _row(search, 1, "finished", 4, 2.5, {"1.output": 0.5, "1.temperature": 1.0}),
        _row(search, 2, "stopped early", 2, math.nan, {"1.output": 1.5, "1.temperature": 2.0}),
        _row(search, 3, "failed", 0, math.nan, {"1.output": 0.2, "1.temperature": 1.0}, error="ValueError: boom"),
    ]
    outcome = SearchOutcome(search, rows, rows[0]["values"], 2.5)
    report = Path(write_tune_report(str(tmp_path), job, [outcome], {0: {"output": 0.5, "temperature": 1.0}}, "best_config.yaml"))
    with open(tmp_path / RESULTS_CSV) as handle:
        table = list(csv.DictReader(handle))
    assert [r["status"] for r in table] == ["finished", "stopped early", "failed"]
    assert [r["stopped_early"] for r in table] == ["False", "True", "False"]
    assert table[0]["output"] == "0.5" and table[2]["error"] == "ValueError: boom"
    text = report.read_text()
    assert "## Failed trials" in text and "ValueError: boom" in text
    plot = tmp_path / "stage1_val_loss_vs_values.png"
    assert plot.exists() and f"]({plot.name})" in text


def _row(search: Search, trial: int, status: str, steps: int, val_loss: float, values: dict, error: str = "") -> dict:
    return {"search": search.name, "trial": trial, "trial_id": f"t{trial}", "status": status, "values": values, "steps": steps,
            "val_loss": val_loss, "val_accuracy": math.nan, "train_task_loss": 3.0, "signal_cache_hits": 1,
            "signal_teacher_passes": 0, "seconds": 1.0, "error": error}


@pytest.mark.ray
@pytest.mark.parametrize("searcher", ["random", "optuna"])
def test_searchers_honour_max_concurrent_trials(ray_local, tmp_path, searcher):
    """Trials hold a Train worker group (and, without the signal cache, a teacher pool): more at
    once than `max_concurrent_trials` can starve a small cluster. Tune ignores the limit for a
    generator passed in, so the random searcher must carry it."""
    import time

    from ray import tune

    from ckd_ray.tune.runner import _searcher

    settings = validate_config(_raw(searcher=searcher, max_concurrent_trials=1)).tune

    def trainable(config):
        start = time.time()
        time.sleep(1.0)
        tune.report({"val_loss": config["x"], "start": start, "end": time.time()})

    grid = tune.Tuner(
        trainable,
        param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(num_samples=3, search_alg=_searcher(settings, 0), max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()
    spans = sorted((r.metrics["start"], r.metrics["end"]) for r in grid)
    assert len(spans) == 3
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
