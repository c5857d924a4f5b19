"""Loss weights, temperature and layer maps: the knobs Ray Tune searches."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field

from ckd_ray.section import Section

from ckd_ray.losses.terms import TERM_NAMES as LOSS_TERMS
# Seed 000's names for its multi-level loss L = a*task + b*output + c*feature + d*knowledge + e*attention.
GREEK_ALIASES = {"alpha": "task", "beta": "output", "gamma": "feature", "delta": "knowledge", "epsilon": "attention"}


def _weight(term: str, description: str):
    greek = [g for g, t in GREEK_ALIASES.items() if t == term]
    alias = AliasChoices(term, *greek) if greek else None
    return Field(0.0, ge=0.0, description=description, validation_alias=alias)


class LossWeights(Section):
    """Weight of every loss term; 0 turns a term off (and its teacher signal is not needed).
    Seed 000's alpha..epsilon are accepted as aliases of task, output, feature, knowledge, attention."""

    task: float = _weight("task", "Autoregressive cross-entropy on response tokens (alpha).")
    output: float = _weight("output", "T^2-scaled KL between teacher and student on response tokens (beta).")
    visual_kl: float = _weight("visual_kl", "The same KL on visual-token positions (LLaVA-KD).")
    visual_relation: float = _weight("visual_relation", "1 - cos between visual Gram matrices (LLaVA-KD).")
    feature: float = _weight("feature", "MSE between student features and projected teacher features (gamma).")
    knowledge: float = _weight("knowledge", "Cross-entropy between teacher and student fact distributions (delta).")
    attention: float = _weight("attention", "MSE between cross-modal attention maps (epsilon).")

    def active(self) -> list[str]:
        return [term for term in LOSS_TERMS if getattr(self, term) > 0]


class FusionConfig(Section):
    """How a stage with several `teachers` fuses them per token (`ckd_ray.losses.fusion`)."""

    rule: Literal["fixed", "min_ce", "confidence", "entropy"] = "confidence"
    """Per-token teacher weights of the KL terms: fixed (the `weights` below), min_ce (FuseLLM: the
    teacher with the lowest CE on the label token), confidence (CA-MKD: (1 - softmax(CE / temperature))
    / (K - 1)), entropy (softmax(-entropy / temperature)). The label rules use entropy weights on
    tokens without a label (visual tokens)."""
    temperature: float = Field(1.0, gt=0.0)
    """tau of the confidence and entropy rules (Ray Tune: `fusion_temperature`); not the KL's T."""
    weights: dict[str, float] = {}
    """Per teacher role, >= 0: the fixed rule's weights, and the weights of the terms fused per
    teacher (visual_relation, feature, attention, knowledge). A role left out weighs 1."""

    def weight_of(self, role: str) -> float:
        return self.weights.get(role, 1.0)


class LossConfig(Section):
    """How the student's loss is formed in distillation steps (DPT, DFT)."""

    weights: LossWeights | None = None
    """Term weights; unset means the step type's default (LLaVA-KD: task, output, visual_kl, visual_relation = 1)."""
    temperature: float = Field(1.0, gt=0.0)
    """Softmax temperature T of the KL terms and the fact distribution; KL is scaled by T^2."""
    kl_direction: Literal["forward", "reverse"] = "forward"
    """forward = KL(teacher || student) (Hinton); reverse = KL(student || teacher)."""
    chunk_size: int = Field(256, ge=1)
    """Positions per chunk in the KL terms, bounding peak memory at chunk_size x vocabulary."""
    feature_layers: dict[int, int] = {}
    """Feature term layer map, student hidden-state index -> teacher hidden-state index."""
    attention_layers: dict[int, int] = {}
    """Attention term layer map, student layer -> teacher layer."""
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    """How a stage with several `teachers` fuses them (unused by a stage with one teacher)."""
