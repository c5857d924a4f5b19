"""Token-level terms (task, output / visual_kl KL) against plain float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from ckd_ray.losses import IGNORE_INDEX, cut_vocab, kl_loss_dense, kl_loss_topk, task_loss

TEMPERATURES = (0.5, 1.0, 2.0)
DIRECTIONS = ("forward", "reverse")
NUM_SAMPLES, SEQ_LEN, VOCAB = 3, 6, 40


def make_mask(generator: torch.Generator) -> torch.Tensor:
    mask_BL = torch.rand(NUM_SAMPLES, SEQ_LEN, generator=generator) < 0.6
    mask_BL[1] = False  # a sample with no masked position
    mask_BL[0, 0] = True
    return mask_BL


def make_logits(generator: torch.Generator, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator, dtype=torch.float64) * scale


def topk_signal(teacher_BLV: torch.Tensor, k: int):
    """What a teacher ships: raw top-k logits, their ids, and the tail's log-mass at T = 1."""
    values_BLK, ids_BLK = teacher_BLV.topk(k, dim=-1)
    tail_logmass_BL = teacher_BLV.scatter(-1, ids_BLK, -math.inf).logsumexp(dim=-1)
    return values_BLK, ids_BLK, tail_logmass_BL


# ---- float64 references: one row at a time, written for clarity, not speed ----


def reference_kl(log_a, log_b):
    """KL(a || b) over the entries where a > 0."""
    support = log_a > -math.inf
    return (log_a[support].exp() * (log_a[support] - log_b[support])).sum()


def reference_dense(student_BLV, teacher_BLV, mask_BL, temperature, direction):
    rows = []
    for b, t in mask_BL.nonzero().tolist():
        log_q = torch.log_softmax(student_BLV[b, t].double() / temperature, dim=0)
        log_p = torch.log_softmax(teacher_BLV[b, t].double() / temperature, dim=0)
        rows.append(reference_kl(log_q, log_p) if direction == "reverse" else reference_kl(log_p, log_q))
    if not rows:
        return student_BLV.sum() * 0
    return torch.stack(rows).mean() * temperature**2


def reference_topk(student_BLV, values_BLK, ids_BLK, tail_BL, mask_BL, temperature, direction):
    rows = []
    for b, t in mask_BL.nonzero().tolist():
        ids = ids_BLK[b, t].tolist()
        log_q = torch.log_softmax(student_BLV[b, t].double() / temperature, dim=0)
        tail_ids = [v for v in range(VOCAB) if v not in ids]
        reachable = [v for v in tail_ids if log_q[v] > -math.inf]  # logsumexp of only -inf has a NaN gradient
        log_q_tail = log_q[reachable].logsumexp(0) if reachable else torch.tensor(-math.inf, dtype=torch.float64)
        log_q_buckets = torch.cat([log_q[ids], log_q_tail[None]])
        num_tail = len(tail_ids)
        if num_tail:
            tail_logit = math.log(num_tail) + (tail_BL[b, t].double() - math.log(num_tail)) / temperature
        else:
            tail_logit = torch.tensor(-math.inf, dtype=torch.float64)
        log_p_buckets = torch.log_softmax(torch.cat([values_BLK[b, t].double() / temperature, tail_logit[None]]), dim=0)
        if direction == "reverse":
            rows.append(reference_kl(log_q_buckets, log_p_buckets))
        else:
            rows.append(reference_kl(log_p_buckets, log_q_buckets))
    return torch.stack(rows).mean() * temperature**2


def value_and_grad(loss_fn, logits):
    logits = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(logits)
    loss.backward()
    return loss.detach(), logits.grad


def assert_relative(actual, expected, tol=1e-5):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert error < tol, f"relative error {error:.2e} >= {tol:.0e}"


# ---- task ----


def test_task_matches_cross_entropy_reference():
    generator = torch.Generator().manual_seed(0)
    logits = make_logits(generator).float()
    targets_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    mask_BL = make_mask(generator)
    targets_BL[0, 0] = IGNORE_INDEX  # a response position without target is skipped
    counted = mask_BL & (targets_BL != IGNORE_INDEX)
    loss, grad = value_and_grad(lambda z: task_loss(z, targets_BL, mask_BL, chunk_size=2), logits)
    expected, expected_grad = value_and_grad(
        lambda z: F.cross_entropy(z.double()[counted], targets_BL[counted]), logits.double()
    )
    assert_relative(loss, expected)
    assert_relative(grad, expected_grad)


# ---- dense KL ----


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_dense_kl_matches_reference_with_inf_logits(temperature, direction):
    generator = torch.Generator().manual_seed(1)
    student, teacher = make_logits(generator), make_logits(generator)
    # -inf entries: in the teacher only (forward: those terms are 0), or in both (reverse needs
    # the student's support inside the teacher's, else the KL is infinite).
    blocked = torch.rand(student.shape, generator=generator) < 0.2
    teacher = teacher.masked_fill(blocked, -math.inf)
    if direction == "reverse":
        student = student.masked_fill(blocked, -math.inf)
    mask_BL = make_mask(generator)
    loss, grad = value_and_grad(
        lambda z: kl_loss_dense(
            z, teacher.float(), mask_BL, temperature=temperature, direction=direction, chunk_size=3
        ),
        student.float(),
    )
    expected, expected_grad = value_and_grad(
        lambda z: reference_dense(z, teacher, mask_BL, temperature, direction), student
    )
    assert_relative(loss, expected)
    assert_relative(grad, expected_grad)
    assert torch.isfinite(grad).all()


def test_forward_kl_is_infinite_when_student_excludes_teacher_mass():
    student = torch.zeros(1, 1, 4)
    student[0, 0, 2] = -math.inf
    loss = kl_loss_dense(student, torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == math.inf


def test_vocab_mismatch_needs_cut():
    generator = torch.Generator().manual_seed(2)
    student = make_logits(generator).float()
    teacher = torch.cat([make_logits(generator).float(), torch.randn(NUM_SAMPLES, SEQ_LEN, 8, generator=generator)], -1)
    mask_BL = make_mask(generator)
    with pytest.raises(ValueError, match="cut_vocab"):
        kl_loss_dense(student, teacher, mask_BL)
    loss = kl_loss_dense(student, cut_vocab(teacher, VOCAB), mask_BL)
    assert_relative(loss, reference_dense(student, teacher[..., :VOCAB], mask_BL, 1.0, "forward"))
    with pytest.raises(ValueError, match="vocab_size"):
        cut_vocab(student, VOCAB + 1)


# ---- top-k KL ----


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("k", [1, 7])
def test_topk_kl_matches_reference(temperature, direction, k):
    generator = torch.Generator().manual_seed(3)
    student, teacher = make_logits(generator), make_logits(generator)
    in_top = torch.zeros(student.shape, dtype=torch.bool).scatter_(-1, teacher.topk(k, dim=-1).indices, True)
    # -inf entries outside the teacher's top-k, on both sides; in row [0, 0] the whole tail is
    # -inf on both sides (an empty bucket: 0 * log 0 must stay 0, in value and gradient).
    student = student.masked_fill(~in_top & (torch.rand(student.shape, generator=generator) < 0.2), -math.inf)
    teacher = teacher.masked_fill(~in_top & (torch.rand(teacher.shape, generator=generator) < 0.2), -math.inf)
    student[0, 0][~in_top[0, 0]] = -math.inf
    teacher[0, 0][~in_top[0, 0]] = -math.inf
    values, ids, tail = topk_signal(teacher, k)
    assert torch.isneginf(tail[0, 0])
    mask_BL = make_mask(generator)
    loss, grad = value_and_grad(
        lambda z: kl_loss_topk(
            z, values.bfloat16(), ids.int(), tail.float(), mask_BL,
            temperature=temperature, direction=direction, chunk_size=2,
        ),
        student.float(),
    )
    expected, expected_grad = value_and_grad(
        lambda z: reference_topk(z, values.bfloat16().double(), ids, tail, mask_BL, temperature, direction), student
    )
    assert_relative(loss, expected)
    assert_relative(grad, expected_grad)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_topk_covering_vocab_equals_dense(temperature, direction):
    generator = torch.Generator().manual_seed(4)
    student, teacher = make_logits(generator).float(), make_logits(generator).float()
    if direction == "forward":
        teacher[0, 0, :5] = -math.inf  # zero teacher probabilities inside the top-k
    values, ids, tail = topk_signal(teacher, VOCAB)
    assert torch.isneginf(tail).all()
    mask_BL = make_mask(generator)
    options = dict(temperature=temperature, direction=direction, chunk_size=4)
    loss, grad = value_and_grad(lambda z: kl_loss_topk(z, values, ids, tail, mask_BL, **options), student)
    dense, dense_grad = value_and_grad(lambda z: kl_loss_dense(z, teacher, mask_BL, **options), student)
    assert_relative(loss, dense)
    assert_relative(grad, dense_grad)


def test_topk_buckets_are_exact_at_temperature_one():
    """At T = 1 the shipped tail log-mass gives exactly the teacher's tail probability."""
    generator = torch.Generator().manual_seed(5)
    student, teacher = make_logits(generator), make_logits(generator)
    values, ids, tail = topk_signal(teacher, 5)
    mask_BL = torch.ones(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    rows = []
    for b in range(NUM_SAMPLES):
        for t in range(SEQ_LEN):
            p = torch.softmax(teacher[b, t], 0)
            q = torch.softmax(student[b, t], 0)
            in_top = torch.zeros(VOCAB, dtype=torch.bool)
            in_top[ids[b, t]] = True
            p_buckets = torch.cat([p[ids[b, t]], p[~in_top].sum()[None]])
            q_buckets = torch.cat([q[ids[b, t]], q[~in_top].sum()[None]])
            rows.append((p_buckets * (p_buckets / q_buckets).log()).sum())
    loss = kl_loss_topk(student.float(), values.float(), ids, tail.float(), mask_BL)
    assert_relative(loss, torch.stack(rows).mean())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_tail_temperature_error_matches_documented_formula(temperature):
    """Approximate minus exact softened tail log-mass == (1 - 1/T) (H_{1/T}(r) - log n)."""
    generator = torch.Generator().manual_seed(6)
    tail_logits = torch.randn(33, generator=generator, dtype=torch.float64) * 2
    num_tail, tail_logmass = tail_logits.numel(), tail_logits.logsumexp(0)
    approximate = math.log(num_tail) + (tail_logmass - math.log(num_tail)) / temperature
    exact = (tail_logits / temperature).logsumexp(0)
    order = 1 / temperature
    r = torch.softmax(tail_logits, 0)
    renyi_entropy = (r**order).sum().log() / (1 - order)
    documented_error = (1 - 1 / temperature) * (renyi_entropy - math.log(num_tail))
    # the docstring gives exact-minus-approximate; check that sign convention and the bound
    assert (exact - approximate).item() == pytest.approx(documented_error.item(), rel=1e-9)
    assert abs(documented_error.item()) <= abs(1 - 1 / temperature) * math.log(num_tail)
    assert (approximate < exact) if temperature < 1 else (approximate > exact)


def test_topk_error_shrinks_as_k_grows():
    generator = torch.Generator().manual_seed(7)
    student, teacher = make_logits(generator).float(), make_logits(generator, scale=4.0).float()
    mask_BL = make_mask(generator)
    errors = {}
    for temperature in TEMPERATURES:
        dense = kl_loss_dense(student, teacher, mask_BL, temperature=temperature).item()
        for k in (1, 2, 4, 8, 16, 32, VOCAB):
            topk = kl_loss_topk(student, *topk_signal(teacher, k), mask_BL, temperature=temperature).item()
            errors[temperature, k] = dense - topk
    print("\ndense KL - top-k KL (forward):")
    for (temperature, k), error in errors.items():
        print(f"  T={temperature} k={k:2d}: {error:+.6f}")
    ks = (1, 2, 4, 8, 16, 32, VOCAB)
    at_t1 = [errors[1.0, k] for k in ks]
    # T = 1: a lower bound (data processing inequality) that tightens monotonically with k
    assert all(error >= -1e-5 for error in at_t1)
    assert all(later <= earlier + 1e-5 for earlier, later in zip(at_t1, at_t1[1:]))
    for temperature in TEMPERATURES:
        assert abs(errors[temperature, VOCAB]) < 1e-5
        assert abs(errors[temperature, 32]) < abs(errors[temperature, 1])


def test_topk_rejects_ids_outside_the_student_vocabulary():
    generator = torch.Generator().manual_seed(8)
    student = make_logits(generator).float()
    values, ids, tail = topk_signal(make_logits(generator), 3)
    ids[0, 0, 0] = VOCAB + 5
    with pytest.raises(ValueError, match="top-k ids"):
        kl_loss_topk(student, values, ids, tail, torch.ones(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool))


# ---- chunking ----


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_equals_unchunked(direction):
    generator = torch.Generator().manual_seed(9)
    student, teacher = make_logits(generator).float(), make_logits(generator).float()
    values, ids, tail = topk_signal(teacher, 6)
    targets_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    mask_BL = make_mask(generator)
    num_positions = int(mask_BL.sum())
    losses = {
        "dense": lambda z, c: kl_loss_dense(z, teacher, mask_BL, temperature=0.5, direction=direction, chunk_size=c),
        "topk": lambda z, c: kl_loss_topk(
            z, values, ids, tail, mask_BL, temperature=2.0, direction=direction, chunk_size=c
        ),
        "task": lambda z, c: task_loss(z, targets_BL, mask_BL, chunk_size=c),
    }
    for name, loss_fn in losses.items():
        whole, whole_grad = value_and_grad(lambda z: loss_fn(z, num_positions), student)
        for chunk_size in (1, 2, 5, num_positions + 100):
            loss, grad = value_and_grad(lambda z: loss_fn(z, chunk_size), student)
            torch.testing.assert_close(loss, whole, rtol=1e-6, atol=0, msg=f"{name} chunk {chunk_size}")
            torch.testing.assert_close(grad, whole_grad, rtol=1e-6, atol=1e-9, msg=f"{name} chunk {chunk_size}")


def test_cut_vocab_view_keeps_gradient_shape():
    generator = torch.Generator().manual_seed(10)
    padded = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB + 6, generator=generator, requires_grad=True)
    teacher = make_logits(generator).float()
    kl_loss_dense(cut_vocab(padded, VOCAB), teacher, make_mask(generator), chunk_size=2).backward()
    assert padded.grad.shape == padded.shape
    assert (padded.grad[..., VOCAB:] == 0).all()


# ---- low precision, masking, NaN ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_low_precision_gradients_are_finite_at_low_temperature(dtype, direction):
    generator = torch.Generator().manual_seed(11)
    student = (torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 60).to(dtype)
    teacher = (torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 60).to(dtype)
    values, ids, tail = topk_signal(teacher.float(), 8)
    targets_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    mask_BL = make_mask(generator)
    options = dict(temperature=0.5, direction=direction, chunk_size=2)
    losses = {
        "dense": lambda z: kl_loss_dense(z, teacher, mask_BL, **options),
        "topk": lambda z: kl_loss_topk(z, values.to(dtype), ids, tail, mask_BL, **options),
        "task": lambda z: task_loss(z, targets_BL, mask_BL),
    }
    for name, loss_fn in losses.items():
        loss, grad = value_and_grad(loss_fn, student)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
        # computed in float32: the same as feeding the (already rounded) values in float32
        reference, _ = value_and_grad(loss_fn, student.float())
        assert_relative(loss, reference)


def test_all_masked_batch_gives_zero_with_zero_grad():
    generator = torch.Generator().manual_seed(12)
    student = make_logits(generator).float()
    student[0, 0, 0] = -math.inf  # 0 * inf must not leak into the empty reduction
    teacher = make_logits(generator).float()
    values, ids, tail = topk_signal(teacher, 4)
    no_positions = torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    targets_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    for loss_fn in (
        lambda z: kl_loss_dense(z, teacher, no_positions, direction="reverse"),
        lambda z: kl_loss_topk(z, values, ids, tail, no_positions),
        lambda z: task_loss(z, targets_BL, no_positions),
        lambda z: task_loss(z, torch.full_like(targets_BL, IGNORE_INDEX), ~no_positions),
    ):
        loss, grad = value_and_grad(loss_fn, student)
        assert loss.item() == 0.0
        assert (grad == 0).all()


def test_nan_in_the_teacher_is_not_masked_away():
    """A NaN teacher probability must not pass as "probability 0" (NaN > 0 is False)."""
    generator = torch.Generator().manual_seed(13)
    student, teacher = make_logits(generator).float(), make_logits(generator).float()
    values, ids, tail = topk_signal(teacher, 4)
    mask_BL = torch.ones(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    for direction in DIRECTIONS:
        nan_teacher = teacher.clone()
        nan_teacher[2, 3, 5] = math.nan
        assert kl_loss_dense(student, nan_teacher, mask_BL, direction=direction).isnan()
        nan_values, nan_tail = values.clone(), tail.clone()
        nan_values[0, 1, 2] = math.nan
        nan_tail[1, 0] = math.nan
        assert kl_loss_topk(student, nan_values, ids, tail, mask_BL, direction=direction).isnan()
        assert kl_loss_topk(student, values, ids, nan_tail, mask_BL, direction=direction).isnan()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_custom_backward_passes_gradcheck(direction):
    generator = torch.Generator().manual_seed(14)
    student, teacher = make_logits(generator)[:, :3, :9], make_logits(generator)[:, :3, :9]
    mask_BL = torch.ones(NUM_SAMPLES, 3, dtype=torch.bool)
    mask_BL[1, 1] = False
    values, ids, tail = topk_signal(teacher, 3)
    options = dict(temperature=0.5, direction=direction, chunk_size=2)
    for loss_fn in (
        lambda z: kl_loss_dense(z, teacher, mask_BL, **options),
        lambda z: kl_loss_topk(z, values, ids, tail, mask_BL, **options),
    ):
        assert torch.autograd.gradcheck(loss_fn, (student.clone().requires_grad_(True),))


def test_options_are_validated():
    logits = torch.zeros(1, 1, 3)
    mask_BL = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="direction"):
        kl_loss_dense(logits, logits, mask_BL, direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        kl_loss_dense(logits, logits, mask_BL, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kl_loss_dense(logits, logits, mask_BL, chunk_size=0)
