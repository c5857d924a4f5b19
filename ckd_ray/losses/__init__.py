"""Distillation loss terms: pure functions of tensors and masks, computed in float32 log-space.

Several teachers fused per token: ``ckd_ray.losses.fusion``, through ``FusedTeacherSignal``.
One function per term (``task_loss``, ``kl_loss_topk`` / ``kl_loss_sparse`` / ``kl_loss_dense`` for ``output`` and
``visual_kl``, ``visual_relation_loss``, ``feature_loss``, ``knowledge_loss``,
``attention_loss``) and ``distillation_loss``, which weighs them and reports each one.
"""

from ckd_ray.losses.attention import attention_loss, gather_visual_keys
from ckd_ray.losses.composite import (
    FUSION_PREFIX,
    TERM_NAMES,
    FusedTeacherSignal,
    NonFiniteLossError,
    SparseLogits,
    StudentOutputs,
    TeacherSignalBatch,
    TopKLogits,
    distillation_loss,
)
from ckd_ray.losses.feature import FeatureProjection, feature_loss
from ckd_ray.losses.kl import DEFAULT_CHUNK_SIZE, KL_DIRECTIONS, KLDirection, cut_vocab, kl_loss_dense, kl_loss_sparse, kl_loss_topk
from ckd_ray.losses.knowledge import fact_log_probs, knowledge_loss, soften_fact_log_probs
from ckd_ray.losses.relation import visual_relation_loss
from ckd_ray.losses.task import IGNORE_INDEX, task_loss

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "KL_DIRECTIONS",
    "FUSION_PREFIX",
    "TERM_NAMES",
    "FeatureProjection",
    "FusedTeacherSignal",
    "KLDirection",
    "NonFiniteLossError",
    "SparseLogits",
    "StudentOutputs",
    "TeacherSignalBatch",
    "TopKLogits",
    "attention_loss",
    "cut_vocab",
    "distillation_loss",
    "fact_log_probs",
    "feature_loss",
    "gather_visual_keys",
    "kl_loss_dense",
    "kl_loss_sparse",
    "kl_loss_topk",
    "knowledge_loss",
    "soften_fact_log_probs",
    "task_loss",
    "visual_relation_loss",
]
