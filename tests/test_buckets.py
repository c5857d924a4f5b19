"""A padded batch's forward in groups of rows of similar length (`ckd_ray.models.buckets`): the
split is the cheapest one, and the outputs, gradients and teacher signal at every real position
are the whole batch's, checked in float64 on tiny LLaVA models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ckd_ray.models import build_preset
from ckd_ray.models.buckets import MIN_SAVING_PER_SPLIT, ForwardOutputs, forward_by_length, plan_buckets

IMAGE_TOKEN, NUM_VISUAL = 4, 16


def _cost(lengths, groups, min_saving=MIN_SAVING_PER_SPLIT) -> float:
    return sum(len(g) * lengths[g].max() for g in groups) + min_saving * len(lengths) * lengths.max() * (len(groups) - 1)


def _brute_force_cost(lengths, max_buckets) -> float:
    """The least cost over every split of the sorted rows into at most `max_buckets` contiguous groups."""
    order = np.argsort(lengths, kind="stable")
    best = np.inf
    for num_cuts in range(max_buckets):
        for cuts in itertools.combinations(range(1, len(lengths)), num_cuts):
            best = min(best, _cost(lengths, np.split(order, cuts)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_buckets", [1, 2, 3, 4])
def test_the_split_is_the_cheapest_one(seed, max_buckets):
    lengths = np.random.default_rng(seed).choice([20, 21, 45, 47, 60, 90, 114], size=9)
    groups = plan_buckets(lengths, max_buckets)
    assert 1 <= len(groups) <= max_buckets
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # every row once
    for group in groups:
        assert np.all(np.diff(lengths[group]) >= 0)  # ascending, so the last row is the longest
    assert _cost(lengths, groups) == pytest.approx(_brute_force_cost(lengths, max_buckets))


def test_rows_of_one_length_or_a_small_saving_stay_one_group():
    assert len(plan_buckets(np.full(32, 57), 3)) == 1
    # 31 rows of 100 and one of 99: a split saves 1 position of 3,200, less than 5%
    assert len(plan_buckets(np.array([100] * 31 + [99]), 3)) == 1
    # half short, half long: two groups
    groups = plan_buckets(np.array([40] * 16 + [110] * 16), 3)
    assert [len(g) for g in groups] == [16, 16]


def _batch(lengths, image_rows, seed=0):
    """A right-padded batch: image tokens at 1..16 of the rows with an image, random text after."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.zeros(len(lengths), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, 500, (n,), generator=generator)
        attention_mask[row, :n] = 1
        if row in image_rows:
            input_ids[row, 1 : 1 + NUM_VISUAL] = IMAGE_TOKEN
    pixel_values = torch.randn(len(image_rows), 3, 32, 32, generator=generator, dtype=torch.float64)
    pixel_rows = np.full(len(lengths), -1)
    pixel_rows[list(image_rows)] = np.arange(len(image_rows))
    return input_ids, attention_mask, pixel_values, pixel_rows


def test_outputs_and_gradients_at_real_positions_are_the_whole_batch_s_in_float64():
    model = build_preset("tiny-student", seed=0, attn_implementation="eager").double()
    lengths = [20, 58, 21, 40, 60, 41, 19]  # three groups; row 2 has no image
    image_rows = [0, 1, 3, 4, 5, 6]
    input_ids, attention_mask, pixel_values, pixel_rows = _batch(lengths, image_rows)
    real_BL = attention_mask.bool()
    options = dict(output_hidden_states=True, output_attentions=True, use_cache=False)

    def run(max_buckets):
        model.zero_grad()
        out = forward_by_length(model, input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                pixel_rows=pixel_rows, row_lengths=np.array(lengths), max_buckets=max_buckets, **options)
        loss = out.logits[real_BL].logsumexp(-1).mean() + sum(h[real_BL].pow(2).mean() for h in out.hidden_states)
        loss.backward()
        return out, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole, whole_loss, whole_grads = run(1)
    split, split_loss, split_grads = run(3)
    assert isinstance(split, ForwardOutputs) and not isinstance(whole, ForwardOutputs)  # 1: the model's own output
    assert split.logits.shape == whole.logits.shape
    torch.testing.assert_close(split.logits[real_BL], whole.logits[real_BL], rtol=0, atol=1e-10)
    for mine, reference in zip(split.hidden_states, whole.hidden_states, strict=True):
        torch.testing.assert_close(mine[real_BL], reference[real_BL], rtol=0, atol=1e-10)
    for mine, reference in zip(split.attentions, whole.attentions, strict=True):
        real_BHLL = (real_BL[:, None, :, None] & real_BL[:, None, None, :]).expand_as(reference)  # real queries and keys
        torch.testing.assert_close(mine[real_BHLL], reference[real_BHLL], rtol=0, atol=1e-10)
    torch.testing.assert_close(split_loss, whole_loss, rtol=0, atol=1e-10)
    assert split_grads.keys() == whole_grads.keys() and split_grads
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], rtol=0, atol=1e-10, msg=name)
    assert [sorted(g.tolist()) for g in plan_buckets(np.array(lengths), 3)] == [[0, 2, 6], [3, 5], [1, 4]]
    assert torch.all(split.logits[[0, 2, 6], 21:] == 0)  # past the group's longest row: zeros, not computed


def test_the_teacher_signal_is_the_whole_batch_s_in_float64():
    from ckd_ray.teachers import SignalSpec
    from ckd_ray.teachers.forward import TeacherForward

    model = build_preset("tiny-ta", seed=0, attn_implementation="eager").double()
    lengths = [22, 61, 23, 59, 40, 41]
    input_ids, attention_mask, pixel_values, _ = _batch(lengths, range(len(lengths)))
    padded = 64
    response = np.zeros((len(lengths), padded), bool)
    for row, n in enumerate(lengths):
        response[row, n - 4 : n] = True
    batch = {
        "input_ids": np.pad(input_ids.numpy(), ((0, 0), (0, padded - max(lengths)))),
        "attention_mask": np.pad(attention_mask.numpy(), ((0, 0), (0, padded - max(lengths)))),
        "pixel_values": pixel_values.numpy(),
        "response_mask": response,
        "visual_mask": np.pad((input_ids == IMAGE_TOKEN).numpy(), ((0, 0), (0, padded - max(lengths)))),
    }
    spec = SignalSpec(response_top_k=8, visual_top_k=4, gram=True, attention_layers=[2], attention_head_groups=2,
                      feature_layers=[1], value_dtype="float32")
    whole = TeacherForward(model, spec, 512, max_buckets=1)(batch)
    split = TeacherForward(model, spec, 512, max_buckets=3)(batch)
    assert whole.keys() == split.keys()
    real = batch["attention_mask"].astype(bool)
    for name in whole:
        if name.startswith(("sig_hidden_", "sig_attn_")):  # dense over positions: equal at the real ones
            mask = real if name.startswith("sig_hidden_") else np.broadcast_to(real[:, None, :, None], whole[name].shape)
            np.testing.assert_allclose(split[name][mask], whole[name][mask], rtol=0, atol=1e-10, err_msg=name)
        elif name.endswith("_ids"):
            assert np.array_equal(split[name], whole[name]), name
        else:
            np.testing.assert_allclose(split[name], whole[name], rtol=0, atol=1e-10, err_msg=name)
