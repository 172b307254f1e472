"""Coherence metrics of rollouts: repetition, perplexity under the unsteered model, entropy.

SCIENCE.md section 1 ("Collapse ceiling") defines a rollout's coherence by three numbers, each
compared with a threshold from config (:class:`neuronaudit.evaluation.judge.RuleThresholds`):

``repetition_ratio``  the fraction of a rollout's token n-grams (n = 4) that repeat an n-gram seen
                      earlier in the same rollout. A loop ("the the the ...") approaches 1, fluent
                      prose stays near 0. Coherence = 1 − repetition ratio (the CNA "quality"
                      metric of section 3 is the same number).
``perplexity``        exp of the mean negative log-likelihood of the rollout's tokens under the
                      *unsteered* model given the (templated) prompt: token salad produced under a
                      large dose is improbable to the model without the dose.
``entropy``           the mean next-token entropy (nats) of a predictive distribution over the
                      rollout's positions. :mod:`neuronaudit.evaluation.rollouts` records it for the model
                      that generated the rollout (from its generation scores), where a flattened
                      distribution signals collapse; :func:`rollout_scores` also gives the entropy
                      of the unsteered model over the same tokens.

Perplexity and entropy come from one batched, uncached forward per rollout through
:func:`neuronaudit.interventions.scoring.score_tokens` (no intervention plan). The model is causal, so one
forward over the longest horizon gives every shorter horizon's numbers as a prefix mean
(:func:`prefix_means`). Also here: the Wilson score interval used for refusal rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from neuronaudit.errors import NeuronAuditError


def repetition_ratio(token_ids: Sequence, n: int = 4) -> float:
    """Fraction of the n-grams of ``token_ids`` that repeat an earlier n-gram of the same list.

    ``[a, b, c, d, a, b, c, d]`` has five 4-grams of which ``(a, b, c, d)`` repeats once: 0.2.
    A list shorter than ``n`` has no n-gram and a ratio of 0 (nothing repeats). Works on any
    hashable items (token ids or words).
    """
    if n < 1:
        raise NeuronAuditError(f"repetition n-gram size {n!r} must be a positive integer")
    items = list(token_ids)
    total = len(items) - n + 1
    if total <= 0:
        return 0.0
    seen: set[tuple] = set()
    repeats = 0
    for k in range(total):
        gram = tuple(items[k : k + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


def coherence(token_ids: Sequence, n: int = 4) -> float:
    """``1 − repetition_ratio`` (1 = no repeated n-gram)."""
    return 1.0 - repetition_ratio(token_ids, n)


def repetition_ratios(sequences: Sequence[Sequence], n: int = 4) -> np.ndarray:
    """:func:`repetition_ratio` of each sequence."""
    return np.array([repetition_ratio(s, n) for s in sequences], dtype=np.float64)


def prefix_means(values: Sequence[np.ndarray], lengths: Sequence[int]) -> np.ndarray:
    """Mean of the first ``lengths[k]`` entries of ``values[k]`` (NaN when that prefix is empty)."""
    out = np.full(len(values), math.nan)
    for k, (v, n) in enumerate(zip(values, lengths)):
        n = min(int(n), len(v))
        if n > 0:
            out[k] = float(np.mean(v[:n]))
    return out


def prefix_perplexity(logprob: Sequence[np.ndarray], lengths: Sequence[int]) -> np.ndarray:
    """Perplexity ``exp(−mean log p)`` of the first ``lengths[k]`` tokens of each rollout."""
    return np.exp(-prefix_means(logprob, lengths))


