"""Cross-modal attention transfer (`attention`): text queries -> visual keys.

``mean_h MSE(A_S^h, A_T^h)`` over the masked (query, key) entries of a mapped layer. The teacher
ships its attention probabilities gathered to the visual key columns and averaged over its
heads into G groups (``[B, G, L, N]``, well under a megabyte where the full map is hundreds);
the student's heads are averaged the same way before comparing.
"""

import torch

from ckd_ray.losses.precision import compute_dtype


def gather_visual_keys(
    attn_BHLL: torch.Tensor, visual_mask_BL: torch.Tensor, num_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention columns of each sample's visual positions, in order, padded to ``num_keys``.

    Returns ``attn_BHLN`` (zeros in padded columns) and ``key_mask_BN`` (valid columns).
    """
    num_samples, _, _, seq_len = attn_BHLL.shape
    if visual_mask_BL.shape != (num_samples, seq_len):
        raise ValueError(f"visual mask {tuple(visual_mask_BL.shape)} does not match attention {tuple(attn_BHLL.shape)}")
    max_count = int(visual_mask_BL.sum(dim=1).max()) if num_samples else 0  # host sync
    if max_count > num_keys:
        raise ValueError(f"a sample has {max_count} visual positions, more than the {num_keys} key columns")
    positions_L = torch.arange(seq_len, device=visual_mask_BL.device)
    # Sorting visual positions first (non-visual ones pushed past seq_len) keeps their order.
    sort_keys_BL = torch.where(visual_mask_BL, positions_L, positions_L + seq_len)
    key_positions_BN = sort_keys_BL.sort(dim=1).values[:, :num_keys]
    if key_positions_BN.shape[1] < num_keys:  # fewer positions than columns: pad
        padding = key_positions_BN.new_full((num_samples, num_keys - key_positions_BN.shape[1]), 2 * seq_len)
        key_positions_BN = torch.cat([key_positions_BN, padding], dim=1)
    key_mask_BN = key_positions_BN < seq_len
    index_BHLN = torch.where(key_mask_BN, key_positions_BN, 0)[:, None, None, :].expand(*attn_BHLL.shape[:3], num_keys)
    attn_BHLN = attn_BHLL.gather(-1, index_BHLN) * key_mask_BN[:, None, None, :]
    return attn_BHLN, key_mask_BN


def attention_loss(
    attn_student_BHLN: torch.Tensor,
    attn_teacher_BGLN: torch.Tensor,
    query_mask_BL: torch.Tensor,
    key_mask_BN: torch.Tensor,
) -> torch.Tensor:
    """Mean over head groups of the MSE over entries with a query row and a valid key column.

    G == H compares head by head, G == 1 averages all student heads, H a multiple of G averages
    contiguous groups of H / G student heads (how grouped-query models lay out heads); other
    head counts raise ValueError. Returns a float32 scalar; 0 with zero gradient when no entry
    is masked.
    """
    num_samples, num_heads, seq_len, num_keys = attn_student_BHLN.shape
    num_groups = attn_teacher_BGLN.shape[1]
    if attn_teacher_BGLN.shape != (num_samples, num_groups, seq_len, num_keys):
        raise ValueError(
            f"teacher attention {tuple(attn_teacher_BGLN.shape)} does not match student attention "
            f"{tuple(attn_student_BHLN.shape)} outside the head dimension"
        )
    if num_groups == 0 or num_heads % num_groups:
        raise ValueError(
            f"cannot compare {num_heads} student heads with {num_groups} teacher head groups: the "
            "student's head count must equal or be a multiple of the teacher's group count"
        )
    dtype = compute_dtype(attn_student_BHLN.dtype)
    student_BGLN = attn_student_BHLN.to(dtype).reshape(num_samples, num_groups, -1, seq_len, num_keys).mean(dim=2)
    entry_mask_B1LN = (query_mask_BL[:, :, None] & key_mask_BN[:, None, :])[:, None]
    squared_error_BGLN = (student_BGLN - attn_teacher_BGLN.to(dtype)).square()
    num_entries = entry_mask_B1LN.sum() * num_groups
    return torch.where(entry_mask_B1LN, squared_error_BGLN, 0.0).sum() / num_entries.clamp_min(1)
