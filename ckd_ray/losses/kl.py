"""Temperature-softened KL between teacher and student token distributions (`output`, `visual_kl`).

The loss on a set of positions (response positions for `output`, visual positions for
`visual_kl`) is ``T^2 * mean_positions KL``, with T^2 keeping gradient magnitudes comparable
across temperatures (Hinton et al.). Forward KL is ``KL(p_T || p_S)`` (teacher first,
mode-covering); reverse KL is ``KL(p_S || p_T)`` (mode-seeking). Terms where the first
distribution has probability 0 are 0 (the ``xlogy`` convention), so ``-inf`` logits never make
``0 * inf``. A token the teacher gives mass and the student gives none (``-inf`` student logit)
makes forward KL infinite (and the converse makes reverse KL infinite); the caller's finiteness
check then names the term.

Two teacher inputs:

* dense teacher logits ``[B, L, V]`` (a co-located teacher, tests, fidelity measurements);
* the compressed signal that crosses the object store: the teacher's raw ``T = 1`` logits of its
  top-k tokens (``topk_values_BLK``, ``topk_ids_BLK``, distinct ids) and ``tail_logmass_BL =
  log sum_{j not in top-k} exp(z_j)``, also at ``T = 1``, ``-inf`` when the top-k covers the
  vocabulary. Raw logits rather than log-probs let a temperature sweep reuse one teacher pass.

Top-k KL. The KL is taken over k + 1 buckets: the k teacher ids, and one tail bucket holding all
other tokens. The student's bucket probabilities are exact: its probability of each of the k
ids, and for the tail ``logsumexp`` of its logits outside those ids minus its full log-partition
(computed from the full student logits, not as ``1 - sum``, which cancels catastrophically when
the tail is tiny). When k == V the tail is empty and the result is the dense KL. For k < V
at T = 1 the teacher's buckets are exact and merging tokens into one bucket can only lose
information, so the top-k KL is a lower bound of the dense KL (data processing inequality)
that grows towards it as k grows.

Teacher tail at T != 1. The tail is shipped as one number, so its temperature-softened mass
is approximated: the ``n = V - k`` tail tokens are treated as sharing one logit
``u = tail_logmass - log n``, so the tail's softened log-mass is ``log n + u / T``
(exact at T = 1). With ``r`` the teacher's true distribution within its tail, the exact value is
``tail_logmass / T + log sum_j r_j^(1/T)``, and exact minus approximate tail log-mass is
``(1 - 1/T) * (H_{1/T}(r) - log n)`` where ``H_a`` is the Renyi entropy of order ``a``: zero at
T = 1 or for a flat tail, an underestimate of the tail mass for T < 1 and an overestimate for
T > 1, and at most ``|1 - 1/T| * log n`` in size. The top-k buckets are exact at every T;
only the tail bucket's share (and through renormalisation the others') moves. Away from T = 1
the top-k KL is therefore no longer guaranteed to be a lower bound.

Ragged rows (signal version 2, ``kl_loss_sparse``). The same k + 1 buckets, with a k of each
row's own (the smallest whose left-out mass is at most ``signal.tail_mass``), so the tail bucket
of a row holds ``n = V - k_row`` tokens in the formula above. Values may be shifted per row
(softmax is shift-invariant). Rows may also carry m draws from the teacher's distribution within
its tail (RS-KD's importance sampling): for forward KL the tail bucket is then replaced by the
drawn tokens, each weighing ``multiplicity / m`` of the tail at T = 1, so the teacher target
``p_hat`` is exact on the top ids and an unbiased estimate on the tail, and so are the loss value
(its tail terms use each drawn token's exact log-probability) and its gradient ``q - p_hat``.
At T != 1 the tail's softened mass is estimated from the same draws,
``S_T = tail_mass * mean_j exp(z_j (1/T - 1))`` (importance weights ``p_T / p``), and the drawn
tokens weigh ``multiplicity / m * exp(z_j (1/T - 1)) * tail_mass / Z_T``: self-normalised, hence
consistent rather than unbiased. Reverse KL (``sum_v q_v log(q_v / p_v)`` needs ``p_v`` wherever
the student puts mass) ignores the draws and uses the tail bucket.

Memory. The masked positions are gathered first (only those), then processed ``chunk_size`` rows
at a time in float32, so the workspace is a few ``[chunk_size, V]`` tensors instead of
``[B * L, V]`` ones. Backward uses a custom autograd Function rather than
``torch.utils.checkpoint``: it recomputes each chunk's softmaxes and writes the gradient rows
straight into one gradient buffer, whereas checkpointing would keep every chunk's gathered
input alive and scatter each chunk's gradient through a full-size ``[B * L, V]`` zero tensor.
The gradient formulas are closed-form (``p_S - p_T`` for forward KL), cheaper than replaying
autograd through two log-softmaxes. The teacher side receives no gradient.
"""

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from ckd_ray.losses.precision import compute_dtype

KLDirection = Literal["forward", "reverse"]
KL_DIRECTIONS = ("forward", "reverse")
DEFAULT_CHUNK_SIZE = 256


def cut_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Slice the last (vocabulary) dimension to the first ``vocab_size`` entries (a view).

    Qwen2.5 checkpoints pad their output layer (151936 rows for 0.5B-3B, 152064 for 7B+); the
    padded rows are not tokens and must be cut away, not compared.
    """
    if not 0 < vocab_size <= logits.shape[-1]:
        raise ValueError(
            f"cut_vocab: vocab_size must be in [1, {logits.shape[-1]}] for logits of shape "
            f"{tuple(logits.shape)}, got {vocab_size}"
        )
    return logits[..., :vocab_size]


def kl_loss_dense(
    logits_BLV: torch.Tensor,
    teacher_logits_BLV: torch.Tensor,
    mask_BL: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: KLDirection = "forward",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``T^2 * mean over masked positions of KL`` against dense teacher logits.

    Both vocabularies must already be the same size (see ``cut_vocab``). Returns a float32
    scalar (float64 for float64 inputs); 0 with zero gradient when no position is masked.
    """
    _check_options(temperature, direction, chunk_size)
    if teacher_logits_BLV.shape[-1] != logits_BLV.shape[-1]:
        raise ValueError(
            f"student vocabulary {logits_BLV.shape[-1]} != teacher vocabulary "
            f"{teacher_logits_BLV.shape[-1]}: cut both to the shared range with cut_vocab"
        )
    _check_positions(logits_BLV, mask_BL, teacher_logits_BLV=teacher_logits_BLV)
    num_vocab = logits_BLV.shape[-1]
    rows_P = mask_BL.reshape(-1).nonzero().squeeze(1)  # host sync: the number of rows drives chunking
    teacher_NV = teacher_logits_BLV.reshape(-1, num_vocab)
    kl_P = _ChunkedKL.apply(
        logits_BLV.reshape(-1, num_vocab),
        rows_P,
        lambda student_NV, rows_C, with_grad: _dense_kl_rows(
            student_NV, teacher_NV, rows_C, temperature, direction == "reverse", with_grad
        ),
        temperature,
        chunk_size,
    )
    return kl_P.sum() / max(rows_P.numel(), 1) * temperature**2


def kl_loss_topk(
    logits_BLV: torch.Tensor,
    topk_values_BLK: torch.Tensor,
    topk_ids_BLK: torch.Tensor,
    tail_logmass_BL: torch.Tensor,
    mask_BL: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: KLDirection = "forward",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``T^2 * mean over masked positions of KL`` over k + 1 buckets (module docstring).

    The teacher tensors are aligned with the sequence (``[B, L, K]`` and ``[B, L]``) and read at
    masked positions only. Their ids index the student's vocabulary, so the teacher must cut
    its vocabulary to the student's before taking the top-k and the tail. Returns a float32
    scalar; 0 with zero gradient when no position is masked.
    """
    _check_options(temperature, direction, chunk_size)
    _check_positions(
        logits_BLV,
        mask_BL,
        topk_values_BLK=topk_values_BLK,
        topk_ids_BLK=topk_ids_BLK,
        tail_logmass_BL=tail_logmass_BL,
    )
    num_vocab = logits_BLV.shape[-1]
    num_top = topk_ids_BLK.shape[-1]
    if topk_values_BLK.shape != topk_ids_BLK.shape or not 0 < num_top <= num_vocab:
        raise ValueError(
            f"top-k values {tuple(topk_values_BLK.shape)} and ids {tuple(topk_ids_BLK.shape)} "
            f"must have the same shape with 1 <= k <= vocabulary {num_vocab}"
        )
    rows_P = mask_BL.reshape(-1).nonzero().squeeze(1)  # host sync: the number of rows drives chunking
    values_NK = topk_values_BLK.reshape(-1, num_top)
    ids_NK = topk_ids_BLK.reshape(-1, num_top)
    tail_logmass_N = tail_logmass_BL.reshape(-1)
    ids_PK = ids_NK.index_select(0, rows_P)
    if ids_PK.numel() and (ids_PK.min() < 0 or ids_PK.max() >= num_vocab):  # host sync
        raise ValueError(
            f"top-k ids must lie in [0, {num_vocab}) at masked positions, got range "
            f"[{int(ids_PK.min())}, {int(ids_PK.max())}]: cut the teacher's vocabulary to the "
            "student's before taking the top-k"
        )
    kl_P = _ChunkedKL.apply(
        logits_BLV.reshape(-1, num_vocab),
        rows_P,
        lambda student_NV, rows_C, with_grad: _topk_kl_rows(
            student_NV,
            rows_C,
            values_NK.index_select(0, rows_C),
            ids_NK.index_select(0, rows_C).long(),
            tail_logmass_N.index_select(0, rows_C),
            temperature,
            direction == "reverse",
            with_grad,
        ),
        temperature,
        chunk_size,
    )
    return kl_P.sum() / max(rows_P.numel(), 1) * temperature**2


def kl_loss_sparse(
    logits_BLV: torch.Tensor,
    sparse,
    mask_BL: torch.Tensor,
    *,
    temperature: float = 1.0,
    direction: KLDirection = "forward",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``T^2 * mean over masked positions of KL`` against ragged teacher rows (``SparseLogits``,
    module docstring), read at masked positions only: every masked position needs a row, rows
    at other positions are ignored. Never forms ``[B, L, V]`` teacher tensors. Returns a float32
    scalar; 0 with zero gradient when no position is masked."""
    _check_options(temperature, direction, chunk_size)
    _check_positions(logits_BLV, mask_BL)
    num_vocab = logits_BLV.shape[-1]
    num_positions = mask_BL.numel()
    positions_R = sparse.positions_R.long()
    num_rows = positions_R.numel()
    if sparse.ids_RK.shape[0] != num_rows or sparse.values_RK.shape != sparse.ids_RK.shape or sparse.tail_logmass_R.shape != (num_rows,):
        raise ValueError(f"sparse teacher rows disagree: {num_rows} positions, ids {tuple(sparse.ids_RK.shape)}, "
                         f"values {tuple(sparse.values_RK.shape)}, tail {tuple(sparse.tail_logmass_R.shape)}")
    # host syncs: malformed rows are refused before they turn into a silently wrong loss
    if num_rows and (positions_R.min() < 0 or positions_R.max() >= num_positions):
        raise ValueError(f"sparse teacher row positions must lie in [0, {num_positions}) (flat [B, L] = {tuple(mask_BL.shape)})")
    if sparse.ids_RK.numel() and sparse.ids_RK.max() >= num_vocab:
        raise ValueError(f"teacher ids must be < the student vocabulary {num_vocab}, got {int(sparse.ids_RK.max())}: "
                         "cut the teacher's vocabulary to the student's before taking the top-k")
    row_of_N = torch.full((num_positions,), -1, dtype=torch.long, device=positions_R.device)
    row_of_N[positions_R] = torch.arange(num_rows, device=positions_R.device)
    rows_P = mask_BL.reshape(-1).nonzero().squeeze(1)  # host sync: the number of rows drives chunking
    missing = int((row_of_N.index_select(0, rows_P) < 0).sum())
    if missing:
        raise ValueError(f"{missing} masked position(s) have no teacher row: the signal was computed for other masks")
    use_draws = sparse.draw_ids_RM is not None and direction == "forward"
    kl_P = _ChunkedKL.apply(
        logits_BLV.reshape(-1, num_vocab),
        rows_P,
        lambda student_NV, rows_C, with_grad: _sparse_kl_rows(
            student_NV, rows_C, row_of_N.index_select(0, rows_C), sparse, temperature, direction == "reverse", use_draws, with_grad
        ),
        temperature,
        chunk_size,
    )
    return kl_P.sum() / max(rows_P.numel(), 1) * temperature**2


# (student_NV, rows_C, with_grad) -> (KL of the chunk's rows, d KL / d (student logits / T) or None)
RowsKL = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


class _ChunkedKL(torch.autograd.Function):
    """Per-row KL over the gathered rows, computed and differentiated chunk by chunk.

    ``rows_kl`` returns a chunk's KL and, when asked, its gradient w.r.t. the softened student
    logits; backward recomputes it (nothing but the inputs is saved) and writes ``grad / T``
    into the chunk's rows of one gradient buffer.
    """

    @staticmethod
    def forward(ctx, student_NV, rows_P, rows_kl: RowsKL, temperature, chunk_size):
        kl_P = student_NV.new_empty(rows_P.numel(), dtype=compute_dtype(student_NV.dtype))
        for start in range(0, rows_P.numel(), chunk_size):
            kl_P[start : start + chunk_size] = rows_kl(student_NV, rows_P[start : start + chunk_size], False)[0]
        ctx.save_for_backward(student_NV, rows_P)
        ctx.rows_kl, ctx.temperature, ctx.chunk_size = rows_kl, temperature, chunk_size
        return kl_P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl_P):
        student_NV, rows_P = ctx.saved_tensors
        # The one full-size allocation: the gradient of the student logits itself.
        grad_student_NV = torch.zeros_like(student_NV)
        for start in range(0, rows_P.numel(), ctx.chunk_size):
            rows_C = rows_P[start : start + ctx.chunk_size]
            grad_s_CV = ctx.rows_kl(student_NV, rows_C, True)[1]
            scale_C1 = grad_kl_P[start : start + ctx.chunk_size, None].to(grad_s_CV.dtype) / ctx.temperature
            grad_student_NV.index_copy_(0, rows_C, grad_s_CV.mul_(scale_C1).to(student_NV.dtype))
        return grad_student_NV, None, None, None, None


def _dense_kl_rows(student_NV, teacher_NV, rows_C, temperature, reverse, with_grad):
    log_q_CV = F.log_softmax(_softened_rows(student_NV, rows_C, temperature), dim=-1)
    log_p_CV = F.log_softmax(_softened_rows(teacher_NV, rows_C, temperature), dim=-1)
    kl_C = _kl_rows(log_q_CV, log_p_CV) if reverse else _kl_rows(log_p_CV, log_q_CV)
    if not with_grad:
        return kl_C, None
    if reverse:
        # d KL(q || p) / d s_v = q_v * (log q_v - log p_v - KL); 0 where q_v = 0.
        grad_CV = log_q_CV.sub(log_p_CV).sub_(kl_C[:, None])
        q_CV = log_q_CV.exp_()
        return kl_C, grad_CV.mul_(q_CV).masked_fill_(q_CV == 0, 0.0)
    # d KL(p || q) / d s_v = q_v - p_v.
    return kl_C, log_q_CV.exp_().sub_(log_p_CV.exp_())


def _topk_kl_rows(student_NV, rows_C, values_CK, ids_CK, tail_logmass_C, temperature, reverse, with_grad):
    s_CV = _softened_rows(student_NV, rows_C, temperature)
    log_partition_C1 = torch.logsumexp(s_CV, dim=-1, keepdim=True)
    s_tail_CV = s_CV.scatter(1, ids_CK, -math.inf)  # the student's logits outside the teacher's top-k
    tail_log_partition_C1 = torch.logsumexp(s_tail_CV, dim=-1, keepdim=True)
    log_q_CB = torch.cat([s_CV.gather(1, ids_CK), tail_log_partition_C1], dim=1) - log_partition_C1
    log_p_CB = _teacher_bucket_log_probs(
        values_CK.to(s_CV.dtype), tail_logmass_C.to(s_CV.dtype), s_CV.shape[-1], temperature
    )
    kl_C = _kl_rows(log_q_CB, log_p_CB) if reverse else _kl_rows(log_p_CB, log_q_CB)
    if not with_grad:
        return kl_C, None
    # With b(v) the bucket of token v: d KL / d s_v = q_v * (1 - p_b(v) / q_b(v)) forward,
    # q_v * (log q_b(v) - log p_b(v) - KL) reverse. For tail tokens q_v / q_tail is the
    # student's distribution within its tail, exp(s_v - tail_log_partition), taken in log space.
    q_CB, p_CB = log_q_CB.exp(), log_p_CB.exp()
    grad_CV = s_CV.sub_(log_partition_C1).exp_()  # q_v, reusing the chunk's buffer
    if reverse:
        coef_CB = (log_q_CB - log_p_CB - kl_C[:, None]).masked_fill_(q_CB == 0, 0.0)
        grad_CV.mul_(coef_CB[:, -1:])
        grad_top_CK = q_CB[:, :-1] * coef_CB[:, :-1]
    else:
        within_tail_CV = s_tail_CV.sub_(tail_log_partition_C1).exp_()
        within_tail_CV.masked_fill_(torch.isneginf(tail_log_partition_C1), 0.0)  # empty tail: -inf - -inf
        grad_CV.sub_(within_tail_CV.mul_(p_CB[:, -1:]))
        grad_top_CK = q_CB[:, :-1] - p_CB[:, :-1]
    return kl_C, grad_CV.scatter_(1, ids_CK, grad_top_CK)


def _sparse_kl_rows(student_NV, rows_C, teacher_C, sparse, temperature, reverse, use_draws, with_grad):
    s_CV = _softened_rows(student_NV, rows_C, temperature)
    ids_CK = sparse.ids_RK.index_select(0, teacher_C).long()
    valid_CK = ids_CK >= 0
    ids_CK = ids_CK.clamp_min(0)  # padding points at id 0 and adds 0 to it (scatter_add, never scatter)
    values_CK = sparse.values_RK.index_select(0, teacher_C).to(s_CV.dtype).masked_fill(~valid_CK, -math.inf)
    tail_logmass_C = sparse.tail_logmass_R.index_select(0, teacher_C).to(s_CV.dtype)
    log_partition_C1 = torch.logsumexp(s_CV, dim=-1, keepdim=True)
    log_q_CK = (s_CV.gather(1, ids_CK) - log_partition_C1).masked_fill(~valid_CK, -math.inf)
    if use_draws:
        return _sampled_forward_rows(s_CV, log_partition_C1, log_q_CK, ids_CK, values_CK, tail_logmass_C, sparse, teacher_C,
                                     temperature, with_grad)
    in_top_CV = torch.zeros_like(s_CV).scatter_add_(1, ids_CK, valid_CK.to(s_CV.dtype)) > 0
    s_tail_CV = s_CV.masked_fill(in_top_CV, -math.inf)
    tail_log_partition_C1 = torch.logsumexp(s_tail_CV, dim=-1, keepdim=True)
    log_q_CB = torch.cat([log_q_CK, tail_log_partition_C1 - log_partition_C1], dim=1)
    num_tail_C = s_CV.shape[-1] - valid_CK.sum(dim=1)
    log_num_tail_C = num_tail_C.clamp_min(1).to(s_CV.dtype).log()
    tail_logit_C = torch.where(num_tail_C > 0, log_num_tail_C + (tail_logmass_C - log_num_tail_C) / temperature, -math.inf)
    log_p_CB = F.log_softmax(torch.cat([values_CK / temperature, tail_logit_C[:, None]], dim=1), dim=-1)
    kl_C = _kl_rows(log_q_CB, log_p_CB) if reverse else _kl_rows(log_p_CB, log_q_CB)
    if not with_grad:
        return kl_C, None
    # As `_topk_kl_rows`, written additively: every token first gets its tail-bucket gradient,
    # then each top id its own bucket's correction (padding adds 0).
    q_CB, p_CB = log_q_CB.exp(), log_p_CB.exp()
    grad_CV = s_CV.sub_(log_partition_C1).exp_()  # q_v
    if reverse:
        coef_CB = (log_q_CB - log_p_CB - kl_C[:, None]).masked_fill_(q_CB == 0, 0.0)
        grad_CV.mul_(coef_CB[:, -1:])
        top_CK = q_CB[:, :-1] * (coef_CB[:, :-1] - coef_CB[:, -1:])
    else:
        within_tail_CV = s_tail_CV.sub_(tail_log_partition_C1).exp_()
        within_tail_CV.masked_fill_(torch.isneginf(tail_log_partition_C1), 0.0)  # empty tail: -inf - -inf
        grad_CV.sub_(within_tail_CV.mul_(p_CB[:, -1:]))
        top_CK = -p_CB[:, :-1]
    return kl_C, grad_CV.scatter_add_(1, ids_CK, top_CK.masked_fill(~valid_CK, 0.0))


def _sampled_forward_rows(s_CV, log_partition_C1, log_q_CK, ids_CK, values_CK, tail_logmass_C, sparse, teacher_C,
                          temperature, with_grad):
    """Forward KL with the tail as importance-weighted draws (module docstring)."""
    draw_ids_CM = sparse.draw_ids_RM.index_select(0, teacher_C).long()
    drawn_CM = draw_ids_CM >= 0
    draw_ids_CM = draw_ids_CM.clamp_min(0)
    z_CM = sparse.draw_values_RM.index_select(0, teacher_C).to(s_CV.dtype).masked_fill(~drawn_CM, 0.0)
    log_w_CM = sparse.draw_weights_RM.index_select(0, teacher_C).to(s_CV.dtype).log().masked_fill(~drawn_CM, -math.inf)
    # log of the tail's softened mass, estimated with importance weights p_T / p (exact at T = 1)
    log_ratio_CM = log_w_CM + z_CM * (1.0 / temperature - 1.0)
    log_tail_T_C = tail_logmass_C + torch.logsumexp(log_ratio_CM, dim=-1)
    log_norm_C1 = torch.logsumexp(torch.cat([values_CK / temperature, log_tail_T_C[:, None]], dim=1), dim=-1, keepdim=True)
    log_p_CK = values_CK / temperature - log_norm_C1
    log_weight_CM = log_ratio_CM + tail_logmass_C[:, None] - log_norm_C1  # the drawn tokens' share of p_hat
    log_p_CM = z_CM / temperature - log_norm_C1  # each drawn token's own probability
    log_q_CM = (s_CV.gather(1, draw_ids_CM) - log_partition_C1).masked_fill(~drawn_CM, -math.inf)
    kl_C = _kl_rows(log_p_CK, log_q_CK) + _weighted_log_ratio(log_weight_CM, log_p_CM, log_q_CM)
    if not with_grad:
        return kl_C, None
    grad_CV = s_CV.sub_(log_partition_C1).exp_()  # q_v
    grad_CV.scatter_add_(1, ids_CK, -log_p_CK.exp())
    return kl_C, grad_CV.scatter_add_(1, draw_ids_CM, -log_weight_CM.exp())


def _weighted_log_ratio(log_w_CX, log_a_CX, log_b_CX):
    """sum_x w_x (log a_x - log b_x) per row, 0 where w = 0 (as `_kl_rows`)."""
    w_CX = log_w_CX.exp()
    return (log_a_CX - log_b_CX).mul_(w_CX).masked_fill_(w_CX == 0, 0.0).sum(dim=-1)


def _softened_rows(logits_NV: torch.Tensor, rows_C: torch.Tensor, temperature: float) -> torch.Tensor:
    """The chunk's rows divided by T, as a fresh float32 tensor the caller may modify in place."""
    return logits_NV.index_select(0, rows_C).to(compute_dtype(logits_NV.dtype)).div_(temperature)


def _teacher_bucket_log_probs(values_CK, tail_logmass_C, num_vocab, temperature):
    """log-probabilities at temperature T of the teacher's k top ids and its tail bucket."""
    num_tail = num_vocab - values_CK.shape[-1]
    if num_tail == 0:
        tail_logit_C = torch.full_like(tail_logmass_C, -math.inf)  # nothing left outside the top-k
    else:
        # n tail tokens sharing the logit u = tail_logmass - log n (module docstring): exact at T = 1.
        log_num_tail = math.log(num_tail)
        tail_logit_C = log_num_tail + (tail_logmass_C - log_num_tail) / temperature
    return F.log_softmax(torch.cat([values_CK / temperature, tail_logit_C[:, None]], dim=1), dim=-1)


def _kl_rows(log_a_CX: torch.Tensor, log_b_CX: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities.

    Entries with a == 0 contribute 0 (xlogy), so -inf logits never give 0 * inf. Tested as
    a == 0 rather than a > 0 so that a NaN stays NaN and reaches the finiteness check.
    """
    a_CX = log_a_CX.exp()
    return (log_a_CX - log_b_CX).mul_(a_CX).masked_fill_(a_CX == 0, 0.0).sum(dim=-1)


def _check_options(temperature: float, direction: str, chunk_size: int) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_positions(logits_BLV: torch.Tensor, mask_BL: torch.Tensor, **teacher_tensors: torch.Tensor) -> None:
    if logits_BLV.dim() != 3 or mask_BL.shape != logits_BLV.shape[:2] or mask_BL.dtype != torch.bool:
        raise ValueError(
            f"expected logits [B, L, V] and a bool mask [B, L], got logits {tuple(logits_BLV.shape)} "
            f"and mask {tuple(mask_BL.shape)} {mask_BL.dtype}"
        )
    for name, tensor in teacher_tensors.items():
        if tensor.shape[:2] != mask_BL.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected it to start with [B, L] = {tuple(mask_BL.shape)}"
            )
