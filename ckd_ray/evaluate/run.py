"""`evaluate_models`: models' answers and scores on benchmark rows, each model in a fresh Ray
actor process (so its peak-memory figure is its own), a few side by side."""

from __future__ import annotations

from ckd_ray.errors import require_ray
from ckd_ray.evaluate.config import EvaluationConfig


class _Evaluator:
    """One model in its own process: its answers and scores on the rows, then (once no other
    model of the batch is generating) its single-prompt latency."""

    def __init__(self, model_uri: str):
        import torch
        from transformers import AutoTokenizer

        from ckd_ray import storage
        from ckd_ray.models import load_model

        torch.manual_seed(0)
        self.model = load_model(model_uri)
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.tokenizer = AutoTokenizer.from_pretrained(storage.download_dir(model_uri))

    def score(self, rows: list[dict], settings: dict) -> dict:
        from ckd_ray.evaluate.generate import generate_answers, peak_memory_mb
        from ckd_ray.evaluate.scoring import BASELINE_FIELDS, score_records
        from ckd_ray.data.eval_sets import RECORD_FIELDS
        from ckd_ray.models import count_parameters

        answers = generate_answers(self.model, self.tokenizer, rows, batch_size=settings["batch_size"],
                                   max_new_tokens=settings["max_new_tokens"])
        # The no-model answerers' answers ride along (rows carry them where the benchmark has them),
        # so every score can stand beside its baselines on the same samples; so do an evaluation
        # set's name and what its own scorer reads (POPE's strategy, VQAv2's ten human answers).
        carried = (*BASELINE_FIELDS.values(), "eval_set", *RECORD_FIELDS)
        records = [
            {"sample_id": str(r["sample_id"]), "question_type": str(r["question_type"]), "hop": int(r["hop"]),
             "answer": str(r["answer"]), "prediction": a, **{f: r[f] for f in carried if f in r}}
            for r, a in zip(rows, answers)
        ]
        scores = score_records(records)
        scores["parameters"] = float(count_parameters(self.model))
        scores["peak_memory_mb"] = peak_memory_mb()
        return {"scores": scores, "records": records}

    def latency(self, row: dict, settings: dict) -> float:
        from ckd_ray.evaluate.generate import measure_latency

        return measure_latency(self.model, row, max_new_tokens=settings["max_new_tokens"], runs=settings["latency_runs"])


def evaluate_models(model_uris: list[str], rows: list[dict], settings: EvaluationConfig, *, use_gpu: bool = False) -> list[dict]:
    """Scores (`scores`) and per-sample predictions (`records`) of each model, in order. Each
    model gets a fresh Ray actor (its process's peak memory is its own); `settings.concurrent`
    of them generate side by side on CPU (one at a time with a GPU), then their latencies are
    timed one by one, each while nothing else of the batch runs."""
    import ray

    require_ray("evaluate_models")
    options = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0}
    plain = settings.model_dump()
    width = 1 if use_gpu else settings.concurrent
    results: list[dict] = []
    for start in range(0, len(model_uris), width):
        actors = [ray.remote(**options)(_Evaluator).remote(uri) for uri in model_uris[start : start + width]]
        try:
            batch = ray.get([actor.score.remote(rows, plain) for actor in actors])
            for actor, result in zip(actors, batch):
                result["scores"]["latency_s"] = ray.get(actor.latency.remote(rows[0], plain))
            results.extend(batch)
        finally:
            for actor in actors:
                ray.kill(actor)
    return results


def evaluate_model(model_uri: str, rows: list[dict], settings: EvaluationConfig, *, use_gpu: bool = False) -> dict:
    """`evaluate_models` of one model."""
    return evaluate_models([model_uri], rows, settings, use_gpu=use_gpu)[0]


def knowledge_preservation(student_scores: dict, teacher_scores: dict, metric: str | None = None) -> float | None:
    """Seed 000: the student's score as a fraction of its teacher's, on `metric` (default: the
    headline, see `scoring.headline_name`); None (undefined, shown as "-") when the teacher scores
    0 on it."""
    from ckd_ray.evaluate.scoring import headline_name

    metric = metric or headline_name(teacher_scores)
    teacher = teacher_scores.get(metric, 0.0)
    return student_scores.get(metric, 0.0) / teacher if teacher else None
