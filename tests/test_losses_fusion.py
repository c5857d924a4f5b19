"""Several teachers fused per token (`ckd_ray.losses.fusion`) against a plain float64 reference."""

import math

import pytest
import torch

from ckd_ray.losses import SparseLogits, TopKLogits, kl_loss_topk
from ckd_ray.losses.fusion import CE_CAP, FUSION_RULES, fused_kl_loss

NUM_SAMPLES, SEQ_LEN, VOCAB = 2, 5, 13


def make_mask(generator):
    mask_BL = torch.rand(NUM_SAMPLES, SEQ_LEN, generator=generator) < 0.7
    mask_BL[0, 0] = True
    return mask_BL


def topk_of(teacher_BLV, k):
    values_BLK, ids_BLK = teacher_BLV.topk(k, dim=-1)
    return TopKLogits(values_BLK, ids_BLK, teacher_BLV.scatter(-1, ids_BLK, -math.inf).logsumexp(dim=-1))


def sparse_of(teacher_BLV, mask_BL, max_k, generator):
    """Ragged rows at the masked positions: a random k per row, values shifted by a random constant."""
    positions = mask_BL.reshape(-1).nonzero().squeeze(1)
    flat_NV = teacher_BLV.reshape(-1, VOCAB)
    ks = torch.randint(1, max_k + 1, (positions.numel(),), generator=generator)
    ids = torch.full((positions.numel(), max_k), -1, dtype=torch.long)
    values = torch.full((positions.numel(), max_k), -math.inf, dtype=torch.float64)
    tails = torch.empty(positions.numel(), dtype=torch.float64)
    for r, (position, k) in enumerate(zip(positions.tolist(), ks.tolist())):
        row_values, row_ids = flat_NV[position].topk(k)
        shift = float(torch.randn((), generator=generator, dtype=torch.float64)) * 5
        ids[r, :k], values[r, :k] = row_ids, row_values - shift
        tails[r] = flat_NV[position].scatter(0, row_ids, -math.inf).logsumexp(0) - shift
    return SparseLogits(positions, ids, values, tails)


# ---- float64 reference: one position at a time, dense over the vocabulary ----


def dense_row(signal, b, t):
    """The teacher's logits over the vocabulary as the loss models them: its top ids exact, its
    tail tokens sharing one logit tail_logmass - log n."""
    if isinstance(signal, SparseLogits):
        r = signal.positions_R.tolist().index(b * SEQ_LEN + t)
        keep = signal.ids_RK[r] >= 0
        ids, values, tail = signal.ids_RK[r][keep], signal.values_RK[r][keep], signal.tail_logmass_R[r]
    else:
        ids, values, tail = signal.ids_BLK[b, t], signal.values_BLK[b, t], signal.tail_logmass_BL[b, t]
    num_tail = VOCAB - ids.numel()
    row = torch.full((VOCAB,), float(tail) - math.log(max(num_tail, 1)), dtype=torch.float64)
    row[ids] = values.double()
    return row, set(ids.tolist())


def reference_weights(rows, label, rule, fixed, tau):
    log_ps = [torch.log_softmax(row, 0) for row in rows]
    entropy = torch.stack([-(lp.exp() * lp).sum() for lp in log_ps])
    if rule == "fixed":
        return torch.tensor(fixed, dtype=torch.float64) / sum(fixed)
    if rule == "entropy" or label < 0:
        return torch.softmax(-entropy / tau, 0)
    ce = torch.stack([-lp[label] for lp in log_ps]).clamp_max(CE_CAP)
    if rule == "min_ce":
        best = (ce == ce.min()).double()
        return best / best.sum()
    return (1 - torch.softmax(ce / tau, 0)) / (len(rows) - 1)


def reference_fused(student_BLV, signals, mask_BL, labels_BL, rule, fixed, tau, temperature, direction):
    losses, weights = [], []
    for b, t in mask_BL.nonzero().tolist():
        dense = [dense_row(signal, b, t) for signal in signals]
        w = reference_weights([row for row, _ in dense], int(labels_BL[b, t]), rule, fixed, tau)
        p_f = sum(w_k * torch.softmax(row / temperature, 0) for w_k, (row, _) in zip(w, dense))
        union = sorted(set().union(*[ids for _, ids in dense]))
        rest = [v for v in range(VOCAB) if v not in union]
        log_q = torch.log_softmax(student_BLV[b, t] / temperature, 0)
        log_q_b = torch.cat([log_q[union], log_q[rest].logsumexp(0, keepdim=True) if rest else log_q.new_zeros(0)])
        p_b = torch.cat([p_f[union], p_f[rest].sum(0, keepdim=True) if rest else p_f.new_zeros(0)])
        log_p_b = p_b.log()
        a, c = (log_q_b, log_p_b) if direction == "reverse" else (log_p_b, log_q_b)
        keep = a > -math.inf
        losses.append((a[keep].exp() * (a[keep] - c[keep])).sum())
        weights.append(w)
    return torch.stack(losses).mean() * temperature**2, torch.stack(weights).mean(0)


@pytest.mark.parametrize("rule", FUSION_RULES)
@pytest.mark.parametrize("temperature, direction", [(1.0, "forward"), (2.0, "forward"), (0.5, "reverse")])
@pytest.mark.parametrize("layout", ["topk", "sparse"])
def test_fused_kl_matches_float64_reference(rule, temperature, direction, layout):
    generator = torch.Generator().manual_seed(7)
    mask_BL = make_mask(generator)
    teachers_BLV = [torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator, dtype=torch.float64) * 3 for _ in range(3)]
    if layout == "topk":
        signals = [topk_of(teachers_BLV[0], 3), topk_of(teachers_BLV[1], 5), topk_of(teachers_BLV[2], 2)]
    else:  # ragged rows, and one teacher whose rows cover the vocabulary (an empty tail)
        signals = [sparse_of(teachers_BLV[0], mask_BL, 4, generator), sparse_of(teachers_BLV[1], mask_BL, 6, generator),
                   topk_of(teachers_BLV[2], VOCAB)]
    labels_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    labels_BL[0, 0] = -100  # a token without a label: the label rules use entropy weights there
    student = (torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    options = dict(rule=rule, fixed_weights=[1.0, 2.0, 0.5], rule_temperature=0.7)
    loss, mean_weight = fused_kl_loss(student, signals, mask_BL, labels_BL=labels_BL, temperature=temperature,
                                      direction=direction, chunk_size=3, **options)
    (grad,) = torch.autograd.grad(loss, student)
    expected, expected_weight = reference_fused(student, signals, mask_BL, labels_BL, rule, [1.0, 2.0, 0.5], 0.7,
                                                temperature, direction)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mean_weight, expected_weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_weight.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("rule", FUSION_RULES)
@pytest.mark.parametrize("temperature, direction", [(1.0, "forward"), (2.0, "forward"), (1.0, "reverse")])
def test_two_identical_teachers_give_the_single_teacher_loss_and_gradient(rule, temperature, direction):
    generator = torch.Generator().manual_seed(3)
    mask_BL = make_mask(generator)
    signal = topk_of(torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 3, 4)
    labels_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    student = (torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 2).requires_grad_()
    single = kl_loss_topk(student, signal.values_BLK, signal.ids_BLK, signal.tail_logmass_BL, mask_BL,
                          temperature=temperature, direction=direction)
    (single_grad,) = torch.autograd.grad(single, student)
    fused, mean_weight = fused_kl_loss(student, [signal, signal], mask_BL, rule=rule, labels_BL=labels_BL,
                                       fixed_weights=[3.0, 1.0], temperature=temperature, direction=direction)
    (fused_grad,) = torch.autograd.grad(fused, student)
    torch.testing.assert_close(fused, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, single_grad, rtol=1e-5, atol=1e-7)
    expected_weight = [0.75, 0.25] if rule == "fixed" else [0.5, 0.5]
    torch.testing.assert_close(mean_weight, torch.tensor(expected_weight))


@pytest.mark.parametrize("rule", ["min_ce", "confidence"])
def test_a_noise_teacher_gets_weight_near_zero_and_the_fused_loss_approaches_the_good_one(rule):
    """The good teacher puts most of its mass on the label; the noise teacher's logits are random."""
    generator = torch.Generator().manual_seed(11)
    vocab = 200
    mask_BL = torch.ones(4, 16, dtype=torch.bool)
    labels_BL = torch.randint(0, vocab, (4, 16), generator=generator)
    good_BLV = torch.randn(4, 16, vocab, generator=generator) + 12 * torch.nn.functional.one_hot(labels_BL, vocab)
    noise_BLV = torch.randn(4, 16, vocab, generator=generator) * 3
    good, noise = topk_of(good_BLV, 8), topk_of(noise_BLV, 8)
    student = torch.randn(4, 16, vocab, generator=generator).requires_grad_()
    alone = kl_loss_topk(student, good.values_BLK, good.ids_BLK, good.tail_logmass_BL, mask_BL)
    with_noise = kl_loss_topk(student, noise.values_BLK, noise.ids_BLK, noise.tail_logmass_BL, mask_BL)
    fused, mean_weight = fused_kl_loss(student, [good, noise], mask_BL, rule=rule, labels_BL=labels_BL)
    assert float(mean_weight[1]) < 0.01  # confidence at tau = 1: 0.0055 here; min_ce: 0
    gap = abs((with_noise - alone).item())
    assert abs((fused - alone).item()) < 0.02 * gap
    (fused_grad,) = torch.autograd.grad(fused, student)
    (alone_grad,) = torch.autograd.grad(alone, student)
    (noise_grad,) = torch.autograd.grad(with_noise, student)
    assert float((fused_grad - alone_grad).norm()) < 0.02 * float((noise_grad - alone_grad).norm())
    # Static equal weights let the noise in: what per-token weighting avoids.
    mixed, _ = fused_kl_loss(student, [good, noise], mask_BL, rule="fixed", fixed_weights=[1, 1])
    assert abs((mixed - alone).item()) > 0.3 * gap


def test_no_masked_position_gives_zero_with_zero_gradient_and_zero_weights():
    generator = torch.Generator().manual_seed(0)
    signal = topk_of(torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator), 3)
    student = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator).requires_grad_()
    mask_BL = torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    empty = SparseLogits(torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0))
    loss, mean_weight = fused_kl_loss(student, [signal, empty], mask_BL, rule="confidence",
                                      labels_BL=torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and bool((student.grad == 0).all())
    assert mean_weight.tolist() == [0.0, 0.0]


def test_rules_and_weights_are_validated():
    signal = topk_of(torch.randn(1, 2, VOCAB), 3)
    student = torch.randn(1, 2, VOCAB)
    mask_BL = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="fusion rule must be one of"):
        fused_kl_loss(student, [signal, signal], mask_BL, rule="average")
    with pytest.raises(ValueError, match="one weight per teacher"):
        fused_kl_loss(student, [signal, signal], mask_BL, rule="fixed", fixed_weights=[1.0])
    with pytest.raises(ValueError, match="not all 0"):
        fused_kl_loss(student, [signal, signal], mask_BL, rule="fixed", fixed_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="fusion temperature"):
        fused_kl_loss(student, [signal, signal], mask_BL, rule="entropy", rule_temperature=0.0)
