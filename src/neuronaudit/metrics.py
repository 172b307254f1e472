"""Coherence metrics of rollouts: repetition, perplexity under the unsteered model, entropy.

SCIENCE.md section 1 ("Collapse ceiling") defines a rollout's coherence by three numbers, each
compared with a threshold from config (:class:`neuronaudit.judge.RuleThresholds`):

``repetition_ratio``  the fraction of a rollout's token n-grams (n = 4) that repeat an n-gram seen
                      earlier in the same rollout. A loop ("the the the ...") approaches 1, fluent
                      prose stays near 0. Coherence = 1 − repetition ratio (the CNA "quality"
                      metric of section 3 is the same number).
``perplexity``        exp of the mean negative log-likelihood of the rollout's tokens under the
                      *unsteered* model given the (templated) prompt: token salad produced under a
                      large dose is improbable to the model without the dose.
``entropy``           the mean next-token entropy (nats) of a predictive distribution over the
                      rollout's positions. :mod:`neuronaudit.rollouts` records it for the model
                      that generated the rollout (from its generation scores), where a flattened
                      distribution signals collapse; :func:`rollout_scores` also gives the entropy
                      of the unsteered model over the same tokens.

Perplexity and entropy come from one batched, uncached forward per rollout through
:func:`neuronaudit.scoring.score_tokens` (no intervention plan). The model is causal, so one
forward over the longest horizon gives every shorter horizon's numbers as a prefix mean
(:func:`prefix_means`). Also here: the Wilson score interval used for refusal rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from neuronaudit.errors import NeuronAuditError
from neuronaudit.scoring import TokenScores, score_tokens


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


def entropy_from_logits(logits) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits)`` along the last axis (torch tensor or array)."""
    import torch

    t = torch.as_tensor(logits).float()
    logp = torch.log_softmax(t, dim=-1)
    return (-(logp.exp() * logp).sum(-1)).cpu().numpy()


def rollout_scores(
    model,
    adapter,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> TokenScores:
    """Per-token log-probs and entropies of each response under the *unsteered* model.

    Row ``k`` scores ``response_ids[k]`` given ``prompt_ids[k]`` (unpadded token lists; the
    prompt must be non-empty). No intervention plan is installed, whatever produced the rollout.
    Empty responses give empty arrays (their means are NaN).
    """
    if len(prompt_ids) != len(response_ids):
        raise NeuronAuditError(
            f"{len(prompt_ids)} prompts but {len(response_ids)} responses to score"
        )
    sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    scored_from = [len(p) for p in prompt_ids]
    if any(s < 1 for s in scored_from):
        raise NeuronAuditError("a rollout to score has an empty prompt; it needs at least one token")
    # Longest sequences first: batches of similar length waste less padding.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = score_tokens(
        model, adapter, [sequences[i] for i in order], [scored_from[i] for i in order],
        plan=None, batch_size=batch_size, pad_token_id=pad_token_id,
    )
    logprob: list[np.ndarray] = [np.empty(0)] * len(order)
    entropy: list[np.ndarray] = [np.empty(0)] * len(order)
    for j, i in enumerate(order):
        logprob[i], entropy[i] = scores.logprob[j], scores.entropy[j]
    return TokenScores(logprob, entropy)


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


def unsteered_perplexity(
    model, adapter, prompt_ids, response_ids, batch_size: int = 8, pad_token_id: int = 0
) -> np.ndarray:
    """Perplexity of each full response under the unsteered model."""
    s = rollout_scores(model, adapter, prompt_ids, response_ids, batch_size, pad_token_id)
    return s.perplexity()


def unsteered_mean_entropy(
    model, adapter, prompt_ids, response_ids, batch_size: int = 8, pad_token_id: int = 0
) -> np.ndarray:
    """Mean next-token entropy of the unsteered model over each response's positions."""
    s = rollout_scores(model, adapter, prompt_ids, response_ids, batch_size, pad_token_id)
    return s.mean_entropy()


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (``(nan, nan)`` when ``n = 0``)."""
    from scipy.stats import norm

    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise NeuronAuditError(f"count {k!r} is not between 0 and n = {n}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)
