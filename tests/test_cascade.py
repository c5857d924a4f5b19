"""Cascade plans, and a real cascade run that is killed mid-stage and resumed by running the same
command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ckd_ray.cascade.plan import build_plan
from ckd_ray.config import validate_config

REPO = Path(__file__).resolve().parents[1]


def job(plan: str, **cascade):
    return validate_config({
        "models": {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}, "teacher": {"preset": "tiny-teacher"}},
        "data": {"benchmark_root": "data/kvqa"},
        "cascade": {"plan": plan, **cascade},
    })


@pytest.mark.parametrize(
    "plan, expected",
    [
        ("bottom_up", ["ta:PT", "ta:FT", "teacher:PT", "teacher:FT", "ta>student:DPT", "ta>student:SFT", "ta>student:DFT",
                       "teacher>student:DPT", "teacher>student:SFT", "teacher>student:DFT"]),
        ("single_teacher", ["teacher:PT", "teacher:FT", "teacher>student:DPT", "teacher>student:SFT", "teacher>student:DFT"]),
        ("top_down", ["teacher:PT", "teacher:FT", "ta:PT", "ta:FT", "teacher>ta:DPT", "teacher>ta:SFT", "teacher>ta:DFT",
                      "ta>student:DPT", "ta>student:SFT", "ta>student:DFT"]),
        ("student_only", ["student:PT", "student:FT"]),
    ],
)
def test_named_plans_expand_with_teacher_preparation(plan, expected):
    steps = build_plan(job(plan))
    assert [f"{s.teacher + '>' if s.teacher else ''}{s.learner}:{s.kind}" for s in steps] == expected
    assert len({s.step_id for s in steps}) == len(steps)


def test_progressive_plan_filters_hops_and_uses_stage_loss():
    steps = build_plan(job("progressive", prepare_teachers=False))
    assert [(s.kind, s.stage.hop_levels) for s in steps] == [
        ("DPT", [0]), ("SFT", [0]), ("DFT", [0]), ("DFT", [0, 1]), ("DFT", [0, 1, 2])
    ]
    assert [s.data_kind for s in steps] == ["caption", "instruct", "instruct", "instruct", "instruct"]
    assert steps[1].loss.weights.active() == ["task"]  # SFT trains on the task loss alone
    assert steps[0].loss.weights.active() == ["task", "output", "visual_kl", "visual_relation"]


def test_teacher_preparation_steps_carry_their_own_budget():
    steps = build_plan(job("single_teacher", teacher_prep_steps=["PT", {"kind": "FT", "max_steps": 300, "lr": 1e-3}]))
    assert [(s.step_id, s.step.max_steps, s.step.lr) for s in steps[:2]] == [
        ("00-prepare-teacher-PT", None, None), ("01-prepare-teacher-FT", 300, 1e-3)
    ]
    assert all(s.step.max_steps is None for s in steps[2:])  # the student's stages keep trainer.max_steps


def test_the_student_alone_control_mirrors_the_student_steps_without_a_teacher():
    steps = build_plan(job("bottom_up", student_alone=True, prepare_teachers=False))
    distilled, control = steps[:6], steps[6:]
    assert [(s.learner, s.kind) for s in control] == [("student_alone", k) for k in ("PT", "SFT", "FT", "PT", "SFT", "FT")]
    assert all(s.teacher is None and s.loss.weights.active() == ["task"] for s in control)
    assert {s.stage.label for s in control} == {"student-alone"} and {s.stage_index for s in control} == {2}
    # Same data kind, budget and learning rate as the student step it mirrors.
    assert [s.data_kind for s in control] == [s.data_kind for s in distilled]
    trainer_lr = job("bottom_up").trainer.lr
    assert [s.step.lr for s in control] == [trainer_lr[s.kind] for s in distilled]
    with pytest.raises(Exception, match="different hop levels"):
        job("progressive", student_alone=True)


def test_experiment_table_shows_mean_and_spread_and_leaves_preservation_undefined_for_a_teacher_scoring_zero():
    from ckd_ray.cascade.experiment import TABLE_METRICS, ExperimentConfig, _Row, _table

    experiment = ExperimentConfig(kind="experiment", name="t", base="b.yaml", seeds=[0],
                                  runs=[{"name": "kd", "plan": "single_teacher"}])
    row = _Row(scores=[{m: 0.25 for m in TABLE_METRICS}], steps=[120], samples=[3840])
    line = _table(experiment, {"kd": row}, {}, {"teacher": {m: 0.5 for m in TABLE_METRICS}}).splitlines()[-1]
    assert "baseline:" not in _table(experiment, {"kd": row}, {}, {})  # no records with baseline answers: no rows
    assert line.startswith("| single_teacher | T->S | 120 | 3,840 | 0.250 |") and line.endswith("| 0.500 |")
    zero = {"teacher": {m: 0.0 for m in TABLE_METRICS}}
    assert _table(experiment, {"kd": row}, {}, zero).splitlines()[-1].endswith("| - |")
    three = experiment.model_copy(update={"seeds": [0, 1, 2]})
    row3 = _Row(scores=[{m: v for m in TABLE_METRICS} for v in (0.1, 0.2, 0.3)], steps=[120] * 3, samples=[3840] * 3)
    text = _table(three, {"kd": row3}, {}, {"teacher": {m: 0.5 for m in TABLE_METRICS}})
    assert "| single_teacher | T->S | 120 | 3,840 | 0.200 +- 0.100 |" in text
    assert "## Seed 2" in text and "| single_teacher | 0.300 |" in text  # the per-seed tables are kept


def _manifest(run: Path) -> dict:
    path = run / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"steps": {}}


@pytest.mark.slow
@pytest.mark.ray
def test_killed_cascade_resumes_at_the_step_it_was_in(kvqa_dir, tmp_path, random_preset_models):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "tiny_cascade.yaml"),
        "name": "resume",
        "data": {"benchmark_root": str(kvqa_dir)},
        "models": random_preset_models,
        "storage": {"root": str(tmp_path / "runs")},
        "cascade": {"prepare_teachers": False, "plan": None, "stages": [{"teacher": "teacher", "steps": ["SFT", "DFT"]}],
                    "student_alone": True},  # the control (SFT, FT from the same initial student) after the stage
        # DFT's teacher pass runs while SFT trains: the kill and the resume cover that path too.
        "teacher_pool": {"overlap_training": True},
        "trainer": {"max_steps": 8, "micro_batch_size": 4, "num_workers": 1, "report_every": 1, "checkpoint_every": 2},
        "evaluation": {"max_samples": 16},
        "ray": {"num_cpus": 4},
    }))
    run = tmp_path / "runs" / "resume"
    command = [str(Path(sys.executable).parent / "ckd-ray"), "cascade", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    dft_checkpoints = []
    while time.time() < deadline and first.poll() is None:
        steps = _manifest(run)["steps"]
        dft = [k for k in steps if k.endswith("DFT")]
        if dft and steps[dft[0]]["status"] == "running":
            dft_checkpoints = list(run.glob(f"train/*/{dft[0]}/step-*/train_state.json"))
            if dft_checkpoints:
                break
        time.sleep(0.5)
    assert first.poll() is None, first.stdout.read()[-3000:]
    assert dft_checkpoints, "the DFT step wrote no checkpoint within 10 minutes"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray die mid-step
    first.wait()
    subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)  # stragglers started with this run's paths

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "00-s1-teacher_to_student-SFT: done in an earlier run, skipped" in output
    assert "resum" in output.lower()  # the DFT step picked up its checkpoint
    manifest = _manifest(run)
    assert [e["status"] for e in manifest["steps"].values()] == ["done"] * 4
    assert manifest["steps"]["01-s1-teacher_to_student-DFT"]["metrics"]["step"] == 8
    assert list(manifest["steps"])[2:] == ["02-student-alone-SFT", "03-student-alone-FT"]
    assert manifest["roles"]["student"].endswith("01-s1-teacher_to_student-DFT/model")  # the control does not move the student
    assert manifest["roles"]["student_alone"].endswith("03-student-alone-FT/model")
    report = (run / "report.md").read_text()
    assert "loss_terms.png" in report and (run / "loss_terms.png").exists()
    assert "| student-alone (student_alone) |" in report
    # The scores stand beside the no-model baselines on the same samples, headline first.
    for row in ("| baseline: chance |", "| baseline: majority per type |", "| baseline: question-only |", "| checkpoint | grounded | margin |"):
        assert row in report, report
    assert abs(manifest["baselines"]["question_only"]["grounded"]) < 1e-12 and manifest["baselines"]["chance"]["yes_no_acc"] == 0.5
    (evaluation,) = [e for e in manifest["evaluations"].values() if e["model_uri"].endswith("DFT/model")]
    predictions = [json.loads(line) for line in Path(evaluation["predictions_uri"]).read_text().splitlines()]
    assert len(predictions) == evaluation["scores"]["num_samples"] == 16
    assert {"question_type", "answer", "prediction"} <= set(predictions[0])


def test_config_hash_ignores_defaults_and_runtime_sections_but_not_changes():
    from ckd_ray.cascade.manifest import config_hash

    plain = job("bottom_up")
    spelled_out = job("bottom_up", teacher_prep_steps=["PT", "FT"], prepare_teachers=True)
    assert config_hash(plain) == config_hash(spelled_out)  # a field added with its default keeps old runs resumable
    assert config_hash(plain) == config_hash(plain.model_copy(update={"ray": plain.ray.model_copy(update={"num_cpus": 3})}))
    assert config_hash(plain) != config_hash(job("bottom_up", teacher_prep_steps=["PT", {"kind": "FT", "max_steps": 9}]))
    assert config_hash(plain) != config_hash(job("single_teacher"))
