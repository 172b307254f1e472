"""Contrastive screening (CNA) on synthetic last-token tables."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import bootstrap_indices
from neuronaudit.interventions.capture import LastTokenTable as T
from neuronaudit.io import last_token_schema, read_provenance, with_provenance
from neuronaudit.methods.screen import (
    SCREEN_SCHEMA,
    circuit_plan,
    contrast,
    heldout_contrast,
    paired_count_matrices,
    resolve_k,
    screen,
    select_circuit,
    universal_neurons,
)
from neuronaudit.options import ScreenOptions
from neuronaudit.prompts import prompt_table
from neuronaudit.stages.common import read_circuit
from neuronaudit.stages.screen import run_screen
from neuronaudit.testing import stage_options

N_LAYERS, WIDTH = 4, 32


def write_last_token(path, ids, acts, prov=None):
    """``acts [n_prompts, n_layers, width]`` as a last-token table (rows shuffled by layer)."""
    schema = with_provenance(last_token_schema(acts.shape[2]),
                             prov or {"weight_sha256": "abc", "n_layers": acts.shape[1]})
    rows = [(pid, layer, acts[p, layer]) for layer in range(acts.shape[1]) for p, pid in enumerate(ids)]
    table = pa.Table.from_pydict(
        {
            "prompt_id": [r[0] for r in rows],
            "layer": np.array([r[1] for r in rows], dtype=np.int32),
            "activation": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([r[2] for r in rows]).astype(np.float32).ravel()), acts.shape[2]
            ),
        },
        schema=schema,
    )
    pq.write_table(table, path)
    return path


def write_prompts(path, ids, heldout=(), pair_ids=None):
    df = pd.DataFrame(
        {
            "prompt_id": ids,
            "text": [f"text {i}" for i in ids],
            "split": ["heldout" if i in heldout else "discovery" for i in ids],
            "extra": ["{}"] * len(ids) if pair_ids is None else [json.dumps({"pair_id": p}) for p in pair_ids],
        }
    )
    table = prompt_table(df)
    table = table.replace_schema_metadata(
        with_provenance(table.schema, {"prompt_set": path.stem, "prompt_set_hash": "h-" + path.stem}).metadata
    )
    pq.write_table(table, path)
    return path


def planted(tmp_path, n=30, seed=0):
    rng = np.random.default_rng(seed)
    pos_ids = [f"pos-{i:03d}" for i in range(n)]
    neg_ids = [f"neg-{i:03d}" for i in range(n)]
    pos = rng.normal(size=(n, N_LAYERS, WIDTH))
    neg = rng.normal(size=(n, N_LAYERS, WIDTH))
    pos[:, 2, 7] += 3.0  # the planted controller, positive sign
    neg[:, 3, 4] += 2.0  # a negative-sign neuron
    pos[:, 0, 5] += 10.0  # huge but in a skipped layer
    return (
        write_last_token(tmp_path / "pos.parquet", pos_ids, pos),
        write_last_token(tmp_path / "neg.parquet", neg_ids, neg),
        pos_ids, neg_ids, pos, neg,
    )


def test_screen_recovers_the_planted_neuron_with_its_sign(tmp_path):
    pos_path, neg_path, *_ = planted(tmp_path)
    scores = screen(T(pos_path), T(neg_path), n_boot=200)
    assert len(scores) == N_LAYERS * WIDTH and list(scores.columns) == SCREEN_SCHEMA.names
    first = scores[scores["rank"] == 1].iloc[0]
    assert (first.layer, first.neuron) == (2, 7) and first.delta > 2 and first.ci_low > 0
    second = scores[scores["rank"] == 2].iloc[0]
    assert (second.layer, second.neuron) == (3, 4) and second.delta < 0 and second.ci_high < 0
    skipped = scores[scores["layer"].isin([0, 1])]
    assert not skipped["screened"].any() and skipped["rank"].isna().all()
    assert scores.loc[(scores.layer == 0) & (scores.neuron == 5), "delta"].iloc[0] > 8  # still scored
    circuit = select_circuit(scores, k=2)
    assert list(zip(circuit.layer, circuit.neuron, circuit.sign)) == [(2, 7, "pos"), (3, 4, "neg")]
    # without skipping, the huge layer-0 neuron wins
    unskipped = screen(T(pos_path), T(neg_path), skip_layers=(), n_boot=10)
    top = unskipped[unskipped["rank"] == 1].iloc[0]
    assert (top.layer, top.neuron) == (0, 5)


def test_std_delta_and_bootstrap_ci_match_a_direct_computation(tmp_path):
    pos_path, neg_path, pos_ids, neg_ids, pos, neg = planted(tmp_path, n=12, seed=3)
    n_boot, seed = 500, 11
    scores = screen(T(pos_path), T(neg_path), n_boot=n_boot, seed=seed, skip_layers=())
    idx_pos, idx_neg = bootstrap_indices(12, 12, n_boot, seed)
    # the tables were written in id order, which is the order the screen sorts rows into
    for layer, neuron in [(2, 7), (3, 4), (1, 0), (0, 31)]:
        x = pos[:, layer, neuron].astype(np.float32).astype(np.float64)
        y = neg[:, layer, neuron].astype(np.float32).astype(np.float64)
        row = scores[(scores.layer == layer) & (scores.neuron == neuron)].iloc[0]
        delta = x.mean() - y.mean()
        pooled = np.sqrt((11 * x.var(ddof=1) + 11 * y.var(ddof=1)) / 22)
        xs = pos[:, layer, :].astype(np.float32).astype(np.float64)
        ys = neg[:, layer, :].astype(np.float32).astype(np.float64)
        s0 = np.median(np.sqrt((11 * xs.var(0, ddof=1) + 11 * ys.var(0, ddof=1)) / 22))  # the layer's floor
        boot = np.array([x[idx_pos[b]].mean() - y[idx_neg[b]].mean() for b in range(n_boot)])
        np.testing.assert_allclose(row.delta, delta, rtol=1e-10)
        np.testing.assert_allclose(row.std_delta, delta / np.sqrt(pooled**2 + s0**2), rtol=1e-10)
        np.testing.assert_allclose([row.ci_low, row.ci_high], np.percentile(boot, [2.5, 97.5]), rtol=1e-9)
        np.testing.assert_allclose([row.mean_pos, row.mean_neg], [x.mean(), y.mean()], rtol=1e-10)
    # a different seed gives different CIs; the same seed the same ones
    again = screen(T(pos_path), T(neg_path), n_boot=n_boot, seed=seed, skip_layers=())
    other = screen(T(pos_path), T(neg_path), n_boot=n_boot, seed=seed + 1, skip_layers=())
    assert np.array_equal(scores["ci_low"], again["ci_low"])
    assert not np.array_equal(scores["ci_low"], other["ci_low"])


def test_contrast_handles_constant_neurons():
    pos = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    neg = np.array([[1.0, 0.0], [1.0, 0.0]])
    out = contrast(pos, neg)
    assert out["std_delta"][0] == 0 and np.isposinf(out["std_delta"][1])
    with pytest.raises(NeuronAuditError, match="at least 2 prompts"):
        contrast(pos[:1], neg)


def test_universal_neurons_are_flagged_and_excluded(tmp_path):
    pos_path, neg_path, pos_ids, neg_ids, pos, neg = planted(tmp_path)
    rng = np.random.default_rng(5)
    n = 40
    diverse = rng.normal(size=(n, N_LAYERS, WIDTH))
    diverse[: int(0.9 * n), 2, 7] = 50.0  # the planted controller fires on 90% of diverse prompts
    diverse[: int(0.7 * n), 3, 4] = 50.0  # 70%: below the 80% bar
    d_path = write_last_token(tmp_path / "diverse.parquet", [f"d{i:02d}" for i in range(n)], diverse)
    uni = universal_neurons([T(d_path)], top_n=3, fraction=0.8)
    flagged = set(zip(uni.loc[uni.universal, "layer"], uni.loc[uni.universal, "neuron"]))
    assert (2, 7) in flagged and (3, 4) not in flagged
    assert uni.loc[(uni.layer == 2) & (uni.neuron == 7), "top_frac"].iloc[0] >= 0.9
    scores = screen(T(pos_path), T(neg_path), diverse_last_tokens=[T(d_path)], n_boot=50, universal_top_n=3)
    assert scores.loc[(scores.layer == 2) & (scores.neuron == 7), "universal"].iloc[0]
    circuit = select_circuit(scores, k=1)
    assert (circuit.layer[0], circuit.neuron[0]) == (3, 4) and circuit.attrs["n_universal_excluded"] == 1
    kept = select_circuit(scores, k=1, exclude_universal=False)
    assert (kept.layer[0], kept.neuron[0]) == (2, 7)


def test_k_as_count_and_fraction(tmp_path):
    pos_path, neg_path, *_ = planted(tmp_path)
    scores = screen(T(pos_path), T(neg_path), n_boot=10)
    assert resolve_k(3, 128) == 3 and resolve_k(0.05, 128) == 6 and resolve_k(0.001, 128) == 1
    assert len(select_circuit(scores, k=5)) == 5
    frac = select_circuit(scores, k=0.05)  # of all 128 neurons, not only the screened 64
    assert len(frac) == 6 and frac.attrs["n_total"] == 128
    assert len(select_circuit(scores, k=0.05, n_total=1000)) == 50
    assert (frac["rank"] == np.arange(1, 7)).all()
    assert frac["delta"].abs().is_monotonic_decreasing
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(NeuronAuditError):
            resolve_k(bad, 128)
    with pytest.raises(NeuronAuditError, match="exceeds"):
        select_circuit(scores, k=65)
    plan = circuit_plan(frac, 0.0)
    assert len(plan.rows[0]) == 6 and all(e.op == "scale" and e.value == 0 for e in plan.rows[0])
    assert len(circuit_plan(frac, 2.0, sign="neg").rows[0]) == int((frac.sign == "neg").sum())


def test_run_screen_uses_only_the_discovery_split_and_writes_provenance(tmp_path):
    rng = np.random.default_rng(1)
    n = 30
    pos_ids = [f"pos-{i:03d}" for i in range(n)]
    neg_ids = [f"neg-{i:03d}" for i in range(n)]
    pos, neg = rng.normal(size=(n, N_LAYERS, WIDTH)), rng.normal(size=(n, N_LAYERS, WIDTH))
    pos[:, 2, 7] += 3.0
    held = set(pos_ids[:8])
    pos[:8, 3, 9] += 40.0  # only on held-out prompts: must not be found
    pos_path = write_last_token(tmp_path / "pos.parquet", pos_ids, pos)
    neg_path = write_last_token(tmp_path / "neg.parquet", neg_ids, neg)
    pos_tab = write_prompts(tmp_path / "harmful.parquet", pos_ids, heldout=held)
    neg_tab = write_prompts(tmp_path / "harmless.parquet", neg_ids)
    scores, circuit = run_screen(
        "refusal", pos_path, neg_path, pos_tab, neg_tab, [pos_path, neg_path],
        tmp_path / "out" / "refusal.scores.parquet", tmp_path / "out" / "refusal.circuit.json",
        stage_options(ScreenOptions, k=3, n_boot=100, seed=2),
    )
    assert (circuit.layer[0], circuit.neuron[0]) == (2, 7)
    assert not ((circuit.layer == 3) & (circuit.neuron == 9)).any()
    written = pq.read_table(tmp_path / "out" / "refusal.scores.parquet")
    assert written.schema.remove_metadata() == SCREEN_SCHEMA and written.num_rows == N_LAYERS * WIDTH
    prov = read_provenance(tmp_path / "out" / "refusal.scores.parquet")
    assert prov["n_pos"] == n - len(held) and prov["n_neg"] == n and prov["split"] == "discovery"
    assert prov["positive_set"] == "harmful" and prov["k"] == 3 and prov["seed"] == 2
    assert prov["weight_sha256"] == "abc" and prov["n_total_neurons"] == N_LAYERS * WIDTH
    doc = json.loads((tmp_path / "out" / "refusal.circuit.json").read_text())
    assert len(doc["neurons"]) == 3 and doc["behaviour"] == "refusal"
    # the held-out split was not collected here: δ not re-measured is null, and the file says why
    assert doc["heldout"]["skipped"] and all(n["delta_heldout"] is None for n in doc["neurons"])
    assert doc["null_reasons"]["delta_heldout"].startswith("held-out δ not measured: ")
    back = read_circuit(tmp_path / "out" / "refusal.circuit.json")
    pd.testing.assert_frame_equal(back.reset_index(drop=True), circuit.reset_index(drop=True), check_dtype=False)
    run_screen(
        "refusal", pos_path, neg_path, pos_tab, neg_tab, [], tmp_path / "s.parquet", tmp_path / "c.parquet",
        stage_options(ScreenOptions, k=3, n_boot=10),
    )
    assert pq.read_table(tmp_path / "c.parquet").num_rows == 3
    other = write_last_token(tmp_path / "other.parquet", neg_ids, neg, prov={"weight_sha256": "zzz"})
    with pytest.raises(NeuronAuditError, match="different models"):
        run_screen("refusal", pos_path, other, pos_tab, neg_tab, [], tmp_path / "x.parquet", tmp_path / "y.json",
                   stage_options(ScreenOptions))


def test_a_near_constant_neuron_cannot_outrank_a_planted_controller_by_std_delta():
    rng = np.random.default_rng(7)
    n, width = 20, 32
    pos, neg = rng.normal(size=(n, width)), rng.normal(size=(n, width))
    pos[:, 3] += 2.0  # the planted controller: a large shift at ordinary variance
    pos[:, 9], neg[:, 9] = 0.02 + 1e-4 * rng.normal(size=n), 1e-4 * rng.normal(size=n)  # tiny δ, no variance
    out = contrast(pos, neg)
    plain_d = out["delta"] / np.sqrt((pos.var(0, ddof=1) + neg.var(0, ddof=1)) / 2)
    assert np.argmax(np.abs(plain_d)) == 9  # Cohen's d alone puts the constant neuron on top (|d| ~ 200)
    assert np.argmax(np.abs(out["std_delta"])) == 3  # the variance floor ranks the controller first


def test_paired_bootstrap_draws_both_prompts_of_a_pair_together():
    pos_units = ["p0", "p1", "p2", "p3", None]
    neg_units = ["p3", "p2", "p1", "p0", "p9"]  # p9 has no partner: resampled within its own set
    wp, wn, info = paired_count_matrices(pos_units, neg_units, n_boot=300, seed=0)
    assert info == {"n_pairs": 4, "n_unpaired_pos": 1, "n_unpaired_neg": 1}
    np.testing.assert_allclose(wp.sum(1), 5)
    np.testing.assert_allclose(wn.sum(1), 5)
    # each replicate weighs a pair's positive and negative prompt alike (up to the row scaling)
    raw_p, raw_n = wp[:, :4] / wp[:, :4].sum(1, keepdims=True), wn[:, [3, 2, 1, 0]] / wn[:, :4].sum(1, keepdims=True)
    np.testing.assert_allclose(raw_p, raw_n)
    assert (wp[:, :4] == 0).any()  # pairs are really left out of some replicates


def test_pairing_removes_the_pair_effect_from_the_bootstrap_ci(tmp_path):
    """Style-matched pairs share a large pair effect; resampling sets independently counts it as
    noise, resampling pairs together does not."""
    rng = np.random.default_rng(4)
    n = 24
    pair_effect = rng.normal(scale=5.0, size=(n, 1, WIDTH))
    pos = pair_effect + 0.5 + 0.1 * rng.normal(size=(n, 1, WIDTH))
    neg = pair_effect + 0.1 * rng.normal(size=(n, 1, WIDTH))
    pos_ids, neg_ids = [f"pos-{i:03d}" for i in range(n)], [f"neg-{i:03d}" for i in range(n)]
    pos_t = T(write_last_token(tmp_path / "pos.parquet", pos_ids, pos))
    neg_t = T(write_last_token(tmp_path / "neg.parquet", neg_ids, neg))
    pairs = {**{p: f"pair-{i}" for i, p in enumerate(pos_ids)}, **{p: f"pair-{i}" for i, p in enumerate(neg_ids)}}
    paired = screen(pos_t, neg_t, skip_layers=(), n_boot=500, pairs=pairs)
    unpaired = screen(pos_t, neg_t, skip_layers=(), n_boot=500)
    assert paired.attrs["bootstrap"] == {"paired": True, "n_pairs": n, "n_unpaired_pos": 0, "n_unpaired_neg": 0}
    width_paired = (paired["ci_high"] - paired["ci_low"]).median()
    width_unpaired = (unpaired["ci_high"] - unpaired["ci_low"]).median()
    assert width_paired < 0.2 * width_unpaired
    assert (paired["ci_low"] > 0).all()  # δ = 0.5 everywhere is resolved only by the paired bootstrap
    np.testing.assert_allclose(paired["delta"], unpaired["delta"])


def test_heldout_contrast_shows_the_winners_curse(tmp_path):
    rng = np.random.default_rng(5)
    n = 40
    pos, neg = rng.normal(size=(n, N_LAYERS, WIDTH)), rng.normal(size=(n, N_LAYERS, WIDTH))
    pos[:, 2, 7] += 3.0  # real on every prompt
    pos[:20, 3, 1] += 4.0  # only on the first (discovery) half: a lucky winner
    pos_ids, neg_ids = [f"pos-{i:03d}" for i in range(n)], [f"neg-{i:03d}" for i in range(n)]
    pos_t = T(write_last_token(tmp_path / "pos.parquet", pos_ids, pos))
    neg_t = T(write_last_token(tmp_path / "neg.parquet", neg_ids, neg))
    scores = screen(pos_t, neg_t, pos_ids[:20], neg_ids[:20], skip_layers=(), n_boot=200)
    circuit = select_circuit(scores, k=2)
    assert circuit["delta_heldout"].isna().all()
    out = heldout_contrast(circuit, pos_t, neg_t, pos_ids[20:], neg_ids[20:], n_boot=200)
    by = out.set_index(["layer", "neuron"])
    assert by.loc[(2, 7), "heldout_ci_low"] > 1.5  # the real one holds up
    assert abs(by.loc[(3, 1), "delta_heldout"]) < 1.0 < by.loc[(3, 1), "delta"]  # the lucky one shrinks
    direct = pos[20:, 3, 1].mean() - neg[20:, 3, 1].mean()
    assert by.loc[(3, 1), "delta_heldout"] == pytest.approx(direct)
    h = out.attrs["heldout"]
    assert h["n_pos"] == 20 and 0 < h["retained"] < 0.8 and h["share_ci_excludes_zero"] == 0.5


def test_run_screen_pairs_the_bootstrap_and_re_measures_the_circuit_on_held_out_prompts(tmp_path):
    rng = np.random.default_rng(6)
    n = 30
    pos_ids, neg_ids = [f"pos-{i:03d}" for i in range(n)], [f"neg-{i:03d}" for i in range(n)]
    pos, neg = rng.normal(size=(n, N_LAYERS, WIDTH)), rng.normal(size=(n, N_LAYERS, WIDTH))
    pos[:, 2, 7] += 3.0
    pos_path = write_last_token(tmp_path / "pos.parquet", pos_ids, pos)
    neg_path = write_last_token(tmp_path / "neg.parquet", neg_ids, neg)
    pairs = [f"pair-{i}" for i in range(n)]
    held_pos, held_neg = set(pos_ids[:10]), set(neg_ids[:10])  # pairs stay on one side of the split
    pos_tab = write_prompts(tmp_path / "harmful.parquet", pos_ids, heldout=held_pos, pair_ids=pairs)
    neg_tab = write_prompts(tmp_path / "harmless.parquet", neg_ids, heldout=held_neg, pair_ids=pairs)
    _, circuit = run_screen(
        "refusal", pos_path, neg_path, pos_tab, neg_tab, [], tmp_path / "s.parquet", tmp_path / "c.parquet",
        stage_options(ScreenOptions, k=3, n_boot=100, seed=2),
    )
    written = pq.read_table(tmp_path / "c.parquet").to_pandas()
    assert written["delta_heldout"].notna().all()
    top = written.iloc[0]
    assert (top.layer, top.neuron) == (2, 7)
    assert top.delta_heldout == pytest.approx(pos[:10, 2, 7].mean() - neg[:10, 2, 7].mean())
    prov = read_provenance(tmp_path / "c.parquet")
    assert prov["bootstrap"] == {"paired": True, "n_pairs": 20, "n_unpaired_pos": 0, "n_unpaired_neg": 0}
    assert prov["heldout"]["n_pos"] == 10 and prov["heldout"]["n_pairs"] == 10 and prov["heldout"]["paired"]
