"""A right-padded batch's forward run in groups of rows of similar length.

A batch is padded to its longest row, and the benchmark's instructions are far apart in length
(a third of a 1-hop question's tokens is padding in a batch that holds a 2-hop one): on CPU,
where time grows with the tokens a forward computes, about 45% of an instruction step's
forward and backward went into padding. `forward_by_length` sorts the rows by length, splits
them into at most `max_buckets` contiguous groups (the split that computes the fewest padded
positions), runs the model once per group, each trimmed to its own longest row, and puts the
outputs back in the batch's row order and `[B, L]` layout, zero past each group's length.

Same rows, same optimizer step: with causal attention and right padding a row's outputs at its
own positions do not depend on the padding after it, so every real position gets the value the
whole batch's forward gives it (up to float rounding: other matmul shapes sum in another
order). Losses read only real positions (their masks), so the loss and its gradients are those
of the padded batch. One group (equal lengths, or a split that saves too little) is the plain
forward, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# A group's own forward costs fixed work (kernel launches, the vision tower's call, Python):
# a split must save this share of the batch's padded positions to pay for it.
MIN_SAVING_PER_SPLIT = 0.05


def plan_buckets(row_lengths: np.ndarray, max_buckets: int, min_saving: float = MIN_SAVING_PER_SPLIT) -> list[np.ndarray]:
    """Row indices of each group, shortest rows first, each group's rows in ascending length.

    Minimises the positions computed, sum over groups of (rows x longest row), plus
    `min_saving` x B x L (B rows, L the longest) for each group after the first: an exact
    dynamic programme over the distinct lengths (groups split only between two lengths)."""
    lengths = np.asarray(row_lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    distinct, counts = np.unique(lengths, return_counts=True)
    num_distinct = len(distinct)
    if max_buckets <= 1 or num_distinct == 1:
        return [order]
    rows_through = np.concatenate([[0], np.cumsum(counts)])  # rows of length <= distinct[j - 1]
    penalty = min_saving * len(lengths) * distinct[-1]
    # best[j]: least cost of the rows of the first j distinct lengths in k groups; cut[k][j]: where the last group starts
    best = np.where(np.arange(num_distinct + 1) == 0, 0.0, np.inf)
    cuts = []
    totals = []
    for _ in range(min(max_buckets, num_distinct)):
        new_best = np.full(num_distinct + 1, np.inf)
        cut = np.zeros(num_distinct + 1, dtype=np.int64)
        for j in range(1, num_distinct + 1):
            candidates = best[:j] + (rows_through[j] - rows_through[:j]) * distinct[j - 1]
            cut[j] = int(np.argmin(candidates))
            new_best[j] = candidates[cut[j]]
        best = new_best
        cuts.append(cut)
        totals.append(best[num_distinct] + penalty * (len(cuts) - 1))
    num_groups = int(np.argmin(totals)) + 1  # the fewest groups among equal costs
    bounds, end = [], num_distinct
    for k in range(num_groups - 1, -1, -1):
        start = cuts[k][end]
        bounds.append((rows_through[start], rows_through[end]))
        end = start
    return [order[a:b] for a, b in reversed(bounds)]


@dataclass
class ForwardOutputs:
    """The outputs a caller reads, in the batch's layout: `[B, L, ...]` with L the longest row;
    attention maps `[B, H, L, L]`. None where the forward did not return them."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def forward_by_length(
    forward: Callable[..., object],
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    pixel_rows: np.ndarray,
    row_lengths: np.ndarray,
    max_buckets: int,
    **options,
):
    """`forward(input_ids=..., attention_mask=..., pixel_values=..., **options)` over the rows of
    a right-padded batch (`[B, L]`), in length groups (module docstring). `pixel_values[i]` is
    the image of the row `r` with `pixel_rows[r] == i` (-1: a row without image tokens, which
    gets none); `row_lengths`: each row's real tokens, on the host. One group returns the
    forward's own output object; several return a `ForwardOutputs`."""
    groups = plan_buckets(row_lengths, max_buckets)
    if len(groups) == 1:
        return forward(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **options)
    pixel_rows = np.asarray(pixel_rows)
    length = input_ids.shape[1]
    parts = []
    for rows in groups:
        used = int(row_lengths[rows[-1]])  # the group's longest row: its rows are in ascending length
        images = pixel_rows[rows]
        images = images[images >= 0]
        index = torch.as_tensor(rows, device=input_ids.device)
        parts.append(forward(
            input_ids=input_ids[index, :used],
            attention_mask=attention_mask[index, :used],
            pixel_values=pixel_values[torch.as_tensor(images, device=pixel_values.device)] if len(images) else None,
            **options,
        ))
    order = np.concatenate(groups)
    inverse = torch.as_tensor(np.argsort(order, kind="stable"), device=input_ids.device)

    def assemble(tensors, seq_dims: tuple[int, ...]) -> torch.Tensor:
        padded = []
        for tensor in tensors:
            widths = [0] * (2 * tensor.dim())
            for dim in seq_dims:  # F.pad lists (before, after) pairs from the last dim back
                widths[2 * (tensor.dim() - 1 - dim) + 1] = length - tensor.shape[dim]
            padded.append(F.pad(tensor, widths))
        return torch.cat(padded).index_select(0, inverse)

    def field(name: str):
        return [getattr(part, name, None) for part in parts]

    outputs = ForwardOutputs()
    for name in ("logits", "last_hidden_state"):
        if all(value is not None for value in field(name)):
            setattr(outputs, name, assemble(field(name), (1,)))
    if all(value is not None for value in field("hidden_states")):
        outputs.hidden_states = tuple(assemble(layer, (1,)) for layer in zip(*field("hidden_states")))
    if all(value is not None for value in field("attentions")):
        outputs.attentions = tuple(assemble(layer, (2, 3)) for layer in zip(*field("attentions")))
    return outputs
