"""Sequence-level terms (visual relation, feature, knowledge, attention) and the composite loss."""

import math

import pytest
import torch

from ckd_ray.losses import (
    TERM_NAMES,
    FeatureProjection,
    NonFiniteLossError,
    StudentOutputs,
    TeacherSignalBatch,
    TopKLogits,
    attention_loss,
    distillation_loss,
    fact_log_probs,
    feature_loss,
    gather_visual_keys,
    kl_loss_topk,
    knowledge_loss,
    soften_fact_log_probs,
    task_loss,
    visual_relation_loss,
)

NUM_SAMPLES, SEQ_LEN, VOCAB = 3, 10, 24
D_STUDENT, D_TEACHER = 6, 9
NUM_HEADS, NUM_FACTS, FACT_LEN = 4, 5, 3
LAYER_MAP = {1: 2, 3: 5}


def value_and_grads(loss_fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.detach(), [x.grad for x in inputs]


def assert_relative(actual, expected, tol=1e-5):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert error < tol, f"relative error {error:.2e} >= {tol:.0e}"


def make_visual_mask():
    """Visual counts 4, 0 and 6: variable per sample, one sample without image."""
    visual_mask_BL = torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    visual_mask_BL[0, 1:5] = True
    visual_mask_BL[2, 0:6] = True
    return visual_mask_BL


def teacher_gram(teacher_logits_BLV, visual_mask_BL):
    counts = visual_mask_BL.sum(1)
    gram_BNN = torch.zeros(NUM_SAMPLES, int(counts.max()), int(counts.max()))
    for b in range(NUM_SAMPLES):
        z = teacher_logits_BLV[b][visual_mask_BL[b]]
        gram_BNN[b, : len(z), : len(z)] = z @ z.T
    return gram_BNN.bfloat16(), counts


# ---- visual relation ----


def reference_relation(logits_BLV, visual_mask_BL, gram_BNN):
    losses = []
    for b in range(NUM_SAMPLES):
        positions = visual_mask_BL[b].nonzero().squeeze(1).tolist()
        if not positions:
            continue
        n = len(positions)
        z = logits_BLV[b, positions].double()
        dot = norm_s = norm_t = 0.0
        for i in range(n):
            for j in range(n):
                g_s = (z[i] * z[j]).sum()
                g_t = gram_BNN[b, i, j].double()
                dot, norm_s, norm_t = dot + g_s * g_t, norm_s + g_s**2, norm_t + g_t**2
        losses.append(1 - dot / (norm_s.sqrt() * norm_t.sqrt()))
    return torch.stack(losses).mean()


def test_visual_relation_matches_reference():
    generator = torch.Generator().manual_seed(20)
    student = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator)
    teacher = student + torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator)
    visual_mask_BL = make_visual_mask()
    gram_BNN, counts_B = teacher_gram(teacher, visual_mask_BL)
    loss, (grad,) = value_and_grads(lambda z: visual_relation_loss(z, visual_mask_BL, gram_BNN, counts_B), student)
    expected, (expected_grad,) = value_and_grads(
        lambda z: reference_relation(z, visual_mask_BL, gram_BNN), student.double()
    )
    assert_relative(loss, expected)
    assert_relative(grad, expected_grad)
    # identical Gram matrices give 0, in bf16 input too
    own_gram_BNN, _ = teacher_gram(student, visual_mask_BL)
    same = visual_relation_loss(student.bfloat16().float(), visual_mask_BL, own_gram_BNN.float(), counts_B)
    assert same.item() == pytest.approx(0.0, abs=1e-2)


def test_visual_relation_edge_cases():
    student = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB)
    visual_mask_BL = make_visual_mask()
    gram_BNN, counts_B = teacher_gram(student, visual_mask_BL)
    with pytest.raises(ValueError, match="visual token counts differ"):
        visual_relation_loss(student, visual_mask_BL, gram_BNN, counts_B + 1)
    no_visual = torch.zeros_like(visual_mask_BL)
    loss, (grad,) = value_and_grads(
        lambda z: visual_relation_loss(z, no_visual, gram_BNN, torch.zeros(NUM_SAMPLES, dtype=torch.long)), student
    )
    assert loss.item() == 0.0 and (grad == 0).all()
    zero_student = torch.zeros_like(student)  # a zero Gram matrix: cosine 0, finite gradient
    loss, (grad,) = value_and_grads(lambda z: visual_relation_loss(z, visual_mask_BL, gram_BNN, counts_B), zero_student)
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(grad).all()


# ---- feature ----


def make_hidden_states(generator):
    student = [torch.randn(NUM_SAMPLES, SEQ_LEN, D_STUDENT, generator=generator) for _ in range(4)]
    teacher = {layer: torch.randn(NUM_SAMPLES, SEQ_LEN, D_TEACHER, generator=generator) for layer in (2, 5)}
    return student, teacher


def test_feature_matches_reference():
    generator = torch.Generator().manual_seed(21)
    torch.manual_seed(21)
    student, teacher = make_hidden_states(generator)
    projection = FeatureProjection(LAYER_MAP, D_STUDENT, D_TEACHER)
    mask_BL = torch.rand(NUM_SAMPLES, SEQ_LEN, generator=generator) < 0.5
    mask_BL[1] = False
    loss = feature_loss(student, teacher, projection, mask_BL)
    loss.backward()
    per_layer = []
    for s_layer, t_layer in LAYER_MAP.items():
        w = projection.projections[str(s_layer)].weight.detach().double()
        errors = [
            ((student[s_layer][b, t].double() - w @ teacher[t_layer][b, t].double()) ** 2).sum() / D_STUDENT
            for b, t in mask_BL.nonzero().tolist()
        ]
        per_layer.append(sum(errors) / len(errors))
    assert_relative(loss.detach(), sum(per_layer) / len(per_layer))
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in projection.parameters())


def test_feature_projection_contract():
    projection = FeatureProjection({3: 5, 1: 2}, D_STUDENT, D_TEACHER)
    assert list(projection.layer_map) == [1, 3]
    assert sorted(projection.state_dict()) == ["projections.1.weight", "projections.3.weight"]
    assert projection(3, torch.zeros(2, D_TEACHER)).shape == (2, D_STUDENT)
    with pytest.raises(ValueError, match="teacher layers"):
        student_hidden = [torch.zeros(1, 1, D_STUDENT)] * 4
        feature_loss(student_hidden, {2: torch.zeros(1, 1, D_TEACHER)}, projection, torch.ones(1, 1, dtype=torch.bool))


def test_feature_all_masked_gives_zero_with_zero_grads():
    generator = torch.Generator().manual_seed(22)
    student, teacher = make_hidden_states(generator)
    student = [h.requires_grad_(True) for h in student]
    projection = FeatureProjection(LAYER_MAP, D_STUDENT, D_TEACHER)
    loss = feature_loss(student, teacher, projection, torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert all((p.grad == 0).all() for p in projection.parameters())
    assert (student[1].grad == 0).all()


# ---- knowledge ----


def make_facts(generator):
    fact_token_ids_BFT = torch.randint(0, VOCAB, (NUM_SAMPLES, NUM_FACTS, FACT_LEN), generator=generator)
    fact_token_ids_BFT[:, :, 1:] = fact_token_ids_BFT[:, :, 1:].masked_fill(
        torch.rand(NUM_SAMPLES, NUM_FACTS, FACT_LEN - 1, generator=generator) < 0.4, -1
    )
    fact_mask_BF = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    answer_pos_B = torch.tensor([4, -1, 7])  # -1: the sample without facts is never read
    return fact_token_ids_BFT, fact_mask_BF, answer_pos_B


def reference_fact_probs(logits_BLV, answer_pos_B, fact_token_ids_BFT, fact_mask_BF, temperature, b):
    log_probs = torch.log_softmax(logits_BLV[b, answer_pos_B[b]].double(), 0)
    scores = []
    for f in fact_mask_BF[b].nonzero().squeeze(1).tolist():
        ids = [i for i in fact_token_ids_BFT[b, f].tolist() if i >= 0]
        scores.append(sum(log_probs[i] for i in ids) / len(ids))
    return torch.softmax(torch.stack(scores) / temperature, 0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_knowledge_matches_reference(temperature):
    generator = torch.Generator().manual_seed(23)
    student = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 3
    teacher = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 3
    fact_token_ids_BFT, fact_mask_BF, answer_pos_B = make_facts(generator)
    # the teacher ships T = 1 log-probs; they are softened to T on this side
    shipped_BF = fact_log_probs(teacher.bfloat16(), answer_pos_B, fact_token_ids_BFT, fact_mask_BF, 1.0)
    teacher_BF = soften_fact_log_probs(shipped_BF, fact_mask_BF, temperature)

    def loss_fn(z):
        student_BF = fact_log_probs(z, answer_pos_B, fact_token_ids_BFT, fact_mask_BF, temperature)
        return knowledge_loss(student_BF, teacher_BF, fact_mask_BF)

    def reference_fn(z):
        losses = []
        for b in (0, 2):
            facts = (answer_pos_B, fact_token_ids_BFT, fact_mask_BF, temperature, b)
            p_t = reference_fact_probs(teacher.bfloat16().double(), *facts)
            p_s = reference_fact_probs(z, *facts)
            losses.append(-(p_t * p_s.log()).sum())
        return sum(losses) / len(losses)

    loss, (grad,) = value_and_grads(loss_fn, student)
    expected, (expected_grad,) = value_and_grads(reference_fn, student.double())
    assert_relative(loss, expected)
    assert_relative(grad, expected_grad)
    assert torch.isneginf(teacher_BF[~fact_mask_BF]).all()


def test_knowledge_edge_cases():
    generator = torch.Generator().manual_seed(24)
    student = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator)
    fact_token_ids_BFT, fact_mask_BF, answer_pos_B = make_facts(generator)
    no_facts = torch.zeros_like(fact_mask_BF)
    teacher_BF = torch.full(fact_mask_BF.shape, -math.inf)

    def loss_fn(z):
        return knowledge_loss(fact_log_probs(z, answer_pos_B, fact_token_ids_BFT, no_facts), teacher_BF, no_facts)

    loss, (grad,) = value_and_grads(loss_fn, student)
    assert loss.item() == 0.0 and (grad == 0).all()
    empty_fact = fact_token_ids_BFT.clone()
    empty_fact[0, 1] = -1
    with pytest.raises(ValueError, match="no token ids"):
        fact_log_probs(student, answer_pos_B, empty_fact, fact_mask_BF)
    with pytest.raises(ValueError, match="answer_pos_B"):
        fact_log_probs(student, torch.tensor([SEQ_LEN, 0, 0]), fact_token_ids_BFT, fact_mask_BF)


# ---- attention ----


def reference_attention(student_BHLN, teacher_BGLN, query_mask_BL, key_mask_BN):
    num_groups = teacher_BGLN.shape[1]
    heads_per_group = student_BHLN.shape[1] // num_groups
    per_group = []
    for g in range(num_groups):
        student_LN = student_BHLN[:, g * heads_per_group : (g + 1) * heads_per_group].double().mean(1)
        errors = [
            (student_LN[b, l, n] - teacher_BGLN[b, g, l, n].double()) ** 2
            for b in range(student_BHLN.shape[0])
            for l in range(student_BHLN.shape[2])
            for n in range(student_BHLN.shape[3])
            if query_mask_BL[b, l] and key_mask_BN[b, n]
        ]
        per_group.append(sum(errors) / len(errors))
    return sum(per_group) / num_groups


@pytest.mark.parametrize("num_groups", [NUM_HEADS, 2, 1])
def test_attention_matches_reference(num_groups):
    generator = torch.Generator().manual_seed(25)
    student_BHLL = torch.softmax(torch.randn(NUM_SAMPLES, NUM_HEADS, SEQ_LEN, SEQ_LEN, generator=generator), -1)
    visual_mask_BL = make_visual_mask()
    num_keys = int(visual_mask_BL.sum(1).max())
    teacher_BGLN = torch.rand(NUM_SAMPLES, num_groups, SEQ_LEN, num_keys, generator=generator).bfloat16()
    query_mask_BL = ~visual_mask_BL & (torch.rand(NUM_SAMPLES, SEQ_LEN, generator=generator) < 0.7)

    def loss_fn(attn_BHLL):
        student_BHLN, key_mask_BN = gather_visual_keys(attn_BHLL, visual_mask_BL, num_keys)
        return attention_loss(student_BHLN, teacher_BGLN, query_mask_BL, key_mask_BN)

    def reference_fn(attn_BHLL):
        student_BHLN = torch.zeros(NUM_SAMPLES, NUM_HEADS, SEQ_LEN, num_keys, dtype=attn_BHLL.dtype)
        key_mask_BN = torch.zeros(NUM_SAMPLES, num_keys, dtype=torch.bool)
        for b in range(NUM_SAMPLES):
            for n, position in enumerate(visual_mask_BL[b].nonzero().squeeze(1).tolist()):
                student_BHLN[b, :, :, n] = attn_BHLL[b, :, :, position]
                key_mask_BN[b, n] = True
        return reference_attention(student_BHLN, teacher_BGLN, query_mask_BL, key_mask_BN)

    loss, (grad,) = value_and_grads(loss_fn, student_BHLL)
    expected, (expected_grad,) = value_and_grads(reference_fn, student_BHLL.double())
    assert_relative(loss, expected)
    assert_relative(grad, expected_grad)


def test_attention_head_counts_and_empty_masks():
    student_BHLN = torch.rand(2, 6, 3, 4, requires_grad=True)
    all_queries, no_queries = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)
    all_keys = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="6 student heads with 4 teacher head groups"):
        attention_loss(student_BHLN, torch.rand(2, 4, 3, 4), all_queries, all_keys)
    loss = attention_loss(student_BHLN, torch.rand(2, 3, 3, 4), no_queries, all_keys)
    loss.backward()
    assert loss.item() == 0.0 and (student_BHLN.grad == 0).all()


# ---- composite ----


def make_batch(seed=26, student_dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher_logits = torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 2
    student_logits = (torch.randn(NUM_SAMPLES, SEQ_LEN, VOCAB, generator=generator) * 2).to(student_dtype)
    visual_mask_BL = make_visual_mask()
    response_mask_BL = torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    response_mask_BL[:, 7:9] = True
    target_ids_BL = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)
    values, ids = teacher_logits.topk(5, dim=-1)
    tail = teacher_logits.scatter(-1, ids, -math.inf).logsumexp(-1)
    gram_BNN, counts_B = teacher_gram(teacher_logits, visual_mask_BL)
    student_hidden, teacher_hidden = make_hidden_states(generator)
    student_attn = [
        torch.softmax(torch.randn(NUM_SAMPLES, NUM_HEADS, SEQ_LEN, SEQ_LEN, generator=generator), -1) for _ in range(4)
    ]
    fact_token_ids_BFT, fact_mask_BF, answer_pos_B = make_facts(generator)
    signal = TeacherSignalBatch(
        response_topk=TopKLogits(values.bfloat16(), ids.int(), tail),
        visual_topk=TopKLogits(values.bfloat16(), ids.int(), tail),
        gram_BNN=gram_BNN,
        visual_count_B=counts_B,
        hidden_states=teacher_hidden,
        attentions={2: torch.rand(NUM_SAMPLES, 2, SEQ_LEN, 6, generator=generator)},
        fact_log_probs_BF=fact_log_probs(teacher_logits, answer_pos_B, fact_token_ids_BFT, fact_mask_BF, 1.0),
        fact_mask_BF=fact_mask_BF,
        fact_token_ids_BFT=fact_token_ids_BFT,
        answer_pos_B=answer_pos_B,
    )
    student = StudentOutputs(student_logits.requires_grad_(True), student_hidden, student_attn)
    masks = dict(target_ids_BL=target_ids_BL, response_mask_BL=response_mask_BL, visual_mask_BL=visual_mask_BL)
    return student, signal, masks, FeatureProjection(LAYER_MAP, D_STUDENT, D_TEACHER)


WEIGHTS = dict(task=1.0, output=0.5, visual_kl=2.0, visual_relation=0.25, feature=3.0, knowledge=0.1, attention=10.0)


def test_composite_total_is_the_weighted_sum_of_the_terms():
    student, signal, masks, projection = make_batch()
    total, terms = distillation_loss(
        WEIGHTS, student, signal, **masks, temperature=2.0, chunk_size=2, projection=projection
    )
    assert set(terms) == set(TERM_NAMES) | {"total"}
    assert all(not value.requires_grad for value in terms.values())
    assert total.item() == pytest.approx(sum(WEIGHTS[name] * terms[name].item() for name in TERM_NAMES), rel=1e-6)
    assert terms["total"].item() == pytest.approx(total.item())
    # each reported term is the term function's value
    topk = signal.response_topk
    expected_output = kl_loss_topk(
        student.logits_BLV, topk.values_BLK, topk.ids_BLK, topk.tail_logmass_BL, masks["response_mask_BL"],
        temperature=2.0,
    )
    assert terms["output"].item() == pytest.approx(expected_output.item(), rel=1e-6)
    expected_task = task_loss(student.logits_BLV, masks["target_ids_BL"], masks["response_mask_BL"])
    assert terms["task"].item() == pytest.approx(expected_task.item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(student.logits_BLV.grad).all()
    assert all(p.grad is not None for p in projection.parameters())


def test_composite_skips_zero_weight_terms_and_their_signal():
    student, _, masks, _ = make_batch()
    weights = {name: 0.0 for name in TERM_NAMES} | {"task": 1.0}
    total, terms = distillation_loss(weights, student, TeacherSignalBatch(), **masks)
    assert set(terms) == {"task", "total"}
    assert total.item() == pytest.approx(terms["task"].item())


def test_composite_names_every_missing_field():
    student, signal, masks, _ = make_batch()
    signal.gram_BNN = None
    signal.fact_mask_BF = None
    with pytest.raises(ValueError) as error:
        distillation_loss(WEIGHTS, StudentOutputs(student.logits_BLV), signal, **masks)
    message = str(error.value)
    for term, field in [
        ("visual_relation", "signal.gram_BNN"),
        ("knowledge", "signal.fact_mask_BF"),
        ("feature", "projection"),
        ("feature", "student.hidden_states"),
        ("attention", "student.attentions"),
    ]:
        assert f"{term} = " in message and f"{field} is missing" in message


def test_composite_validates_weights():
    student, signal, masks, _ = make_batch()
    with pytest.raises(ValueError, match="visual_kld"):
        distillation_loss(WEIGHTS | {"visual_kld": 1.0}, student, signal, **masks)
    with pytest.raises(ValueError, match="loss weight attention is missing"):
        distillation_loss({k: v for k, v in WEIGHTS.items() if k != "attention"}, student, signal, **masks)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        distillation_loss({name: 0 for name in TERM_NAMES}, student, signal, **masks)
    with pytest.raises(ValueError, match="task = -1.0"):
        distillation_loss(WEIGHTS | {"task": -1.0}, student, signal, **masks)

    class LossWeights:  # attribute access, as the config's weights class provides
        task, output, visual_kl, visual_relation, feature, knowledge, attention = 1, 1, 0, 0, 0, 0, 0

    _, terms = distillation_loss(LossWeights(), student, signal, **masks)
    assert set(terms) == {"task", "output", "total"}


def test_composite_all_masked_gives_zero_with_zero_grads():
    student, signal, masks, projection = make_batch()
    nothing = torch.zeros(NUM_SAMPLES, SEQ_LEN, dtype=torch.bool)
    signal.visual_count_B = torch.zeros(NUM_SAMPLES, dtype=torch.long)
    signal.fact_mask_BF = torch.zeros_like(signal.fact_mask_BF)
    masks = dict(masks, response_mask_BL=nothing, visual_mask_BL=nothing)
    total, terms = distillation_loss(WEIGHTS, student, signal, **masks, projection=projection)
    total.backward()
    assert all(value.item() == 0.0 for value in terms.values())
    assert (student.logits_BLV.grad == 0).all()


def poison_student(student, signal, term):
    logits = student.logits_BLV.detach().clone()
    if term in ("task", "output"):
        logits[0, 7, 3] = math.nan  # a response position
    elif term in ("visual_kl", "visual_relation"):
        logits[0, 2, 3] = math.nan  # a visual position
    elif term == "knowledge":
        logits[0, 4, 3] = math.nan  # the answer position
    elif term == "feature":
        student.hidden_states[1][0, 7, 0] = math.nan
    else:
        student.attentions[2][0, 0, 7, 1] = math.nan  # a response query on a visual key
    student.logits_BLV = logits.requires_grad_(True)


def poison_teacher(student, signal, term):
    if term == "output":
        signal.response_topk.values_BLK[0, 7, 0] = math.nan
    elif term == "visual_kl":
        signal.visual_topk.tail_logmass_BL[0, 2] = math.nan
    elif term == "visual_relation":
        signal.gram_BNN[0, 1, 2] = math.nan
    elif term == "feature":
        signal.hidden_states[2][0, 7, 0] = math.nan
    elif term == "knowledge":
        signal.fact_log_probs_BF[0, 1] = math.nan
    elif term == "attention":
        signal.attentions[2][0, 0, 7, 1] = math.nan


@pytest.mark.parametrize(
    "term, poison",
    [(term, poison_student) for term in TERM_NAMES]
    + [(term, poison_teacher) for term in TERM_NAMES if term != "task"],
)
def test_composite_raises_on_nan_naming_the_term(term, poison):
    student, signal, masks, projection = make_batch()
    poison(student, signal, term)
    weights = {name: 0.0 for name in TERM_NAMES} | {term: 1.0}
    with pytest.raises(NonFiniteLossError, match=f"{term} = nan"):
        distillation_loss(weights, student, signal, **masks, projection=projection)


def test_composite_low_precision_student_gradients_are_finite():
    for dtype in (torch.bfloat16, torch.float16):
        student, signal, masks, projection = make_batch(student_dtype=dtype)
        student.logits_BLV = (student.logits_BLV.detach().float() * 30).to(dtype).requires_grad_(True)
        weights = WEIGHTS | {"feature": 0.0, "attention": 0.0}
        total, terms = distillation_loss(weights, student, signal, **masks, temperature=0.5, projection=projection)
        total.backward()
        assert total.dtype == torch.float32
        assert torch.isfinite(student.logits_BLV.grad).all(), dtype
