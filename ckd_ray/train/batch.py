"""A micro-batch of the data pipeline (numpy columns, right-padded to the pipeline's max length)
as the student's tensors, trimmed to the batch's longest row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ckd_ray.models.buckets import forward_by_length


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
    row_lengths: np.ndarray | None = None
    """Each row's real tokens, on the host (None: read from `attention_mask_BL`)."""
    pixel_rows: np.ndarray | None = None
    """Row -> its index in `pixel_values`, -1 for a row without image tokens (None: from `visual_mask_BL`)."""

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {"input_ids": self.input_ids_BL, "attention_mask": self.attention_mask_BL, "pixel_values": self.pixel_values}

    def forward(self, model, max_buckets: int, **options):
        """`model`'s forward over this batch in at most `max_buckets` groups of rows of similar
        length (`ckd_ray.models.buckets`): the padded batch's outputs, less the padding's compute."""
        row_lengths, pixel_rows = self.row_lengths, self.pixel_rows
        if row_lengths is None:
            row_lengths = self.attention_mask_BL.sum(dim=1).cpu().numpy()  # host sync
        if pixel_rows is None:
            has_image = self.visual_mask_BL.any(dim=1).cpu().numpy()  # host sync
            pixel_rows = np.where(has_image, np.cumsum(has_image) - 1, -1)
        return forward_by_length(model, **self.model_inputs(), pixel_rows=pixel_rows, row_lengths=row_lengths,
                                 max_buckets=max_buckets, **options)


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
        row_lengths=np.asarray(batch["attention_mask"]).sum(axis=1),
        pixel_rows=np.where(has_image, np.cumsum(has_image) - 1, -1),
    )
