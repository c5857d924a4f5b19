"""A stage with several teachers fused per token (`teachers: [...]`, `loss.fusion`, `cascade.plan: fused`):
its plan, its config checks, its decoded signal, its loss through `distillation_loss`, and one
end-to-end fused step on a local Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ckd_ray.cascade.plan import build_plan
from ckd_ray.config import ConfigError, validate_config
from ckd_ray.losses import FusedTeacherSignal, StudentOutputs, TeacherSignalBatch, TopKLogits, distillation_loss
from ckd_ray.losses.config import FusionConfig, LossWeights

REPO = Path(__file__).resolve().parents[1]
MODELS = {"student": {"preset": "tiny-student"}, "ta": {"preset": "tiny-ta"}, "teacher": {"preset": "tiny-teacher"}}


def job(**sections):
    return validate_config({"models": MODELS, "data": {"benchmark_root": "data/kvqa"}, **sections})


def test_fused_plan_is_one_stage_from_ta_and_teacher_after_preparing_both():
    steps = build_plan(job(cascade={"plan": "fused"}))
    assert [(s.teachers, s.learner, s.kind) for s in steps] == [
        ((), "ta", "PT"), ((), "ta", "FT"), ((), "teacher", "PT"), ((), "teacher", "FT"),
        *[(("ta", "teacher"), "student", kind) for kind in ("DPT", "SFT", "DFT")],
    ]
    assert steps[4].step_id == "04-s1-ta+teacher_to_student-DPT" and steps[4].teacher is None
    assert steps[4].loss.fusion == FusionConfig()  # confidence weights, tau = 1


def test_fused_stage_problems_are_reported_at_once_with_field_and_fix():
    with pytest.raises(ConfigError) as err:
        job(loss={"fusion": {"rule": "fixed", "weights": {"tx": 1, "ta": -1}}, "weights": {"output": 1, "feature": 1},
                  "feature_layers": {1: 1}},
            signal={"response_top_k": 8, "feature_layers": [1]}, teacher_pool={"use_cache": False},
            cascade={"stages": [{"teachers": ["ta", "student", "techer"], "steps": ["DFT"]}]})
    message = str(err.value)
    for expected in (
        "cascade.stages.0.teachers.2: role 'techer' is not in models -> fix: did you mean `teacher`?",
        "cascade.stages.0.teachers.1: a model cannot teach itself",
        "loss.fusion.weights.tx: is not one of the stage's teachers",
        "loss.fusion.weights.ta: = -1.0 must be >= 0",
        "loss.weights.feature: > 0 in a stage with several teachers",
        "teacher_pool.use_cache: is false",
        "cascade.stages.0.teachers.1: learner 'student' (~252,672 LLM parameters) is not smaller than teacher 'student'",
    ):
        assert expected in message, message
    assert message.count("loss.fusion.weights.tx") == 1
    with pytest.raises(ConfigError, match="both `teacher` and `teachers` are set"):
        job(cascade={"stages": [{"teacher": "ta", "teachers": ["ta", "teacher"]}]})
    with pytest.raises(ConfigError, match="at least two distinct roles"):
        job(cascade={"stages": [{"teachers": ["ta", "ta"]}]})
    with pytest.raises(ConfigError, match="fusion_temperature"):
        job(cascade={"plan": "fused"}, tune={"space": {"fusion_temprature": {"low": 0.5, "high": 2}}})
    tuned = job(cascade={"plan": "fused"}, tune={"space": {"fusion_temperature": {"low": 0.5, "high": 2}}})
    from ckd_ray.tune.space import plan_searches, tuned_loss

    (search,) = plan_searches(tuned)
    assert search.terms(0) == set()  # tau is no loss term
    assert tuned_loss(tuned.loss, {"fusion_temperature": 0.5}).fusion.temperature == 0.5


def _topk(generator, vocab=16, k=4):
    logits_BLV = torch.randn(2, 6, vocab, generator=generator) * 3
    values_BLK, ids_BLK = logits_BLV.topk(k, dim=-1)
    return TopKLogits(values_BLK, ids_BLK, logits_BLV.scatter(-1, ids_BLK, -math.inf).logsumexp(dim=-1))


def test_two_identical_teachers_through_distillation_loss_give_the_single_teacher_terms():
    generator = torch.Generator().manual_seed(5)
    gram_BNN = torch.randn(2, 3, 3, generator=generator)
    signal = TeacherSignalBatch(response_topk=_topk(generator), visual_topk=_topk(generator),
                                gram_BNN=gram_BNN @ gram_BNN.transpose(1, 2), visual_count_B=torch.tensor([3, 2]))
    logits = (torch.randn(2, 6, 16, generator=generator) * 2).requires_grad_()
    response_mask_BL = torch.zeros(2, 6, dtype=torch.bool)
    response_mask_BL[:, 3:] = True
    visual_mask_BL = torch.zeros(2, 6, dtype=torch.bool)
    visual_mask_BL[0, :3] = True
    visual_mask_BL[1, :2] = True
    options = dict(target_ids_BL=torch.randint(0, 16, (2, 6), generator=generator), response_mask_BL=response_mask_BL,
                   visual_mask_BL=visual_mask_BL, temperature=2.0)
    weights = LossWeights(task=1, output=1, visual_kl=1, visual_relation=1)
    single_total, single = distillation_loss(weights, StudentOutputs(logits), signal, **options)
    (single_grad,) = torch.autograd.grad(single_total, logits)
    fusion = FusionConfig(rule="confidence", weights={"ta": 3.0})
    fused_total, fused = distillation_loss(weights, StudentOutputs(logits), FusedTeacherSignal({"ta": signal, "teacher": signal}),
                                           fusion=fusion, **options)
    (fused_grad,) = torch.autograd.grad(fused_total, logits)
    for term in ("task", "output", "visual_kl", "visual_relation", "total"):
        torch.testing.assert_close(fused[term], single[term], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, single_grad, rtol=1e-5, atol=1e-7)
    assert {k: round(float(v), 6) for k, v in fused.items() if k.startswith("fusion_")} == {
        "fusion_output/ta": 0.5, "fusion_output/teacher": 0.5, "fusion_visual_kl/ta": 0.5, "fusion_visual_kl/teacher": 0.5}
    with pytest.raises(ValueError, match="teacher 'teacher': loss weight visual_relation"):
        distillation_loss(weights, StudentOutputs(logits), FusedTeacherSignal({"ta": signal, "teacher": TeacherSignalBatch(
            response_topk=signal.response_topk, visual_topk=signal.visual_topk)}), fusion=fusion, **options)


def test_fused_batch_decodes_each_teacher_and_refuses_rows_of_other_samples():
    from ckd_ray.teachers.config import SignalSpec
    from ckd_ray.teachers.signal import decode_fused_signal, to_wire

    spec = SignalSpec(response_top_k=2, visual_top_k=0, gram=False)
    values = {role: np.random.default_rng(i).normal(size=(2, 4, 2)).astype(np.float32) for i, role in enumerate(("ta", "teacher"))}
    batch = {"sample_id": np.array(["a", "b"]), "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "sig_resp_topk_values": to_wire(torch.as_tensor(values["ta"]), spec.value_dtype),
             "sig_resp_topk_ids": np.zeros((2, 4, 2), np.int32), "sig_resp_tail_logmass": np.zeros((2, 4), np.float32),
             "t1:sample_id": np.array(["a", "b"]),
             "t1:sig_resp_topk_values": to_wire(torch.as_tensor(values["teacher"]), spec.value_dtype),
             "t1:sig_resp_topk_ids": np.ones((2, 4, 2), np.int32), "t1:sig_resp_tail_logmass": np.ones((2, 4), np.float32)}
    fused = decode_fused_signal(batch, spec, {}, ["ta", "teacher"])
    assert list(fused.teachers) == ["ta", "teacher"]
    assert int(fused.teachers["teacher"].response_topk.ids_BLK.max()) == 1 and int(fused.teachers["ta"].response_topk.ids_BLK.max()) == 0
    torch.testing.assert_close(fused.teachers["teacher"].response_topk.values_BLK.float(),
                               torch.as_tensor(values["teacher"])[:, :4].bfloat16().float())
    batch["t1:sample_id"] = np.array(["b", "a"])
    with pytest.raises(ValueError, match="not the samples of teacher 'ta'"):
        decode_fused_signal(batch, spec, {}, ["ta", "teacher"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.stage2
def test_fused_step_trains_from_both_cached_passes_and_reports_each_teachers_weight(kvqa_dir, tmp_path, random_preset_models):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "tiny_cascade.yaml"),
        "name": "fused",
        "data": {"benchmark_root": str(kvqa_dir)},
        "models": random_preset_models,
        "storage": {"root": str(tmp_path / "runs")},
        "cascade": {"prepare_teachers": False, "plan": None, "student_alone": False,
                    "stages": [{"teachers": ["ta", "teacher"], "steps": ["DFT"]}]},
        "loss": {"fusion": {"rule": "confidence", "temperature": 0.5}},
        "trainer": {"max_steps": 3, "micro_batch_size": 4, "num_workers": 1, "report_every": 1, "checkpoint_every": 10},
        "evaluation": {"max_samples": 8},
        "ray": {"num_cpus": 4},
    }))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "ckd-ray"), "cascade", str(config)], env=env,
                          capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    run = tmp_path / "runs" / "fused"
    manifest = json.loads((run / "manifest.json").read_text())
    (step,) = manifest["steps"].values()
    assert step["status"] == "done" and step["teacher"] == "ta+teacher" and step["metrics"]["step"] == 3
    assert set(step["teacher_pass"]["teachers"]) == {"ta", "teacher"}  # one pass per teacher, each its own cache entry
    assert len({p["key"] for p in step["teacher_pass"]["teachers"].values()}) == 2
    for report in step["history"]:
        weights = [report[f"fusion_output/{role}"] for role in ("ta", "teacher")]
        assert all(0 <= w <= 1 for w in weights) and abs(sum(weights) - 1) < 1e-6
        assert "loss_output" in report and not any(k.startswith("loss_fusion") for k in report)
    assert "## Teacher weights (steps with several teachers)" in (run / "report.md").read_text()
