"""Relation between visual tokens (`visual_relation`, LLaVA-KD).

``1 - cos(vec(G_S), vec(G_T))`` per sample, ``G = Z Z^T`` the Gram matrix of the logits ``Z`` at
the sample's visual positions, mean over samples that have visual positions. The teacher
computes its Gram matrix on its side (``n x n`` instead of ``n x V`` crosses the object store).
"""

import torch

from ckd_ray.losses.precision import compute_dtype

_NORM_EPS = 1e-12


def visual_relation_loss(
    logits_BLV: torch.Tensor,
    visual_mask_BL: torch.Tensor,
    gram_teacher_BNN: torch.Tensor,
    visual_count_B: torch.Tensor,
) -> torch.Tensor:
    """Mean over samples with visual positions of ``1 - cos(vec(G_S), vec(G_T))``.

    The student's visual positions are ``visual_mask_BL`` in sequence order; the teacher's Gram
    matrix of sample b is ``gram_teacher_BNN[b, :n_b, :n_b]`` in the same order, with
    ``n_b = visual_count_B[b]`` and padding beyond. A sample whose count differs between the two
    sides raises ValueError. Returns a float32 scalar; 0 with zero gradient when no sample has
    visual positions.
    """
    if visual_mask_BL.shape != logits_BLV.shape[:2] or visual_count_B.shape != visual_mask_BL.shape[:1]:
        raise ValueError(
            f"expected logits [B, L, V], visual mask [B, L] and counts [B], got {tuple(logits_BLV.shape)}, "
            f"{tuple(visual_mask_BL.shape)} and {tuple(visual_count_B.shape)}"
        )
    # host sync: per-sample counts drive the loop over samples (visual counts vary per sample)
    student_counts = visual_mask_BL.sum(dim=1).tolist()
    teacher_counts = visual_count_B.tolist()
    if student_counts != teacher_counts:
        raise ValueError(
            f"visual token counts differ: student (visual_mask_BL) {student_counts}, teacher "
            f"(visual_count_B) {teacher_counts}"
        )
    if max(student_counts, default=0) > min(gram_teacher_BNN.shape[1:]):
        raise ValueError(
            f"teacher Gram matrices {tuple(gram_teacher_BNN.shape)} are smaller than the largest "
            f"visual count {max(student_counts)}"
        )
    dtype = compute_dtype(logits_BLV.dtype)
    loss_per_sample = []
    for sample, count in enumerate(student_counts):
        if count == 0:
            continue
        visual_logits_NV = logits_BLV[sample][visual_mask_BL[sample]].to(dtype)
        gram_student_NN = visual_logits_NV @ visual_logits_NV.T
        gram_teacher_NN = gram_teacher_BNN[sample, :count, :count].to(dtype)
        loss_per_sample.append(1.0 - _cosine(gram_student_NN.flatten(), gram_teacher_NN.flatten()))
    if not loss_per_sample:
        return logits_BLV.flatten()[:0].to(dtype).sum()  # 0, still connected to the graph
    return torch.stack(loss_per_sample).mean()


def _cosine(a_X: torch.Tensor, b_X: torch.Tensor) -> torch.Tensor:
    # cos is scale-invariant, so divide by each vector's (detached) largest entry first: the
    # squared norms then stay far from float32 overflow whatever the logit scale, and the
    # gradient is unchanged.
    a_X = a_X / a_X.detach().abs().max().clamp_min(_NORM_EPS)
    b_X = b_X / b_X.detach().abs().max().clamp_min(_NORM_EPS)
    return torch.dot(a_X, b_X) / (a_X.norm() * b_X.norm()).clamp_min(_NORM_EPS)
