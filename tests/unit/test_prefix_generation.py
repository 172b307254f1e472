"""Rollouts sharing a clean prompt prefix: every row equals its own ``generate`` under the same edits
(greedy), rows leave the batch at end-of-sequence, activations read during generation equal a
teacher-forced forward, sampling is reproducible from the seed."""

import numpy as np
import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions import InterventionPlan, NeuronEdit
from neuronaudit.interventions.generation import generate_tokens
from neuronaudit.interventions.prefix_generation import shared_prefix_generate
from neuronaudit.methods.reasoning import mean_activations
from neuronaudit.models.adapters import adapter_for
from neuronaudit.testing import TINY_FAMILIES, tiny_model

N_NEW = 7


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(5, vocab, size=n))) for n in (1, 4, 9, 6)]


def _rows(n_prompts: int) -> list[tuple[int, tuple]]:
    pos = ("last_prompt", "generated")
    conditions = [(), (NeuronEdit.dose(0, 3, 6.0, pos),),
                  (NeuronEdit.ablate(1, 5, pos), NeuronEdit.dose(0, 7, -4.0, pos)),
                  (NeuronEdit.blend(1, 2, 3.0, 0.8, pos),), (NeuronEdit.dose(1, 9, 8.0, ("generated",)),)]
    return [(p, c) for p in range(n_prompts) for c in conditions]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_row_equals_its_own_generate_and_finished_rows_leave(family):
    model = tiny_model(family, seed=3)
    adapter = adapter_for(model)
    vocab = model.config.vocab_size
    prompts = _prompts(vocab)
    rows = _rows(len(prompts))
    # an end-of-sequence token some rows emit early: the third token of the first unedited rollout
    ref, _, _ = generate_tokens(model, [prompts[1]], N_NEW, adapter=adapter)
    eos = [ref[0][2]]
    out = shared_prefix_generate(model, adapter, prompts, rows, N_NEW, eos_token_ids=eos, pad_token_id=0,
                                 prefix_batch=3, row_batch=4)
    n_stopped = 0
    for k, (p, edits) in enumerate(rows):
        plan = InterventionPlan.broadcast(edits) if edits else None
        tokens, stopped, entropy = generate_tokens(model, [prompts[p]], N_NEW, adapter=adapter, plan=plan,
                                                   eos_token_ids=eos, pad_token_id=0)
        assert out.tokens[k] == tokens[0], (family, k)
        assert out.stopped[k] == stopped[0]
        np.testing.assert_allclose(out.entropy[k], entropy[0], rtol=1e-4, atol=1e-4)
        n_stopped += stopped[0]
    assert 0 < n_stopped < len(rows)  # some rows stopped early, some ran to the end
    # a row costs its generated tokens plus one, the prefixes run once per prompt
    assert out.token_positions <= sum(len(p) - 1 for p in prompts) + sum(len(t) + 1 for t in out.tokens)


def test_activations_read_during_generation_equal_a_teacher_forced_forward():
    model = tiny_model("llama", seed=1)
    adapter = adapter_for(model)
    prompts = _prompts(model.config.vocab_size, seed=2)
    rows = [(p, ()) for p in range(len(prompts))]
    ref, _, _ = generate_tokens(model, [prompts[2]], N_NEW, adapter=adapter)
    eos = [ref[0][4]]
    out = shared_prefix_generate(model, adapter, prompts, rows, N_NEW, eos_token_ids=eos, record=[True] * len(rows),
                                 record_layers=[0, 1], row_batch=3)
    assert any(out.stopped) and not all(out.stopped)  # both cases: a row ended by EOS and one cut at N_NEW
    forced = mean_activations(model, adapter, prompts, out.tokens, layers=[0, 1])
    np.testing.assert_allclose(out.mean_activation, forced, rtol=1e-4, atol=1e-5)
    last = mean_activations(model, adapter, prompts, out.tokens, positions=("last_prompt",), layers=[0, 1])
    np.testing.assert_allclose(out.last_prompt_activation, last, rtol=1e-4, atol=1e-5)
    assert out.activation_row(2) == 2


def test_sampling_is_reproducible_from_the_seed_and_edits_of_the_prompt_are_refused():
    model = tiny_model("llama", seed=0)
    adapter = adapter_for(model)
    prompts = _prompts(model.config.vocab_size)
    rows = [(p, ()) for p in range(len(prompts)) for _ in range(3)]
    kw = dict(do_sample=True, temperature=1.0, top_p=0.9)
    a = shared_prefix_generate(model, adapter, prompts, rows, N_NEW, seed=5, **kw)
    b = shared_prefix_generate(model, adapter, prompts, rows, N_NEW, seed=5, **kw)
    c = shared_prefix_generate(model, adapter, prompts, rows, N_NEW, seed=6, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert len({tuple(t) for t in a.tokens[3:6]}) > 1  # three samples of one prompt differ
    with pytest.raises(NeuronAuditError, match="may edit only"):
        shared_prefix_generate(model, adapter, prompts, [(0, (NeuronEdit.ablate(0, 1),))], N_NEW)
    torch.manual_seed(0)
