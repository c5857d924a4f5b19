"""The config tree: every shipped config validates; bad configs report every problem at once,
each naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ckd_ray.config import ConfigError, load_config, validate_config
from ckd_ray.config.loader import apply_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
JOB_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "kind: experiment" not in p.read_text())


def base() -> dict:
    return {
        "name": "t",
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}, "teacher": {"preset": "tiny-teacher"}},
        "cascade": {"plan": "bottom_up"},
        "data": {"benchmark_root": "data/kvqa"},
    }


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_job_config_validates(path):
    config = load_config(path)
    assert config.cascade.resolved_stages() or config.cascade.plan


EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if "kind: experiment" in p.read_text())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_validates_every_run(path):
    from ckd_ray.cascade.experiment import load_experiment

    experiment, _ = load_experiment(path)
    assert len(experiment.runs) >= 2


def test_experiment_set_overrides_reach_every_run_and_the_teachers_preparation():
    from ckd_ray.cascade.experiment import _prepared_base, _run_config, load_experiment
    from ckd_ray.cascade.prepared import preparation_config

    experiment, base = load_experiment(CONFIGS / "kvqa_table.yaml", ["trainer.max_steps=2", "cascade.teacher_prep_steps=[PT, FT]",
                                                                     "cascade.role_prep_steps={}"])
    teachers = {"ta": "preset", "teacher": "preset"}
    for run in experiment.runs:  # --set comes after the budget rule: it shrinks every row
        assert validate_config(_run_config(base, experiment, run, 0, teachers)).trainer.max_steps == 2
    for role in ("ta", "teacher"):
        prep = validate_config(preparation_config(_prepared_base(base, experiment), role))
        assert [(stage.learner, step.kind) for stage in prep.cascade.stages for step in stage.steps] == [(role, "PT"), (role, "FT")]
        assert prep.trainer.max_steps == 2


def test_the_experiment_budget_rule_gives_every_row_the_same_student_steps():
    from ckd_ray.cascade.experiment import _run_config, load_experiment, student_step_count
    from ckd_ray.cascade.steps import step_budget

    experiment, base = load_experiment(CONFIGS / "kvqa_table.yaml")
    teachers = {"ta": "preset", "teacher": "preset"}
    assert {plan: student_step_count(plan) for plan in ("student_only", "single_teacher", "top_down", "bottom_up",
                                                         "progressive", "end_to_end")} == {
        "student_only": 2, "single_teacher": 3, "top_down": 3, "bottom_up": 6, "progressive": 5, "end_to_end": 5}
    for run in experiment.runs:
        job = validate_config(_run_config(base, experiment, run, 0, teachers))
        budgets = [step_budget(job, step)[0] for stage in job.cascade.resolved_stages() if stage.learner == "student"
                   for step in stage.steps]
        assert sum(budgets) == experiment.student_steps == 480, run.name
    experiment.student_steps = 100  # 100 does not split over 3 or 6 student steps
    with pytest.raises(ConfigError, match="student_steps.*llava-kd.*multiple"):
        _run_config(base, experiment, experiment.runs[1], 0, teachers)


def test_experiment_runs_side_by_side_share_the_cores_but_the_teachers_recipe_does_not_change():
    """`parallel_runs: 2` gives each row's worker half of the base config's CPUs (the table's
    2-core machine: one each); the teachers' preparation keeps the base's, so its digest, and
    the prepared teachers it names, stay the same; `--set` still has the last word."""
    from ckd_ray.cascade.experiment import _prepared_base, _run_config, load_experiment

    teachers = {"ta": "preset", "teacher": "preset"}
    experiment, base = load_experiment(CONFIGS / "kvqa_table.yaml")
    assert experiment.parallel_runs == 2 and base["trainer"]["cpus_per_worker"] == 2
    assert {validate_config(_run_config(base, experiment, run, 0, teachers)).trainer.cpus_per_worker for run in experiment.runs} == {1}
    assert validate_config(_prepared_base(base, experiment)).trainer.cpus_per_worker == 2
    experiment, base = load_experiment(CONFIGS / "kvqa_table.yaml", ["trainer.cpus_per_worker=2"])
    assert validate_config(_run_config(base, experiment, experiment.runs[0], 0, teachers)).trainer.cpus_per_worker == 2
    experiment.parallel_runs = 4  # never below one CPU
    experiment._command_overrides = []
    assert validate_config(_run_config(base, experiment, experiment.runs[0], 0, teachers)).trainer.cpus_per_worker == 1


def test_the_teachers_are_prepared_once_for_every_seed_in_runs_named_by_their_config():
    from ckd_ray.cascade.experiment import _prepared_base, load_experiment
    from ckd_ray.cascade.prepared import preparation_config

    def name(base, experiment, role="teacher"):
        return preparation_config(_prepared_base(base, experiment), role)["name"]

    experiment, base = load_experiment(CONFIGS / "kvqa_table.yaml")
    prep = preparation_config(_prepared_base(base, experiment), "teacher")
    assert prep["seed"] == experiment.seeds[0]
    assert name(base, experiment) == prep["name"]  # the same recipe: the same run folder
    assert prep["name"].startswith("prepared-teacher-") and name(base, experiment, "ta").startswith("prepared-ta-")
    shorter, base2 = load_experiment(CONFIGS / "kvqa_table.yaml", ["cascade.role_prep_steps={}"])
    assert name(base2, shorter) != prep["name"]  # another recipe: another teacher
    assert name(base2, shorter, "ta") == name(base, experiment, "ta")  # the TA's recipe did not change
    student_only, base3 = load_experiment(CONFIGS / "kvqa_table.yaml", ["evaluation.max_samples=8"])
    assert name(base3, student_only) != prep["name"]  # its scores are recorded in that run
    # The quickstart prepares the same teachers as the experiment: one preparation for both.
    quickstart = load_config(CONFIGS / "tiny_cascade.yaml").model_dump(mode="json", exclude_defaults=True)
    assert preparation_config(quickstart, "teacher")["name"] == prep["name"]
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        load_experiment(CONFIGS / "kvqa_table.yaml", ["trainer.max_stepz=2"])


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert "tiny_cascade.yaml" in names and len(names) >= 4


def test_defaults_are_valid_and_alias_greek_names():
    raw = base()
    raw["loss"] = {"weights": {"alpha": 1.0, "beta": 0.5, "visual_kl": 1.0, "visual_relation": 1.0}}
    config = validate_config(raw)
    assert config.loss.weights.task == 1.0 and config.loss.weights.output == 0.5


def test_three_mistakes_are_reported_together():
    raw = base()
    raw["trainer"] = {"num_workrs": 2, "zero_stage": "two"}
    raw["loss"] = {"weights": {"task": 1, "knowledge": 0.5}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    fields = [p.field for p in info.value.problems]
    assert "trainer.num_workrs" in fields
    assert "trainer.zero_stage" in fields
    assert "loss.weights.knowledge" in fields
    text = str(info.value)
    assert "did you mean `num_workers`" in text
    assert "signal.facts" in text
    assert text.startswith("3 problems")


def test_unknown_top_level_key_gets_did_you_mean():
    raw = base()
    raw["trainr"] = {}
    with pytest.raises(ConfigError, match="did you mean `trainer`"):
        validate_config(raw)


def test_weight_without_signal_names_field_and_fix():
    raw = base()
    raw["loss"] = {"weights": {"task": 1, "feature": 1.0}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    (problem,) = info.value.problems
    assert problem.field == "loss.weights.feature"
    assert "loss.feature_layers" in problem.fix


def test_feature_layers_must_be_sent_by_teacher():
    raw = base()
    raw["cascade"] = {"plan": "single_teacher"}  # the 6-layer teacher only (the TA has 3 layers)
    raw["loss"] = {"weights": {"task": 1, "feature": 1.0}, "feature_layers": {2: 4}}
    raw["signal"] = {"feature_layers": [3]}
    with pytest.raises(ConfigError, match=r"teacher layers \[4\] are not in signal.feature_layers"):
        validate_config(raw)
    raw["signal"] = {"feature_layers": [4]}
    validate_config(raw)


def test_signal_and_loss_layers_must_exist_in_the_models_they_name():
    raw = base()  # bottom_up: the TA (3 layers) and the teacher (6) both teach the student (2)
    raw["signal"] = {"feature_layers": [4], "attention_layers": [5]}
    raw["loss"] = {"weights": {"task": 1, "feature": 1.0, "attention": 1.0}, "feature_layers": {3: 4}, "attention_layers": {2: 5}}
    with pytest.raises(ConfigError) as raised:
        validate_config(raw)
    found = sorted(str(p) for p in raised.value.problems)
    assert found == [
        "loss.attention_layers: layer 2 is not in learner 'student' (2 layers: attention layers 0..1) -> fix: name a layer of 'student', e.g. its last, 1",
        "loss.feature_layers: layer 3 is not in learner 'student' (2 layers: hidden states 0..2 (0: the embeddings)) -> fix: name a layer of 'student', e.g. its last, 2",
        "signal.attention_layers: layer 5 is not in teacher 'ta' (3 layers: attention layers 0..2) -> fix: name a layer of 'ta', e.g. its last, 2",
        "signal.feature_layers: layer 4 is not in teacher 'ta' (3 layers: hidden states 0..3 (0: the embeddings)) -> fix: name a layer of 'ta', e.g. its last, 3",
    ]
    raw["cascade"] = {"plan": "single_teacher"}
    raw["loss"] = {"weights": {"task": 1, "feature": 1.0, "attention": 1.0}, "feature_layers": {2: 4}, "attention_layers": {1: 5}}
    validate_config(raw)  # the 6-layer teacher has them all


def test_student_larger_than_teacher_is_an_error():
    raw = base()
    raw["models"]["ta"] = {"preset": "tiny-teacher"}
    raw["models"]["teacher"] = {"preset": "tiny-ta"}
    raw["cascade"] = {"stages": [{"teacher": "teacher", "learner": "ta", "steps": ["DFT"]}]}
    with pytest.raises(ConfigError, match="is not smaller than teacher"):
        validate_config(raw)


def test_unknown_storage_scheme_and_unknown_role():
    raw = base()
    raw["storage"] = {"root": "gs://bucket/runs"}
    raw["cascade"] = {"stages": [{"teacher": "teachr", "steps": ["DFT"]}]}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    text = str(info.value)
    assert "storage.root" in text and "unknown storage scheme 'gs'" in text
    assert "did you mean `teacher`" in text


def test_distillation_step_without_teacher_and_plan_plus_stages():
    raw = base()
    raw["cascade"] = {"stages": [{"steps": ["DPT"]}]}
    with pytest.raises(ConfigError, match="DPT distills but the stage has no teacher"):
        validate_config(raw)
    raw["cascade"] = {"plan": "bottom_up", "stages": [{"steps": ["SFT"]}]}
    with pytest.raises(ConfigError, match="both `plan` and `stages`"):
        validate_config(raw)


def test_disjoint_data_needs_a_budget_for_every_step():
    """The pool of `cascade.disjoint_data` is what the steps' budgets consume: a step without
    one is named, with the fix, before anything runs."""
    raw = base()
    raw["cascade"] = {"plan": "single_teacher", "prepare_teachers": False, "disjoint_data": True}
    raw["trainer"] = {**raw.get("trainer", {}), "max_steps": None}
    with pytest.raises(ConfigError, match=r"cascade.disjoint_data.*teacher->student/DPT.*set trainer.max_steps"):
        validate_config(raw)
    raw["trainer"]["max_steps"] = 4
    assert validate_config(raw).cascade.disjoint_data


def test_set_overrides_parse_yaml_values_and_list_indices(tmp_path):
    path = tmp_path / "job.yaml"
    raw = base()
    raw["cascade"] = {"stages": [{"teacher": "ta", "steps": ["SFT"]}]}
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, ["trainer.max_steps=7", "cascade.stages.0.teacher=teacher", "loss.temperature=2"])
    assert config.trainer.max_steps == 7
    assert config.cascade.stages[0].teacher == "teacher"
    assert config.loss.temperature == 2.0
    with pytest.raises(ConfigError, match="greater than 0"):
        load_config(path, ["loss.temperature=0"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "trainer.max_steps")


def test_extends_merges_parent_file(tmp_path):
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(base()))
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nname: child\ntrainer: {max_steps: 3}\n")
    config = load_config(tmp_path / "child.yaml")
    assert config.name == "child" and config.trainer.max_steps == 3 and "ta" in config.models


def test_tokenizer_mismatch_between_local_models_is_a_config_error(tmp_path):
    import json

    llava = {"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8},
             "text_config": {"vocab_size": 8}, "vision_feature_select_strategy": "full", "image_token_index": 1}
    for role, vocab in (("a", {"x": 0}), ("b", {"y": 0})):
        folder = tmp_path / role
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(llava))
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    raw = base()
    raw["models"]["student"] = {"path": str(tmp_path / "a")}
    raw["models"]["teacher"] = {"path": str(tmp_path / "b")}
    raw["cascade"] = {"stages": [{"teacher": "teacher", "steps": ["DFT"]}]}
    with pytest.raises(ConfigError, match="different tokenizers"):
        validate_config(raw)


def test_cli_check_prints_every_problem(tmp_path):
    from click.testing import CliRunner

    from ckd_ray.cli import main

    raw = base()
    raw["trainer"] = {"num_workrs": 2, "zero_stage": 7}
    raw["storage"] = {"root": "ftp://x"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "3 problems" in result.output
    for field in ("trainer.num_workrs", "trainer.zero_stage", "storage.root"):
        assert field in result.output


def test_cli_check_lists_the_plan_with_teacher_preparation():
    from click.testing import CliRunner

    from ckd_ray.cli import main

    result = CliRunner().invoke(main, ["config", "check", str(CONFIGS / "tiny_cascade.yaml")])
    assert result.exit_code == 0, result.output
    assert ("plan bottom_up: prepare-ta[PT,FT], prepare-teacher[PT,FT], ta->student[DPT,SFT,DFT], "
            "teacher->student[DPT,SFT,DFT]") in result.output


def test_cli_check_reads_an_experiment_as_the_experiment_command_does(tmp_path):
    """`config check` on an experiment checks every row as a job (it used to read the experiment as
    a job and crash on the missing `data` section)."""
    from click.testing import CliRunner

    from ckd_ray.cli import main

    result = CliRunner().invoke(main, ["config", "check", str(CONFIGS / "kvqa_table.yaml")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: experiment 'kvqa-table'") and "llava-ckd[bottom_up]" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "experiment", "name": "x", "base": str(CONFIGS / "tiny_cascade.yaml"),
                                   "runs": [{"name": "a", "plan": "no_such_plan"}]}))
    result = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 2 and "runs.0.plan" in result.output and "Traceback" not in result.output


def test_a_job_missing_a_required_section_is_one_problem_not_a_crash():
    with pytest.raises(ConfigError) as raised:
        validate_config({"name": "x", "models": {"student": {"preset": "tiny-student"}}, "seed": 0})
    assert [p.field for p in raised.value.problems] == ["data"]


def test_paths_from_resolves_relative_paths_against_another_directory(tmp_path, monkeypatch):
    """What a `ray job submit` entrypoint needs: it runs in Ray's upload of the working directory,
    and `--paths-from $PWD` points the config's data, models and outputs back at the checkout."""
    from click.testing import CliRunner

    from ckd_ray.cli import main

    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(main, ["config", "show", str(CONFIGS / "tiny_cascade.yaml"), "--paths-from", str(CONFIGS.parent)])
    assert shown.exit_code == 0, shown.output
    resolved = yaml.safe_load(shown.output)
    assert resolved["models"]["teacher"]["path"] == str(CONFIGS.parent / "models" / "tiny" / "teacher")
    assert resolved["data"]["benchmark_root"] == str(CONFIGS.parent / "data" / "kvqa")
    assert resolved["storage"]["root"] == str(CONFIGS.parent / "runs")
    here = yaml.safe_load(CliRunner().invoke(main, ["config", "show", str(CONFIGS / "tiny_cascade.yaml")]).output)
    assert here["storage"]["root"] == str(tmp_path / "runs")


def test_a_run_folder_of_another_config_ends_the_command_with_its_fix_and_exit_2_not_a_traceback(tmp_path, capsys):
    """`ckd-ray cascade` on a run folder another config wrote: the console prints the whole message
    (what to change) and the command exits 2; any other error keeps its traceback."""
    from ckd_ray.cascade.manifest import Manifest
    from ckd_ray.cli.console import console

    root = {"name": "mismatch", "storage": {"root": str(tmp_path)}, "data": {"benchmark_root": str(tmp_path / "kvqa")}}
    first = validate_config(root)
    Manifest.open(first.run_uri, first).save()
    other = validate_config({**root, "seed": 7})
    with pytest.raises(SystemExit) as exit_info, console(other, verbose=True):
        Manifest.open(other.run_uri, other)
    assert exit_info.value.code == 2
    shown = capsys.readouterr().out
    assert "[ckd-ray] failed: " in shown and "Use a new `name`" in shown and "Traceback" not in shown
    with pytest.raises(ZeroDivisionError), console(other, verbose=True):  # not a user's fix: raised as it is
        1 / 0
    assert "[ckd-ray] failed: ZeroDivisionError" in capsys.readouterr().out
