"""Batched dose sweeps equal the naive loop of one forward/generate per (prompt, row)."""

import math

import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions import sweeps
from neuronaudit.models.adapters import adapter_for
from neuronaudit.testing import TINY_FAMILIES, tiny_model

TEXTS = ["How do I bake bread at home? Give me step", "Hello! How are"]
ROWS = [(0, 3, 4.0), (1, 5, -3.0), (2, 7, 10.0), (3, 100, 2.0), (3, 100, -20.0), (1, 9, 0.0)]
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared machine a second OpenMP
    # thread waiting at barriers for a busy core makes them up to 100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def enc(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request, tokenizer):
    model = tiny_model(request.param, vocab_size=len(tokenizer))
    return model, adapter_for(model)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)


def test_last_token_sweep_equals_naive_loop(family_model, enc):
    model, adapter = family_model
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = sweeps.naive_dose_loop(model, adapter, ids, mask, ROWS, positions=("last_prompt",), read_layers=[1, 3])
    fast = sweeps.last_token_dose_sweep(model, adapter, ids, mask, ROWS, read_layers=[1, 3], row_batch_size=4)
    assert fast.logits.shape == (2, len(ROWS), model.config.vocab_size)
    for name in ("logits", "resid_write", "resid_final", "resid_read"):
        _close(getattr(fast, name), getattr(ref, name))
    # the doses did something, and the zero dose did nothing
    assert (fast.logits[:, 2] - fast.clean_logits).abs().max() > 1e-3
    _close(fast.logits[:, 5], fast.clean_logits)


def test_prompt_sweep_equals_naive_loop(family_model, enc):
    model, adapter = family_model
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = sweeps.naive_dose_loop(model, adapter, ids, mask, ROWS, positions=("prompt",), read_layers=[2])
    fast = sweeps.prompt_dose_sweep(model, adapter, ids, mask, ROWS, read_layers=[2], row_batch_size=4)
    for name in ("logits", "resid_write", "resid_final", "resid_read"):
        _close(getattr(fast, name), getattr(ref, name))
    last = sweeps.last_token_dose_sweep(model, adapter, ids, mask, ROWS[:3])
    assert (fast.logits[:, :3] - last.logits).abs().max() > 1e-3  # every token differs from last only


def test_generated_sweep_equals_naive_generate(family_model, enc):
    model, adapter = family_model
    ids, mask = enc["input_ids"], enc["attention_mask"]
    kw = dict(eos_token_id=None, pad_token_id=0)
    ref = sweeps.naive_dose_loop(
        model, adapter, ids, mask, ROWS, positions=("last_prompt", "generated"), max_new_tokens=5, **kw
    )
    fast = sweeps.generated_dose_sweep(model, adapter, ids, mask, ROWS, 5, return_logits=True, row_batch_size=4, **kw)
    assert torch.equal(fast.tokens, ref.tokens)
    assert torch.equal(fast.lengths, ref.lengths) and bool((fast.lengths == 5).all())
    _close(fast.logits, ref.logits)
    _close(fast.token_logprob, ref.token_logprob)
    _close(fast.entropy, ref.entropy)
    # a logit-pair oracle keeps a few tokens' logits instead of the whole vocabulary
    kept = sweeps.generated_dose_sweep(model, adapter, ids, mask, ROWS, 5, row_batch_size=4, keep_token_ids=[7, 3],
                                       **kw)
    assert kept.logits is None and kept.token_logits.shape == (*fast.tokens.shape, 2)
    _close(kept.token_logits, fast.logits[..., [7, 3]])


@pytest.mark.parametrize("include_last_prompt", [True, False])
def test_generated_sweep_stops_rows_at_eos_like_generate(llama, enc, include_last_prompt):
    model, adapter = llama
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = ("last_prompt", "generated") if include_last_prompt else ("generated",)
    probe = sweeps.generated_dose_sweep(
        model, adapter, ids, mask, ROWS, 6, include_last_prompt=include_last_prompt,
        eos_token_id=None, pad_token_id=0,
    )
    eos = int(probe.tokens[0, 0, 2])  # a token row 0 of prompt 0 emits by its third step
    stop = int((probe.tokens[0, 0] == eos).nonzero()[0]) + 1
    kw = dict(eos_token_id=eos, pad_token_id=0)
    ref = sweeps.naive_dose_loop(model, adapter, ids, mask, ROWS, positions=positions, max_new_tokens=6, **kw)
    fast = sweeps.generated_dose_sweep(
        model, adapter, ids, mask, ROWS, 6, include_last_prompt=include_last_prompt, row_batch_size=3, **kw
    )
    assert torch.equal(fast.tokens, ref.tokens) and torch.equal(fast.lengths, ref.lengths)
    if include_last_prompt:
        assert int(fast.lengths[0, 0]) == stop and bool((fast.tokens[0, 0, stop:] == 0).all())
    after = torch.arange(6)[None, None, :] >= fast.lengths[..., None]
    assert bool(after.any()) and bool(fast.token_logprob[after].isnan().all())
    assert not bool(fast.token_logprob[~after].isnan().any())
    _close(fast.token_logprob.nan_to_num(), ref.token_logprob.nan_to_num())


def test_layer_sharing_can_be_turned_off_and_padding_side_does_not_matter(llama, tokenizer):
    model, adapter = llama
    tokenizer.padding_side = "right"
    right = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    left = tokenizer(TEXTS, return_tensors="pt", padding=True)
    a = sweeps.last_token_dose_sweep(model, adapter, left["input_ids"], left["attention_mask"], ROWS)
    b = sweeps.last_token_dose_sweep(
        model, adapter, right["input_ids"], right["attention_mask"], ROWS, share_lower_layers=False, row_batch_size=1
    )
    _close(a.logits, b.logits)
    _close(a.resid_write, b.resid_write)
    assert a.prompt_lengths == b.prompt_lengths == [int(m.sum()) for m in left["attention_mask"]]


def test_alignment_follows_the_saturation_curve_at_the_write_layer(llama, enc):
    """r' = r + d·v after the dosed layer, so cosθ = (c0 + x)/sqrt(1 + 2·x·c0 + x²), x = d·|v|/|r|."""
    model, adapter = llama
    rows = [(2, 11, d) for d in (-30.0, -3.0, 0.0, 3.0, 30.0, 300.0)]
    res = sweeps.last_token_dose_sweep(model, adapter, enc["input_ids"], enc["attention_mask"], rows)
    v = adapter.write_vector(2, 11).detach().float()
    r = res.clean_resid[:, 2]  # [P, D]
    _close(res.resid_write, r[:, None] + torch.tensor([d for *_, d in rows])[None, :, None] * v)
    c0 = sweeps.alignment(r, v)[:, None]
    x = torch.tensor([d for *_, d in rows])[None] * v.norm() / r.norm(dim=-1, keepdim=True)
    expected = (c0 + x) / torch.sqrt(1 + 2 * x * c0 + x * x)
    _close(res.alignment_at_write(adapter), expected)
    _close(res.clean_alignment(adapter, "write"), c0.expand(-1, len(rows)))
    assert res.alignment_at_write(adapter)[:, -1].min() > 0.99  # a huge dose aligns r' with v
    assert res.alignment_at_readout(adapter).shape == (2, len(rows))
    assert sweeps.alignment(v, v).item() == pytest.approx(1.0, abs=1e-6)


def test_the_readout_is_the_final_norms_output_where_unequal_gains_cap_the_alignment(tokenizer, enc):
    """The readout alignment is cos(norm(h), v), h the final norm's input: with unequal norm gains g
    a huge dose saturates it at cos(g ⊙ v, v) < 1 while the pre-norm alignment goes to 1, so the
    normalisation cap can fire."""
    from neuronaudit.methods.window import classify_failure

    model = tiny_model("llama", vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    with torch.no_grad():
        gains = torch.exp(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)))
        adapter.final_norm.weight.copy_(gains)
    rows = [(2, 11, d) for d in (0.0, 3.0, 30.0, 3000.0)]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pre = []  # the final norm's input of every (prompt, row) of the naive loop, in its order
    handle = adapter.final_norm.register_forward_pre_hook(lambda m, args: pre.append(args[0][0, -1].detach()))
    try:
        ref = sweeps.naive_dose_loop(model, adapter, ids, mask, rows, positions=("last_prompt",))
    finally:
        handle.remove()
    h = torch.stack(pre).reshape(2, len(rows), -1)
    with torch.no_grad():
        normed = adapter.final_norm(h)
    fast = sweeps.last_token_dose_sweep(model, adapter, ids, mask, rows)
    _close(ref.resid_final, normed)
    _close(fast.resid_final, normed)
    v = adapter.write_vector(2, 11).detach().float()
    readout = fast.alignment_at_readout(adapter)
    _close(readout, normed @ v / (normed.norm(dim=-1) * v.norm()))
    before_norm = sweeps.alignment(h, v)
    cap = float(sweeps.alignment(gains * v, v))
    assert cap < 0.9 and before_norm[:, -1].min() > 0.99  # the pre-norm alignment goes to 1 ...
    assert readout[:, -1].max() < 0.9 and float(readout[:, -1].mean()) == pytest.approx(cap, abs=1e-3)  # ... capped
    resp = sweeps.single_pass_dose_response(model, adapter, ids, mask, rows, positions="last_prompt")
    _close(resp.alignment_readout, readout)
    max_readout = float(resp.alignment_readout.mean(0).abs().max())
    assert float(resp.alignment_write.mean(0).abs().max()) > 0.99 and max_readout < 0.9
    assert classify_failure("closed", 2, 4, max_readout, float("nan"), float("nan"), 1.0) == "normalisation_cap"
    assert not adapter.final_norm._forward_hooks and not adapter.final_norm._forward_pre_hooks


@pytest.mark.parametrize("positions", ["prompt", "last_prompt"])
def test_single_pass_dose_response_matches_naive_kl(llama, enc, positions):
    model, adapter = llama
    ids, mask = enc["input_ids"], enc["attention_mask"]
    resp = sweeps.single_pass_dose_response(model, adapter, ids, mask, ROWS, positions=positions, row_batch_size=4)
    ref = sweeps.naive_dose_loop(model, adapter, ids, mask, ROWS, positions=(positions,))
    plain = sweeps.naive_dose_loop(model, adapter, ids, mask, [(0, 0, 0.0)])
    clean = plain.log_probs()[:, 0]
    dosed = ref.log_probs()
    kl = (clean.exp()[:, None] * (clean[:, None] - dosed)).sum(-1)
    _close(resp.kl, kl)
    _close(resp.entropy, -(dosed.exp() * dosed).sum(-1))
    _close(resp.clean_entropy, -(clean.exp() * clean).sum(-1))
    assert resp.kl[:, 5].abs().max() < 1e-5 and bool((resp.kl > -1e-6).all())
    _close(resp.alignment_write, sweeps.alignment(ref.resid_write, sweeps.write_vectors(adapter, ROWS)[None]))
    # caller-supplied clean logits are used as the reference
    shifted = sweeps.single_pass_dose_response(
        model, adapter, ids, mask, ROWS[:2], clean_logits=dosed[:, 5].exp().log(), positions=positions
    )
    _close(shifted.kl, resp.kl[:, :2])


def test_bad_rows_fail_with_one_line_errors(llama, enc):
    model, adapter = llama
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with pytest.raises(NeuronAuditError, match="out of range"):
        sweeps.last_token_dose_sweep(model, adapter, ids, mask, [(9, 0, 1.0)])
    with pytest.raises(NeuronAuditError, match="finite"):
        sweeps.prompt_dose_sweep(model, adapter, ids, mask, [(0, 0, math.inf)])
    with pytest.raises(NeuronAuditError, match="layer, neuron, dose"):
        sweeps.generated_dose_sweep(model, adapter, ids, mask, [(0, 0)], 2)
    with pytest.raises(NeuronAuditError, match="row_batch_size"):
        sweeps.last_token_dose_sweep(model, adapter, ids, mask, ROWS, row_batch_size=0)


def test_model_is_left_as_found(llama, enc):
    model, adapter = llama
    ids, mask = enc["input_ids"], enc["attention_mask"]
    before = model(**enc).logits
    sweeps.last_token_dose_sweep(model, adapter, ids, mask, ROWS)
    sweeps.prompt_dose_sweep(model, adapter, ids, mask, ROWS)
    assert all("forward" not in block.__dict__ for block in adapter.blocks)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in adapter.blocks)
    assert not adapter.final_norm._forward_pre_hooks and not adapter.final_norm._forward_hooks
    torch.testing.assert_close(model(**enc).logits, before)


def test_bench_script_runs_on_a_tiny_model(capsys):
    from neuronaudit import bench

    assert bench.main(["--model", "tiny", "--quick", "--only", "sweeps,rollouts,dtype,rules"]) == 0
    text = capsys.readouterr().out
    assert "machine:" in text and "sweeps/last-prompt-token" in text and "rollouts/" in text
    assert "repeats) target" in text
    assert "dtype/forward, bfloat16 vs float32" in text and "greedy continuations identical" in text
