"""The weighted distillation loss: every term, its inputs checked up front, its value reported.

Positions each term reads (``*_mask_BL`` are the data pipeline's masks):

* ``task``, ``output``: positions that predict a response token (``response_mask_BL``);
* ``visual_kl``, ``visual_relation``: image-token positions (``visual_mask_BL``);
* ``feature``: response positions, at the layers of ``projection.layer_map``;
* ``knowledge``: the answer position of each sample with candidate facts;
* ``attention``: response positions as queries, visual positions as keys, at the student layers
  the teacher shipped attention for.

Several teachers (``FusedTeacherSignal``, a stage with several `teachers`): ``output`` and
``visual_kl`` are the KL to the teachers' per-token fusion (``ckd_ray.losses.fusion``; the label of
an ``output`` position is its target token, visual positions have none), and the report adds each
teacher's mean weight, ``fusion_<term>/<role>``; the other teacher terms are each teacher's term
weighted by ``fusion.weights`` (normalised).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckd_ray.losses.attention import attention_loss, gather_visual_keys
from ckd_ray.losses.feature import FeatureProjection, feature_loss
from ckd_ray.losses.fusion import fused_kl_loss
from ckd_ray.losses.kl import DEFAULT_CHUNK_SIZE, KLDirection, kl_loss_sparse, kl_loss_topk
from ckd_ray.losses.knowledge import fact_log_probs, knowledge_loss, soften_fact_log_probs
from ckd_ray.losses.logits import SparseLogits, TopKLogits
from ckd_ray.losses.relation import visual_relation_loss
from ckd_ray.losses.task import task_loss
from ckd_ray.losses.terms import TERM_NAMES

FUSION_PREFIX = "fusion_"
"""Report entries ``fusion_<term>/<role>``: a teacher's mean per-token weight, not a loss term."""


class NonFiniteLossError(FloatingPointError):
    """A loss term came out NaN or infinite; the message names the term(s) and value(s)."""


@dataclass
class StudentOutputs:
    """What the student's forward pass provides to the loss.

    ``logits_BLV`` in any float dtype. ``hidden_states[i]`` is ``[B, L, d_student]`` with
    transformers' indexing (0 = embedding output), needed for ``feature``. ``attentions[i]`` is
    layer i's attention probabilities ``[B, H, L, L]`` (eager attention), needed for
    ``attention``. Either may be a tuple as transformers returns it or a dict by layer.
    """

    logits_BLV: torch.Tensor
    hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor] | None = None
    attentions: Sequence[torch.Tensor] | Mapping[int, torch.Tensor] | None = None


@dataclass
class TeacherSignalBatch:
    """The teacher signal for one batch; each field is needed only by the terms listed.

    * ``response_topk`` (``output``), ``visual_topk`` (``visual_kl``);
    * ``gram_BNN`` ``[B, N, N]`` padded and ``visual_count_B`` (``visual_relation``);
    * ``hidden_states``: ``[B, L, d_teacher]`` by teacher layer index (``feature``);
    * ``attentions``: ``[B, G, L, N]`` visual-key columns averaged into G head groups, keyed by the
      student layer they are distilled into (``attention``);
    * ``fact_log_probs_BF`` at T = 1, ``fact_mask_BF``, ``fact_token_ids_BFT`` (padded with -1)
      and ``answer_pos_B`` (``knowledge``).
    """

    response_topk: TopKLogits | SparseLogits | None = None
    visual_topk: TopKLogits | SparseLogits | None = None
    gram_BNN: torch.Tensor | None = None
    visual_count_B: torch.Tensor | None = None
    hidden_states: Mapping[int, torch.Tensor] | None = None
    attentions: Mapping[int, torch.Tensor] | None = None
    fact_log_probs_BF: torch.Tensor | None = None
    fact_mask_BF: torch.Tensor | None = None
    fact_token_ids_BFT: torch.Tensor | None = None
    answer_pos_B: torch.Tensor | None = None


@dataclass
class FusedTeacherSignal:
    """The signals of several teachers for one batch (a stage with several `teachers`), by role in
    the stage's order; the loss fuses them as its ``fusion`` argument says."""

    teachers: dict[str, TeacherSignalBatch]


def distillation_loss(
    weights: Any,
    student: StudentOutputs,
    signal: TeacherSignalBatch | FusedTeacherSignal,
    *,
    target_ids_BL: torch.Tensor,
    response_mask_BL: torch.Tensor,
    visual_mask_BL: torch.Tensor,
    temperature: float = 1.0,
    kl_direction: KLDirection = "forward",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    projection: FeatureProjection | None = None,
    fusion: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``total = sum_term weight * term`` and a report of every computed term.

    ``weights`` is any object or mapping with the float fields ``TERM_NAMES`` (the config's
    ``LossWeights``). Terms with weight 0 are neither computed nor reported, and need no signal;
    a positive weight whose inputs are missing raises one ValueError listing every such field.
    Returns the total (with gradient) and ``{term: detached unweighted value, ..., "total": ...}``.
    Raises NonFiniteLossError naming the term when any term is NaN or infinite.

    With a ``FusedTeacherSignal``, ``fusion`` (the config's ``FusionConfig``: ``rule``,
    ``temperature``, ``weight_of(role)``) says how the teachers are fused (module docstring);
    ``projection`` is then a mapping role -> FeatureProjection when the feature term is on.
    """
    term_weights = _read_weights(weights)
    fused = isinstance(signal, FusedTeacherSignal)
    if fused and fusion is None:
        raise ValueError("several teachers' signal but no `fusion` settings: pass the loss config's fusion")
    teachers = signal.teachers if fused else {None: signal}
    problems = []
    for role, teacher in teachers.items():
        found = _missing_inputs(term_weights, student, teacher, projection[role] if fused and isinstance(projection, Mapping) else projection)
        problems += [f"teacher {role!r}: {problem}" if fused else problem for problem in found]
    if problems:
        raise ValueError("cannot compute the distillation loss:\n  " + "\n  ".join(problems))
    logits_BLV = student.logits_BLV
    kl_options = dict(temperature=temperature, direction=kl_direction, chunk_size=chunk_size)
    terms: dict[str, torch.Tensor] = {}
    fusion_report: dict[str, torch.Tensor] = {}
    role_weights = _normalised_role_weights(fusion, teachers) if fused else {None: 1.0}

    def per_teacher(term) -> torch.Tensor:
        """The term of each teacher, weighted (one teacher: its term)."""
        return sum(weight * term(teachers[role], role) for role, weight in role_weights.items() if weight > 0)

    def kl_term(name: str, field: str, mask_BL, labels_BL) -> torch.Tensor:
        if not fused:
            return _teacher_kl(logits_BLV, getattr(signal, field), mask_BL, kl_options)
        loss, mean_weight_K = fused_kl_loss(
            logits_BLV, [getattr(teacher, field) for teacher in teachers.values()], mask_BL, rule=fusion.rule,
            labels_BL=labels_BL, fixed_weights=list(role_weights.values()), rule_temperature=fusion.temperature, **kl_options)
        fusion_report.update({f"{FUSION_PREFIX}{name}/{role}": mean_weight_K[k] for k, role in enumerate(teachers)})
        return loss

    if term_weights["task"]:
        terms["task"] = task_loss(logits_BLV, target_ids_BL, response_mask_BL, chunk_size=chunk_size)
    if term_weights["output"]:
        terms["output"] = kl_term("output", "response_topk", response_mask_BL, target_ids_BL.masked_fill(~response_mask_BL, -1))
    if term_weights["visual_kl"]:
        terms["visual_kl"] = kl_term("visual_kl", "visual_topk", visual_mask_BL, None)
    if term_weights["visual_relation"]:
        terms["visual_relation"] = per_teacher(lambda teacher, role: visual_relation_loss(
            logits_BLV, visual_mask_BL, teacher.gram_BNN, teacher.visual_count_B))
    if term_weights["feature"]:
        terms["feature"] = per_teacher(lambda teacher, role: feature_loss(
            student.hidden_states, teacher.hidden_states, projection[role] if fused else projection, response_mask_BL))
    if term_weights["knowledge"]:
        student_fact_log_probs_BF = None

        def knowledge(teacher, role):
            nonlocal student_fact_log_probs_BF
            if student_fact_log_probs_BF is None:  # the student side is the same for every teacher
                student_fact_log_probs_BF = fact_log_probs(
                    logits_BLV, teacher.answer_pos_B, teacher.fact_token_ids_BFT, teacher.fact_mask_BF, temperature)
            teacher_fact_log_probs_BF = soften_fact_log_probs(teacher.fact_log_probs_BF, teacher.fact_mask_BF, temperature)
            return knowledge_loss(student_fact_log_probs_BF, teacher_fact_log_probs_BF, teacher.fact_mask_BF)

        terms["knowledge"] = per_teacher(knowledge)
    if term_weights["attention"]:
        terms["attention"] = per_teacher(lambda teacher, role: _mean_attention_loss(
            student.attentions, teacher.attentions, response_mask_BL, visual_mask_BL))
    _check_finite(terms)
    total = sum(term_weights[name] * value for name, value in terms.items())
    report = {name: value.detach() for name, value in terms.items()}
    report["total"] = total.detach()
    report.update(fusion_report)
    return total, report


def _normalised_role_weights(fusion, teachers: Mapping[str, Any]) -> dict[str, float]:
    weights = {role: float(fusion.weight_of(role)) for role in teachers}
    total = sum(weights.values())
    if not (math.isfinite(total) and total > 0) or any(not (math.isfinite(w) and w >= 0) for w in weights.values()):
        raise ValueError(f"fusion weights {weights} must be finite, >= 0 and not all 0")
    return {role: weight / total for role, weight in weights.items()}


def _teacher_kl(logits_BLV, topk: TopKLogits | SparseLogits, mask_BL, kl_options) -> torch.Tensor:
    if isinstance(topk, SparseLogits):
        return kl_loss_sparse(logits_BLV, topk, mask_BL, **kl_options)
    return kl_loss_topk(logits_BLV, topk.values_BLK, topk.ids_BLK, topk.tail_logmass_BL, mask_BL, **kl_options)


def _mean_attention_loss(student_attentions, teacher_attentions, query_mask_BL, visual_mask_BL):
    loss_per_layer = []
    for student_layer, attn_teacher_BGLN in sorted(teacher_attentions.items()):
        attn_student_BHLN, key_mask_BN = gather_visual_keys(
            student_attentions[student_layer], visual_mask_BL, attn_teacher_BGLN.shape[-1]
        )
        loss_per_layer.append(attention_loss(attn_student_BHLN, attn_teacher_BGLN, query_mask_BL, key_mask_BN))
    return torch.stack(loss_per_layer).mean()


def _read_weights(weights: Any) -> dict[str, float]:
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(TERM_NAMES))
        if unknown:
            raise ValueError(f"unknown loss weight(s) {unknown}: the terms are {list(TERM_NAMES)}")
        raw = {name: weights.get(name) for name in TERM_NAMES}
    else:
        raw = {name: getattr(weights, name, None) for name in TERM_NAMES}
    problems = [f"loss weight {name} is missing" for name, value in raw.items() if value is None]
    term_weights = {name: float(value) for name, value in raw.items() if value is not None}
    problems += [
        f"loss weight {name} = {value} must be a finite number >= 0"
        for name, value in term_weights.items()
        if not (math.isfinite(value) and value >= 0)
    ]
    if not problems and not any(term_weights.values()):
        problems.append(f"every loss weight is 0: set at least one of {list(TERM_NAMES)} > 0")
    if problems:
        raise ValueError("invalid loss weights:\n  " + "\n  ".join(problems))
    return term_weights


def _missing_inputs(term_weights, student, signal, projection) -> list[str]:
    required = {
        "output": {"signal.response_topk": signal.response_topk},
        "visual_kl": {"signal.visual_topk": signal.visual_topk},
        "visual_relation": {"signal.gram_BNN": signal.gram_BNN, "signal.visual_count_B": signal.visual_count_B},
        "feature": {
            "signal.hidden_states": signal.hidden_states,
            "student.hidden_states": student.hidden_states,
            "projection": projection,
        },
        "knowledge": {
            "signal.fact_log_probs_BF": signal.fact_log_probs_BF,
            "signal.fact_mask_BF": signal.fact_mask_BF,
            "signal.fact_token_ids_BFT": signal.fact_token_ids_BFT,
            "signal.answer_pos_B": signal.answer_pos_B,
        },
        "attention": {"signal.attentions": signal.attentions, "student.attentions": student.attentions},
    }
    problems = [
        f"loss weight {term} = {term_weights[term]} > 0 but {field} is missing: "
        "provide it, or set the weight to 0"
        for term, fields in required.items()
        if term_weights[term]
        for field, value in fields.items()
        if value is None
    ]
    if term_weights["attention"] and signal.attentions is not None and student.attentions is not None:
        if not signal.attentions:
            problems.append(
                "loss weight attention > 0 but signal.attentions has no layer: ship one, or set the weight to 0"
            )
        if isinstance(student.attentions, Mapping):
            student_layers = set(student.attentions)
        else:
            student_layers = set(range(len(student.attentions)))
        problems += [
            f"signal.attentions has student layer {layer}, which student.attentions lacks"
            for layer in sorted(set(signal.attentions) - student_layers)
        ]
    return problems


def _check_finite(terms: dict[str, torch.Tensor]) -> None:
    values = torch.stack([value.detach().float() for value in terms.values()])
    if bool(torch.isfinite(values).all()):  # host sync, once per step
        return
    bad = [f"{name} = {float(value.detach())}" for name, value in terms.items() if not torch.isfinite(value.detach())]
    raise NonFiniteLossError(f"non-finite loss term(s): {', '.join(bad)}; stopping the step")
