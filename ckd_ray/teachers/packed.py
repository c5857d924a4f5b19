"""Signal version 2: the teacher's logits as ragged, bit-packed rows, and the Gram as one triangle.

Version 1 ships dense ``[L, K]`` top-k rows over every position (zeros where no term reads them),
int32 ids and one K for every token. Version 2 ships, per sample and per part (response, visual),
one bytes value holding only the rows of the positions the term reads (the sample's
``response_mask`` / ``visual_mask`` positions, in sequence order: the student has the same masks,
so positions are not shipped):

| section        | count            | encoding                                              |
|----------------|------------------|-------------------------------------------------------|
| header         | 1                | ``<IBBH``: rows, id bits, count bits, tail draws m    |
| k per row      | rows             | bit-packed, ``count_bits`` each                       |
| top ids        | sum k            | bit-packed, ``id_bits`` = bits of the vocabulary size |
| top values     | sum k            | wire dtype: logit minus the row's largest logit       |
| tail log-mass  | rows             | float32, same shift: log sum exp of the other logits  |
| (m > 0) unique draws per row, their ids, their multiplicities (bit-packed), their values |

Per row k is the smallest k whose left-out T = 1 mass is at most ``tail_mass`` (capped by the
configured k; ``tail_mass`` 0 keeps the configured k). Values keep the payload re-temperable:
softmax is shift-invariant, so ``z - max z`` at any T gives the same distribution as the raw
logits, and the shift puts the values bf16 resolves best (near 0) on the tokens that hold the
mass. With ``tail_samples`` m > 0, m tokens are also drawn (with replacement) from the teacher's
distribution within its tail, for the unbiased forward-KL estimate of ``ckd_ray.losses.kl``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

_HEADER = struct.Struct("<IBBH")
_WIRE_NUMPY = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}  # bf16 travels as its bits
# The value dtypes a signal travels in (`signal.value_dtype`).
WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_wire(tensor: torch.Tensor, value_dtype: str) -> np.ndarray:
    """A tensor as a numpy array in the wire dtype (bf16 as uint16 bits)."""
    tensor = tensor.detach().to(WIRE_DTYPES[value_dtype]).cpu().contiguous()
    if value_dtype == "bfloat16":
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def from_wire(array, value_dtype: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of `to_wire`: float tensors in the wire dtype (the losses upcast to float32)."""
    tensor = torch.as_tensor(np.ascontiguousarray(array))
    if value_dtype == "bfloat16":
        tensor = tensor.view(torch.int16).view(torch.bfloat16)
    return tensor.to(device)


def bits_for(num_values: int) -> int:
    """Bits that address ``num_values`` distinct values (18 for Qwen2.5's 151,936 ids)."""
    return max(1, math.ceil(math.log2(num_values))) if num_values > 1 else 1


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers < 2**width, ``width`` bits each, little-endian bit order."""
    values = np.asarray(values, dtype=np.uint64).reshape(-1)
    if values.size and int(values.max()) >= 1 << width:
        raise ValueError(f"value {int(values.max())} does not fit in {width} bits")
    bits = (values[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: memoryview | bytes, count: int, width: int) -> np.ndarray:
    """Inverse of `pack_bits`: ``count`` int64 values."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * width, bitorder="little")
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) * weights).sum(axis=1).astype(np.int64)


def packed_bits_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


@dataclass
class PackedRows:
    """The selected teacher rows of one or more samples, ragged (CSR by row).

    ``counts_R`` top ids per row; ``ids_X`` / ``values_X`` their ids and shifted logits (float32,
    row by row); ``tail_logmass_R`` log sum exp of the row's other logits (same shift, ``-inf``
    when the top covers the vocabulary). With tail draws (``num_draws`` > 0): ``draw_counts_R``
    distinct drawn ids per row, ``draw_ids_Y`` / ``draw_values_Y`` / ``draw_multiplicity_Y``."""

    counts_R: np.ndarray
    ids_X: np.ndarray
    values_X: np.ndarray
    tail_logmass_R: np.ndarray
    num_draws: int = 0
    draw_counts_R: np.ndarray | None = None
    draw_ids_Y: np.ndarray | None = None
    draw_values_Y: np.ndarray | None = None
    draw_multiplicity_Y: np.ndarray | None = None

    @classmethod
    def empty(cls, num_draws: int = 0) -> "PackedRows":
        none = lambda dtype: np.zeros(0, dtype)
        rows = cls(none(np.int64), none(np.int64), none(np.float32), none(np.float32), num_draws)
        if num_draws:
            rows.draw_counts_R, rows.draw_ids_Y, rows.draw_values_Y, rows.draw_multiplicity_Y = (
                none(np.int64), none(np.int64), none(np.float32), none(np.int64))
        return rows

    @property
    def num_rows(self) -> int:
        return len(self.counts_R)

    def split(self, rows_per_sample: list[int]) -> list["PackedRows"]:
        """One `PackedRows` per sample, the rows taken in order."""
        out, row, top, draw = [], 0, 0, 0
        for num in rows_per_sample:
            counts = self.counts_R[row : row + num]
            num_top = int(counts.sum())
            part = PackedRows(counts, self.ids_X[top : top + num_top], self.values_X[top : top + num_top],
                              self.tail_logmass_R[row : row + num], self.num_draws)
            if self.num_draws:
                draw_counts = self.draw_counts_R[row : row + num]
                num_drawn = int(draw_counts.sum())
                part.draw_counts_R = draw_counts
                part.draw_ids_Y = self.draw_ids_Y[draw : draw + num_drawn]
                part.draw_values_Y = self.draw_values_Y[draw : draw + num_drawn]
                part.draw_multiplicity_Y = self.draw_multiplicity_Y[draw : draw + num_drawn]
                draw += num_drawn
            out.append(part)
            row, top = row + num, top + num_top
        return out


@torch.no_grad()
def select_rows(logits_NV: torch.Tensor, top_k: int, tail_mass: float = 0.0, num_draws: int = 0,
                generator: torch.Generator | None = None) -> PackedRows:
    """The teacher side of version 2 for N rows of full (vocabulary-cut) logits: per row the
    smallest k <= ``top_k`` whose left-out mass is <= ``tail_mass``, the exact log-mass of the
    rest, and ``num_draws`` draws from the distribution within that rest."""
    logits_NV = logits_NV.float()
    num_rows, num_vocab = logits_NV.shape
    cap = min(top_k, num_vocab)
    values_NK, ids_NK = logits_NV.topk(cap, dim=-1)
    if tail_mass > 0:
        probs_NK = (values_NK - torch.logsumexp(logits_NV, dim=-1, keepdim=True)).exp()
        counts_N = ((probs_NK.cumsum(dim=-1) < 1.0 - tail_mass).sum(dim=-1) + 1).clamp_max(cap)
    else:
        counts_N = torch.full((num_rows,), cap, dtype=torch.long, device=logits_NV.device)
    kept_NK = torch.arange(cap, device=logits_NV.device) < counts_N[:, None]
    # The tail is a logsumexp with the kept ids masked out (exact, see `topk_with_tail`).
    tail_NV = logits_NV.scatter(-1, ids_NK, torch.where(kept_NK, -math.inf, values_NK))
    tail_N = torch.logsumexp(tail_NV, dim=-1)
    shift_N1 = values_NK[:, :1]
    rows = PackedRows(
        counts_N.cpu().numpy().astype(np.int64),
        ids_NK[kept_NK].cpu().numpy().astype(np.int64),
        (values_NK - shift_N1)[kept_NK].cpu().numpy(),
        (tail_N - shift_N1[:, 0]).cpu().numpy(),
    )
    if num_draws:
        _draw_tail(rows, tail_NV, shift_N1, num_draws, generator)
    return rows


def _draw_tail(rows: PackedRows, tail_NV, shift_N1, num_draws: int, generator) -> None:
    """``num_draws`` draws per row from softmax of the tail logits, stored as distinct ids with
    multiplicities (rows with an empty tail draw nothing)."""
    has_tail_N = torch.isfinite(tail_NV).any(dim=-1)
    safe_NV = torch.where(has_tail_N[:, None], tail_NV, 0.0)
    drawn_NM = torch.multinomial(torch.softmax(safe_NV, dim=-1), num_draws, replacement=True, generator=generator)
    drawn_NM = drawn_NM.sort(dim=-1).values
    first_NM = torch.ones_like(drawn_NM, dtype=torch.bool)
    first_NM[:, 1:] = drawn_NM[:, 1:] != drawn_NM[:, :-1]
    first_NM &= has_tail_N[:, None]
    starts = first_NM.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([first_NM.numel()])])
    # A run ends where the next one starts, or at its row's end.
    row_end = (starts // num_draws + 1) * num_draws
    multiplicity = torch.minimum(ends, row_end) - starts
    ids = drawn_NM.reshape(-1)[starts]
    values = (tail_NV.gather(1, drawn_NM) - shift_N1).reshape(-1)[starts]
    rows.num_draws = num_draws
    rows.draw_counts_R = first_NM.sum(dim=-1).cpu().numpy().astype(np.int64)
    rows.draw_ids_Y = ids.cpu().numpy().astype(np.int64)
    rows.draw_values_Y = values.cpu().numpy()
    rows.draw_multiplicity_Y = multiplicity.cpu().numpy().astype(np.int64)


def encode_rows(rows: PackedRows, vocab_size: int, top_k: int, value_dtype: str) -> bytes:
    """One sample's rows as the version 2 bytes (module docstring)."""
    id_bits, count_bits = bits_for(vocab_size), bits_for(max(top_k, rows.num_draws) + 1)

    def wire(values: np.ndarray) -> bytes:
        return to_wire(torch.as_tensor(values, dtype=torch.float32), value_dtype).tobytes()

    parts = [
        _HEADER.pack(rows.num_rows, id_bits, count_bits, rows.num_draws),
        pack_bits(rows.counts_R, count_bits),
        pack_bits(rows.ids_X, id_bits),
        wire(rows.values_X),
        np.asarray(rows.tail_logmass_R, dtype="<f4").tobytes(),
    ]
    if rows.num_draws:
        parts += [pack_bits(rows.draw_counts_R, count_bits), pack_bits(rows.draw_ids_Y, id_bits),
                  pack_bits(rows.draw_multiplicity_Y, count_bits), wire(rows.draw_values_Y)]
    return b"".join(parts)


def decode_rows(data: bytes, value_dtype: str) -> PackedRows:
    """Inverse of `encode_rows` (values come back as float32)."""
    view = memoryview(data)
    num_rows, id_bits, count_bits, num_draws = _HEADER.unpack_from(view)
    offset = _HEADER.size
    wire_np = np.dtype(_WIRE_NUMPY[value_dtype])
    value_size = wire_np.itemsize

    def take_bits(count: int, width: int) -> np.ndarray:
        nonlocal offset
        size = packed_bits_size(count, width)
        values = unpack_bits(view[offset : offset + size], count, width)
        offset += size
        return values

    def take_values(count: int) -> np.ndarray:
        nonlocal offset
        raw = np.frombuffer(view[offset : offset + count * value_size], dtype=wire_np).copy()
        offset += count * value_size
        return from_wire(raw, value_dtype).float().numpy()

    counts = take_bits(num_rows, count_bits)
    num_top = int(counts.sum())
    ids = take_bits(num_top, id_bits)
    values = take_values(num_top)
    tail = np.frombuffer(view[offset : offset + 4 * num_rows], dtype="<f4").astype(np.float32)
    offset += 4 * num_rows
    rows = PackedRows(counts, ids, values, tail, num_draws)
    if num_draws:
        rows.draw_counts_R = take_bits(num_rows, count_bits)
        num_drawn = int(rows.draw_counts_R.sum())
        rows.draw_ids_Y = take_bits(num_drawn, id_bits)
        rows.draw_multiplicity_Y = take_bits(num_drawn, count_bits)
        rows.draw_values_Y = take_values(num_drawn)
    if offset != len(view):
        raise ValueError(f"a version 2 signal row block of {len(view)} bytes holds {len(view) - offset} bytes its header does not account for")
    return rows


def concat_rows(parts: list[PackedRows]) -> PackedRows:
    """The rows of several samples as one block (the batch, in sample order)."""
    num_draws = {part.num_draws for part in parts if part.num_rows}
    if len(num_draws) > 1:
        raise ValueError(f"the samples of a batch were drawn with different tail_samples: {sorted(num_draws)}")
    cat = lambda name, dtype: np.concatenate([getattr(part, name) for part in parts]).astype(dtype) if parts else np.zeros(0, dtype)
    rows = PackedRows(cat("counts_R", np.int64), cat("ids_X", np.int64), cat("values_X", np.float32),
                      cat("tail_logmass_R", np.float32), num_draws.pop() if num_draws else 0)
    if rows.num_draws:
        parts = [part for part in parts if part.num_rows]
        rows.draw_counts_R, rows.draw_ids_Y = cat("draw_counts_R", np.int64), cat("draw_ids_Y", np.int64)
        rows.draw_values_Y, rows.draw_multiplicity_Y = cat("draw_values_Y", np.float32), cat("draw_multiplicity_Y", np.int64)
    return rows


def triangle_indices(num: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of the upper triangle (diagonal included), row by row."""
    return torch.triu_indices(num, num, device=device).unbind(0)


def pack_triangle(gram_BNN: torch.Tensor) -> torch.Tensor:
    """A symmetric ``[B, N, N]`` as its upper triangle ``[B, N (N + 1) / 2]``."""
    rows, cols = triangle_indices(gram_BNN.shape[-1], gram_BNN.device)
    return gram_BNN[:, rows, cols]


def unpack_triangle(triangle_BT: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_triangle`: the symmetric ``[B, N, N]``."""
    num = int((math.isqrt(8 * triangle_BT.shape[-1] + 1) - 1) // 2)
    if num * (num + 1) // 2 != triangle_BT.shape[-1]:
        raise ValueError(f"{triangle_BT.shape[-1]} values are not the upper triangle of a square matrix")
    rows, cols = triangle_indices(num, triangle_BT.device)
    gram_BNN = triangle_BT.new_zeros(triangle_BT.shape[0], num, num)
    gram_BNN[:, rows, cols] = triangle_BT
    gram_BNN[:, cols, rows] = triangle_BT
    return gram_BNN


