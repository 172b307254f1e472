"""Scoring: batched, padded log-probs equal one-sequence-at-a-time scoring."""

import numpy as np
import pytest
import torch

from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit
from neuronaudit.interventions.scoring import score_tokens, text_perplexity


@pytest.mark.parametrize("starts", [[2, 3, 1], [4, 3, 2]])  # the second: no logits before position 1
def test_batched_scores_equal_single_sequence_scores(llama, tokenizer, starts):
    model, adapter = llama
    seqs = [tokenizer(t)["input_ids"] for t in ["Hello there, friend.", "Paris is the capital of France.", "Hi all"]]
    batched = score_tokens(model, adapter, seqs, starts, batch_size=3)
    for k, (s, st) in enumerate(zip(seqs, starts)):
        single = score_tokens(model, adapter, [s], [st], batch_size=1)
        np.testing.assert_allclose(batched.logprob[k], single.logprob[0], atol=1e-5)
        assert batched.logprob[k].shape == (len(s) - st,)
        with torch.no_grad():
            logits = model(torch.tensor([s])).logits[0]
        manual = torch.log_softmax(logits[:-1], -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])]
        np.testing.assert_allclose(batched.logprob[k], manual[st - 1 :].numpy(), atol=1e-5)
        logp = torch.log_softmax(logits[:-1], -1)
        entropy = -(logp.exp() * logp).sum(-1)
        np.testing.assert_allclose(batched.entropy[k], entropy[st - 1 :].numpy(), atol=1e-4)
    assert np.all(batched.mean_entropy() > 0)


def test_perplexity_changes_under_a_large_dose(llama, tokenizer):
    model, adapter = llama
    texts = ["The river flows through the old city.", "Cats are animals."]
    plain = text_perplexity(model, tokenizer, adapter, texts)
    dosed = text_perplexity(model, tokenizer, adapter, texts,
                            plan=InterventionPlan.broadcast([NeuronEdit.dose(1, 3, 200.0)]))
    assert plain.shape == (2,) and np.all(np.isfinite(plain))
    assert not np.allclose(plain, dosed)


def test_generated_edits_follow_each_rows_own_prompt_length(llama, tokenizer):
    model, adapter = llama
    seqs = [tokenizer(t)["input_ids"] for t in ["Hello there, friend. How are you", "Cats are animals and dogs too"]]
    starts = [3, 5]
    plan = InterventionPlan.broadcast([NeuronEdit.dose(2, 9, 50.0, ["generated"])])
    batched = score_tokens(model, adapter, seqs, starts, plan=plan, batch_size=2)
    plain = score_tokens(model, adapter, seqs, starts, batch_size=2)
    for k in range(2):
        single = score_tokens(model, adapter, [seqs[k]], [starts[k]], plan=plan, batch_size=1)
        np.testing.assert_allclose(batched.logprob[k], single.logprob[0], atol=1e-5)
        # the first scored token is predicted from the last prompt position: untouched
        np.testing.assert_allclose(batched.logprob[k][0], plain.logprob[k][0], atol=1e-5)
        assert not np.allclose(batched.logprob[k][1:], plain.logprob[k][1:])


@pytest.mark.parametrize("prompt_text", ["Hi", "Tell me about the old city by the river."])
def test_shared_prompt_scores_equal_scoring_each_full_sequence(llama, tokenizer, prompt_text):
    from neuronaudit.interventions.scoring import shared_prompt_scores

    model, adapter = llama
    prompt = tokenizer(prompt_text)["input_ids"][:1] if prompt_text == "Hi" else tokenizer(prompt_text)["input_ids"]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"]
                 for t in ["It is old.", "A river runs through it, slowly and wide.", "", "Yes"]]
    shared = shared_prompt_scores(model, prompt, responses, batch_size=3)
    full = score_tokens(model, adapter, [prompt + r for r in responses], [len(prompt)] * len(responses), batch_size=4)
    for k, r in enumerate(responses):
        assert shared.logprob[k].shape == (len(r),)
        np.testing.assert_allclose(shared.logprob[k], full.logprob[k], atol=1e-4)
        np.testing.assert_allclose(shared.entropy[k], full.entropy[k], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt", "phi", "gpt_neox"])
def test_scoring_from_the_layer_inputs_a_sweep_recorded_equals_running_every_block(tokenizer, family):
    """The window's scoring: the blocks below each row's dose are not run again; what enters the
    row's layer, recorded while the rollouts decoded, stands in for them. Same scores as running
    every block (float rounding), and those blocks really do not run."""
    from neuronaudit.interventions.scoring import LowerLayers, _block_output_kind, shared_prompt_scores
    from neuronaudit.interventions.sweeps import generated_dose_sweep
    from neuronaudit.models.adapters import adapter_for
    from neuronaudit.testing import tiny_model

    model = tiny_model(family, vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    prompt = tokenizer("Tell me about the old city by the river.")["input_ids"]
    rows = [(3, 5, 40.0), (3, 9, -30.0), (1, 2, 25.0), (0, 4, 60.0), (2, 7, 0.0), (1, 6, -80.0)]
    result = generated_dose_sweep(model, adapter, torch.tensor([prompt]), None, rows, max_new_tokens=7,
                                  eos_token_id=None, row_batch_size=4, keep_layer_inputs=True)
    responses = [result.tokens[0, r, : result.lengths[0, r]].tolist() for r in range(len(rows))]
    responses[1] = responses[1][:3]  # rows of one layer with different lengths share a batch
    full = shared_prompt_scores(model, prompt, responses, batch_size=4)
    ran = []
    first_child = next(iter(adapter.blocks[0].children()))  # the block's own hooks fire even for a stand-in
    handle = first_child.register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        lower = LowerLayers(adapter, [r[0] for r in rows], list(result.layer_inputs[0]))
        skipped = shared_prompt_scores(model, prompt, responses, batch_size=4, lower=lower)
    finally:
        handle.remove()
    for k, r in enumerate(responses):
        assert skipped.logprob[k].shape == (len(r),)
        np.testing.assert_allclose(skipped.logprob[k], full.logprob[k], atol=1e-4)
        np.testing.assert_allclose(skipped.entropy[k], full.entropy[k], atol=1e-4)
    assert not torch.all(result.layer_inputs[0, 0] == 0)  # recorded for a row above layer 0 ...
    assert torch.all(result.layer_inputs[0, 3] == 0)  # ... and nothing for the row at layer 0
    kind = _block_output_kind(model, adapter)
    # block 0 runs for the prompt's prefix, the one-token probe of the blocks' output and the layer-0
    # batch; with stand-ins, not for the batches of layers 1, 2 and 3
    assert len(ran) == (6 if kind is None else 3)
    assert kind is not None or family not in ("llama", "gemma2")  # the families the study runs take it
