"""Evaluation: generated answers scored the benchmarks' way, plus size, latency and memory."""

from ckd_ray.evaluate.config import EvaluationConfig
from ckd_ray.evaluate.run import evaluate_model, evaluate_models, knowledge_preservation
from ckd_ray.evaluate.scoring import pope_average_f1, pope_f1, score_records, vqa_soft_accuracy

__all__ = ["EvaluationConfig", "evaluate_model", "evaluate_models", "knowledge_preservation", "pope_average_f1", "pope_f1", "score_records", "vqa_soft_accuracy"]
