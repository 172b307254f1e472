"""The adaptive dose search: the search itself, recorded sweeps, and the tiny model.

What is claimed (``neuronaudit.methods.dose_search``): the search returns, per target, the first
rolled-out grid point where the target's predicate holds. That point always satisfies the
predicate and is never below the full grid's first crossing; it equals the full grid's when the
predicate is monotone over the grid, or when no grid point below it was skipped. The window's
ceiling is the collapse target; a trigger below the ceiling is found through the
flip-or-collapse target, so it is exact when flip-or-collapse is monotone and the trigger is where it
first holds (a trigger at or below the ceiling).
"""

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from neuronaudit.evaluation.judge import RuleJudge, RuleThresholds
from neuronaudit.evaluation.stats import crossing_bootstrap, crossing_bootstrap_bounds
from neuronaudit.methods import window as law
from neuronaudit.methods.dose_search import (
    SearchState,
    first_visited,
    full_grid_first,
    gallop_indices,
    is_monotone,
    next_probe,
    path_result,
    run_searches,
    search_recorded,
    unvisited_below,
)

# --------------------------------------------------------------------------------------------
# the search on bare predicates
# --------------------------------------------------------------------------------------------


def test_gallop_indices():
    assert gallop_indices(1) == [0]
    assert gallop_indices(2) == [0, 1]
    assert gallop_indices(8) == [0, 1, 3, 7]
    assert gallop_indices(9) == [0, 1, 3, 7, 8]
    assert gallop_indices(20) == [0, 1, 3, 7, 15, 19]


def _search(outcomes, at_once=False):
    state, _ = search_recorded({"k": {"p": list(outcomes)}}, gallop_at_once=at_once)
    return state["k"]


@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("n", range(1, 33))
def test_monotone_predicates_give_the_full_grid_crossing(n, at_once):
    for first in [*range(n), None]:
        outcomes = [first is not None and i >= first for i in range(n)]
        s = _search(outcomes, at_once)
        assert s.result("p") == first == s.path_result("p")
        assert len(s.visited) <= 2 * math.ceil(math.log2(n + 1)) + 1


@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("n", range(1, 11))
def test_every_predicate_gives_a_point_where_it_holds_never_below_the_full_grid(n, at_once):
    """All 2^n predicates on n grid points, monotone or not."""
    for outcomes in itertools.product([False, True], repeat=n):
        s = _search(outcomes, at_once)
        assert set(gallop_indices(n)) <= set(s.visited) or not at_once
        found, full = s.result("p"), full_grid_first(outcomes)
        known = s.known("p")
        assert found == first_visited(known)
        if found is None:
            # nothing visited holds; the full grid finds one only at a point not rolled out
            assert full is None or full not in s.visited
            continue
        assert outcomes[found] and full is not None and full <= found
        if unvisited_below(n, s.visited, found) == 0:
            assert found == full
        if is_monotone(outcomes):
            assert found == full
        r = s.path_result("p")  # the path's own answer is a rising edge
        assert outcomes[r] and (r == 0 or (r - 1 in known and not known[r - 1])) and found <= r


def test_next_probe_replays_the_path():
    assert next_probe(9, {}) == 0
    assert next_probe(9, {0: False, 1: False}) == 3
    assert next_probe(9, {0: False, 1: False, 3: False, 7: True}) == 5
    assert next_probe(9, {0: False, 1: False, 3: False, 7: True, 5: True}) == 4
    assert next_probe(9, {0: False, 1: False, 3: False, 7: True, 5: True, 4: False}) is None
    assert path_result(9, {0: False, 1: False, 3: False, 7: True, 5: True, 4: False}) == 5
    assert next_probe(9, {0: False, 1: False, 3: False, 7: False, 8: False}) is None


def test_searches_share_rounds_and_do_not_depend_on_each_other():
    rng = np.random.default_rng(0)
    recorded = {k: {t: list(rng.random(12) < 0.3) for t in ("a", "b")} for k in range(6)}
    together, rounds = search_recorded(recorded)
    for k in recorded:  # each search alone visits exactly what it visits beside the others
        alone, _ = search_recorded({k: recorded[k]})
        assert alone[k].visited == together[k].visited
    # one evaluation per round, with every unfinished search's probes
    calls = []
    states = {k: SearchState(12, ("a", "b")) for k in recorded}

    def evaluate(points):
        calls.append(points)
        return {(k, i): {t: recorded[k][t][i] for t in ("a", "b")} for k, i in points}

    run_searches(states, evaluate)
    assert calls == rounds and len(calls) <= 2 * 4 + 1
    assert sum(len(c) for c in calls) == sum(len(s.visited) for s in together.values())


# --------------------------------------------------------------------------------------------
# recorded sweeps: synthetic full-grid tables, searched through the window's own code
# --------------------------------------------------------------------------------------------

GRID = [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]
HORIZONS = [8, 16]


def recorded_sweeps(seed: int, n_neurons: int = 8, n_prompts: int = 12, noise: float = 0.0) -> pd.DataFrame:
    """A full-grid sweep table as the window writes it. Each prompt of each (neuron, sign) flips
    from its own dose and collapses from a later one (later still at the shorter horizon);
    ``noise`` flips that share of the outcomes at random, making the dose response non-monotone.
    Flips need a coherent rollout, as in the window."""
    rng = np.random.default_rng(seed)
    rows = [{"behaviour": "b", "layer": 1, "neuron": 0, "kind": "baseline", "sign": 0, "x": 0.0, "dose": 0.0,
             "grid_index": -1, "grid_size": len(GRID), "prompt_id": f"p{p}", "horizon": h,
             "flip": p == 0, "collapse": False} for h in HORIZONS for p in range(n_prompts)]
    G = len(GRID)
    for neuron in range(n_neurons):
        layer = 1 + neuron % 3
        for sign in (1, -1):
            centre_t, centre_c = rng.integers(0, G + 3), rng.integers(2, G + 4)
            for p in range(n_prompts):
                t_p = centre_t + rng.integers(-1, 2)
                c_p = centre_c + rng.integers(-1, 2)
                for i, x in enumerate(GRID):
                    for h in HORIZONS:
                        collapse = i >= c_p + (1 if h < max(HORIZONS) else 0)
                        flip = i >= t_p
                        if noise:
                            collapse ^= bool(rng.random() < noise)
                            flip ^= bool(rng.random() < noise)
                        rows.append({"behaviour": "b", "layer": layer, "neuron": neuron, "kind": "screened",
                                     "sign": sign, "x": sign * x, "dose": sign * x * 10.0, "grid_index": i,
                                     "grid_size": G, "prompt_id": f"p{p}", "horizon": h,
                                     "collapse": collapse, "flip": flip and not collapse})
    return pd.DataFrame(rows)


class RecordedRollouts:
    """Reads the rows of a recorded full sweep for the points asked, as a rollout would type them."""

    def __init__(self, full: pd.DataFrame):
        self.full = full
        self.calls = []

    def __call__(self, points):
        self.calls.append(len(points))
        keys = ["layer", "neuron", "sign", "grid_index", "kind"]
        want = pd.DataFrame([{k: p[k] for k in keys} for p in points])
        return want.merge(self.full, on=keys, how="left")


def neurons_of(full: pd.DataFrame) -> pd.DataFrame:
    d = full[full.kind != "baseline"].drop_duplicates(["layer", "neuron"])
    return d[["behaviour", "layer", "neuron", "kind"]].reset_index(drop=True)


def geometry_of(neurons: pd.DataFrame) -> pd.DataFrame:
    return neurons.assign(budget=10.0, c0=0.0)[["layer", "neuron", "budget", "c0"]]


def readout(sweeps: pd.DataFrame, horizons=HORIZONS) -> pd.DataFrame:
    """Ceiling and per-horizon triggers per (neuron, sign) by the window's readout."""
    keys = ["behaviour", "layer", "neuron", "sign"]
    final = max(horizons)
    dosed = sweeps[sweeps.kind != "baseline"]
    at = dosed[dosed.horizon == final]
    table = law.crossings(at.assign(x=at.x.abs()), "collapse", keys).rename(columns={"collapse_x": "ceiling_x"})
    base = law.baseline_rates(sweeps)
    for h in horizons:
        table = table.merge(law.triggers(dosed, base, h, keys), on=keys, how="outer")
    return table.set_index(keys[1:]).sort_index()


def predicates(full: pd.DataFrame, horizons=HORIZONS) -> dict:
    """The search targets' predicates at every grid index, from the full table."""
    base = full[full.kind == "baseline"].groupby("horizon")["flip"].mean()
    dosed = full[full.kind != "baseline"]
    out = {}
    for (layer, neuron, sign), g in dosed.groupby(["layer", "neuron", "sign"]):
        c = g[g.horizon == max(horizons)].groupby("grid_index")["collapse"].mean().ge(law.CEILING_LEVEL)
        preds = {"collapse": list(c)}
        for h in horizons:
            f = g[g.horizon == h].groupby("grid_index")["flip"].agg(["sum", "size"])
            preds[f"trigger_{h}"] = [law.trigger_holds(int(k), int(n), float(base[h])) for k, n in f.to_numpy()]
        out[(layer, neuron, sign)] = preds
    return out


def check_against_full_grid(full: pd.DataFrame, sparse: pd.DataFrame, grid=GRID, horizons=HORIZONS) -> dict:
    """Assert the stated relation between the adaptive and the full readout; count the cases."""
    a, f = readout(sparse, horizons), readout(full, horizons)
    preds = predicates(full, horizons)
    counts = {"ceiling_exact_by_monotonicity": 0, "ceiling_nonmonotone": 0, "trigger_exact_by_monotonicity": 0,
              "trigger_nonmonotone": 0, "trigger_absent": 0, "differs": 0}
    as_index = lambda x: None if np.isnan(x) else grid.index(x)  # noqa: E731
    for key, p in preds.items():
        visited = sorted(sparse[(sparse.layer == key[0]) & (sparse.neuron == key[1]) & (sparse.sign == key[2])]
                         ["grid_index"].unique())
        fc, ac = as_index(f.loc[key, "ceiling_x"]), as_index(a.loc[key, "ceiling_x"])
        if ac is not None:  # always a point where it holds, never below the full grid's
            assert p["collapse"][ac] and fc is not None and fc <= ac
        if is_monotone(p["collapse"]) or unvisited_below(len(grid), visited, ac) == 0:
            assert ac == fc
            counts["ceiling_exact_by_monotonicity"] += 1
        else:
            counts["ceiling_nonmonotone"] += 1
        for h in horizons:
            ft, at = as_index(f.loc[key, f"trigger_x_{h}"]), as_index(a.loc[key, f"trigger_x_{h}"])
            if at is not None:
                assert p[f"trigger_{h}"][at] and ft is not None and ft <= at
            if ft is None:  # no trigger on the full grid: none on a subset of it
                assert at is None
                counts["trigger_absent"] += 1
                continue
            either = [t or c for t, c in zip(p[f"trigger_{h}"], p["collapse"])]
            # the trigger is where the rollouts first leave the unintervened regime (at or below the ceiling)
            first_exit = ft == full_grid_first(either)
            if (is_monotone(either) and first_exit) or unvisited_below(len(grid), visited, at) == 0:
                assert at == ft
                counts["trigger_exact_by_monotonicity"] += 1
            else:
                counts["trigger_nonmonotone"] += 1
                counts["differs"] += int(at != ft)
        final = max(horizons)
        if is_monotone(p["collapse"]) and is_monotone([t or c for t, c in zip(p[f"trigger_{final}"], p["collapse"])]):
            # the verdict (a trigger below the ceiling) is the full grid's
            fv = law.verdict(f.loc[key, f"trigger_x_{final}"], f.loc[key, "ceiling_x"])
            av = law.verdict(a.loc[key, f"trigger_x_{final}"], a.loc[key, "ceiling_x"])
            assert fv == av
    return counts


def run_adaptive(full: pd.DataFrame, at_once: bool = True):
    rollouts = RecordedRollouts(full)
    neurons = neurons_of(full)
    sparse, record = law.sweep_behaviour_search(rollouts, neurons, geometry_of(neurons), GRID, HORIZONS,
                                                gallop_at_once=at_once)
    return sparse, record, rollouts


@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_recorded_monotone_sweeps_give_the_full_grid_ceilings_and_triggers(seed, at_once):
    full = recorded_sweeps(seed)
    sparse, record, rollouts = run_adaptive(full, at_once)
    # the rows the search rolled out are the full grid's rows at those points
    keys = ["layer", "neuron", "sign", "grid_index", "prompt_id", "horizon"]
    both = sparse.merge(full, on=keys, suffixes=("", "_full"))
    assert len(both) == len(sparse)
    assert (both["collapse"] == both["collapse_full"]).all() and (both["flip"] == both["flip_full"]).all()
    assert record["n_points"] < record["n_points_full_grid"] and rollouts.calls == record["rounds"]
    assert set(sparse["search"]) == {"adaptive"} and (sparse.kind == "baseline").any()
    counts = check_against_full_grid(full, sparse)
    assert counts["ceiling_exact_by_monotonicity"] > 0 and counts["trigger_exact_by_monotonicity"] > 0


def test_every_ceiling_and_trigger_of_monotone_recorded_sweeps_is_exact():
    """Every prompt with the same thresholds: both predicates monotone for every (neuron, sign)."""
    full = recorded_sweeps(11)
    # one prompt's outcomes copied to all: the shares are 0 or 1, so every predicate is monotone
    first = full[full.prompt_id == "p1"]
    full = pd.concat([first.assign(prompt_id=f"p{p}") for p in range(12)], ignore_index=True)
    sparse, _, _ = run_adaptive(full)
    a, f = readout(sparse), readout(full)
    pd.testing.assert_frame_equal(a, f)
    for p in predicates(full).values():
        assert is_monotone(p["collapse"])


@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_non_monotone_recorded_sweeps_obey_the_stated_bounds(seed, at_once):
    full = recorded_sweeps(100 + seed, noise=0.15)
    sparse, _, _ = run_adaptive(full, at_once)
    counts = check_against_full_grid(full, sparse)
    # noise makes some predicates non-monotone; where the answers differ, points were skipped
    assert counts["ceiling_nonmonotone"] + counts["trigger_nonmonotone"] > 0


def test_window_table_of_an_adaptive_sweep_records_the_search_and_bounds_the_prompt_bootstrap():
    full = recorded_sweeps(3, noise=0.05)
    sparse, _, _ = run_adaptive(full)
    neurons = neurons_of(full)
    single = pd.DataFrame([{"layer": n.layer, "neuron": n.neuron, "x": s * x, "kl": x, "entropy": 1.0,
                            "alignment_write": 0.99, "alignment_readout": 0.95}
                           for n in neurons.itertuples() for x in GRID for s in (1, -1)])
    with pytest.raises(Exception, match="x_grid"):
        law.window_table(sparse, single, neurons, geometry_of(neurons), HORIZONS, 4, 2, 0)
    ta, _ = law.window_table(sparse, single, neurons, geometry_of(neurons), HORIZONS, 4, 2, 0, x_grid=GRID)
    tf, _ = law.window_table(full, single, neurons, geometry_of(neurons), HORIZONS, 4, 2, 0, x_grid=GRID)
    keys = ["behaviour", "layer", "neuron", "sign"]
    both = ta.merge(tf, on=keys, suffixes=("", "_full"))
    assert (both["search"] == "adaptive").all() and (both["search_full"] == "full").all()
    assert (both["n_grid_points"] == len(GRID)).all() and (both["n_grid_visited"] < len(GRID)).all()
    assert (both["n_grid_visited_full"] == len(GRID)).all() and (both["ceiling_unvisited_below_full"] == 0).all()
    assert (both["grid_max_x"] == max(GRID)).all() and (both["grid_min_x"] == min(GRID)).all()
    for v in ("collapse", "flip"):
        lo, hi = both[f"{v}_x_ci_low"], both[f"{v}_x_ci_high"]
        assert (lo <= both[f"{v}_x_ci_low_full"]).all() and (hi >= both[f"{v}_x_ci_high_full"]).all()
        exact = both[f"{v}_x_ci_exact"]
        assert both[f"{v}_x_ci_exact_full"].all()
        assert (lo[exact] == both.loc[exact, f"{v}_x_ci_low_full"]).all()
        assert (hi[exact] == both.loc[exact, f"{v}_x_ci_high_full"]).all()
        share = both[f"{v}_x_share_crossing"]
        assert (share.isna() | (share == both[f"{v}_x_share_crossing_full"])).all()
    # a value with no skipped grid point below it is the full grid's
    same = both["ceiling_unvisited_below"] == 0
    assert np.array_equal(both.loc[same, "ceiling_x"].to_numpy(), both.loc[same, "ceiling_x_full"].to_numpy(),
                          equal_nan=True)
    summary = law.search_summary("adaptive", {"b": law.search_record({"search": "adaptive", "n_points": 10,
                                                                       "n_points_full_grid": 40, "rounds": [6, 4]},
                                                                      n_prompts=12)}, ta)
    assert summary["n_rollouts"] == 120 and summary["n_rollouts_full_grid"] == 480
    assert "n_ceilings_with_unvisited_points_below" in summary["dose_search"]


def test_the_bounded_prompt_bootstrap_is_the_plain_one_on_a_full_grid():
    rng = np.random.default_rng(0)
    hits = (rng.random((12, 6)) < np.linspace(0.1, 0.9, 6)).astype(float)
    x = np.arange(1, 7, dtype=float)
    share, lo, hi = crossing_bootstrap(hits, x, n_boot=1000, seed=3)
    b = crossing_bootstrap_bounds(hits, x, (), n_boot=1000, seed=3)
    assert (b.share_low, b.share_high, b.ci_low, b.ci_high, b.exact) == (share, share, lo, hi, True)
    keep = [0, 2, 5]  # rolled out 1, 3, 6: the interval contains the full grid's
    c = crossing_bootstrap_bounds(hits[:, keep], x[keep], [2.0, 4.0, 5.0], n_boot=1000, seed=3)
    assert c.ci_low <= lo and c.ci_high >= hi and c.share_low <= share <= c.share_high


# --------------------------------------------------------------------------------------------
# the tiny model: rollouts, not recordings
# --------------------------------------------------------------------------------------------

TINY_GRID = [0.02, 0.0389, 0.0757, 0.1474, 0.2867, 0.558, 1.0858, 2.1128, 4.1112, 8.0]
TINY_HORIZONS = [4, 12]


@pytest.fixture(scope="module")
def tiny_window(tokenizer):
    """A tiny llama whose neuron (3, 5) writes onto the unembedding row of a word token: doses
    make it say the word (a flip at 4 tokens), then repeat it (a collapse at 12)."""
    from neuronaudit.models.adapters import adapter_for
    from neuronaudit.testing import tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer))
    adapter = adapter_for(model)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    word = next(i for i in range(100, len(tokenizer))
                if tokenizer.decode([i]).strip().isalpha() and len(tokenizer.decode([i]).strip()) >= 4)
    with torch.no_grad():
        u = model.lm_head.weight[word] / model.model.norm.weight
        adapter.write_matrix(3)[:, 5] = u / u.norm() * adapter.write_matrix(3).norm(dim=0).mean()
    texts = ["The river flows through the old city.", "Cats are animals.", "Hello there!",
             "Tell me about the sea.", "What is two plus two?", "Name a colour."]
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(texts))], "text": texts, "extra": "{}"})
    geometry = law.generic_geometry(model, tokenizer, adapter, texts)
    neurons = pd.DataFrame({"behaviour": "b", "layer": [3, 1, 2], "neuron": [5, 11, 20], "kind": "screened"})
    judge = RuleJudge(RuleThresholds(max_repetition_ratio=0.5, max_perplexity=1e9, max_entropy=1e9,
                                     max_word_repetition=1.0, min_alpha_fraction=0.0))
    spec = {"oracle": "regex", "pattern": re.escape(tokenizer.decode([word]).strip()),
            "positive": "pos", "negative": "neg"}

    def sweep(search, row_batch_size=64):
        rollouts = law.BehaviourRollouts(model, tokenizer, adapter, judge, "b", spec, prompts, TINY_HORIZONS,
                                         "none", None, row_batch_size)
        frame, record = law.sweep_behaviour_search(rollouts, neurons, geometry, TINY_GRID, TINY_HORIZONS, search)
        return frame, record, rollouts

    return sweep


def test_tiny_model_adaptive_rows_equal_the_full_grid_rows(tiny_window):
    full, full_record, full_rollouts = tiny_window("full")
    sparse, record, rollouts = tiny_window("adaptive", row_batch_size=5)  # other batches than the full sweep's
    assert full_record["n_points"] == full_record["n_points_full_grid"] == 1 + 3 * 2 * len(TINY_GRID)
    assert rollouts.n_rollouts == record["n_points"] * 6 < full_rollouts.n_rollouts
    keys = ["kind", "layer", "neuron", "sign", "grid_index", "prompt_id", "horizon"]
    both = sparse.merge(full, on=keys, suffixes=("", "_full"), validate="one_to_one")
    assert len(both) == len(sparse) and len(sparse) < len(full)
    for col in ("x", "dose", "response", "n_tokens", "rollout_type", "collapse", "flip", "repetition_ratio"):
        assert (both[col] == both[f"{col}_full"]).all(), col
    for col in ("perplexity", "entropy"):  # batch shapes change float rounding only
        np.testing.assert_allclose(both[col], both[f"{col}_full"], rtol=1e-4)
    # the sparse table lists its rows in the full table's order
    order = full.reset_index().merge(sparse[keys], on=keys)["index"]
    assert order.is_monotonic_increasing


def test_tiny_model_adaptive_ceilings_and_triggers_equal_the_full_grid(tiny_window):
    full, _, _ = tiny_window("full")
    sparse, _, _ = tiny_window("adaptive")
    counts = check_against_full_grid(full, sparse, TINY_GRID, TINY_HORIZONS)
    assert counts["ceiling_exact_by_monotonicity"] > 0 and counts["trigger_exact_by_monotonicity"] > 0
    a, f = readout(sparse, TINY_HORIZONS), readout(full, TINY_HORIZONS)
    # the planted neuron: a trigger at 4 tokens below the ceiling at 12, found by the search
    assert not math.isnan(f.loc[(3, 5, 1), "trigger_x_4"])
    assert a.loc[(3, 5, 1), "trigger_x_4"] == f.loc[(3, 5, 1), "trigger_x_4"]
    assert a.loc[(3, 5, 1), "ceiling_x"] == f.loc[(3, 5, 1), "ceiling_x"]
