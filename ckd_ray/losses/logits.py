"""The teacher's compressed logits as the loss terms read them: dense top-k rows (signal version 1)
and ragged sparse rows (version 2). Plain data, below every term that reads them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TopKLogits:
    """The teacher's compressed logits on a set of positions (crosses the object store).

    Raw ``T = 1`` logits of the k largest tokens (bf16 or float) with their distinct vocabulary
    ids (int32 or int64), each ``[B, L, K]``, and ``tail_logmass_BL = log sum exp`` of all other
    logits (``-inf`` when k covers the vocabulary). Read at masked positions only.
    """

    values_BLK: torch.Tensor
    ids_BLK: torch.Tensor
    tail_logmass_BL: torch.Tensor


@dataclass
class SparseLogits:
    """The teacher's compressed logits as ragged rows (signal version 2), ``[R, K]`` for R rows.

    ``positions_R`` are the rows' flat ``b * L + t`` positions in ``[B, L]``. ``ids_RK`` are
    distinct vocabulary ids, -1 in padding; ``values_RK`` their T = 1 logits, shifted by any
    per-row constant (softmax is shift-invariant), -inf in padding; ``tail_logmass_R`` log sum exp
    of all other logits with the same shift (-inf when the ids cover the vocabulary). Optional
    tail draws: ``draw_ids_RM`` (distinct, not among the top ids, -1 in padding), their shifted
    logits ``draw_values_RM`` and ``draw_weights_RM`` = multiplicity / draws per row.
    """

    positions_R: torch.Tensor
    ids_RK: torch.Tensor
    values_RK: torch.Tensor
    tail_logmass_R: torch.Tensor
    draw_ids_RM: torch.Tensor | None = None
    draw_values_RM: torch.Tensor | None = None
    draw_weights_RM: torch.Tensor | None = None
