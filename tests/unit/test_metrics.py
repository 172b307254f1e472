"""Coherence metrics: repetition ratio on hand-made token lists, unsteered scoring, Wilson CI."""

import math

import numpy as np
import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.metrics import (
    coherence,
    prefix_perplexity,
    repetition_ratio,
    repetition_ratios,
)
from neuronaudit.evaluation.stats import wilson_interval
from neuronaudit.interventions.scoring import (
    entropy_from_logits,
    rollout_scores,
    unsteered_mean_entropy,
    unsteered_perplexity,
)


@pytest.mark.parametrize(
    "tokens, n, expected",
    [
        ([1, 2, 3, 4, 1, 2, 3, 4], 4, 1 / 5),  # 5 four-grams, (1,2,3,4) repeats once
        ([1, 2, 3, 4, 5, 6, 7, 8], 4, 0.0),  # nothing repeats
        ([7] * 10, 4, 6 / 7),  # a loop: every 4-gram after the first repeats
        ([1, 2, 3], 4, 0.0),  # shorter than n: no n-gram
        ([], 4, 0.0),
        ([1, 1, 2], 1, 1 / 3),
        ([5, 6, 5, 6, 5, 6], 2, 3 / 5),  # (5,6),(6,5),(5,6)r,(6,5)r,(5,6)r
        (["the", "cat", "the", "cat"], 2, 1 / 3),  # works on words too
    ],
)
def test_repetition_ratio_on_hand_made_lists(tokens, n, expected):
    assert repetition_ratio(tokens, n) == pytest.approx(expected)
    assert coherence(tokens, n) == pytest.approx(1 - expected)


def test_repetition_ratio_rejects_bad_n_and_batches():
    with pytest.raises(NeuronAuditError, match="0"):
        repetition_ratio([1, 2, 3], 0)
    np.testing.assert_allclose(repetition_ratios([[1, 2, 3, 4, 1, 2, 3, 4], [9] * 5]), [0.2, 0.5])


def test_entropy_from_logits():
    uniform = entropy_from_logits(torch.zeros(2, 50))
    np.testing.assert_allclose(uniform, [math.log(50)] * 2, rtol=1e-5)
    peaked = entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]]))
    assert peaked[0] < 1e-6


def test_rollout_scores_are_unsteered_per_token_logprobs_in_input_order(llama, tokenizer):
    model, adapter = llama
    prompts = [tokenizer(t)["input_ids"] for t in ["Hello there, friend.", "Cats", "The river flows through"]]
    responses = [tokenizer(t)["input_ids"] for t in [" How are you today?", " are animals and dogs too.", " the city"]]
    s = rollout_scores(model, adapter, prompts, responses, batch_size=2)
    for k, (p, r) in enumerate(zip(prompts, responses)):
        assert s.logprob[k].shape == (len(r),)
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0, :-1], -1)
        manual = logp[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]
        np.testing.assert_allclose(s.logprob[k], manual.numpy(), atol=1e-5)
        ent = -(logp.exp() * logp).sum(-1)[len(p) - 1 :]
        np.testing.assert_allclose(s.entropy[k], ent.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        unsteered_perplexity(model, adapter, prompts, responses), s.perplexity(), rtol=1e-5
    )
    np.testing.assert_allclose(
        unsteered_mean_entropy(model, adapter, prompts, responses), s.mean_entropy(), rtol=1e-5
    )


def test_prefix_perplexity_equals_scoring_the_truncated_rollout(llama, tokenizer):
    """Causality: the first h tokens of one long scoring equal a separate scoring of h tokens."""
    model, adapter = llama
    prompt = tokenizer("What is 7 plus 5?")["input_ids"]
    response = tokenizer(" The answer is 12, and 3 times 4 is 12 as well.")["input_ids"]
    full = rollout_scores(model, adapter, [prompt], [response])
    for h in (1, 3, len(response)):
        short = rollout_scores(model, adapter, [prompt], [response[:h]])
        np.testing.assert_allclose(prefix_perplexity(full.logprob, [h]), short.perplexity(), rtol=1e-5)
    assert math.isnan(prefix_perplexity(full.logprob, [0])[0])


def test_rollout_scores_reject_mismatched_or_empty_prompts(llama):
    model, adapter = llama
    with pytest.raises(NeuronAuditError, match="1 prompts but 2 responses"):
        rollout_scores(model, adapter, [[1, 2]], [[3], [4]])
    with pytest.raises(NeuronAuditError, match="empty prompt"):
        rollout_scores(model, adapter, [[]], [[3]])


def test_wilson_interval_known_values_and_bracketing():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(59, 60)
    assert 0.9 < lo < 59 / 60 < hi <= 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(NeuronAuditError):
        wilson_interval(11, 10)
