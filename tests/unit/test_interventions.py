"""The intervention engine: per-row edits, every op, and no off-by-one under cached generation."""

import json

import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.hooks import (
    InterventionPlan,
    NeuronEdit,
    NeuronHooks,
    ResidualEdit,
    StopForward,
)


def _batch(tokenizer, texts, side="left"):
    tokenizer.padding_side = side
    return tokenizer(texts, return_tensors="pt", padding=True)


TEXTS = ["How do I bake bread at home?", "Hello!"]


def _reader(store):
    def read(layer, a, ctx):
        store[layer] = a.detach().clone()

    return read


def test_per_row_plan_equals_separate_runs(llama, tokenizer):
    model, adapter = llama
    enc = _batch(tokenizer, [TEXTS[0]] * 4)
    edits = [
        NeuronEdit.dose(1, 3, 4.0),
        NeuronEdit.dose(2, 100, -6.0),
        NeuronEdit.scale(0, 7, 0.0),
        NeuronEdit.clamp(3, 64, 2.5),
    ]
    with torch.no_grad():
        with NeuronHooks(adapter, InterventionPlan.per_row([[e] for e in edits])):
            batched = model(**enc).logits
        for r, e in enumerate(edits):
            with NeuronHooks(adapter, InterventionPlan.broadcast([e])):
                single = model(**{k: v[r : r + 1] for k, v in enc.items()}).logits
            torch.testing.assert_close(batched[r : r + 1], single, atol=1e-5, rtol=1e-5)
        plain = model(**enc).logits
    assert not torch.allclose(batched[0], plain[0])  # the dose did something


def test_ops_write_the_expected_values_only_at_real_tokens(llama, tokenizer):
    model, adapter = llama
    enc = _batch(tokenizer, TEXTS, side="left")
    clean, edited = {}, {}
    with torch.no_grad():
        with NeuronHooks(adapter, on_activation=_reader(clean)):
            model(**enc)
        plan = InterventionPlan.broadcast(
            [
                NeuronEdit.dose(1, 3, 1.5, ["prompt"]),
                NeuronEdit.ablate(1, 4, ["prompt"]),
                NeuronEdit.clamp(1, 5, -2.0, ["last_prompt"]),
                NeuronEdit.scale(1, 6, 3.0, ["prompt"]),
            ]
        )
        with NeuronHooks(adapter, plan, on_activation=_reader(edited)):
            model(**enc)
    real = enc["attention_mask"].bool()
    a, b = clean[1], edited[1]
    torch.testing.assert_close(b[..., 3][real], a[..., 3][real] + 1.5)
    assert torch.equal(b[..., 3][~real], a[..., 3][~real])  # padding untouched
    assert torch.all(b[..., 4][real] == 0)
    assert torch.all(b[:, -1, 5] == -2.0)  # left padding: last prompt token is the last column
    assert torch.equal(b[:, :-1, 5], a[:, :-1, 5])
    torch.testing.assert_close(b[..., 6][real], 3.0 * a[..., 6][real])
    untouched = [i for i in range(adapter.n_neurons) if i not in (3, 4, 5, 6)]
    assert torch.equal(a[..., untouched], b[..., untouched])


def test_last_prompt_with_right_padding_finds_each_rows_last_real_token(llama, tokenizer):
    model, adapter = llama
    enc = _batch(tokenizer, TEXTS, side="right")
    got = {}
    with torch.no_grad(), NeuronHooks(
        adapter,
        InterventionPlan.broadcast([NeuronEdit.clamp(0, 9, 7.0, ["last_prompt"])]),
        on_activation=_reader(got),
    ):
        model(**enc)
    lengths = enc["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        hits = (got[0][row, :, 9] == 7.0).nonzero().flatten().tolist()
        assert hits == [n - 1]


def test_patch_copies_another_runs_activation(llama, tokenizer):
    model, adapter = llama
    donor, target = _batch(tokenizer, [TEXTS[0]]), _batch(tokenizer, ["Paris is the capital of France."])
    d, t = {}, {}
    with torch.no_grad():
        with NeuronHooks(adapter, on_activation=_reader(d)):
            model(**donor)
        source = d[2][0, :, 11].tolist()
        plan = InterventionPlan.broadcast([NeuronEdit.patch(2, 11, source, ["prompt"])])
        with NeuronHooks(adapter, plan, on_activation=_reader(t)):
            model(**target)
    n = min(len(source), t[2].shape[1])
    torch.testing.assert_close(t[2][0, :n, 11], torch.tensor(source[:n]))


@pytest.mark.parametrize("positions", [("generated",), ("last_prompt",), ("last_prompt", "generated")])
def test_cached_generation_equals_uncached_forward_under_the_same_positions(llama, tokenizer, positions):
    """No off-by-one at the prompt/generation boundary: generate (KV cache) == full forward."""
    model, adapter = llama
    enc = _batch(tokenizer, TEXTS, side="left")
    prompt_length = enc["input_ids"].shape[1]
    plan = InterventionPlan.broadcast([NeuronEdit.dose(2, 17, 25.0, positions)])
    with torch.no_grad():
        with NeuronHooks(adapter, plan):
            out = model.generate(
                **enc, max_new_tokens=6, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
            )
        step_logits = torch.stack(out.logits, dim=1)  # [batch, new, vocab]
        full_mask = torch.cat(
            [enc["attention_mask"], torch.ones_like(out.sequences[:, prompt_length:])], dim=1
        )
        with NeuronHooks(adapter, plan, prompt_length=prompt_length):
            full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
        plain = model(**enc).logits
    new = step_logits.shape[1]
    torch.testing.assert_close(step_logits, full[:, prompt_length - 1 : prompt_length - 1 + new], atol=1e-4, rtol=1e-4)
    first_step_changed = not torch.allclose(step_logits[:, 0], plain[:, -1], atol=1e-4)
    assert first_step_changed == ("last_prompt" in positions)


def test_stop_after_layer_skips_the_rest(llama, tokenizer):
    model, adapter = llama
    seen = []
    with torch.no_grad(), NeuronHooks(
        adapter, on_activation=lambda l, a, c: seen.append(l), layers=[0, 1], stop_after_layer=1
    ):
        with pytest.raises(StopForward):
            adapter.base(**_batch(tokenizer, TEXTS))
    assert seen == [0, 1]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_impossible_dose_is_rejected_by_name(value):
    with pytest.raises(NeuronAuditError, match=r"impossible add value"):
        NeuronEdit.dose(1, 2, value)


def test_bad_positions_ops_and_duplicates_are_rejected(llama, tokenizer):
    model, adapter = llama
    with pytest.raises(NeuronAuditError, match="'everywhere'"):
        NeuronEdit.dose(1, 2, 1.0, ["everywhere"])
    with pytest.raises(NeuronAuditError, match="twice"):
        InterventionPlan.broadcast([NeuronEdit.dose(1, 2, 1.0), NeuronEdit.scale(1, 2, 0.5)])
    with pytest.raises(NeuronAuditError, match="neuron index 9999"):
        NeuronHooks(adapter, InterventionPlan.broadcast([NeuronEdit.dose(1, 9999, 1.0)]))
    plan = InterventionPlan.per_row([[NeuronEdit.dose(1, 2, 1.0)]] * 3)
    with pytest.raises(NeuronAuditError, match="3 rows but the batch has 2"):
        with torch.no_grad(), NeuronHooks(adapter, plan):
            model(**_batch(tokenizer, TEXTS))


def _add_to_block_output(adapter, layer, vector, where):
    """A plain forward hook adding ``vector`` to block ``layer``'s output where ``where [batch, seq]``."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + where[..., None].to(hidden.dtype) * vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return adapter.blocks[layer].register_forward_hook(hook)


@pytest.mark.parametrize("positions", [("prompt",), ("last_prompt",)])
def test_residual_edit_equals_adding_the_vector_to_the_block_output(llama, tokenizer, positions):
    model, adapter = llama
    enc = _batch(tokenizer, TEXTS, side="left")
    vector = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    mask = enc["attention_mask"].bool()
    if positions == ("last_prompt",):
        where = torch.zeros_like(mask)
        where[:, -1] = True  # left padding: every row's last prompt token is the last column
    else:
        where = mask
    with torch.no_grad():
        plain = model(**enc).logits
        with NeuronHooks(adapter, InterventionPlan.broadcast([ResidualEdit.add(2, vector, 3.0, positions)])):
            edited = model(**enc).logits
        handle = _add_to_block_output(adapter, 2, 3.0 * vector, where)
        try:
            reference = model(**enc).logits
        finally:
            handle.remove()
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited[:, -1], plain[:, -1], atol=1e-3)


def test_residual_edit_per_row_and_under_cached_generation(llama, tokenizer):
    model, adapter = llama
    enc = _batch(tokenizer, TEXTS, side="left")
    prompt_length = enc["input_ids"].shape[1]
    vector = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1))
    edit = ResidualEdit.add(1, vector, -4.0)  # after the instruction: last prompt token + generated
    plan = InterventionPlan.per_row([[edit], []])
    with torch.no_grad():
        plain = model(**enc).logits
        with NeuronHooks(adapter, plan):
            out = model.generate(
                **enc, max_new_tokens=5, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
            )
        step_logits = torch.stack(out.logits, dim=1)
        full_mask = torch.cat([enc["attention_mask"], torch.ones_like(out.sequences[:, prompt_length:])], dim=1)
        where = torch.zeros_like(full_mask, dtype=torch.bool)
        where[0, prompt_length - 1 :] = True  # row 0 only, from its last prompt token on
        handle = _add_to_block_output(adapter, 1, -4.0 * vector, where)
        try:
            full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
        finally:
            handle.remove()
    new = step_logits.shape[1]
    torch.testing.assert_close(step_logits, full[:, prompt_length - 1 : prompt_length - 1 + new], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits[1, 0], plain[1, -1], atol=1e-4, rtol=1e-4)  # row 1 untouched
    assert not torch.allclose(step_logits[0, 0], plain[0, -1], atol=1e-3)


def test_residual_edit_round_trips_through_the_intervention_spec(llama):
    from neuronaudit.evaluation.rollouts import edit_spec, parse_interventions

    _, adapter = llama
    edit = ResidualEdit.add(3, [0.5] * adapter.d_model, -2.0)
    spec = json.loads(edit_spec([edit, NeuronEdit.dose(3, 1, 1.0)]))
    parsed = parse_interventions({"caa": spec})["caa"]
    assert parsed == [edit, NeuronEdit.dose(3, 1, 1.0)]
    with pytest.raises(NeuronAuditError, match="residual stream after layer 3 twice"):
        InterventionPlan.broadcast([edit, edit])
    with pytest.raises(NeuronAuditError, match="has 3 entries"):
        NeuronHooks(adapter, InterventionPlan.broadcast([ResidualEdit.add(0, [1.0, 2.0, 3.0])]))
