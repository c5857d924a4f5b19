"""One teacher forward pass -> the compressed signal of a batch (see `signal.py` for the format).

Memory: the LM head runs only on the positions the signal needs (response and visual rows), a
chunk of rows at a time, so a 151936-token vocabulary never materializes [B, L, V] logits. The
visual Gram matrix Z Z^T = H (W^T W) H^T is formed from the final hidden states H and the
precomputed D x D matrix W^T W of the (vocabulary-cut) LM head, never from the N x V logits.
"""

from __future__ import annotations

import numpy as np
import torch

from ckd_ray.losses.attention import gather_visual_keys
from ckd_ray.losses.knowledge import fact_log_probs
from ckd_ray.models import num_image_tokens
from ckd_ray.models.buckets import forward_by_length
from ckd_ray.teachers.config import SignalSpec
from ckd_ray.teachers.packed import PackedRows, concat_rows, encode_rows, pack_triangle, select_rows
from ckd_ray.teachers.signal import to_wire, topk_with_tail

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


class TeacherForward:
    """Computes the signal of `spec` with a loaded, frozen teacher. `shared_vocab_size` cuts a
    padded vocabulary to the range the student shares; `rows_per_chunk` bounds LM-head memory;
    `max_buckets`: the forward runs in at most this many groups of rows of similar length
    (`ckd_ray.models.buckets`; positions past a row's length then hold zeros, which no loss reads)."""

    def __init__(self, model, spec: SignalSpec, shared_vocab_size: int, *, rows_per_chunk: int = 512, max_buckets: int = 1):
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.spec = spec
        self.vocab_size = shared_vocab_size
        self.rows_per_chunk = rows_per_chunk
        self.max_buckets = max_buckets
        self.device = next(model.parameters()).device
        # Fixed per model, so signal columns keep one shape across batches (Arrow tensor columns).
        self.num_visual = num_image_tokens(model.config)
        self.lm_weight_VD = model.get_output_embeddings().weight[:shared_vocab_size]
        self.gram_basis_DD = None
        # Tail draws (signal version 2) are seeded, so a pass is reproducible.
        self.generator = torch.Generator(device=self.device).manual_seed(0) if spec.tail_samples else None
        if spec.gram:
            weight = self.lm_weight_VD.float()
            self.gram_basis_DD = weight.T @ weight

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec
        seq_len = batch["input_ids"].shape[1]
        row_lengths = batch["attention_mask"].sum(axis=1)
        used = int(row_lengths.max())  # trim right padding
        response_BL = torch.as_tensor(batch["response_mask"][:, :used], device=self.device)
        visual_BL = torch.as_tensor(batch["visual_mask"][:, :used], device=self.device)
        out = forward_by_length(
            self.model.model,
            input_ids=torch.as_tensor(batch["input_ids"][:, :used], dtype=torch.long, device=self.device),
            attention_mask=torch.as_tensor(batch["attention_mask"][:, :used], dtype=torch.long, device=self.device),
            pixel_values=torch.as_tensor(batch["pixel_values"], device=self.device).to(self.model.dtype),
            pixel_rows=np.arange(len(row_lengths)),  # every row's image, as the whole batch's forward is given
            row_lengths=row_lengths,
            max_buckets=self.max_buckets,
            output_hidden_states=bool(spec.feature_layers),
            output_attentions=bool(spec.attention_layers),
            return_dict=True,
        )
        hidden_BLD = out.last_hidden_state
        signal: dict[str, np.ndarray] = {}
        if spec.response_top_k:
            self._topk(signal, "resp", hidden_BLD, response_BL, spec.response_top_k, seq_len)
        if spec.visual_top_k:
            self._topk(signal, "vis", hidden_BLD, visual_BL, spec.visual_top_k, seq_len)
        if spec.gram and spec.version == 2:
            gram_BNN = self._gram_matrices(hidden_BLD, visual_BL)
            signal["sig_gram_triangle"] = to_wire(pack_triangle(gram_BNN), spec.value_dtype)
        elif spec.gram:
            signal["sig_gram"] = to_wire(self._gram_matrices(hidden_BLD, visual_BL), spec.value_dtype)
        for layer in spec.attention_layers:
            signal[f"sig_attn_{layer}"] = self._attention(out.attentions[layer], visual_BL, seq_len)
        for layer in spec.feature_layers:
            signal[f"sig_hidden_{layer}"] = to_wire(_pad_to(out.hidden_states[layer], seq_len), spec.value_dtype)
        if spec.facts:
            signal["sig_fact_logprobs"] = self._facts(hidden_BLD, batch).cpu().numpy()
        return signal

    def _logits(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_ND, self.lm_weight_VD).float()

    def _topk(self, signal, name, hidden_BLD, mask_BL, k, seq_len) -> None:
        if self.spec.version == 2:
            self._packed_rows(signal, name, hidden_BLD, mask_BL, k)
            return
        num_samples = hidden_BLD.shape[0]
        k = min(k, self.vocab_size)
        values = torch.zeros(num_samples, seq_len, k, device=self.device)
        ids = torch.zeros(num_samples, seq_len, k, dtype=torch.int32, device=self.device)
        tail = torch.zeros(num_samples, seq_len, device=self.device)
        rows_R2 = mask_BL.nonzero()
        for start in range(0, len(rows_R2), self.rows_per_chunk):
            b, t = rows_R2[start : start + self.rows_per_chunk].unbind(-1)
            chunk_values, chunk_ids, chunk_tail = topk_with_tail(self._logits(hidden_BLD[b, t]), k)
            values[b, t], ids[b, t], tail[b, t] = chunk_values, chunk_ids.int(), chunk_tail
        signal[f"sig_{name}_topk_values"] = to_wire(values, self.spec.value_dtype)
        signal[f"sig_{name}_topk_ids"] = ids.cpu().numpy()
        signal[f"sig_{name}_tail_logmass"] = tail.cpu().numpy()

    def _packed_rows(self, signal, name, hidden_BLD, mask_BL, k) -> None:
        """Version 2: one bytes value per sample with the rows of its masked positions only."""
        spec = self.spec
        rows_R2 = mask_BL.nonzero()  # sample-major, positions in order: the order the student reads
        chunks = []
        for start in range(0, len(rows_R2), self.rows_per_chunk):
            b, t = rows_R2[start : start + self.rows_per_chunk].unbind(-1)
            chunks.append(select_rows(self._logits(hidden_BLD[b, t]), k, spec.tail_mass, spec.tail_samples, self.generator))
        rows = concat_rows(chunks) if chunks else PackedRows.empty(spec.tail_samples)
        rows_per_sample = mask_BL.sum(dim=1).tolist()  # host sync
        signal[f"sig_{name}_packed"] = np.array(
            [encode_rows(part, self.vocab_size, k, spec.value_dtype) for part in rows.split(rows_per_sample)], dtype=object
        )

    def _gram_matrices(self, hidden_BLD, visual_BL) -> torch.Tensor:
        counts = visual_BL.sum(dim=1).tolist()  # host sync
        gram_BNN = torch.zeros(len(counts), self.num_visual, self.num_visual, device=self.device)
        for sample, count in enumerate(counts):
            h_ND = hidden_BLD[sample][visual_BL[sample]].float()
            gram_BNN[sample, :count, :count] = h_ND @ self.gram_basis_DD @ h_ND.T
        return gram_BNN

    def _attention(self, attn_BHLL, visual_BL, seq_len) -> np.ndarray:
        num_keys = self.num_visual
        attn_BHLN, _ = gather_visual_keys(attn_BHLL.float(), visual_BL, num_keys)
        groups = self.spec.attention_head_groups
        num_samples, num_heads, length, _ = attn_BHLN.shape
        if num_heads % groups:
            raise ValueError(f"signal.attention_head_groups={groups} does not divide the teacher's {num_heads} heads")
        grouped_BGLN = attn_BHLN.reshape(num_samples, groups, num_heads // groups, length, num_keys).mean(dim=2)
        return to_wire(_pad_to(grouped_BGLN, seq_len, dim=2), self.spec.value_dtype)

    def _facts(self, hidden_BLD, batch) -> torch.Tensor:
        answer_pos_B = torch.as_tensor(batch["answer_pos"], dtype=torch.long, device=self.device)
        answer_pos_B = answer_pos_B.clamp(0, hidden_BLD.shape[1] - 1)
        rows_B = torch.arange(hidden_BLD.shape[0], device=self.device)
        answer_logits_B1V = self._logits(hidden_BLD[rows_B, answer_pos_B])[:, None, :]
        return fact_log_probs(
            answer_logits_B1V,
            torch.zeros_like(answer_pos_B),
            torch.as_tensor(batch["fact_token_ids"], device=self.device),
            torch.as_tensor(batch["fact_mask"], device=self.device),
            temperature=1.0,
        )


def _pad_to(tensor: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
