"""`evaluate_model`: a model's answers and scores on benchmark rows, in a fresh Ray worker
process (so its peak-memory figure is its own)."""

from __future__ import annotations

from ckd_ray.evaluate.config import EvaluationConfig


def _evaluate_in_process(model_uri: str, rows: list[dict], settings: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ckd_ray import storage
    from ckd_ray.evaluate.generate import generate_answers, measure_latency, peak_memory_mb
    from ckd_ray.evaluate.scoring import score_records
    from ckd_ray.models import count_parameters, load_model

    torch.manual_seed(0)
    model = load_model(model_uri)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(storage.download_dir(model_uri))
    answers = generate_answers(model, tokenizer, rows, batch_size=settings["batch_size"], max_new_tokens=settings["max_new_tokens"])
    records = [
        {"sample_id": str(r["sample_id"]), "question_type": str(r["question_type"]), "hop": int(r["hop"]),
         "answer": str(r["answer"]), "prediction": a}
        for r, a in zip(rows, answers)
    ]
    scores = score_records(records)
    scores["parameters"] = float(count_parameters(model))
    scores["latency_s"] = measure_latency(model, rows[0], max_new_tokens=settings["max_new_tokens"], runs=settings["latency_runs"])
    scores["peak_memory_mb"] = peak_memory_mb()
    return {"scores": scores, "records": records}


def evaluate_model(model_uri: str, rows: list[dict], settings: EvaluationConfig, *, use_gpu: bool = False) -> dict:
    """Scores (`scores`) and per-sample predictions (`records`) of the model at `model_uri`.
    Runs as a Ray task with `max_calls=1`: a fresh process per model, so peak memory is its own."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_calls=1)(_evaluate_in_process)
    return ray.get(task.remote(model_uri, rows, settings.model_dump()))


def knowledge_preservation(student_scores: dict, teacher_scores: dict, metric: str = "average") -> float | None:
    """Seed 000: the student's score as a fraction of its teacher's; None (undefined, shown as
    "-") when the teacher scores 0 on `metric`."""
    teacher = teacher_scores.get(metric, 0.0)
    return student_scores.get(metric, 0.0) / teacher if teacher else None
