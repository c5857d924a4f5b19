"""Tiny pretrained parts: a vision tower that sees digits and ink colours, LLMs trained on the
benchmark's text, cached by content, and composed into Llava folders the way public parts are."""

from __future__ import annotations

import json
import os

import pytest

from ckd_ray.models.pretrain import LanguageRecipe, VisionRecipe, language_corpus, pretrain_parts


@pytest.fixture(scope="module")
def parts(kvqa_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("parts")
    lines: list[str] = []
    built = pretrain_parts(kvqa_dir, out / "parts", vision=VisionRecipe(steps=150), language=LanguageRecipe(steps=40),
                           sizes=("student",), compose_into=out / "tiny", log=lines.append)
    return built, out, lines


def test_the_vision_tower_sees_digits_and_ink_colours(parts):
    built, _, lines = parts
    figures = built.figures["vision"]
    # Chance: 0.1 for the digit, 0.25 for the colour; measured on the validation split's images.
    assert figures["val_digit_accuracy"] > 0.6 and figures["val_colour_accuracy"] > 0.9, figures
    assert any(line.startswith("[pretrain] vision step 150/150") for line in lines)


def test_the_llm_learns_the_benchmark_text_and_is_saved_with_its_tokenizer(parts, kvqa_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built, _, _ = parts
    figures = built.figures["student"]
    # An untrained model of a 512-token vocabulary is near perplexity 512; 40 steps bring the facts far below.
    assert figures["fact_perplexity"] < 20 and figures["val_perplexity"] < 20, figures
    model = AutoModelForCausalLM.from_pretrained(built.llms["student"])
    tokenizer = AutoTokenizer.from_pretrained(built.llms["student"])
    assert model.config.model_type == "qwen2" and sum(p.numel() for p in model.parameters()) == figures["parameters"]
    assert tokenizer("7 is odd.")["input_ids"] == AutoTokenizer.from_pretrained(kvqa_dir / "processor")("7 is odd.")["input_ids"]
    train, val = language_corpus(kvqa_dir, "train"), language_corpus(kvqa_dir, "val")
    assert "7 is odd." in train and "7 is odd." not in val and not any("<image>" in text for text in train + val)


def test_parts_are_cached_by_content_and_composed_into_llava_folders(parts, kvqa_dir):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    built, out, _ = parts
    again = pretrain_parts(kvqa_dir, out / "parts", vision=VisionRecipe(steps=150), language=LanguageRecipe(steps=40),
                           sizes=("student",), compose_into=out / "tiny", log=lambda _line: None)
    assert again.figures == built.figures
    assert set(again.reused) == {built.vision, built.llms["student"], built.composed["student"]}
    other = pretrain_parts(kvqa_dir, out / "parts", vision=VisionRecipe(steps=150), language=LanguageRecipe(steps=41),
                           sizes=("student",), log=lambda _line: None)
    assert other.llms["student"] != built.llms["student"] and other.vision == built.vision  # another recipe, another folder

    folder = built.composed["student"]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llava" and config.vision_feature_layer == -1 and config.vision_config.hidden_size == 64
    assert json.loads((out / "tiny" / "student" / "composed_from.json").read_text())["llm"] == built.llms["student"]
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer("7 is odd.")["input_ids"] == AutoTokenizer.from_pretrained(kvqa_dir / "processor")("7 is odd.")["input_ids"]


def test_the_composed_budget_benchmark_runs_end_to_end(parts, kvqa_dir, tmp_path):
    """`benchmarks/bench_composed_budget.py` at its smallest size on the composed student: its real
    path (PT, FT, greedy answers, scores beside question-only), checked for shape, not figures."""
    import subprocess
    import sys
    from pathlib import Path

    built, _, _ = parts
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "budget.json"
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_composed_budget.py"), "--model", built.composed["student"],
                           "--benchmark-root", str(kvqa_dir), "--pt-steps", "2", "--ft-steps", "2", "--test-samples", "16",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["seconds"]) == {"data", "PT", "FT", "evaluation"}
    assert {"grounded", "margin", "accuracy"} <= set(figures["scores"]) and 0.0 <= figures["scores"]["grounded"] <= 1.0
    assert "FT step 2/2" in done.stdout


# The short cascade's budget (one worker of 2 CPUs, batch 32): enough for the composed student to
# read the digit off the image.
SHORT_PT, SHORT_FT = 100, 400


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.stage2  # about 2 min alone, 5 beside the default run's other Ray tests: CI's second stage
def test_a_short_cascade_from_the_parts_answers_hop0_questions_better_than_question_only(parts, kvqa_dir, tmp_path):
    """The benchmark's promise, end to end: a student composed from the pretrained parts and trained
    by a short `ckd-ray cascade` (the student-only plan: PT, FT) answers the questions about the
    image itself (hop 0) better than the question-only answerer does on the same samples, which
    the random-weight models never did."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    built, _, _ = parts
    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "short.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(repo / "configs" / "tiny_cascade.yaml"),
        "name": "short",
        # Only the student trains; the config's TA and teacher folders are not built in a fresh clone.
        "models": {"student": {"path": built.composed["student"]}, "ta": {"preset": "tiny-ta", "path": None, "prepare": None},
                   "teacher": {"preset": "tiny-teacher", "path": None, "prepare": None}},
        "data": {"benchmark_root": str(kvqa_dir)},
        "cascade": {"plan": None, "prepare_teachers": False, "student_alone": False,
                    "stages": [{"steps": [{"kind": "PT", "max_steps": SHORT_PT}, {"kind": "FT", "max_steps": SHORT_FT}]}]},
        "trainer": {"num_workers": 1, "cpus_per_worker": 2, "micro_batch_size": 32, "epochs": 3},
        "evaluation": {"max_samples": 400},
        "storage": {"root": str(tmp_path / "runs")},
        "ray": {"num_cpus": 4},
    }))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "ckd-ray"), "cascade", str(config)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    manifest = json.loads((tmp_path / "runs" / "short" / "manifest.json").read_text())
    (student,) = [e["scores"] for e in manifest["evaluations"].values() if e["model_uri"].endswith("FT/model")]
    question_only = manifest["baselines"]["question_only"]
    assert student["hop0_acc"] > question_only["hop0_acc"] + 0.05, (student, question_only)
    assert student["grounded"] > 0.0, student
