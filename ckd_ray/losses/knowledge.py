"""Knowledge consistency (`knowledge`): teacher vs student distributions over a sample's facts.

Per sample, ``-sum_k p_T(k|x) log p_S(k|x)`` over its valid candidate facts (retrieved facts and
distractors), mean over samples with at least one fact.

Reading a distribution over facts from one forward pass (``fact_log_probs``): take the logit row
at the sample's answer position (the position whose next-token prediction is the first response
token), log-softmax it in float32, score each fact by the mean log-probability of its token ids
in that row, and softmax ``score / T`` over the sample's valid facts. This is a bag-of-tokens
score (how readily the model would start its answer with each fact's words), not the sequence
likelihood of the fact, which would cost one forward pass per fact.

The teacher runs ``fact_log_probs`` on its side at T = 1 and ships ``[B, F]`` log-probs.
Because ``log_softmax(log_softmax(scores) / T) == log_softmax(scores / T)``,
``soften_fact_log_probs`` turns them into the teacher's distribution at any T exactly, so a
temperature sweep needs no teacher re-run (the same reason top-k logits ship at T = 1).
"""

import math

import torch
import torch.nn.functional as F

from ckd_ray.losses.precision import compute_dtype


def fact_log_probs(
    logits_BLV: torch.Tensor,
    answer_pos_B: torch.Tensor,
    fact_token_ids_BFT: torch.Tensor,
    fact_mask_BF: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(fact | x) at temperature T, ``[B, F]`` float32, ``-inf`` at invalid facts.

    ``fact_token_ids_BFT`` holds each fact's token ids padded with -1; every valid fact needs at
    least one id. ``answer_pos_B`` is read only for samples with a valid fact.
    """
    num_samples, seq_len, num_vocab = logits_BLV.shape
    has_fact_B = fact_mask_BF.any(dim=1)
    answer_pos_B = torch.where(has_fact_B, answer_pos_B, 0)
    token_valid_BFT = fact_token_ids_BFT >= 0
    num_tokens_BF = token_valid_BFT.sum(dim=-1)
    # host sync: reject malformed inputs before they turn into silent garbage
    if ((answer_pos_B < 0) | (answer_pos_B >= seq_len)).any():
        raise ValueError(f"answer_pos_B must lie in [0, {seq_len}) for samples with facts, got {answer_pos_B.tolist()}")
    if (fact_mask_BF & (num_tokens_BF == 0)).any():
        raise ValueError("a valid fact (fact_mask_BF) has no token ids (all -1 in fact_token_ids_BFT)")
    if (fact_token_ids_BFT >= num_vocab).any():
        raise ValueError(f"fact token ids must be < the vocabulary size {num_vocab}")
    answer_logits_BV = logits_BLV[torch.arange(num_samples, device=logits_BLV.device), answer_pos_B]
    log_probs_BV = F.log_softmax(answer_logits_BV.to(compute_dtype(logits_BLV.dtype)), dim=-1)
    token_ids_BX = fact_token_ids_BFT.clamp_min(0).long().reshape(num_samples, -1)
    token_log_probs_BFT = log_probs_BV.gather(1, token_ids_BX).reshape(fact_token_ids_BFT.shape)
    token_log_probs_BFT = torch.where(token_valid_BFT, token_log_probs_BFT, 0.0)
    scores_BF = token_log_probs_BFT.sum(dim=-1) / num_tokens_BF.clamp_min(1)
    return soften_fact_log_probs(scores_BF, fact_mask_BF, temperature)


def soften_fact_log_probs(scores_BF: torch.Tensor, fact_mask_BF: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(scores / T)`` over each sample's valid facts; ``-inf`` elsewhere.

    Accepts raw scores or log-probs at T = 1 (the same result). Samples without a valid fact
    come out all ``-inf`` with no NaN in the forward or backward pass.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    dtype = compute_dtype(scores_BF.dtype)
    scaled_BF = torch.where(fact_mask_BF, scores_BF.to(dtype) / temperature, -math.inf)
    # A row of only -inf would give NaN in log_softmax (and in its backward): feed zeros instead.
    has_fact_B1 = fact_mask_BF.any(dim=1, keepdim=True)
    log_probs_BF = F.log_softmax(torch.where(has_fact_B1, scaled_BF, 0.0), dim=-1)
    return torch.where(fact_mask_BF, log_probs_BF, -math.inf)


def knowledge_loss(
    student_fact_log_probs_BF: torch.Tensor,
    teacher_fact_log_probs_BF: torch.Tensor,
    fact_mask_BF: torch.Tensor,
) -> torch.Tensor:
    """Mean over samples with a valid fact of ``-sum_k p_T(k) log p_S(k)`` over valid facts.

    Both inputs are log-probs at the same temperature. Facts the teacher gives probability 0
    contribute 0. Returns a float32 scalar; 0 with zero gradient when no sample has a fact.
    """
    dtype = compute_dtype(student_fact_log_probs_BF.dtype)
    teacher_probs_BF = teacher_fact_log_probs_BF.to(dtype).exp()
    counted_BF = fact_mask_BF & (teacher_probs_BF != 0)  # != keeps a NaN visible
    student_log_probs_BF = torch.where(counted_BF, student_fact_log_probs_BF.to(dtype), 0.0)
    cross_entropy_B = -(teacher_probs_BF * student_log_probs_BF).sum(dim=1)
    num_samples_with_facts = fact_mask_BF.any(dim=1).sum().clamp_min(1)
    return cross_entropy_B.sum() / num_samples_with_facts
