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
    # One control stage per student stage, each scored where it ends: the control at the same
    # optimizer steps as the student after TA -> student, and after teacher -> student.
    assert [(s.stage.label, s.stage_index) for s in control] == [("student-alone-1", 2)] * 3 + [("student-alone", 3)] * 3
    assert [s.step_id for s in control][2:4] == ["08-student-alone-1-FT", "09-student-alone-PT"]
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
    distinct = {"captions": 854, "hop 0": 430, "hop 1": 659, "hop 2": 618}
    row = _Row(scores=[{m: 0.25 for m in TABLE_METRICS}], steps=[120], samples=[3840], distinct=[distinct])
    line = _table(experiment, {"kd": row}, {}, {"teacher": {m: 0.5 for m in TABLE_METRICS}}).splitlines()[-1]
    assert "baseline:" not in _table(experiment, {"kd": row}, {}, {})  # no records with baseline answers: no rows
    assert line.startswith("| single_teacher | T->S | 120 | 3,840 | 854 | 430 | 659 | 618 | 0.250 |") and line.endswith("| 0.500 |")
    zero = {"teacher": {m: 0.0 for m in TABLE_METRICS}}
    assert _table(experiment, {"kd": row}, {}, zero).splitlines()[-1].endswith("| - |")
    three = experiment.model_copy(update={"seeds": [0, 1, 2]})
    row3 = _Row(scores=[{m: v for m in TABLE_METRICS} for v in (0.1, 0.2, 0.3)], steps=[120] * 3, samples=[3840] * 3,
                distinct=[distinct] * 3)
    text = _table(three, {"kd": row3}, {}, {"teacher": {m: 0.5 for m in TABLE_METRICS}})
    assert "| single_teacher | T->S | 120 | 3,840 | 854 | 430 | 659 | 618 | 0.200 +- 0.100 |" in text
    assert "## Seed 2" in text and "| single_teacher | 0.300 |" in text  # the per-seed tables are kept


def _answers(correct: list[bool]) -> list[dict]:
    """Evaluation records of yes/no questions (half "yes"), right where `correct` says."""
    out = []
    for i, right in enumerate(correct):
        answer = "yes" if i % 2 else "no"
        out.append({"sample_id": f"q{i:03d}", "question_type": "yes_no", "answer": answer,
                    "prediction": answer if right else ("no" if answer == "yes" else "yes")})
    return out


def test_experiment_claims_give_each_ordering_a_verdict_with_its_interval_over_seeds_and_samples():
    """The papers' claims and the teacher > TA > student-alone ladder (the prepared models are one
    for every seed): holds above 0, reversed below, not separable across it, and each seed's own
    interval."""
    from ckd_ray.cascade.experiment import ExperimentConfig, _comparisons, _Row, _table

    experiment = ExperimentConfig(kind="experiment", name="t", base="b.yaml", seeds=[0, 1, 2], runs=[
        {"name": "alone", "plan": "student_only"}, {"name": "kd", "plan": "single_teacher"}, {"name": "ckd", "plan": "bottom_up"}])
    n = 200
    strong, half, weak = _answers([True] * n), _answers([i % 2 == 0 for i in range(n)]), _answers([i % 5 == 0 for i in range(n)])
    rows = {"alone": _Row(records=[weak] * 3), "kd": _Row(records=[strong] * 3),
            "ckd": _Row(records=[_answers([(i + seed) % 3 != 0 for i in range(n)]) for seed in range(3)])}
    comparisons = _comparisons(experiment, rows, {"teacher": strong, "ta": half})
    verdicts = {claim.split(" (")[0]: c.verdict for claim, c in comparisons.items()}
    assert verdicts == {"LLaVA-CKD beats LLaVA-KD": "reversed", "the prepared teacher beats the prepared TA": "holds",
                        "the prepared TA beats the student alone": "holds", "the prepared teacher beats the student alone": "holds",
                        "LLaVA-KD's student beats the student alone": "holds", "LLaVA-CKD's student beats the student alone": "holds"}
    ladder = comparisons["the prepared teacher beats the prepared TA"]
    assert ladder.overall.observed == pytest.approx(1.0 - 0.5) and len(ladder.per_seed) == 3
    assert all(d.low > 0 for d in ladder.per_seed)
    even = _comparisons(experiment, {**rows, "ckd": _Row(records=[strong] * 3)})["LLaVA-CKD beats LLaVA-KD (seed 001, Table 1)"]
    assert even.verdict == "not separable" and even.overall.low == even.overall.high == 0.0
    table = _table(experiment, rows, {}, {}, comparisons)
    assert "| the prepared teacher beats the prepared TA | +0.500 |" in table and "| 3/3 | holds |" in table


def test_split_pool_gives_steps_disjoint_shares_and_a_curriculum_its_levels_cumulatively():
    import numpy as np

    from ckd_ray.cascade.datasets import split_pool

    hops = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0])
    six = split_pool(hops, [(40, None)] * 4)  # the cascade's four instruction steps of 40
    three = split_pool(hops, [(80, None)] * 2)  # LLaVA-KD's two of 80
    assert [len(s) for s in six] == [3, 3, 3, 3] and [len(s) for s in three] == [6, 6]
    assert sorted(np.concatenate(six)) == sorted(np.concatenate(three)) == list(range(12))
    curriculum = split_pool(hops, [(48, (0,)), (48, (0,)), (48, (0, 1)), (48, None)])
    # Stage 1's two steps split the pool's hop-0 records; stage 2 reads hop 0 and 1, stage 3 all of it.
    assert [sorted(hops[s]) for s in curriculum] == [[0, 0], [0, 0], [0, 0, 0, 0, 1, 1, 1, 1], sorted(hops)]
    assert sorted(set(np.concatenate(curriculum))) == list(range(12))  # the end-to-end row's pool, no more
    assert list(curriculum[0]) == [0, 4] and list(curriculum[1]) == [8, 11]  # each share in pool order
    assert list(curriculum[2]) == [0, 1, 3, 4, 7, 8, 9, 11]


def test_experiment_runs_side_by_side_start_in_order_at_most_parallel_at_once_and_stop_starting_after_a_failure():
    """`run_side_by_side` (no Ray): every (seed, run) once, never more than `parallel` running, started
    in the table's order, results by (seed, name) whatever order they finish in; after a failure no
    new run starts, the running one finishes (its work kept), and the error reaches the caller."""
    import threading
    from types import SimpleNamespace

    from ckd_ray.cascade.experiment import run_side_by_side

    work = [(seed, SimpleNamespace(name=name)) for seed in (0, 1) for name in ("a", "b", "c")]
    started, running, peak, lock = [], [0], [0], threading.Lock()

    def run_one(seed, run, fail=None):
        with lock:
            started.append((seed, run.name))
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 if run.name != "a" else 0.15)  # "a" ends after "b" started: out of order
        with lock:
            running[0] -= 1
        if (seed, run.name) == fail:
            raise RuntimeError(f"run {run.name} s{seed} failed")
        return (seed, run.name, "done")

    lines = []
    done = run_side_by_side(work, run_one, 2, lines.append)
    assert done == {(seed, name): (seed, name, "done") for seed in (0, 1) for name in ("a", "b", "c")}
    assert peak[0] == 2 and started[:2] == [(0, "a"), (0, "b")] and sorted(started) == sorted(done)
    assert len([line for line in lines if "done in" in line]) == 6 and lines[-1].endswith("(6/6 runs)")

    started.clear()
    with pytest.raises(RuntimeError, match="run b s0 failed"):
        run_side_by_side(work, lambda seed, run: run_one(seed, run, fail=(0, "b")), 2)
    assert started[:2] == [(0, "a"), (0, "b")] and len(started) < len(work)  # "a" finished; nothing new after "b" failed
    started.clear()
    assert run_side_by_side(work[:2], run_one, 1) and started == [(0, "a"), (0, "b")]  # one at a time: this thread, in order


def test_experiment_rows_see_the_same_distinct_samples_per_hop_level_as_the_rows_they_are_compared_with(kvqa_dir):
    """The planned reads of `cascade.disjoint_data` (no Ray): LLaVA-CKD's six steps and LLaVA-KD's
    three read the same distinct captions and instructions per hop level, as do the progressive and
    end-to-end rows; each step's records are its own; the pool changes with the seed. Reading
    prefixes instead, the cascade saw half of LLaVA-KD's instructions (issue 35)."""
    from ckd_ray.cascade.datasets import StepData, distinct_samples
    from ckd_ray.cascade.experiment import _run_config, load_experiment
    from ckd_ray.cascade.steps import passes_for_budget, plan_step

    # The random presets: a fresh clone has not composed models/tiny (the reads do not depend on the weights).
    presets = [f"models.{role}.{key}={value}" for role in ("student", "ta", "teacher")
               for key, value in (("preset", f"tiny-{role}"), ("path", "null"), ("prepare", "null"))]
    experiment, base = load_experiment(REPO / "configs" / "kvqa_table.yaml", [f"data.benchmark_root={kvqa_dir}", *presets])
    catalogs: dict = {}

    def reads_of(name: str, seed: int = 0, **cascade):
        run = next(r for r in experiment.runs if r.name == name)
        raw = _run_config(base, experiment, run, seed, {"ta": "preset", "teacher": "preset"})
        raw["cascade"].update(cascade)
        job = validate_config(raw)
        plan = [p for p in build_plan(job) if p.learner == "student"]
        reads = StepData(job, job.run_uri, catalogs).planned_reads(plan)
        return job, plan, [reads[p.step_id] for p in plan]

    seen = {}
    for name in ("llava-kd", "llava-ckd", "top-down", "end-to-end", "progressive"):
        job, plan, reads = reads_of(name)
        seen[name] = distinct_samples(reads)
        if name != "progressive":  # no record read by two steps (a curriculum's later stages re-read the earlier levels)
            assert sum(r.num_records for r in reads) == sum(seen[name].values()), name
        for planned, step in zip(plan, reads):
            if planned.stage.hop_levels is not None and planned.data_kind == "instruct":
                assert set(step.hops.tolist()) <= set(planned.stage.hop_levels)
            # every step still makes its optimizer steps, however many samples its share holds
            epochs = passes_for_budget(job, planned.step, step.num_records)
            made = plan_step(job, planned.stage, planned.step.model_copy(update={"epochs": epochs}), init_model_uri="m",
                             num_train_samples=step.num_records, export_uri="e").optimizer.total_steps
            assert made == (planned.step.max_steps or job.trainer.max_steps), planned.step_id
    assert seen["llava-kd"] == seen["llava-ckd"] == seen["top-down"]
    assert seen["llava-kd"]["captions"] == 854 and sum(v for k, v in seen["llava-kd"].items() if k != "captions") == 1707
    assert seen["progressive"] == seen["end-to-end"] and seen["end-to-end"]["captions"] == 512
    assert distinct_samples(reads_of("llava-ckd", seed=1)[2]) != seen["llava-ckd"]  # a seed draws its own pool
    prefixes = {name: distinct_samples(reads_of(name, disjoint_data=False)[2]) for name in ("llava-kd", "llava-ckd")}
    assert sum(prefixes["llava-ckd"].values()) - prefixes["llava-ckd"]["captions"] == 427
    assert sum(prefixes["llava-kd"].values()) - prefixes["llava-kd"]["captions"] == 854


def test_a_top_down_row_from_the_shared_ta_trains_what_its_own_plan_would(kvqa_dir):
    """`share_top_down_ta`: the shared run is the row's first stage (T->TA) with the first seed, and
    a seed's row from it is the second stage (TA->S) from that TA, its student reading the very
    records, in the same order, that the whole plan's student reads (no Ray)."""
    from ckd_ray.cascade.datasets import StepData
    from ckd_ray.cascade.experiment import _from_shared_ta, _run_config, _shared_ta_config, load_experiment

    presets = [f"models.{role}.{key}={value}" for role in ("student", "ta", "teacher")
               for key, value in (("preset", f"tiny-{role}"), ("path", "null"), ("prepare", "null"))]
    experiment, base = load_experiment(REPO / "configs" / "kvqa_table.yaml", [f"data.benchmark_root={kvqa_dir}", *presets])
    run = next(r for r in experiment.runs if r.plan == "top_down")
    teachers = {"ta": "preset", "teacher": "preset"}
    catalogs: dict = {}

    def reads(raw: dict, learner: str):
        job = validate_config(raw)
        plan = [p for p in build_plan(job) if p.learner == learner]
        planned = StepData(job, job.run_uri, catalogs).planned_reads(plan)
        return job, [(p.step.kind, planned[p.step_id].labels.tolist(), planned[p.step_id].ordinals.tolist()) for p in plan]

    own_first = _run_config(base, experiment, run, experiment.seeds[0], teachers)
    shared_job, shared_ta_reads = reads(_shared_ta_config(base, experiment, run, teachers), "ta")
    assert shared_job.name == f"kvqa-table-{run.name}-ta" and shared_job.seed == experiment.seeds[0]
    assert [(s.learner, s.teacher) for s in shared_job.cascade.resolved_stages()] == [("ta", "teacher")]
    assert shared_ta_reads == reads(own_first, "ta")[1]  # the first seed's row's TA steps, record for record
    for seed in experiment.seeds[1:]:
        own = _run_config(base, experiment, run, seed, teachers)
        from_shared, student_reads = reads(_from_shared_ta(own, run, str(kvqa_dir / "distilled-ta")), "student")
        assert [(s.learner, s.teacher) for s in from_shared.cascade.resolved_stages()] == [("student", "ta")]
        assert from_shared.models["ta"].path == str(kvqa_dir / "distilled-ta") and from_shared.seed == seed
        assert from_shared.trainer.max_steps == validate_config(own).trainer.max_steps == 160
        assert student_reads == reads(own, "student")[1] and len(student_reads) == 3


def test_warm_row_workers_refuse_rows_of_several_workers_before_any_actor_starts():
    from ckd_ray.cascade.experiment import ExperimentConfig, _row_workers, _RowSetup
    from ckd_ray.errors import ConfigError

    experiment = ExperimentConfig(kind="experiment", name="t", base="b.yaml", seeds=[0], warm_workers=True, parallel_runs=2,
                                  runs=[{"name": "kd", "plan": "single_teacher"}])
    base = {"data": {"benchmark_root": "benchmark"}, "trainer": {"num_workers": 2},
            "models": {role: {"preset": f"tiny-{role}"} for role in ("student", "ta", "teacher")}}
    with pytest.raises(ConfigError, match=r"warm_workers.*\[2\] workers.*trainer.num_workers: 1"):
        _row_workers(_RowSetup(experiment, base, {"ta": "preset", "teacher": "preset"}, [], side_by_side=True))


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
    assert "| student-alone (student_alone) |" in report and "`student-alone` (the control)" in report
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


def test_a_role_can_have_its_own_preparation_steps_and_a_misspelt_role_is_named():
    from ckd_ray.config import ConfigError
    from ckd_ray.config import validate_config as validate

    steps = build_plan(job("bottom_up", teacher_prep_steps=[{"kind": "PT", "max_steps": 5}, {"kind": "FT", "max_steps": 7}],
                           role_prep_steps={"teacher": [{"kind": "PT", "max_steps": 5}, {"kind": "FT", "max_steps": 11}]}))
    prep = [(p.learner, p.kind, p.step.max_steps) for p in steps if p.stage_index < 0]
    assert prep == [("ta", "PT", 5), ("ta", "FT", 7), ("teacher", "PT", 5), ("teacher", "FT", 11)]
    with pytest.raises(ConfigError) as info:
        validate({"models": {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"}},
                  "data": {"benchmark_root": "data/kvqa"}, "cascade": {"plan": "single_teacher", "role_prep_steps": {"teachr": ["PT"]}}})
    assert "cascade.role_prep_steps.teachr" in str(info.value) and "did you mean `teacher`" in str(info.value)
