"""Signal version 2: packing round trips exactly, per-token k follows `tail_mass`, the ragged KL
(and its tail draws) matches a plain float64 reference, and version 1 keeps its fingerprint."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from ckd_ray.config import ConfigError, validate_config
from ckd_ray.losses import SparseLogits, kl_loss_dense, kl_loss_sparse, kl_loss_topk
from ckd_ray.teachers import SignalSpec, spec_fingerprint
from ckd_ray.teachers.packed import (
    PackedRows, bits_for, concat_rows, decode_rows, encode_rows, pack_bits, pack_triangle, select_rows, unpack_bits, unpack_triangle,
)
from ckd_ray.teachers.signal import signal_nbytes, sparse_logits

NUM_SAMPLES, SEQ_LEN, VOCAB = 3, 7, 40


def make_case(seed: int = 0, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator, dtype=torch.float64) * scale
    student = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator, dtype=torch.float64) * scale
    mask = torch.rand(NUM_SAMPLES, SEQ_LEN, generator=generator) < 0.6
    mask[1] = False  # a sample with no row
    mask[0, 0] = True
    return teacher, student, mask


def shipped(teacher_BLV, mask_BL, top_k, tail_mass=0.0, draws=0, value_dtype="float32", seed=0):
    rows = select_rows(teacher_BLV[mask_BL], top_k, tail_mass, draws, torch.Generator().manual_seed(seed))
    column = np.array([encode_rows(part, VOCAB, top_k, value_dtype) for part in rows.split(mask_BL.sum(dim=1).tolist())], dtype=object)
    return rows, column, sparse_logits(column, mask_BL.numpy(), value_dtype)


def test_bit_packing_round_trips_exactly_at_every_width():
    generator = np.random.default_rng(0)
    for width in (1, 3, 7, 8, 17, 18, 31, 32):
        values = generator.integers(0, 1 << width, size=101, dtype=np.uint64)
        values[:2] = [0, (1 << width) - 1]
        data = pack_bits(values, width)
        assert len(data) == (101 * width + 7) // 8
        assert np.array_equal(unpack_bits(data, 101, width), values.astype(np.int64))
    assert bits_for(151_936) == 18 and bits_for(512) == 9 and bits_for(65) == 7
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        pack_bits(np.array([16]), 4)


@pytest.mark.parametrize("draws", [0, 5])
def test_rows_round_trip_through_the_bytes_exactly(draws):
    teacher, _, mask = make_case()
    rows, column, _ = shipped(teacher, mask, 8, tail_mass=0.2, draws=draws)
    parts = rows.split(mask.sum(dim=1).tolist())
    back = concat_rows([decode_rows(value, "float32") for value in column])
    for name in ("counts_R", "ids_X", "values_X", "tail_logmass_R") + (("draw_counts_R", "draw_ids_Y", "draw_values_Y", "draw_multiplicity_Y") if draws else ()):
        assert np.array_equal(getattr(back, name), getattr(rows, name)), name
    assert parts[1].num_rows == 0 and len(column[1]) == 8  # a sample without rows costs its header
    # bf16: values are the bf16 rounding of the float32 ones, ids and tails untouched
    bf16 = decode_rows(encode_rows(parts[0], VOCAB, 8, "bfloat16"), "bfloat16")
    assert np.array_equal(bf16.ids_X, parts[0].ids_X)
    assert np.array_equal(bf16.values_X, torch.as_tensor(parts[0].values_X).bfloat16().float().numpy())
    with pytest.raises(ValueError, match="does not account for"):
        decode_rows(column[0] + b"\x00", "float32")
    assert signal_nbytes({"sig_resp_packed": column, "input_ids": np.zeros(9)}) == sum(len(v) for v in column)


def test_per_token_k_is_the_smallest_whose_left_out_mass_is_within_tail_mass():
    teacher, _, mask = make_case(seed=3, scale=2.0)
    logits = teacher[mask]
    for tail_mass, cap in ((0.05, 40), (0.3, 40), (0.05, 6)):
        rows = select_rows(logits.float(), cap, tail_mass)
        probs = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values
        for row, k in enumerate(rows.counts_R.tolist()):
            left_out = 1.0 - probs[row, :k].sum()
            assert k == cap or left_out <= tail_mass + 1e-6
            assert k == 1 or 1.0 - probs[row, : k - 1].sum() > tail_mass - 1e-6
        # exact tail log-mass, with the top logit as the shift
        top = logits.float().topk(1, dim=-1).values[:, 0]
        start = np.cumsum(rows.counts_R) - rows.counts_R
        for row, k in enumerate(rows.counts_R.tolist()):
            ids = torch.as_tensor(rows.ids_X[start[row] : start[row] + k])
            rest = logits[row].clone()
            rest[ids] = -math.inf
            assert math.isclose(rows.tail_logmass_R[row], float(rest.logsumexp(0) - top[row]), abs_tol=1e-5)


def test_gram_triangle_round_trips():
    gram = torch.randn(2, 5, 5, dtype=torch.float64)
    gram = gram + gram.transpose(1, 2)
    assert pack_triangle(gram).shape == (2, 15)
    assert torch.equal(unpack_triangle(pack_triangle(gram)), gram)
    with pytest.raises(ValueError, match="upper triangle"):
        unpack_triangle(torch.zeros(1, 14))


# ---- float64 references: one row at a time ----


def reference_sparse(student_BLV, sparse: SparseLogits, mask_BL, temperature, direction):
    """The k + 1 bucket KL (or, for forward KL with draws, the importance-weighted estimate) in
    float64, written from the module docstring of ckd_ray.losses.kl."""
    row_of = {int(p): r for r, p in enumerate(sparse.positions_R.tolist())}
    num_vocab = student_BLV.shape[-1]
    terms = []
    for b, t in mask_BL.nonzero().tolist():
        r = row_of[b * mask_BL.shape[1] + t]
        valid = sparse.ids_RK[r] >= 0
        ids = sparse.ids_RK[r][valid].tolist()
        z = sparse.values_RK[r][valid].double()
        tail = float(sparse.tail_logmass_R[r])
        log_q = torch.log_softmax(student_BLV[b, t].double() / temperature, dim=0)
        if sparse.draw_ids_RM is not None and direction == "forward":
            drawn = sparse.draw_ids_RM[r] >= 0
            d_ids = sparse.draw_ids_RM[r][drawn].tolist()
            d_z = sparse.draw_values_RM[r][drawn].double()
            d_w = sparse.draw_weights_RM[r][drawn].double()
            tail_T = math.exp(tail) * float((d_w * torch.exp(d_z * (1 / temperature - 1))).sum())
            norm = math.log(float(torch.exp(z / temperature).sum()) + tail_T)
            log_p = z / temperature - norm
            kl = (log_p.exp() * (log_p - log_q[ids])).sum()
            weight = d_w * torch.exp(d_z * (1 / temperature - 1) + tail - norm)
            kl = kl + (weight * (d_z / temperature - norm - log_q[d_ids])).sum()
            terms.append(kl)
            continue
        tail_ids = [v for v in range(num_vocab) if v not in ids]
        log_q_b = torch.cat([log_q[ids], log_q[tail_ids].logsumexp(0)[None]])
        n = len(tail_ids)
        tail_logit = math.log(n) + (tail - math.log(n)) / temperature
        log_p_b = torch.log_softmax(torch.cat([z / temperature, torch.tensor([tail_logit], dtype=torch.float64)]), dim=0)
        a, c = (log_q_b, log_p_b) if direction == "reverse" else (log_p_b, log_q_b)
        terms.append((a.exp() * (a - c)).sum())
    return torch.stack(terms).mean() * temperature**2


def value_and_grad(loss_fn, logits):
    logits = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(logits)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tail_mass,draws", [(0.0, 0), (0.2, 0), (0.2, 6)])
def test_sparse_kl_matches_float64_reference(temperature, direction, tail_mass, draws):
    teacher, student, mask = make_case(seed=1)
    _, _, sparse = shipped(teacher, mask, 8, tail_mass, draws)
    assert len(set(sparse.ids_RK.ne(-1).sum(dim=1).tolist())) > 1 or tail_mass == 0  # ragged k
    got, got_grad = value_and_grad(lambda s: kl_loss_sparse(s.float(), sparse, mask, temperature=temperature, direction=direction, chunk_size=3), student)
    ref, ref_grad = value_and_grad(lambda s: reference_sparse(s, sparse, mask, temperature, direction), student)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_sparse_kl_at_fixed_k_equals_version_one_and_at_full_k_the_dense_kl():
    teacher, student, mask = make_case(seed=2)
    for temperature in (1.0, 2.0):
        values, ids = teacher.float().topk(8, dim=-1)
        tail = teacher.float().scatter(-1, ids, -math.inf).logsumexp(dim=-1)
        v1 = kl_loss_topk(student.float(), values, ids, tail, mask, temperature=temperature)
        v2 = kl_loss_sparse(student.float(), shipped(teacher, mask, 8)[2], mask, temperature=temperature)
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-6)
        dense = kl_loss_dense(student.float(), teacher.float(), mask, temperature=temperature)
        torch.testing.assert_close(kl_loss_sparse(student.float(), shipped(teacher, mask, VOCAB)[2], mask, temperature=temperature), dense, rtol=1e-5, atol=1e-6)


def test_tail_draws_are_unbiased_at_temperature_one():
    """The mean of the draw estimate over many seeds is the dense KL; the bucket KL with the
    same top ids is a lower bound well below it."""
    teacher, student, mask = make_case(seed=4, scale=1.0)  # flat teachers: most mass in the tail
    dense = float(kl_loss_dense(student.float(), teacher.float(), mask))
    estimates = [float(kl_loss_sparse(student.float(), shipped(teacher, mask, 2, draws=4, seed=seed)[2], mask)) for seed in range(300)]
    bucket = float(kl_loss_sparse(student.float(), shipped(teacher, mask, 2)[2], mask))
    stderr = np.std(estimates) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - dense) < 4 * stderr
    assert bucket < dense - 10 * stderr


def test_sparse_kl_refuses_rows_that_do_not_fit_the_mask():
    teacher, student, mask = make_case()
    _, column, sparse = shipped(teacher, mask, 4)
    other = mask.clone()
    other[2, :] = True
    with pytest.raises(ValueError, match="masked position\\(s\\) have no teacher row"):
        kl_loss_sparse(student.float(), sparse, other)
    with pytest.raises(ValueError, match="do not match the masked positions"):
        sparse_logits(column, other.numpy(), "float32")


def test_version_one_fingerprint_is_unchanged_and_versions_never_share_one():
    spec = SignalSpec(response_top_k=16, visual_top_k=16)
    fields = {k: v for k, v in spec.model_dump(mode="json").items() if k not in ("version", "tail_mass", "tail_samples")}
    before = hashlib.sha256(json.dumps({"version": 1, "vocab": 512, **fields}, sort_keys=True).encode()).hexdigest()[:16]
    assert spec_fingerprint(spec, 512) == before  # the fingerprint of entries written before version 2
    v2 = spec.model_copy(update={"version": 2})
    prints = {spec_fingerprint(s, 512) for s in (spec, v2, v2.model_copy(update={"tail_mass": 0.05}), v2.model_copy(update={"tail_samples": 8}))}
    assert len(prints) == 4


def test_version_two_options_are_checked_with_field_and_fix():
    base = {"name": "t", "models": {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"}},
            "cascade": {"plan": "single_teacher"}, "data": {"benchmark_root": "data/kvqa"}}
    with pytest.raises(ConfigError) as error:
        validate_config({**base, "signal": {"tail_mass": 0.05, "tail_samples": 8}})
    (problem,) = error.value.problems
    assert problem.field.startswith("signal") and "tail_mass=0.05 and tail_samples=8" in str(error.value)
    assert "set signal.version: 2" in str(error.value)
    for bad in ({"version": 3}, {"version": 2, "tail_mass": 1.0}, {"version": 2, "tail_mass": -0.1}, {"version": 2, "tail_samples": -1}):
        with pytest.raises(ConfigError, match="signal"):
            validate_config({**base, "signal": bad})
    job = validate_config({**base, "signal": {"version": 2, "tail_mass": 0.05, "tail_samples": 48}})
    assert job.signal.version == 2 and job.signal.tail_samples == 48


def test_empty_rows_and_batches_decode():
    mask = np.zeros((2, 5), dtype=bool)
    column = np.array([encode_rows(PackedRows.empty(4), VOCAB, 8, "bfloat16")] * 2, dtype=object)
    sparse = sparse_logits(column, mask, "bfloat16")
    assert sparse.positions_R.numel() == 0
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    loss = kl_loss_sparse(logits, sparse, torch.as_tensor(mask))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not logits.grad.any()


def test_teacher_forward_version_two_decodes_to_version_one_rows_and_losses(kvqa_dir, tmp_path):
    """The real encoder and decoder: at the same fixed k, version 2 ships the same top ids as
    version 1 (values shifted by the row's top logit), the same tails, the same Gram, and the
    losses agree; a per-token k and tail draws change the bytes, not the interface."""
    from ckd_ray.data.config import DataConfig
    from ckd_ray.data.pipeline import iter_plain_batches
    from ckd_ray.data.processor import Processor
    from ckd_ray.losses import StudentOutputs, distillation_loss
    from ckd_ray.losses.config import LossWeights
    from ckd_ray.models import build_preset
    from ckd_ray.teachers.forward import TeacherForward
    from ckd_ray.teachers.signal import decode_signal

    data = DataConfig(benchmark_root=str(kvqa_dir), preprocess_batch_size=6)
    sources = [s.model_copy(update={"split": "val"}) for s in data.instruction_sources()]
    batch = next(iter_plain_batches(sources, Processor.load(kvqa_dir / "processor", 16), data, rejects_uri=str(tmp_path / "rejects.jsonl")))
    teacher, student = build_preset("tiny-teacher", seed=11), build_preset("tiny-student", seed=12)
    v1 = SignalSpec(response_top_k=8, visual_top_k=8, gram=True, value_dtype="float32")
    specs = {"v1": v1, "v2": v1.model_copy(update={"version": 2}),
             "v2 adaptive + draws": v1.model_copy(update={"version": 2, "tail_mass": 0.1, "tail_samples": 16})}
    columns = {name: TeacherForward(teacher, spec, 512)(batch) for name, spec in specs.items()}
    assert columns["v2"]["sig_resp_packed"].dtype == object and "sig_gram" not in columns["v2"]
    assert signal_nbytes(columns["v2"]) < signal_nbytes(columns["v1"]) / 3
    signals = {name: decode_signal({**batch, **columns[name]}, spec, {}) for name, spec in specs.items()}
    used = int(batch["attention_mask"].sum(axis=1).max())
    masks = {name: torch.as_tensor(batch[name][:, :used]).bool() for name in ("response_mask", "visual_mask")}
    dense, packed = signals["v1"].response_topk, signals["v2"].response_topk
    rows = masks["response_mask"].reshape(-1).nonzero().squeeze(1)
    assert torch.equal(packed.positions_R, rows)
    assert torch.equal(packed.ids_RK, dense.ids_BLK.reshape(-1, 8)[rows])
    top = dense.values_BLK.reshape(-1, 8)[rows]
    torch.testing.assert_close(packed.values_RK, top - top[:, :1])
    torch.testing.assert_close(packed.tail_logmass_R, dense.tail_logmass_BL.reshape(-1)[rows] - top[:, 0])
    torch.testing.assert_close(signals["v2"].gram_BNN, signals["v1"].gram_BNN)
    with torch.no_grad():
        inputs = dict(input_ids=torch.as_tensor(batch["input_ids"][:, :used]).long(), attention_mask=torch.as_tensor(batch["attention_mask"][:, :used]).long(),
                      pixel_values=torch.as_tensor(batch["pixel_values"]))
        logits = student(**inputs).logits.float()
    weights = LossWeights(task=1.0, output=1.0, visual_kl=1.0, visual_relation=1.0)
    reports = {name: distillation_loss(weights, StudentOutputs(logits), signal, target_ids_BL=torch.as_tensor(batch["target_ids"][:, :used]).long(),
                                       response_mask_BL=masks["response_mask"], visual_mask_BL=masks["visual_mask"])[1]
               for name, signal in signals.items()}
    for term in ("task", "output", "visual_kl", "visual_relation", "total"):
        torch.testing.assert_close(reports["v2"][term], reports["v1"][term], rtol=1e-5, atol=1e-6)
    assert signals["v2 adaptive + draws"].response_topk.draw_ids_RM is not None
    assert torch.isfinite(reports["v2 adaptive + draws"]["total"])
