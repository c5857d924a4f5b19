"""How students and teachers are evaluated after each stage."""

from __future__ import annotations

from pydantic import Field

from ckd_ray.config.base import Section


class EvaluationConfig(Section):
    """Evaluation on the benchmark's held-out split (generation, greedy)."""

    split: str = "test"
    """Split of the instruction data evaluated."""
    max_samples: int | None = Field(600, ge=1)
    """Evaluate at most this many samples (a deterministic prefix); None = the whole split."""
    batch_size: int = Field(64, ge=1)
    """Prompts generated together."""
    max_new_tokens: int = Field(8, ge=1)
    """Answer length limit (benchmark answers are a word or a letter)."""
    latency_runs: int = Field(3, ge=1)
    """Timed repetitions of a single-prompt generation for the latency figure."""
    concurrent: int = Field(2, ge=1)
    """Models scored side by side on CPU, each in its own process (with a GPU, one at a time);
    their latencies are timed one model at a time after all have generated, so no latency
    figure is taken while another model runs."""
