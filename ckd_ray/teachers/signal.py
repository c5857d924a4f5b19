"""The compressed teacher signal: what a teacher adds to each batch (`SignalSpec.version`).

Version 1 (below) is dense and simple; version 2 (`ckd_ray/teachers/packed.py`) ships the same
information ragged and bit-packed, with a per-token k:

| column (version 2)         | per sample              | for term          |
|----------------------------|-------------------------|-------------------|
| `sig_resp_packed`          | bytes: the response rows | output           |
| `sig_vis_packed`           | bytes: the visual rows  | visual_kl         |
| `sig_gram_triangle`        | [N (N + 1) / 2] wire    | visual_relation   |

(attention, features and facts as in version 1.) The version is part of the spec fingerprint,
so cache entries of the two never mix; a version 1 fingerprint is what it was before version 2
existed, so version 1 entries stay readable.

Version 1:

Full logits cannot cross the object store (Qwen2.5: 2048 x 151936 x 4 B = 1.24 GB a sample), so
the teacher sends, per the step's `SignalSpec`:

| column                     | shape per sample  | dtype          | for term          |
|----------------------------|-------------------|----------------|-------------------|
| `sig_resp_topk_values`     | [L, K]            | wire (bf16)    | output            |
| `sig_resp_topk_ids`        | [L, K]            | int32          | output            |
| `sig_resp_tail_logmass`    | [L]               | float32        | output            |
| `sig_vis_topk_values/ids`  | [L, Kv]           | wire / int32   | visual_kl         |
| `sig_vis_tail_logmass`     | [L]               | float32        | visual_kl         |
| `sig_gram`                 | [N, N]            | wire           | visual_relation   |
| `sig_attn_<layer>`         | [G, L, N]         | wire           | attention         |
| `sig_hidden_<layer>`       | [L, D_teacher]    | wire           | feature           |
| `sig_fact_logprobs`        | [F]               | float32        | knowledge         |

L is the padded sequence length, N the number of visual tokens, K the top-k. Top-k rows are
filled only at response (resp) or visual (vis) positions and zero elsewhere. Values are raw T = 1
logits, not log-probabilities, so a temperature sweep needs no teacher re-run; the tail column is
log(sum of exp(logit) over the ids not in the top-k), -inf when the top-k covers the vocabulary.
bf16 travels as its uint16 bit pattern (numpy and Arrow have no bfloat16) and is viewed back
without a copy on the student side.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

from ckd_ray.teachers.config import SignalSpec
from ckd_ray.teachers.packed import WIRE_DTYPES, from_wire, to_wire, unpack_triangle  # noqa: F401 (the wire format's names, here too)

SIGNAL_VERSION = 1  # the default format; `SignalSpec.version` picks one per job
_VERSION_2_FIELDS = ("version", "tail_mass", "tail_samples")
SIGNAL_PREFIX = "sig_"


def spec_fingerprint(spec: SignalSpec, shared_vocab_size: int) -> str:
    """Identifies a signal format: equal fingerprints mean interchangeable cached signal. A
    version 1 spec hashes as it did before the version 2 fields existed (its cache entries stay
    valid)."""
    fields = spec.model_dump(mode="json")
    if spec.version == 1:
        fields = {name: value for name, value in fields.items() if name not in _VERSION_2_FIELDS}
    blob = json.dumps({"version": spec.version, "vocab": shared_vocab_size, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def bytes_per_sample(
    spec: SignalSpec,
    *,
    seq_len: int,
    num_visual: int,
    teacher_hidden: int,
    num_facts: int = 8,
) -> dict[str, int]:
    """Bytes each signal part adds to one sample on the wire (and their `total`), version 1. A
    version 2 sample's size depends on its tokens (per-token k): measure its packed columns
    (`signal_nbytes`, `benchmarks/bench_teacher_signal.py`)."""
    if spec.version != 1:
        raise ValueError("bytes_per_sample computes version 1 sizes; a version 2 sample's size depends on its "
                         "tokens: measure its columns with signal_nbytes")
    value = torch.tensor([], dtype=WIRE_DTYPES[spec.value_dtype]).element_size()
    parts: dict[str, int] = {}
    if spec.response_top_k:
        parts["response_topk"] = seq_len * spec.response_top_k * (value + 4) + seq_len * 4
    if spec.visual_top_k:
        parts["visual_topk"] = seq_len * spec.visual_top_k * (value + 4) + seq_len * 4
    if spec.gram:
        parts["gram"] = num_visual * num_visual * value
    if spec.attention_layers:
        parts["attention"] = len(spec.attention_layers) * spec.attention_head_groups * seq_len * num_visual * value
    if spec.feature_layers:
        parts["features"] = len(spec.feature_layers) * seq_len * teacher_hidden * value
    if spec.facts:
        parts["facts"] = num_facts * 4
    parts["total"] = sum(parts.values())
    return parts


def signal_nbytes(columns: dict[str, np.ndarray]) -> int:
    """Bytes of the signal columns of a batch (a version 2 bytes column counts its payloads)."""
    return int(sum(_column_nbytes(v) for k, v in columns.items() if k.startswith(SIGNAL_PREFIX)))


def _column_nbytes(column: np.ndarray) -> int:
    if column.dtype == object:
        return sum(len(value) for value in column)
    return column.nbytes


def topk_with_tail(logits_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k raw logits, their ids, and log(sum exp) of the rest, in float32.

    The tail is a logsumexp over the logits with the top-k masked out (exact, unlike
    lse_all + log1p(-exp(lse_top - lse_all)), which cancels when the top-k holds nearly all
    mass); it is -inf when k covers the vocabulary."""
    logits_NV = logits_NV.float()
    k = min(k, logits_NV.shape[-1])
    values_NK, ids_NK = logits_NV.topk(k, dim=-1)
    tail_N = torch.logsumexp(logits_NV.scatter(-1, ids_NK, -math.inf), dim=-1)
    return values_NK, ids_NK, tail_N


def decode_signal(batch, spec: SignalSpec, attention_layers: dict[int, int], device: torch.device | str = "cpu"):
    """The signal columns of a batch (numpy or torch) as the losses' `TeacherSignalBatch`.

    `attention_layers` is the loss's student -> teacher layer map: the teacher's maps are keyed by
    the student layer they are distilled into. Right padding beyond the batch's longest row is
    trimmed to match the student's trimmed inputs (`used` = longest attention mask)."""
    from ckd_ray.losses import SparseLogits, TeacherSignalBatch, TopKLogits

    used = int(np.asarray(batch["attention_mask"]).sum(axis=1).max())

    def tensor(name: str, wire: bool = False, trim_dim: int | None = 1) -> torch.Tensor:
        value = from_wire(batch[name], spec.value_dtype, device) if wire else torch.as_tensor(np.asarray(batch[name]), device=device)
        if trim_dim is not None:
            value = value.narrow(trim_dim, 0, used)
        return value

    def topk(name: str) -> TopKLogits | SparseLogits:
        if spec.version == 2:
            mask = batch["response_mask" if name == "resp" else "visual_mask"]
            return sparse_logits(batch[f"sig_{name}_packed"], np.asarray(mask)[:, :used], spec.value_dtype, device)
        return TopKLogits(
            values_BLK=tensor(f"sig_{name}_topk_values", wire=True),
            ids_BLK=tensor(f"sig_{name}_topk_ids").long(),
            tail_logmass_BL=tensor(f"sig_{name}_tail_logmass"),
        )

    signal = TeacherSignalBatch()
    if spec.response_top_k:
        signal.response_topk = topk("resp")
    if spec.visual_top_k:
        signal.visual_topk = topk("vis")
    if spec.gram and spec.version == 2:
        signal.gram_BNN = unpack_triangle(tensor("sig_gram_triangle", wire=True, trim_dim=None))
        signal.visual_count_B = tensor("visual_mask", trim_dim=None).sum(dim=1)
    elif spec.gram:
        signal.gram_BNN = tensor("sig_gram", wire=True, trim_dim=None)
        signal.visual_count_B = tensor("visual_mask", trim_dim=None).sum(dim=1)
    if spec.feature_layers:
        signal.hidden_states = {layer: tensor(f"sig_hidden_{layer}", wire=True) for layer in spec.feature_layers}
    if attention_layers:
        signal.attentions = {
            student: tensor(f"sig_attn_{teacher}", wire=True, trim_dim=2) for student, teacher in attention_layers.items()
        }
    if spec.facts:
        signal.fact_log_probs_BF = tensor("sig_fact_logprobs", trim_dim=None)
        signal.fact_mask_BF = tensor("fact_mask", trim_dim=None).bool()
        signal.fact_token_ids_BFT = tensor("fact_token_ids", trim_dim=None).long()
        signal.answer_pos_B = tensor("answer_pos", trim_dim=None).long()
    return signal


def fused_column_prefix(index: int) -> str:
    """The prefix of the i-th fused teacher's columns (i >= 1) in a fused step's rows: teacher 0's
    columns keep their names, teacher i's `sample_id` and `sig_*` columns are `t<i>:sample_id`, ..."""
    return f"t{index}:"


def decode_fused_signal(batch, spec: SignalSpec, attention_layers: dict[int, int], roles: list[str],
                        device: torch.device | str = "cpu"):
    """A fused step's batch (`fused_column_prefix`) as the losses' `FusedTeacherSignal`: each
    teacher's columns decoded as `decode_signal` decodes one teacher's, after checking that every
    teacher's row is the same sample (the teachers' cache entries are zipped row by row)."""
    from ckd_ray.losses import FusedTeacherSignal

    sample_ids = np.asarray(batch["sample_id"])
    teachers = {}
    for index, role in enumerate(roles):
        view = batch
        if index:
            prefix = fused_column_prefix(index)
            if not np.array_equal(np.asarray(batch[f"{prefix}sample_id"]), sample_ids):
                raise ValueError(f"the signal rows of teacher {role!r} are not the samples of teacher {roles[0]!r}'s rows: "
                                 "their cache entries were written in different orders (delete both entries to rerun the passes)")
            view = {**batch, **{name[len(prefix):]: value for name, value in batch.items() if name.startswith(prefix)}}
        teachers[role] = decode_signal(view, spec, attention_layers, device)
    return FusedTeacherSignal(teachers)


def sparse_logits(column, mask_BL: np.ndarray, value_dtype: str, device: torch.device | str = "cpu"):
    """A batch's version 2 rows (one bytes value per sample) as the losses' `SparseLogits`: the
    rows of each sample belong to its `mask_BL` positions in order, padded to the batch's
    largest k (``[R, K]``, never ``[B, L, V]``)."""
    from ckd_ray.losses import SparseLogits
    from ckd_ray.teachers.packed import concat_rows, decode_rows

    parts = [decode_rows(bytes(value), value_dtype) for value in column]
    expected = mask_BL.sum(axis=1).tolist()
    shipped = [part.num_rows for part in parts]
    if shipped != expected:
        raise ValueError(f"version 2 signal rows per sample {shipped} do not match the masked positions {expected}: "
                         "the signal was computed for other masks (a stale or foreign cache entry)")
    rows = concat_rows(parts)
    positions_R = torch.as_tensor(np.flatnonzero(mask_BL.reshape(-1)), device=device)
    ids_RK, values_RK = _padded(rows.counts_R, rows.ids_X, rows.values_X, device)
    sparse = SparseLogits(positions_R=positions_R, ids_RK=ids_RK, values_RK=values_RK,
                          tail_logmass_R=torch.as_tensor(rows.tail_logmass_R, device=device))
    if rows.num_draws:
        sparse.draw_ids_RM, sparse.draw_values_RM = _padded(rows.draw_counts_R, rows.draw_ids_Y, rows.draw_values_Y, device)
        multiplicity_RM, _ = _padded(rows.draw_counts_R, rows.draw_multiplicity_Y, rows.draw_values_Y, device)
        sparse.draw_weights_RM = multiplicity_RM.clamp_min(0).float() / rows.num_draws
    return sparse


def _padded(counts_R: np.ndarray, ids_X: np.ndarray, values_X: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows as ``[R, max count]`` ids (-1 in padding) and values (-inf in padding)."""
    width = int(counts_R.max()) if len(counts_R) else 0
    slot_X = np.arange(len(ids_X)) - np.repeat(np.cumsum(counts_R) - counts_R, counts_R)
    row_X = np.repeat(np.arange(len(counts_R)), counts_R)
    ids = np.full((len(counts_R), width), -1, dtype=np.int64)
    values = np.full((len(counts_R), width), -np.inf, dtype=np.float32)
    ids[row_X, slot_X], values[row_X, slot_X] = ids_X, values_X
    return torch.as_tensor(ids, device=device), torch.as_tensor(values, device=device)
