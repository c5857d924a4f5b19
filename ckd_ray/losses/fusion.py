"""Several teachers fused per token: per-token teacher weights, the fused target, its KL.

Every teacher ships its own compressed rows (``TopKLogits`` or ``SparseLogits``) for the same
positions. Per masked position the fused target is the mixture ``p_f = sum_k w_k p_k`` over the
union U of the teachers' top ids plus one tail bucket (the ``V - |U|`` tokens no teacher listed).
Teacher k's probability of a union id outside its own top ids is its tail share: its tail
tokens share one logit (``ckd_ray.losses.kl``'s model of the tail, exact at T = 1), so each gets
``p_k(tail) / n_k`` with ``n_k = V - k_k``, and the mass teacher k puts outside the union is
``p_k(tail) * (V - |U|) / n_k``. Each teacher's buckets sum to one, so the mixture does too. The
fused rows are handed to ``kl_loss_sparse`` as rows whose softmax at the step's temperature is
exactly ``p_f`` (values ``T log p_f``), so the fused loss shares the single-teacher KL's chunked,
closed-form backward, and two identical teachers give the single-teacher loss and gradient.
Tail draws (signal version 2) are not used: the teachers' draws are different tokens; the tail
bucket is.

The weights ``w_k`` (summing to 1 per position, no gradient) are chosen per token by ``rule``:

* ``fixed``: the configured per-teacher weights, normalised, at every token;
* ``min_ce`` (FuseLLM): all weight to the teacher with the lowest cross-entropy on the label
  token (ties split);
* ``confidence`` (CA-MKD): ``(1 - softmax_k(CE_k / tau)) / (K - 1)``: a teacher far worse on the
  label than the others gets weight near 0. With K > 2 no teacher gets more than ``1 / (K - 1)``;
* ``entropy`` (EBKD-like): ``softmax_k(-H_k / tau)``, the surer teacher weighs more.

The label rules fall back to the entropy weights at tokens without a label (visual tokens, a
label < 0). CE and entropy are the teachers' own, at T = 1 (how right each teacher is does not
depend on the distillation temperature); a label in a teacher's tail gets its tail share, and a
label the teacher gives probability 0 a CE of ``CE_CAP`` nats (finite, so the softmax stays defined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from ckd_ray.losses.kl import DEFAULT_CHUNK_SIZE, KLDirection, kl_loss_sparse
from ckd_ray.losses.logits import SparseLogits

FusionRule = Literal["fixed", "min_ce", "confidence", "entropy"]
FUSION_RULES = get_args(FusionRule)
LABEL_RULES = ("min_ce", "confidence")
CE_CAP = 1e4
"""CE (nats) of a label a teacher gives probability 0."""


class TeacherRows:
    """One teacher's rows at the P masked positions, in float (``compute_dtype``): distinct ids
    ``ids_PK`` (-1 in padding), raw T = 1 logits ``values_PK`` (-inf in padding; any per-row
    shift) and ``tail_logmass_P`` (same shift; -inf when the ids cover the vocabulary)."""

    def __init__(self, ids_PK: torch.Tensor, values_PK: torch.Tensor, tail_logmass_P: torch.Tensor, num_vocab: int):
        self.ids_PK, self.values_PK, self.tail_logmass_P = ids_PK, values_PK, tail_logmass_P
        self.num_tail_P = num_vocab - (ids_PK >= 0).sum(dim=1)

    def bucket_log_probs(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each top id ``[P, K]``, log p of one tail token ``[P]``) at temperature T."""
        log_n_P = self.num_tail_P.clamp_min(1).to(self.values_PK.dtype).log()
        has_tail_P = self.num_tail_P > 0
        tail_logit_P = torch.where(has_tail_P, log_n_P + (self.tail_logmass_P - log_n_P) / temperature, -math.inf)
        scaled_PK = self.values_PK / temperature
        log_norm_P = torch.logsumexp(torch.cat([scaled_PK, tail_logit_P[:, None]], dim=1), dim=1)
        log_top_PK = scaled_PK - log_norm_P[:, None]
        log_tail_token_P = torch.where(has_tail_P, tail_logit_P - log_norm_P - log_n_P, -math.inf)
        return log_top_PK, log_tail_token_P

    def log_probs_of(self, ids_PU: torch.Tensor, temperature: float) -> torch.Tensor:
        """log p of the ids ``ids_PU`` (any ids >= 0; -1 gives -inf) at temperature T."""
        log_top_PK, log_tail_token_P = self.bucket_log_probs(temperature)
        if self.ids_PK.shape[1] == 0:  # no row, or only empty rows: every id is in the tail
            return log_tail_token_P[:, None].expand(ids_PU.shape).masked_fill(ids_PU < 0, -math.inf)
        slot_PU, found_PU = _find(self.ids_PK, ids_PU)
        own_PU = log_top_PK.gather(1, slot_PU)
        log_p_PU = torch.where(found_PU, own_PU, log_tail_token_P[:, None].expand_as(own_PU))
        return log_p_PU.masked_fill(ids_PU < 0, -math.inf)

    def entropy(self) -> torch.Tensor:
        """Entropy (nats) at T = 1 of the teacher's distribution, its tail flat over its tail tokens."""
        log_top_PK, log_tail_token_P = self.bucket_log_probs(1.0)
        top_P = _xlogx(log_top_PK).sum(dim=1)
        tail_P = torch.where(self.num_tail_P > 0, self.num_tail_P.to(top_P.dtype) * _xlogx(log_tail_token_P), 0.0)
        return -(top_P + tail_P)


def teacher_rows(signal, rows_P: torch.Tensor, num_vocab: int, dtype: torch.dtype, num_positions: int) -> TeacherRows:
    """A teacher's ``TopKLogits`` or ``SparseLogits`` read at the flat masked positions ``rows_P``."""
    if hasattr(signal, "positions_R"):  # SparseLogits
        positions_R = signal.positions_R.long()
        row_of_N = torch.full((num_positions,), -1, dtype=torch.long, device=positions_R.device)
        row_of_N[positions_R] = torch.arange(positions_R.numel(), device=positions_R.device)
        teacher_P = row_of_N.index_select(0, rows_P)
        missing = int((teacher_P < 0).sum())  # host sync
        if missing:
            raise ValueError(f"{missing} masked position(s) have no teacher row: the signal was computed for other masks")
        ids_PK = signal.ids_RK.index_select(0, teacher_P).long()
        values_PK = signal.values_RK.index_select(0, teacher_P).to(dtype).masked_fill(ids_PK < 0, -math.inf)
        tail_P = signal.tail_logmass_R.index_select(0, teacher_P).to(dtype)
    else:
        num_top = signal.ids_BLK.shape[-1]
        ids_PK = signal.ids_BLK.reshape(-1, num_top).index_select(0, rows_P).long()
        values_PK = signal.values_BLK.reshape(-1, num_top).index_select(0, rows_P).to(dtype)
        tail_P = signal.tail_logmass_BL.reshape(-1).index_select(0, rows_P).to(dtype)
    if ids_PK.numel() and int(ids_PK.max()) >= num_vocab:  # host sync
        raise ValueError(f"teacher ids must be < the student vocabulary {num_vocab}, got {int(ids_PK.max())}: "
                         "cut the teacher's vocabulary to the student's before taking the top-k")
    return TeacherRows(ids_PK, values_PK, tail_P, num_vocab)


def fusion_weights(teachers: Sequence[TeacherRows], rule: str, *, labels_P: torch.Tensor | None = None,
                   fixed: Sequence[float] | None = None, rule_temperature: float = 1.0) -> torch.Tensor:
    """Per-token teacher weights ``[P, K]`` (rows sum to 1) by ``rule`` (module docstring)."""
    _check_rule(rule, len(teachers), fixed, rule_temperature)
    num_rows = teachers[0].ids_PK.shape[0]
    dtype, device = teachers[0].values_PK.dtype, teachers[0].values_PK.device
    if rule == "fixed":
        fixed_K = torch.tensor(list(fixed), dtype=dtype, device=device)
        return (fixed_K / fixed_K.sum()).expand(num_rows, -1).clone()
    entropy_PK = torch.stack([teacher.entropy() for teacher in teachers], dim=1)
    weights_PK = torch.softmax(-entropy_PK / rule_temperature, dim=1)
    if rule == "entropy" or labels_P is None:
        return weights_PK
    labelled_P = labels_P >= 0
    label_P1 = labels_P.clamp_min(0)[:, None]
    ce_PK = torch.cat([-teacher.log_probs_of(label_P1, 1.0) for teacher in teachers], dim=1).clamp_max(CE_CAP)
    if rule == "min_ce":
        best_PK = (ce_PK == ce_PK.min(dim=1, keepdim=True).values).to(dtype)
        by_label_PK = best_PK / best_PK.sum(dim=1, keepdim=True)
    elif len(teachers) == 1:
        by_label_PK = torch.ones_like(ce_PK)
    else:  # confidence
        by_label_PK = (1.0 - torch.softmax(ce_PK / rule_temperature, dim=1)) / (len(teachers) - 1)
    return torch.where(labelled_P[:, None], by_label_PK, weights_PK)


def fuse_rows(teachers: Sequence[TeacherRows], weights_PK: torch.Tensor, num_vocab: int, temperature: float):
    """The fused target at temperature T over the union of the teachers' ids plus one tail
    bucket: (union ids ``[P, U]``, -1 in padding; their log p_f; log p_f of the tail bucket)."""
    ids_PU = torch.cat([teacher.ids_PK for teacher in teachers], dim=1).sort(dim=1).values
    repeated_PU = torch.zeros_like(ids_PU, dtype=torch.bool)
    repeated_PU[:, 1:] = ids_PU[:, 1:] == ids_PU[:, :-1]
    ids_PU = ids_PU.masked_fill(repeated_PU, -1)
    num_outside_P = num_vocab - (ids_PU >= 0).sum(dim=1)
    log_w_PK = weights_PK.log()
    log_p_PU = torch.logsumexp(torch.stack(
        [log_w_PK[:, k, None] + teacher.log_probs_of(ids_PU, temperature) for k, teacher in enumerate(teachers)]), dim=0)
    # Teacher k's mass outside the union: its (V - |U|) tail tokens, each p_k(tail) / n_k.
    log_outside_P = num_outside_P.clamp_min(1).to(log_p_PU.dtype).log()
    log_tail_P = torch.logsumexp(torch.stack(
        [log_w_PK[:, k] + teacher.bucket_log_probs(temperature)[1] + log_outside_P for k, teacher in enumerate(teachers)]), dim=0)
    return ids_PU, log_p_PU.masked_fill(ids_PU < 0, -math.inf), log_tail_P.masked_fill(num_outside_P == 0, -math.inf)


def fused_kl_loss(
    logits_BLV: torch.Tensor,
    teachers: Sequence,
    mask_BL: torch.Tensor,
    *,
    rule: str,
    labels_BL: torch.Tensor | None = None,
    fixed_weights: Sequence[float] | None = None,
    rule_temperature: float = 1.0,
    temperature: float = 1.0,
    direction: KLDirection = "forward",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``T^2 * mean over masked positions of KL`` against the teachers' fused target, and the mean
    weight of each teacher over those positions (``[K]``, detached; zeros when none is masked).

    ``teachers`` are ``TopKLogits`` or ``SparseLogits`` (mixed is fine) for the same positions;
    ``labels_BL`` the label of each position (< 0: none), read by the label rules. Returns a
    float32 scalar (float64 for float64 logits); 0 with zero gradient when no position is masked.
    """
    if logits_BLV.dim() != 3 or mask_BL.shape != logits_BLV.shape[:2] or mask_BL.dtype != torch.bool:
        raise ValueError(f"expected logits [B, L, V] and a bool mask [B, L], got logits {tuple(logits_BLV.shape)} "
                         f"and mask {tuple(mask_BL.shape)} {mask_BL.dtype}")
    if labels_BL is not None and labels_BL.shape != mask_BL.shape:
        raise ValueError(f"labels {tuple(labels_BL.shape)} must have the mask's shape {tuple(mask_BL.shape)}")
    _check_rule(rule, len(teachers), fixed_weights, rule_temperature)
    from ckd_ray.losses.precision import compute_dtype

    num_vocab, dtype = logits_BLV.shape[-1], compute_dtype(logits_BLV.dtype)
    rows_P = mask_BL.reshape(-1).nonzero().squeeze(1)  # host sync
    rows = [teacher_rows(teacher, rows_P, num_vocab, dtype, mask_BL.numel()) for teacher in teachers]
    labels_P = labels_BL.reshape(-1).index_select(0, rows_P).long() if labels_BL is not None else None
    weights_PK = fusion_weights(rows, rule, labels_P=labels_P, fixed=fixed_weights, rule_temperature=rule_temperature)
    ids_PU, log_p_PU, log_tail_P = fuse_rows(rows, weights_PK, num_vocab, temperature)
    # Rows whose softmax at T is p_f: values T log p_f, and the tail written the way kl.py reads it back.
    num_outside_P = num_vocab - (ids_PU >= 0).sum(dim=1)
    log_n_P = num_outside_P.clamp_min(1).to(dtype).log()
    fused = SparseLogits(positions_R=rows_P, ids_RK=ids_PU, values_RK=log_p_PU * temperature,
                         tail_logmass_R=log_n_P + (log_tail_P - log_n_P) * temperature)
    loss = kl_loss_sparse(logits_BLV, fused, mask_BL, temperature=temperature, direction=direction, chunk_size=chunk_size)
    mean_weight_K = weights_PK.mean(dim=0) if rows_P.numel() else weights_PK.new_zeros(len(teachers))
    return loss, mean_weight_K.detach()


def _find(ids_PK: torch.Tensor, ids_PU: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each id of ``ids_PU``, its slot in the same row of ``ids_PK`` and whether it is there."""
    padded_PK = ids_PK.masked_fill(ids_PK < 0, torch.iinfo(ids_PK.dtype).max)
    sorted_PK, order_PK = padded_PK.sort(dim=1)
    at_PU = torch.searchsorted(sorted_PK, ids_PU.contiguous()).clamp_max(ids_PK.shape[1] - 1)
    found_PU = (sorted_PK.gather(1, at_PU) == ids_PU) & (ids_PU >= 0)
    return order_PK.gather(1, at_PU), found_PU


def _xlogx(log_x: torch.Tensor) -> torch.Tensor:
    """x log x from log x, 0 where x = 0."""
    x = log_x.exp()
    return (x * log_x).masked_fill(x == 0, 0.0)


def _check_rule(rule: str, num_teachers: int, fixed, rule_temperature: float) -> None:
    if rule not in FUSION_RULES:
        raise ValueError(f"fusion rule must be one of {FUSION_RULES}, got {rule!r}")
    if num_teachers < 1:
        raise ValueError("fusion needs at least one teacher")
    if not (math.isfinite(rule_temperature) and rule_temperature > 0):
        raise ValueError(f"fusion temperature must be a finite number > 0, got {rule_temperature}")
    if rule == "fixed":
        if fixed is None or len(fixed) != num_teachers:
            raise ValueError(f"the fixed rule needs one weight per teacher ({num_teachers}), got {fixed}")
        if any(not (math.isfinite(w) and w >= 0) for w in fixed) or not sum(fixed) > 0:
            raise ValueError(f"fixed fusion weights must be finite, >= 0 and not all 0, got {list(fixed)}")
