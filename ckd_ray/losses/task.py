"""Autoregressive cross-entropy on response tokens (`task`)."""

import torch

from ckd_ray.losses.kl import DEFAULT_CHUNK_SIZE, kl_loss_topk

IGNORE_INDEX = -100


def task_loss(
    logits_BLV: torch.Tensor,
    target_ids_BL: torch.Tensor,
    response_mask_BL: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean cross-entropy over positions that predict a response token and have a target.

    ``target_ids_BL`` is already shifted (``target_ids[b, t]`` is what ``logits[b, t]`` must
    predict, ``-100`` where there is none). Returns a float32 scalar; 0 with zero gradient
    when no position qualifies.
    """
    mask_BL = response_mask_BL & (target_ids_BL != IGNORE_INDEX)
    # CE(y, q) = KL(one_hot(y) || q): the one-hot is a top-1 teacher with an empty tail, so the
    # chunked KL gives the exact cross-entropy with the same memory profile (no [B*L, V] float32).
    target_ids_BL1 = target_ids_BL.clamp_min(0).unsqueeze(-1)
    return kl_loss_topk(
        logits_BLV,
        torch.zeros(target_ids_BL1.shape, dtype=torch.float32, device=logits_BLV.device),
        target_ids_BL1,
        torch.full(target_ids_BL.shape, -torch.inf, dtype=torch.float32, device=logits_BLV.device),
        mask_BL,
        temperature=1.0,
        direction="forward",
        chunk_size=chunk_size,
    )
