"""The float type every loss term computes in."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16 / fp16 / fp32 inputs; float64 inputs stay float64.

    Low-precision softmaxes at T < 1 lose the tail and overflow, so all terms work in at least
    float32. Keeping float64 lets the tests compare against float64 references and run gradcheck.
    """
    return torch.promote_types(dtype, torch.float32)
