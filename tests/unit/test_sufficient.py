"""Sufficient neuron sets (WASD): the pure search, the batched clamp engine, and the planted pair."""

import math

import numpy as np
import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions import InterventionPlan, NeuronHooks
from neuronaudit.methods.sufficient import (
    ClampedPredictor,
    ForwardCounter,
    Predicate,
    candidate_neurons,
    control_table,
    covered,
    greedy_next_token,
    jaccard,
    last_token_activations,
    meets,
    pairwise_jaccard,
    precision_table,
    predicates_from_activation,
    random_same_layer_sets,
    search_sufficient_set,
    target_attribution,
    top_neurons,
    trace_table,
)
from neuronaudit.models.adapters import adapter_for
from neuronaudit.planted import (
    BOTH_CUES,
    FIRST_CUES,
    NO_CUES,
    SECOND_CUES,
    SUFFICIENT,
    planted_sufficient_model,
    planted_tokenizer,
)
from neuronaudit.testing import tiny_model

# --- the pure search on a rule-defined evaluate ----------------------------------------------

A, B, C, NOISE = (Predicate(1, 0, 2.0), Predicate(1, 1, 3.0), Predicate(2, 0, 1.0), Predicate(0, 5, -1.0, "le"))


def rule_evaluate(first, second, shortcut, calls):
    """Output kept on input j iff (A clamped or first[j]) and (B clamped or second[j]), or C clamped
    and shortcut[j]: A and B together are sufficient, C alone covers the most inputs."""

    def evaluate(sets):
        calls.append(len(sets))
        out = []
        for s in sets:
            keys = {p.key for p in s}
            kept = (first | (A.key in keys)) & (second | (B.key in keys))
            out.append(kept | (shortcut & (C.key in keys)))
        return np.array(out)

    return evaluate


@pytest.fixture
def features():
    rng = np.random.default_rng(3)
    n = 80
    return rng.random(n) < 0.5, rng.random(n) < 0.5, rng.random(n) < 0.75


def test_greedy_takes_the_shortcut_first_then_pruning_removes_it(features):
    first, second, shortcut = features
    calls = []
    result = search_sufficient_set(rule_evaluate(first, second, shortcut, calls), [NOISE, A, B, C], len(first),
                                   delta=0.1, max_size=5)
    assert result.reached
    assert set(result.grown) == {A, B, C}  # C had the highest precision alone
    assert set(result.predicates) == {A, B}  # and is redundant once A and B hold
    assert result.hits == result.n == len(first) and result.low >= 0.9
    assert result.baseline.hits == int((first & second).sum()) and result.baseline.predicates == ()
    # minimal: removing either predicate loses the guarantee
    prune_rows = [r for r in result.trace if r.phase == "prune" and len(r.predicates) == 1]
    assert prune_rows and all(not meets(r.hits, r.n, 0.1, 0.95) for r in prune_rows)
    # every distinct set is evaluated once: the cache answers repeats
    assert sum(calls) == result.n_sets_evaluated == len({frozenset(r.predicates) for r in result.trace})
    table = trace_table(result)
    assert len(table) == len(result.trace) and set(table["phase"]) == {"grow", "prune"}
    assert table.loc[table["chosen"], "neurons"].map(lambda ns: {tuple(n) for n in ns}).tolist() == [{A.key, B.key}]


def test_beam_search_finds_the_same_minimal_set(features):
    first, second, shortcut = features
    result = search_sufficient_set(rule_evaluate(first, second, shortcut, []), [NOISE, A, B, C], len(first),
                                   beam_width=3)
    assert set(result.predicates) == {A, B}


def test_the_wilson_bound_stops_a_search_on_too_few_inputs(features):
    first, second, shortcut = (f[:10] for f in features)
    result = search_sufficient_set(rule_evaluate(first, second, shortcut, []), [A, B, C], 10, delta=0.1,
                                   max_size=3)
    # a perfect 10/10 has a Wilson lower bound of 0.72 < 0.9: never reached, never pruned
    assert not result.reached and result.hits == 10 and result.low < 0.9
    assert not any(r.phase == "prune" for r in result.trace)
    assert meets(40, 40, 0.1, 0.95) and not meets(39, 40, 0.05, 0.95)


def test_a_search_that_needs_nothing_returns_the_empty_set():
    n = 60
    result = search_sufficient_set(lambda sets: np.ones((len(sets), n), bool), [A, B], n)
    assert result.predicates == () and result.reached and len(result.trace) == 1


def test_search_rejects_bad_arguments():
    with pytest.raises(NeuronAuditError, match="delta"):
        search_sufficient_set(lambda s: None, [A], 5, delta=0)
    with pytest.raises(NeuronAuditError, match="same neuron"):
        search_sufficient_set(lambda s: None, [A, Predicate(1, 0, 9.0)], 5)


# --- predicates, rankings, stability ----------------------------------------------------------


def test_predicates_take_a_fraction_of_the_observed_activation_and_its_sign():
    activation = np.array([[2.0, -4.0, 0.0]])
    preds = predicates_from_activation(activation, [(0, 0), (0, 1), (0, 2)], fraction=0.5)
    assert [(p.threshold, p.direction) for p in preds] == [(1.0, "ge"), (-2.0, "le"), (0.0, "ge")]
    assert preds[0].holds(1.5) and not preds[0].holds(0.9)
    assert preds[1].holds(-3.0) and not preds[1].holds(-1.0)
    edit = preds[1].edit()
    assert (edit.op, edit.value, edit.positions) == ("clamp", -2.0, ("last_prompt",))
    with pytest.raises(NeuronAuditError, match="fraction"):
        predicates_from_activation(activation, [(0, 0)], fraction=0.0)


def test_rankings_candidates_and_jaccard():
    score = np.array([[0.1, -5.0, 0.2], [3.0, np.nan, 0.0]])
    assert top_neurons(score, 2) == [(0, 1), (1, 0)]
    assert top_neurons(score, 2, exclude=[(0, 1)]) == [(1, 0), (0, 2)]
    assert top_neurons(score, 0) == []  # the baseline of an empty sufficient set is empty
    other = np.array([[9.0, 0.0, 0.0], [0.0, 0.0, 8.0]])
    assert candidate_neurons([score, other], 2) == [(0, 1), (0, 0), (1, 0), (1, 2)]
    assert jaccard([(0, 1), (1, 2)], [(1, 2), (2, 2)]) == pytest.approx(1 / 3)
    assert jaccard([A], [Predicate(1, 0, 7.0)]) == 1.0  # a predicate counts by its neuron
    assert jaccard([], []) == 1.0
    assert pairwise_jaccard([[(0, 1)], [(0, 1)], [(0, 2)]]) == [1.0, 0.0, 0.0]


def test_random_sets_draw_other_neurons_of_the_same_layers():
    activation = np.arange(2 * 6, dtype=float).reshape(2, 6) - 4
    found = predicates_from_activation(activation, [(0, 1), (1, 3)], 0.8)
    sets = random_same_layer_sets(found, activation, 0.8, n_sets=20, seed=0)
    assert len(sets) == 20
    for s in sets:
        assert [p.layer for p in s] == [0, 1]
        assert not {p.key for p in s} & {p.key for p in found}
        for p in s:
            assert p.threshold == pytest.approx(0.8 * activation[p.layer, p.neuron])
    assert len({tuple(p.key for p in s) for s in sets}) > 1
    assert sets == random_same_layer_sets(found, activation, 0.8, n_sets=20, seed=0)


# --- the batched clamp engine equals one forward per (input, set), on two families -------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_clamps_equal_one_forward_per_row(family, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    texts = ["The river flows", "Hello! How are you today?", "List three benefits of water", "Cats"]
    inputs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    sets = [(), (Predicate(0, 3, 4.0), Predicate(2, 7, -3.0, "le")), (Predicate(3, 100, 6.0),)]
    counter = ForwardCounter()
    predictor = ClampedPredictor(model, adapter, inputs, target_id=5, pad_id=tokenizer.pad_token_id,
                                 batch_size=2, counter=counter, prefix_batch=3)
    out = predictor.outputs(sets)
    # the prefixes of each group of three inputs run once, left-padded together (a group of
    # one-token inputs has none); then the twelve (input, set) rows run two at a time, per group
    groups = [inputs[:3], inputs[3:]]
    prefix_calls = sum(max(len(ids) for ids in g) > 1 for g in groups)
    assert counter.forward_calls == prefix_calls + sum(math.ceil(len(g) * len(sets) / 2) for g in groups)
    assert counter.tokens == sum(len(ids) - 1 for ids in inputs) + 12
    for s, predicates in enumerate(sets):
        for j, ids in enumerate(inputs):
            plan = InterventionPlan.broadcast([p.edit() for p in predicates])
            with torch.no_grad(), NeuronHooks(adapter, plan):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert out.top_token[s, j] == int(logits.argmax())
            assert out.target_logprob[s, j] == pytest.approx(float(torch.log_softmax(logits, -1)[5]), abs=1e-4)
    # the clamps change the output somewhere (the test would pass vacuously otherwise)
    assert not np.allclose(out.target_logprob[0], out.target_logprob[1])
    assert (predictor(sets) == (out.top_token == 5)).all()


def test_a_search_on_a_tiny_random_model_reports_precision_that_re_evaluation_confirms(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer), seed=1)
    adapter = adapter_for(model)
    source = tokenizer("The river flows through the old city", add_special_tokens=False)["input_ids"]
    target = greedy_next_token(model, source)
    activation, attribution = target_attribution(model, adapter, source, target)
    assert activation.shape == attribution.shape == (adapter.n_layers, adapter.n_neurons)
    fillers = ["past the market", "and the cathedral", "today", "at home", "with bread", "by the road"]
    rng = np.random.default_rng(0)
    inputs = [tokenizer(f"The river flows {rng.choice(fillers)} {rng.choice(fillers)}",
                        add_special_tokens=False)["input_ids"] for _ in range(30)]
    candidates = predicates_from_activation(activation, top_neurons(attribution, 6), 1.0)
    counter = ForwardCounter()
    predictor = ClampedPredictor(model, adapter, inputs, target, tokenizer.pad_token_id, batch_size=64,
                                 counter=counter)
    result = search_sufficient_set(predictor, candidates, len(inputs), delta=0.2, max_size=3)
    again = predictor([result.predicates]).sum()
    assert again == result.hits
    # one prefix pass per input, then one position per (input, set) evaluated (and the re-evaluation)
    assert counter.sequences == (result.n_sets_evaluated + 1) * len(inputs) + len(inputs)


# --- the planted ground truth ------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    tokenizer = planted_tokenizer()
    model = planted_sufficient_model(tokenizer)
    return model, adapter_for(model), tokenizer


def planted_texts(cues, n, seed):
    """Filler sentences ending in a cue word drawn from ``cues``."""
    rng = np.random.default_rng(seed)
    subjects = ["the lamp", "a river", "the market", "my garden", "the old city", "a small boat"]
    words = ["bread", "water", "energy", "steps", "today", "health"]
    return [f"Note about {rng.choice(words)}: {rng.choice(subjects)} looks {rng.choice(cues)}" for _ in range(n)]


def ids_of(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_the_search_recovers_exactly_the_planted_pair_and_attribution_misses_it(planted):
    model, adapter, tokenizer = planted
    cues = (*BOTH_CUES, *FIRST_CUES, *SECOND_CUES, *NO_CUES)
    source = ids_of(tokenizer, ["Note about bread: the lamp looks red"])[0]
    target = greedy_next_token(model, source)
    assert tokenizer.decode([target]) == " yes"
    activation, attribution = target_attribution(model, adapter, source, target)

    # the contrastive screen: last-token activations on prompts with the target vs without
    def last_token_activations(texts):
        return np.stack([target_attribution(model, adapter, ids, target)[0] for ids in ids_of(tokenizer, texts)])

    with_target = last_token_activations(planted_texts(BOTH_CUES, 8, seed=1))
    without = last_token_activations(planted_texts((*FIRST_CUES, *SECOND_CUES, *NO_CUES), 8, seed=2))
    screen = with_target.mean(0) - without.mean(0)
    neurons = candidate_neurons([attribution, screen], 6)
    assert {SUFFICIENT.first, SUFFICIENT.second} <= set(neurons) and len(neurons) <= 12
    candidates = predicates_from_activation(activation, neurons, fraction=0.8)

    # perturbations: the cue word and the filler vary; the model keeps " yes" only on both-feature cues
    search_inputs = ids_of(tokenizer, planted_texts(cues, 64, seed=10))
    counter = ForwardCounter()
    predictor = ClampedPredictor(model, adapter, search_inputs, target, tokenizer.pad_token_id, batch_size=128,
                                 counter=counter)
    result = search_sufficient_set(predictor, candidates, len(search_inputs), delta=0.1)
    assert result.reached
    assert set(result.neurons) == {SUFFICIENT.first, SUFFICIENT.second}
    assert result.precision >= 0.95 and result.low >= 0.9
    assert result.baseline.precision < 0.5
    assert counter.sequences > 0 and counter.forward_calls <= counter.sequences

    # fresh perturbations the search never saw
    fresh = ClampedPredictor(model, adapter, ids_of(tokenizer, planted_texts(cues, 64, seed=99)), target,
                             tokenizer.pad_token_id, batch_size=128)
    found, by_attribution, by_screen = (
        tuple(predicates_from_activation(activation, top, 0.8))
        for top in ([p.key for p in result.predicates], top_neurons(attribution, 2), top_neurons(screen, 2))
    )
    hits = fresh([found, by_attribution, by_screen]).mean(1)
    assert hits[0] >= 0.95
    # the baselines of the same size: attribution ranks the always-on neuron first, the screen the noise
    assert set(top_neurons(attribution, 2)) == {SUFFICIENT.always, SUFFICIENT.first}
    assert not {SUFFICIENT.first, SUFFICIENT.second} & set(top_neurons(screen, 2))
    assert hits[1] < 0.8 and hits[2] < 0.5

    # control: the set forces " yes" on inputs without it; random same-layer sets do not
    lacking = ClampedPredictor(model, adapter, ids_of(tokenizer, planted_texts(NO_CUES, 32, seed=5)), target,
                               tokenizer.pad_token_id, batch_size=128)
    random_sets = random_same_layer_sets(found, activation, 0.8, n_sets=10, seed=0)
    forced = lacking([(), found, *random_sets]).mean(1)
    assert forced[0] == 0.0 and forced[1] == 1.0 and forced[2:].max() == 0.0

    # the check tables: fresh precision with intervals, coverage, and control against random sets
    table = precision_table(model, adapter, fresh, {"found": found, "attribution": by_attribution,
                                                    "screen": by_screen}).set_index("set")
    assert table.loc["found", "precision"] == hits[0] and table.loc["found", "precision_low"] >= 0.9
    assert table.loc["attribution", "precision_high"] < table.loc["found", "precision_low"]
    # the pair holds unclamped exactly on the both-feature cues (a quarter of the cue words), where
    # the unclamped answer is always the target
    cues_of = [t.rsplit(" ", 1)[1] for t in planted_texts(cues, 64, seed=99)]
    assert table.loc["found", "covered"] == sum(c in BOTH_CUES for c in cues_of)
    assert table.loc["found", "precision_covered"] == 1.0
    control = control_table(lacking, found, random_sets)
    row = control.set_index("set").loc["found"]
    assert row["forcing_rate"] == 1.0 and row["forcing_low"] > 0.85 and row["random_at_least"] == 0.0
    assert (control["set"] == "random").sum() == 10


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_last_token_activations_read_the_unpadded_last_token(family, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    inputs = ids_of(tokenizer, ["The river flows", "Hello! How are you today?", "Cats"])
    neurons = [(2, 5), (0, 17), (2, 100)]
    acts = last_token_activations(model, adapter, inputs, neurons, batch_size=2)
    for j, ids in enumerate(inputs):
        single = target_attribution(model, adapter, ids, 0)[0]
        assert acts[j] == pytest.approx([single[layer, i] for layer, i in neurons], abs=1e-5)
    preds = predicates_from_activation(acts[:1], [(0, 0), (0, 1), (0, 2)], 1.0)
    held = covered(preds, acts)
    assert held[0] and held.dtype == bool


def test_the_planted_pair_is_stable_across_disjoint_perturbation_sets_and_prompts(planted):
    model, adapter, tokenizer = planted
    cues = (*BOTH_CUES, *FIRST_CUES, *SECOND_CUES, *NO_CUES)
    found = []
    for seed, cue in ((20, "red"), (21, "blue"), (22, "red")):
        source = ids_of(tokenizer, [f"Note about water: a river looks {cue}"])[0]
        target = greedy_next_token(model, source)
        activation, attribution = target_attribution(model, adapter, source, target)
        candidates = predicates_from_activation(activation, top_neurons(attribution, 8), 0.8)
        predictor = ClampedPredictor(model, adapter, ids_of(tokenizer, planted_texts(cues, 48, seed)), target,
                                     tokenizer.pad_token_id, batch_size=128)
        found.append(search_sufficient_set(predictor, candidates, 48, delta=0.1).neurons)
    assert pairwise_jaccard(found) == [1.0, 1.0, 1.0]
    assert set(found[0]) == {SUFFICIENT.first, SUFFICIENT.second}
