"""Distillation loss terms: pure functions of tensors and masks, computed in float32 log-space.

Several teachers fused per token: ``ckd_ray.losses.fusion``, through ``FusedTeacherSignal``.
One function per term (``task_loss``, ``kl_loss_topk`` / ``kl_loss_sparse`` / ``kl_loss_dense`` for ``output`` and
``visual_kl``, ``visual_relation_loss``, ``feature_loss``, ``knowledge_loss``,
``attention_loss``) and ``distillation_loss``, which weighs them and reports each one.

The names below load on first use: a section of the config tree (`ckd_ray.losses.config`) is
imported without torch, so the planner and every config check run without it."""

from ckd_ray.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_CHUNK_SIZE": ".kl",
    "FUSION_PREFIX": ".composite",
    "FeatureProjection": ".feature",
    "FusedTeacherSignal": ".composite",
    "IGNORE_INDEX": ".task",
    "KLDirection": ".kl",
    "KL_DIRECTIONS": ".kl",
    "NonFiniteLossError": ".composite",
    "SparseLogits": ".logits",
    "StudentOutputs": ".composite",
    "TERM_NAMES": ".composite",
    "TeacherSignalBatch": ".composite",
    "TopKLogits": ".logits",
    "attention_loss": ".attention",
    "cut_vocab": ".kl",
    "distillation_loss": ".composite",
    "fact_log_probs": ".knowledge",
    "feature_loss": ".feature",
    "gather_visual_keys": ".attention",
    "kl_loss_dense": ".kl",
    "kl_loss_sparse": ".kl",
    "kl_loss_topk": ".kl",
    "knowledge_loss": ".knowledge",
    "soften_fact_log_probs": ".knowledge",
    "task_loss": ".task",
    "visual_relation_loss": ".relation",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
