"""Feature distillation (`feature`, FitNets).

``mean over mapped layers of mean over chosen positions of ||phi_S - W phi_T||^2 / d_student``:
the paper's squared norm divided by the student width, i.e. the mean squared error per
element, so the term keeps one scale when the student's width changes. ``W`` is one learned
``d_teacher -> d_student`` projection per mapped layer pair (``FeatureProjection``).
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ckd_ray.losses.precision import compute_dtype


class FeatureProjection(nn.Module):
    """The learned maps ``W``: one ``Linear(d_teacher, d_student, bias=False)`` per layer pair.

    ``layer_map`` maps a student layer index to a teacher layer index, both indexing
    hidden states as transformers returns them (0 = embedding output, i = after block i).
    Parameters are keyed by the student layer (``projections.<student layer>.weight``).
    The module belongs to the student's training state: build it before the optimizer, save it
    with checkpoints, leave it out of the exported student. ``forward(student_layer, x)``
    projects teacher features ``[..., d_teacher]`` to ``[..., d_student]``.
    """

    def __init__(self, layer_map: Mapping[int, int], d_student: int, d_teacher: int):
        super().__init__()
        if not layer_map:
            raise ValueError("FeatureProjection needs at least one student -> teacher layer pair")
        self.layer_map = {int(student): int(teacher) for student, teacher in sorted(layer_map.items())}
        self.d_student, self.d_teacher = d_student, d_teacher
        self.projections = nn.ModuleDict(
            {str(student): nn.Linear(d_teacher, d_student, bias=False) for student in self.layer_map}
        )

    def forward(self, student_layer: int, teacher_features: torch.Tensor) -> torch.Tensor:
        return self.projections[str(student_layer)](teacher_features)

    def extra_repr(self) -> str:
        return f"layer_map={self.layer_map}"


def feature_loss(
    student_hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    teacher_hidden_states: Mapping[int, torch.Tensor],
    projection: FeatureProjection,
    mask_BL: torch.Tensor,
) -> torch.Tensor:
    """Mean over ``projection.layer_map`` of the per-element MSE at the masked positions.

    ``student_hidden_states[s]`` is ``[B, L, d_student]`` (a transformers tuple or a dict by
    layer), ``teacher_hidden_states[t]`` is ``[B, L, d_teacher]`` for every mapped teacher layer
    ``t``. Returns a float32 scalar; 0 with zero gradients when no position is masked.
    """
    missing = [teacher for teacher in projection.layer_map.values() if teacher not in teacher_hidden_states]
    if missing:
        raise ValueError(
            f"teacher hidden states lack the mapped teacher layers {missing} (has {sorted(teacher_hidden_states)})"
        )
    num_positions = int(mask_BL.sum())  # host sync
    loss_per_layer = []
    for student_layer, teacher_layer in projection.layer_map.items():
        student_PD = student_hidden_states[student_layer][mask_BL]
        teacher_PE = teacher_hidden_states[teacher_layer][mask_BL]
        weight = projection.projections[str(student_layer)].weight
        dtype = compute_dtype(student_PD.dtype)
        projected_PD = projection(student_layer, teacher_PE.to(weight.dtype)).to(dtype)
        squared_error = (student_PD.to(dtype) - projected_PD).square().mean(dim=-1)
        loss_per_layer.append(squared_error.sum() / max(num_positions, 1))
    return torch.stack(loss_per_layer).mean()
