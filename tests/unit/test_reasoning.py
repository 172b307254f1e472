"""Reasoning-critical neurons (AdaRAS): scores and their bootstrap over problems, paired tests, the failure
probe, transfer between two families, and the planted carry neuron end to end."""


import numpy as np
import pytest
import torch
import transformers
from scipy import stats

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions import NeuronHooks
from neuronaudit.interventions.generation import eos_ids, pad_id
from neuronaudit.methods import reasoning as R
from neuronaudit.models.adapters import adapter_for
from neuronaudit.planted import planted_tokenizer
from neuronaudit.planted_reasoning import (
    CARRY,
    grade_planted,
    planted_reasoning_model,
    planted_reasoning_problems,
)
from neuronaudit.testing import tiny_model

# --- scores on synthetic arrays ------------------------------------------------------------------


def test_scores_match_their_definition_and_rank_by_rel_then_abs_w():
    # 4 solutions, 1 layer, 5 neurons; solutions 0 and 1 correct
    a = np.array([
        [2.0, 1.0, 10.0, 0.5, 3.0],
        [4.0, 1.0, 10.0, 1.5, 3.0],
        [0.0, 1.0, 6.0, -1.0, -3.0],
        [0.0, 1.0, 6.0, -1.0, -3.0],
    ])[:, None, :]
    correct = [True, True, False, False]
    sc = R.critical_scores(a, correct, eps=0.0, layers=[3])
    np.testing.assert_allclose(sc.good[0], [3.0, 1.0, 10.0, 1.0, 3.0])
    np.testing.assert_allclose(sc.bad[0], [0.0, 1.0, 6.0, -1.0, -3.0])
    np.testing.assert_allclose(sc.w[0], [3.0, 0.0, 4.0, 2.0, 6.0])
    np.testing.assert_allclose(sc.rel[0], [1.0, 0.0, 0.25, 1.0, 1.0])
    # rel first (three neurons tie at 1), then |w|
    assert R.rank_neurons(sc) == [(3, 4), (3, 0), (3, 3), (3, 2), (3, 1)]
    assert sc.at((3, 2)) == {"g": 10.0, "b": 6.0, "w": 4.0, "rel": 0.25}
    # binned rel: neurons within one bin order by |w|
    sc2 = R.critical_scores(np.array([[1.0, 9.0], [0.1, 1.0]]), [True, False], eps=0.0)
    assert R.rank_neurons(sc2) == [(0, 0), (0, 1)]  # rel 0.818 > 0.8
    assert R.rank_neurons(sc2, rel_resolution=0.1) == [(0, 1), (0, 0)]  # same bin: |w| 8 > 0.9
    table = R.scores_table(sc, R.rank_neurons(sc, 2))
    assert list(table["rank"]) == [1, 2] and list(table["neuron"]) == [4, 0]


def test_scores_drop_rows_without_positions_and_need_both_outcomes():
    a = np.array([[1.0, 2.0], [np.nan, np.nan], [0.0, 0.0]])
    sc = R.critical_scores(a, [True, True, False])
    assert sc.n_correct == 1 and sc.n_incorrect == 1 and sc.n_dropped == 1
    with pytest.raises(NeuronAuditError, match="correct and incorrect"):
        R.critical_scores(a, [True, True, True])


def test_bootstrap_resamples_problems_not_solutions():
    rng = np.random.default_rng(0)
    n_problems, width = 30, 6
    a = 5.0 + rng.normal(size=(n_problems, 1, width))  # no neuron changes sign between outcomes
    correct = np.arange(n_problems) % 2 == 0
    a[correct, 0, 0] += 2.0
    neurons = [(0, 0), (0, 1)]
    single = R.bootstrap_top_scores(a, correct, np.arange(n_problems), neurons, n_boot=1000, seed=3)
    # ten identical solutions per problem: resampling problems gives the same intervals ...
    repeated = R.bootstrap_top_scores(np.repeat(a, 10, axis=0), np.repeat(correct, 10),
                                      np.repeat(np.arange(n_problems), 10), neurons, n_boot=1000, seed=3)
    cols = ["g_low", "g_high", "w_low", "w_high", "rel_low", "rel_high"]
    np.testing.assert_allclose(single[cols].to_numpy(), repeated[cols].to_numpy())
    # ... while treating every solution as its own unit would shrink them about √10-fold
    naive = R.bootstrap_top_scores(np.repeat(a, 10, axis=0), np.repeat(correct, 10),
                                   np.arange(10 * n_problems), neurons, n_boot=1000, seed=3)
    assert (naive["w_high"] - naive["w_low"] < 0.5 * (single["w_high"] - single["w_low"])).all()
    row = single.iloc[0]
    assert row["w_low"] < row["w"] < row["w_high"] and row["w_low"] > 1.0 and row["top_share"] > 0.9
    assert single["n_problems"].iloc[0] == n_problems and single["n_defined"].iloc[0] == 1000
    with pytest.raises(NeuronAuditError, match="below the 1000"):
        R.bootstrap_top_scores(a, correct, np.arange(n_problems), neurons, n_boot=10)


# --- paired tests and accuracy ---------------------------------------------------------------------


def test_paired_difference_is_an_exact_mcnemar_on_discordant_problems():
    reference = np.array([True] * 10 + [False] * 30)
    condition = reference.copy()
    condition[10:22] = True  # 12 problems fixed
    condition[0:2] = False  # 2 broken
    out = R.paired_difference(reference, condition, n_boot=1000, seed=0)
    assert (out["only_condition_right"], out["only_reference_right"]) == (12, 2)
    assert out["mcnemar_p"] == pytest.approx(stats.binomtest(12, 14, 0.5).pvalue)
    assert out["delta"] == pytest.approx(10 / 40) and out["delta_low"] < 0.25 < out["delta_high"]
    table = R.outcomes_table(R.Outcome("none", reference, np.ones(40, bool)),
                             [R.Outcome("steer", condition, np.ones(40, bool), details={"strength": 1.0})],
                             n_boot=1000)
    assert list(table["condition"]) == ["none", "steer"] and table["mcnemar_p"].iloc[0] == 1.0
    assert table["accuracy"].iloc[1] == pytest.approx(20 / 40) and table["strength"].iloc[1] == 1.0
    lo, hi = stats.binomtest(20, 40).proportion_ci(method="wilson")
    assert (table["accuracy_low"].iloc[1], table["accuracy_high"].iloc[1]) == pytest.approx((lo, hi))
    kept = R.solved_retention(reference, condition)
    assert (kept["n_solved"], kept["still_solved"]) == (10, 8)
    nothing = R.solved_retention(np.zeros(4, bool), np.ones(4, bool))  # a model that solves none
    assert (nothing["n_solved"], nothing["retention"], nothing["retention_low"]) == (0, None, None)
    assert nothing["null_reasons"]["retention"] == "the reference solves none of these problems: nothing to retain"


def test_choose_setting_takes_the_best_validation_row_and_the_smallest_on_ties():
    import pandas as pd

    grid = pd.DataFrame({"n_top": [1, 1, 5, 5], "strength": [0.5, 1.0, 0.5, 1.0], "accuracy": [0.4, 0.6, 0.6, 0.5]})
    assert R.choose_setting(grid) == {"n_top": 1, "strength": 1.0, "accuracy": 0.6}


# --- the failure probe -----------------------------------------------------------------------------


def test_the_probe_auc_of_held_out_problems_that_all_failed_is_null_with_its_reason(tmp_path):
    """A model that solves no held-out problem (a random one) has no AUC: written as null, not NaN."""
    from neuronaudit.io import write_json

    entry = R.probe_auc([0.2, 0.4, 0.9, 0.1], [True] * 4, n_boot=1000)
    assert (entry["auc"], entry["auc_low"], entry["auc_high"]) == (None, None, None)
    assert entry["null_reasons"]["auc"] == "4 of 4 held-out problems failed: an AUC needs failed and solved problems"
    assert R.probe_auc([0.2, 0.4], [False, False], n_boot=1000)["null_reasons"]["auc_high"].startswith("0 of 2")
    write_json({"gate": entry}, tmp_path / "summary.json")  # strict JSON: NaN is refused
    both = R.probe_auc([0.9, 0.8, 0.1, 0.3], [True, True, False, False], n_boot=1000)
    assert both["auc"] == 1.0 and both["auc_low"] == 1.0 and "null_reasons" not in both


def test_probe_separates_a_separable_case_and_its_auc_ci_brackets_it():
    rng = np.random.default_rng(1)
    failed = np.arange(80) % 3 == 0
    x = rng.normal(size=(80, 4))
    x[failed, 1] -= 3.0  # a weak "carry" on the failing problems
    probe = R.fit_failure_probe(x[:40], failed[:40], l2=1.0)
    p = probe.probability(x[40:])
    auc, lo, hi = R.auc_with_ci(p, failed[40:], n_boot=1000, seed=0)
    assert probe.converged and auc > 0.95 and lo <= auc <= hi and hi <= 1.0
    assert probe.coef[1] < 0 and np.abs(probe.coef[1]) > np.abs(probe.coef[[0, 2, 3]]).max()
    assert (probe.fires(x[40:]) == failed[40:]).mean() > 0.9
    noise = R.roc_auc(rng.normal(size=200), rng.random(200) < 0.5)
    assert 0.35 < noise < 0.65
    assert R.roc_auc([1, 2, 3], [True, True, True]) != R.roc_auc([1, 2, 3], [True, True, True])  # NaN: one class
    roc = R.roc_points(p, failed[40:])
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert (roc["tpr"].iloc[-1], roc["fpr"].iloc[-1]) == (1.0, 1.0)
    t = R.youden_threshold(p, failed[40:])
    assert ((p >= t) == failed[40:]).mean() > 0.9
    assert R.gated_row_edits([True, False], ["e"]) == [("e",), ()]
    with pytest.raises(NeuronAuditError, match="failed and solved"):
        R.fit_failure_probe(x, np.zeros(80, bool))


# --- transfer between two families --------------------------------------------------------------

N_FEATURES = 6


def _planted_pair(vocab: int):
    """A llama (4 layers, width 64, MLP 128) and a GPT-2 (3 layers, width 48, MLP 96) in which
    neuron (0, 10 + k) of the llama and (0, 20 + 3k) of the GPT-2 both read token feature k."""
    llama = tiny_model("llama", seed=1, vocab_size=vocab)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_layer=3, n_embd=48, n_head=4, n_inner=96, n_positions=128)).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = [((0, 10 + k), (0, 20 + 3 * k)) for k in range(N_FEATURES)]
    with torch.no_grad():
        emb = torch.randn(vocab, 64, generator=gen)
        emb[:, N_FEATURES] = 2.0  # a constant axis: the llama gates read it
        llama.model.embed_tokens.weight.copy_(emb)
        llama.model.layers[0].self_attn.o_proj.weight.zero_()
        wte = torch.randn(vocab, 48, generator=gen)
        wte[:, :N_FEATURES] = emb[:, :N_FEATURES]
        gpt2.transformer.wte.weight.copy_(wte)
        gpt2.transformer.wpe.weight.zero_()
        attn = gpt2.transformer.h[0].attn.c_proj
        attn.weight.zero_()
        attn.bias.zero_()
        fc = gpt2.transformer.h[0].mlp.c_fc  # Conv1D: weight [n_embd, n_inner]
        for k, ((_, i), (_, j)) in enumerate(pairs):
            mlp = llama.model.layers[0].mlp
            mlp.gate_proj.weight[i] = 2.0 * torch.eye(64)[N_FEATURES]
            mlp.up_proj.weight[i] = 1.5 * torch.eye(64)[k]
            fc.weight[:, j] = 1.5 * torch.eye(48)[k]
            fc.bias[j] = 3.0
    return llama, gpt2, pairs


def test_transfer_recovers_a_planted_correspondence_across_families_better_than_a_random_mapping():
    vocab = 300
    llama, gpt2, pairs = _planted_pair(vocab)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, vocab, size=int(rng.integers(3, 7))))) for _ in range(80)]
    source = R.mean_activations(llama, adapter_for(llama), prompts, positions=("prompt",), batch_size=32)
    target = R.mean_activations(gpt2, adapter_for(gpt2), prompts, positions=("prompt",), batch_size=32)
    assert source.shape == (80, 4, 128) and target.shape == (80, 3, 96)
    neurons = [s for s, _ in pairs]
    for method in ("hungarian", "top"):
        matches = R.map_neurons(source, target, neurons, method=method, window=0.1)
        found = list(zip(matches["target_layer"], matches["target_neuron"]))
        assert sum(f == t for f, (_, t) in zip(found, pairs)) >= N_FEATURES - 1, (method, found)
        assert (matches["target_layer"] == 0).all()  # relative depth 0 matches only layer 0
    baseline = R.random_mapping(source, target, neurons, n_sets=20, seed=0, window=0.1)
    assert matches["abs_correlation"].mean() > 0.8 > 0.3 > baseline["abs_correlation"].mean()
    recovered = np.mean([(r.target_layer, r.target_neuron) == t for r, (_, t) in
                         zip(baseline.itertuples(), pairs * 20)])
    assert recovered < 0.1
    sc = R.critical_scores(source[:40], np.arange(40) % 2 == 0)
    carried = R.carry_steering(R.map_neurons(source, target, neurons), sc, source, target)
    edits = R.carried_edits(carried, 1.0, "add")
    assert [(e.layer, e.neuron) for e in edits] == [t for _, t in pairs]
    ratio = target[:, 0, 20].std() / source[:, 0, 10].std()
    assert edits[0].value == pytest.approx(np.sign(carried["correlation"].iloc[0]) * sc.at((0, 10))["w"] * ratio)


def test_depth_matching_uses_relative_depth():
    assert R.depth_matched_layers(0, 4, 3) == [0]
    assert R.depth_matched_layers(3, 4, 3) == [2]
    assert R.depth_matched_layers(2, 5, 3, window=0.0) == [1]
    assert R.depth_matched_layers(1, 4, 10, window=0.12) == [2, 3, 4]  # 1/3 against 2/9, 3/9, 4/9
    assert R.depth_matched_layers(1, 3, 2, window=0.1) == [0]  # none within: the nearest (tie → first)


# --- the planted carry neuron, end to end ----------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    tokenizer = planted_tokenizer()
    model = planted_reasoning_model(tokenizer)
    adapter = adapter_for(model)

    def encode(rows):
        return [tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in rows]

    def run(rows, **kw):
        tokens = R.solve(model, adapter, encode(rows), 4, eos_token_ids=eos_ids(model, tokenizer),
                         pad_token_id=pad_id(tokenizer), batch_size=16, **kw)
        replies = [tokenizer.decode(t) for t in tokens]
        return tokens, np.array([grade_planted(r, row["answer"]) for r, row in zip(replies, rows)])

    discovery, heldout = planted_reasoning_problems(32), planted_reasoning_problems(32, offset=1000)
    tokens, correct = run(discovery)
    acts = R.mean_activations(model, adapter, encode(discovery), tokens, pad_token_id=pad_id(tokenizer))
    scores = R.critical_scores(acts, correct)
    return {"model": model, "adapter": adapter, "tokenizer": tokenizer, "encode": encode, "run": run,
            "discovery": discovery, "heldout": heldout, "correct": correct, "acts": acts, "scores": scores,
            "tokens": tokens}


def test_planted_ranking_puts_the_carry_neuron_first_with_tight_problem_bootstrap(planted):
    correct, scores = planted["correct"], planted["scores"]
    assert correct.mean() == 0.5 and all(correct == [not r["hard"] for r in planted["discovery"]])
    top = R.rank_neurons(scores, 5)
    assert top[0] == CARRY
    c = scores.at(CARRY)
    assert c["g"] == pytest.approx(3.43, abs=0.05) and c["b"] == pytest.approx(-0.142, abs=0.01)
    table = R.bootstrap_top_scores(planted["acts"], correct, np.arange(len(correct)), top, n_boot=1000, seed=0)
    carry = table.iloc[0]
    assert carry["w_low"] > 3.0 and carry["top_share"] == 1.0 and carry["rel_low"] > 0.99


def test_planted_mean_activations_average_the_positions_that_predict_the_solution(planted):
    model, adapter, enc = planted["model"], planted["adapter"], planted["encode"](planted["discovery"][:3])
    tokens = planted["tokens"][:3]
    seen = {}

    def read(layer, a, ctx):
        seen[layer] = a[0].detach().clone()

    for k in range(3):
        with torch.no_grad(), NeuronHooks(adapter, on_activation=read):
            model(torch.tensor([enc[k] + tokens[k]]))
        p = len(enc[k])
        expected = seen[CARRY[0]][p - 1:, CARRY[1]].mean()
        assert planted["acts"][k, CARRY[0], CARRY[1]] == pytest.approx(float(expected), abs=1e-5)
    only_last = R.mean_activations(model, adapter, enc, tokens, positions=("last_prompt",))
    assert only_last[2, CARRY[0], CARRY[1]] == pytest.approx(float(seen[CARRY[0]][len(enc[2]) - 1, CARRY[1]]))
    assert only_last[0, CARRY[0], CARRY[1]] > 6.5  # an easy cue: the carry fires at the question's end


def test_planted_steering_toward_g_raises_heldout_accuracy_and_a_random_neuron_does_not(planted):
    run, scores, heldout = planted["run"], planted["scores"], planted["heldout"]
    _, base = run(heldout)
    assert base.mean() == 0.5
    [random_neuron] = R.random_same_layer([CARRY], planted["adapter"].n_neurons, 1, seed=0)
    outcomes = []
    for mode in ("blend", "add"):
        _, steered = run(heldout, edits=R.steering_edits([CARRY], scores, 1.0, mode))
        _, control = run(heldout, edits=R.random_steering_edits(random_neuron, [CARRY], scores, 1.0, mode))
        outcomes += [R.Outcome(f"critical-{mode}", steered, np.ones_like(steered)),
                     R.Outcome(f"random-{mode}", control, np.ones_like(control))]
        assert steered.mean() == 1.0 and (control == base).all()
    table = R.outcomes_table(R.Outcome("none", base, np.ones_like(base)), outcomes, n_boot=1000)
    critical = table[table["condition"].str.startswith("critical")]
    assert (critical["mcnemar_p"] < 1e-3).all() and (critical["delta_low"] > 0.3).all()
    assert (table[table["condition"].str.startswith("random")]["delta"] == 0).all()
    # a weak blend leaves the carry below its threshold: the effect grows with the strength
    _, weak = run(heldout, edits=R.steering_edits([CARRY], scores, 0.5, "blend"))
    assert weak.mean() == 0.5


def test_planted_ablation_of_the_carry_breaks_the_easy_problems_and_random_sets_do_not(planted):
    run, heldout, adapter = planted["run"], planted["heldout"], planted["adapter"]
    _, base = run(heldout)
    _, ablated = run(heldout, edits=R.ablation_edits([CARRY]))
    assert ablated.mean() == 0.0
    means = {CARRY: float(np.nanmean(planted["acts"][:, CARRY[0], CARRY[1]]))}
    _, mean_ablated = run(heldout, edits=R.ablation_edits([CARRY], "mean", means))
    assert mean_ablated.mean() == 0.0  # the mean (≈ 1.6) is below the carry's threshold 7/3
    for random_set in R.random_same_layer([CARRY], adapter.n_neurons, 3, seed=1):
        _, control = run(heldout, edits=R.ablation_edits(random_set))
        assert (control == base).all()


def test_planted_gate_predicts_failure_before_generation_and_gated_steering_does_no_harm(planted):
    run, encode, scores, adapter, model = (planted[k] for k in ("run", "encode", "scores", "adapter", "model"))
    critical = R.rank_neurons(scores, 3)
    cols = [(layer, i) for layer, i in critical]

    def features(rows):
        last = R.mean_activations(model, adapter, encode(rows), positions=("last_prompt",))
        return np.stack([last[:, layer, i] for layer, i in cols], axis=1)

    probe = R.fit_failure_probe(features(planted["discovery"]), ~planted["correct"])
    heldout = planted["heldout"]
    _, base = run(heldout)
    x = features(heldout)
    auc, lo, hi = R.auc_with_ci(probe.probability(x), ~base, n_boot=1000)
    assert auc == 1.0 and lo == 1.0
    fires = probe.fires(x)
    assert fires.mean() == 0.5 and (fires == ~base).all()
    edits = R.steering_edits([CARRY], scores, 1.0, "blend")
    _, gated = run(heldout, row_edits=R.gated_row_edits(fires, edits))
    assert gated.mean() == 1.0
    assert R.solved_retention(base, gated)["retention"] == 1.0


def test_planted_solve_per_row_edits_equal_separate_runs(planted):
    run, heldout, scores = planted["run"], planted["heldout"][:8], planted["scores"]
    edits = R.steering_edits([CARRY], scores, 1.0, "add")
    rows = [tuple(edits) if k % 2 else () for k in range(8)]
    mixed, _ = run(heldout, row_edits=rows)
    plain, _ = run(heldout)
    steered, _ = run(heldout, edits=edits)
    assert mixed == [steered[k] if k % 2 else plain[k] for k in range(8)]


def test_planted_sampled_solutions_are_reproducible_and_rows_without_positions_are_nan(planted):
    model, adapter, tokenizer, encode = (planted[k] for k in ("model", "adapter", "tokenizer", "encode"))
    prompts = encode(planted["heldout"][:6])
    kw = dict(eos_token_ids=eos_ids(model, tokenizer), pad_token_id=pad_id(tokenizer), batch_size=4, seed=3)
    index, sample, tokens = R.sample_solutions(model, adapter, prompts, 3, 4, temperature=1.0, **kw)
    assert list(index) == [0, 1, 2, 3, 4, 5] * 3 and list(sample) == [0] * 6 + [1] * 6 + [2] * 6
    assert R.sample_solutions(model, adapter, prompts, 3, 4, temperature=1.0, **kw)[2] == tokens
    greedy = R.sample_solutions(model, adapter, prompts, 3, 4, temperature=0.0, **kw)
    assert len(greedy[2]) == 6 and list(greedy[1]) == [0] * 6  # greedy: one solution per problem
    acts = R.mean_activations(model, adapter, prompts[:2], [[], tokens[1]], positions=("generated",))
    assert np.isnan(acts[0]).all() and np.isfinite(acts[1]).all()
