"""A micro-batch of the data pipeline (numpy columns, right-padded to the pipeline's max length)
as the student's tensors, trimmed to the batch's longest row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StudentBatch:
    """Tensors of one micro-batch, `[B, L]` with L the longest row of the batch."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    pixel_values: torch.Tensor | None
    """`[I, 3, H, W]` for the I samples that have image tokens; None when none has."""
    target_ids_BL: torch.Tensor
    """Already shifted: `target_ids[b, t]` is the token `logits[b, t]` must predict, -100 elsewhere."""
    response_mask_BL: torch.Tensor
    visual_mask_BL: torch.Tensor
    num_samples: int
    num_tokens: int
    """Non-padding tokens in the batch (throughput)."""

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {"input_ids": self.input_ids_BL, "attention_mask": self.attention_mask_BL, "pixel_values": self.pixel_values}


def used_length(attention_mask_BL: np.ndarray) -> int:
    """Length of the longest row of a right-padded batch (the same rule the teacher signal's
    decoder trims by, so student and teacher positions line up)."""
    return int(np.asarray(attention_mask_BL).sum(axis=1).max())


def student_batch(batch: dict[str, np.ndarray], device: torch.device, pixel_dtype: torch.dtype) -> StudentBatch:
    """The student's view of a pipeline batch. Padding beyond the longest row is dropped; pixel
    values are passed only for samples whose prompt holds image tokens (the model matches image
    features to image tokens one to one)."""
    used = used_length(batch["attention_mask"])

    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(batch[name][:, :used])).to(device=device, dtype=dtype)

    has_image = np.asarray(batch["num_visual"]) > 0
    pixel_values = None
    if has_image.any():
        pixel_values = torch.as_tensor(np.ascontiguousarray(batch["pixel_values"][has_image])).to(device=device, dtype=pixel_dtype)
    return StudentBatch(
        input_ids_BL=column("input_ids", torch.long),
        attention_mask_BL=column("attention_mask", torch.long),
        pixel_values=pixel_values,
        target_ids_BL=column("target_ids", torch.long),
        response_mask_BL=column("response_mask", torch.bool),
        visual_mask_BL=column("visual_mask", torch.bool),
        num_samples=len(has_image),
        num_tokens=int(np.asarray(batch["attention_mask"]).sum()),
    )
