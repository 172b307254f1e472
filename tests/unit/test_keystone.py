"""Keystone neurons: cross-task scores, outlier flags, stability IoU, ablation curve vs controls."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.capture import LastTokenTable as T
from neuronaudit.io import (
    RowCheckpoint,
    last_token_schema,
    read_provenance,
    with_provenance,
    write_table,
)
from neuronaudit.methods.keystone import (
    STABILITY_SCHEMA,
    ablation_curve,
    chance_iou,
    curve_schema,
    group_splits,
    group_stability,
    keystone_schema,
    keystone_scores,
    random_controls,
    ranked_neurons,
    split_halves,
    stability,
    summarise_curve,
    summarise_stability,
)
from neuronaudit.options import KeystoneOptions
from neuronaudit.stages.keystone import run_keystone
from neuronaudit.testing import stage_options

N_LAYERS, WIDTH = 3, 16


def stats_frame(mean_abs, max_abs):
    n = mean_abs.size
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(N_LAYERS), WIDTH).astype(np.int32),
            "neuron": np.tile(np.arange(WIDTH), N_LAYERS).astype(np.int32),
            "count": np.full(n, 100),
            "mean": np.zeros(n),
            "std": np.ones(n),
            "mean_abs": mean_abs.ravel(),
            "max_abs": max_abs.ravel(),
            "frac_positive": np.full(n, 0.5),
        }
    )


def test_scores_min_mean_rank_and_outliers(tmp_path):
    rng = np.random.default_rng(0)
    groups = ["task_knowledge", "task_code", "generic"]
    means = {g: rng.uniform(0.1, 1.0, size=(N_LAYERS, WIDTH)) for g in groups}
    maxes = {g: rng.uniform(1.0, 2.0, size=(N_LAYERS, WIDTH)) for g in groups}
    for g in groups:
        means[g][1, 4] = 5.0 + groups.index(g)  # strong everywhere: rank 1 by min
    means["task_code"][2, 9] = 50.0  # strong in one group only: high mean, ordinary min
    maxes["generic"][0, 3] = 500.0  # 500 / ~1.5 ≫ 50: a super-weight-like spike
    maxes["task_code"][2, 2] = 40.0  # ≈ 27×: below the 50× bar
    frames = {g: stats_frame(means[g], maxes[g]) for g in groups}
    # rows in any order: the scores sort by (layer, neuron)
    shuffled = frames["generic"].sample(frac=1.0, random_state=0)
    scores = keystone_scores({"task_knowledge": frames["task_knowledge"], "task_code": frames["task_code"],
                              "generic": shuffled})
    stacked = np.stack([means[g].ravel() for g in groups], axis=1)
    np.testing.assert_allclose(scores["score_min"], stacked.min(1))
    np.testing.assert_allclose(scores["score_mean"], stacked.mean(1))
    np.testing.assert_allclose(scores["mean_abs__task_code"], means["task_code"].ravel())
    top = scores.loc[scores["rank"] == 1].iloc[0]
    assert (top.layer, top.neuron) == (1, 4) and top.score_min == 5.0
    assert scores.loc[(scores.layer == 2) & (scores.neuron == 9), "rank"].iloc[0] > 1
    assert sorted(scores["rank"]) == list(range(1, N_LAYERS * WIDTH + 1))
    flagged = scores[scores["super_weight_outlier"]]
    assert list(zip(flagged.layer, flagged.neuron)) == [(0, 3)]
    ratio = scores.loc[(scores.layer == 2) & (scores.neuron == 2), "max_abs_ratio"].iloc[0]
    assert 15 < ratio < 50
    lower = keystone_scores({g: frames[g] for g in groups}, outlier_multiple=10)
    assert lower.loc[(lower.layer == 2) & (lower.neuron == 2), "super_weight_outlier"].iloc[0]
    assert scores.columns.tolist() == keystone_schema(groups).names
    ranked = ranked_neurons(scores)
    assert (ranked.layer[0], ranked.neuron[0]) == (1, 4) and ranked["score_min"].is_monotonic_decreasing
    with pytest.raises(NeuronAuditError, match="different neurons"):
        keystone_scores({"a": frames["generic"], "b": frames["generic"].iloc[:-1]})


def write_last_token(path, ids, acts, sha="abc"):
    schema = with_provenance(last_token_schema(acts.shape[2]), {"weight_sha256": sha})
    rows = [(pid, layer, acts[p, layer]) for p, pid in enumerate(ids) for layer in range(acts.shape[1])]
    pq.write_table(
        pa.Table.from_pydict(
            {
                "prompt_id": [r[0] for r in rows],
                "layer": np.array([r[1] for r in rows], dtype=np.int32),
                "activation": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.stack([r[2] for r in rows]).astype(np.float32).ravel()), acts.shape[2]
                ),
            },
            schema=schema,
        ),
        path,
    )
    return path


def test_split_halves_are_disjoint_and_seeded():
    ids = [f"p{i}" for i in range(11)]
    a, b = split_halves(ids, 3)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert (a, b) == split_halves(list(reversed(ids)), 3)
    assert (a, b) != split_halves(ids, 4)


def test_iou_is_one_for_identical_halves_and_near_chance_for_noise(tmp_path):
    rng = np.random.default_rng(1)
    tables = {}
    for g in ["task_knowledge", "generic"]:
        vector = rng.normal(size=(N_LAYERS, WIDTH))
        acts = np.repeat(vector[None], 10, axis=0)  # every prompt identical: both halves agree
        tables[g] = T(write_last_token(tmp_path / f"{g}.parquet", [f"{g}-{i}" for i in range(10)], acts))
    stab = stability(tables, k_values=(1, 4, 8), seed=0, n_splits=3)
    assert len(stab) == 3 * 3 * 2 and set(stab["score"]) == {"min", "mean"}
    assert set(stab["basis"]) == {"prompt_halves"}
    assert (stab["iou"] == 1.0).all()
    noise = {
        g: T(write_last_token(tmp_path / f"n-{g}.parquet", [f"{g}-{i}" for i in range(40)],
                              rng.normal(size=(40, N_LAYERS, WIDTH))))
        for g in ["a", "b"]
    }
    noisy = stability(noise, k_values=(8,), seed=0, n_splits=5)
    assert noisy["iou"].mean() < 0.6
    assert noisy["iou_chance"].iloc[0] == pytest.approx(chance_iou(N_LAYERS * WIDTH, 8))


def test_group_splits_are_disjoint_halves_of_the_groups_each_once():
    splits = group_splits(["a", "b", "c", "d", "e"])
    assert len(splits) == 10  # C(5, 2)
    for a, b in splits:
        assert len(a) == 2 and len(b) == 3 and not set(a) & set(b) and set(a) | set(b) == set("abcde")
    even = group_splits(["a", "b", "c", "d"])
    assert len(even) == 3 and all("a" in a for a, _ in even)  # {ab|cd} and {cd|ab} counted once
    with pytest.raises(NeuronAuditError, match="at least 2 groups"):
        group_splits(["a"])


def test_group_stability_uses_the_ranking_score_on_disjoint_groups():
    """The IoU is computed on score_min (all-token mean |a|, min over the half's groups): a neuron
    strong in every group stays in both halves' top-k, one strong in a single group does not."""
    rng = np.random.default_rng(2)
    groups = ["g1", "g2", "g3", "g4"]
    means = {g: rng.uniform(0.1, 1.0, size=(N_LAYERS, WIDTH)) for g in groups}
    for g in groups:
        means[g][0, 1] = 9.0  # a keystone: strong everywhere
        means[g][2, 5] = 8.0
    means["g1"][1, 7] = 100.0  # strong in g1 only: tops the half holding g1 by mean, never by min
    frames = {g: stats_frame(means[g], np.ones((N_LAYERS, WIDTH))) for g in groups}
    stab = group_stability(frames, k_values=(2,))
    assert set(stab["basis"]) == {"task_groups"} and stab["split"].nunique() == 3
    by_min = stab[stab["score"] == "min"]
    assert (by_min["iou"] == 1.0).all()  # {(0,1), (2,5)} in every half
    by_mean = stab[stab["score"] == "mean"]
    assert (by_mean["iou"] < 1.0).all()  # the g1-only neuron enters the top-2 of g1's half only
    for row in stab.itertuples():
        assert not set(json.loads(row.half_a)) & set(json.loads(row.half_b))
    assert list(stab.columns) == STABILITY_SCHEMA.names
    summary = summarise_stability(stab)
    assert summary[0]["primary"] and summary[0]["basis"] == "task_groups"


def test_chance_iou_exact_small_case():
    # two random 2-subsets of 4 items: overlap 2 (p=1/6) -> IoU 1, overlap 1 (p=4/6) -> 1/3, 0 (1/6) -> 0
    assert chance_iou(4, 2) == pytest.approx(1 / 6 + 4 / 6 / 3)
    assert chance_iou(10, 10) == pytest.approx(1.0)
    sims = np.random.default_rng(0)
    draws = [
        len(set(sims.choice(30, 5, replace=False)) & set(sims.choice(30, 5, replace=False))) for _ in range(20000)
    ]
    mc = np.mean([j / (10 - j) for j in draws])
    assert chance_iou(30, 5) == pytest.approx(mc, abs=0.01)


def test_random_controls_match_layers_and_avoid_keystones():
    keystone = [(2, 5), (2, 7), (0, 1)]
    controls = random_controls(keystone, n_neurons=16, n_random=4, seed=0, exclude=[(2, 1), (0, 3)])
    assert len(controls) == 4
    for c in controls:
        assert sorted(l for l, _ in c) == sorted(l for l, _ in keystone)
        assert not set(c) & ({(2, 1), (0, 3)} | set(keystone))
        assert len(set(c)) == len(c)
    assert controls != random_controls(keystone, 16, 4, seed=1)
    assert controls == random_controls(keystone, 16, 4, seed=0, exclude=[(2, 1), (0, 3)])


def test_ablation_curve_on_a_tiny_model(llama, tokenizer):
    model, adapter = llama
    ranked = pd.DataFrame(
        {
            "layer": [1, 3, 1, 0, 2, 3],
            "neuron": [10, 20, 30, 40, 50, 60],
            "super_weight_outlier": [False, True, False, False, False, False],
        }
    )
    tasks = {
        "task_arithmetic": pd.DataFrame({"text": ["What is 7 + 5?", "What is 3 times 4?"], "answer": [12, 12]}),
    }
    curve = ablation_curve(
        model, tokenizer, adapter, ranked, ["Cats are animals.", "The river flows."], tasks,
        k_values=(1, 2, 4), n_random=2, seed=0, max_new_tokens=3,
    )
    assert curve.columns.tolist() == curve_schema(["task_arithmetic"]).names
    assert set(curve["k"]) == {0, 1, 2, 4}
    keystone = curve[curve.kind == "keystone"].set_index("k")
    for k in (1, 2, 4):
        top = [tuple(x) for x in json.loads(keystone.loc[k, "neurons"])]
        assert top == list(zip(ranked.layer[:k], ranked.neuron[:k]))
        randoms = curve[(curve.kind == "random") & (curve.k == k)]
        assert sorted(randoms["replicate"]) == [0, 1]
        for neurons in randoms["neurons"]:
            got = [tuple(x) for x in json.loads(neurons)]
            assert sorted(l for l, _ in got) == sorted(l for l, _ in top)  # same layers
            assert not set(got) & set(zip(ranked.layer[:4], ranked.neuron[:4]))
    assert keystone.loc[1, "n_outliers"] == 0 and keystone.loc[2, "n_outliers"] == 1
    clean = curve[curve.kind == "keystone_no_outliers"].set_index("k")
    assert [tuple(x) for x in json.loads(clean.loc[2, "neurons"])] == [(1, 10), (1, 30)]
    assert curve.loc[curve.kind == "baseline", "neurons"].iloc[0] == "[]"
    assert np.isfinite(curve["perplexity"]).all() and curve["accuracy__task_arithmetic"].between(0, 1).all()
    assert keystone.loc[4, "perplexity"] != curve.loc[curve.kind == "baseline", "perplexity"].iloc[0]


def _curve(rows):
    df = pd.DataFrame(rows, columns=["k", "kind", "replicate", "perplexity", "accuracy__t"])
    df["n_outliers"] = 0
    return df


def test_summary_only_claims_separation_that_is_there():
    curve = _curve(
        [
            (0, "baseline", 0, 5.0, 0.9),
            (1, "keystone", 0, 6.0, 0.8), (1, "random", 0, 5.5, 0.9), (1, "random", 1, 7.0, 0.7),
            (2, "keystone", 0, 50.0, 0.1), (2, "random", 0, 5.5, 0.9), (2, "random", 1, 6.0, 0.8),
        ]
    )
    s = summarise_curve(curve, ["t"], n_random=2)
    assert s["perplexity_separates_at_k"] == [2] and s["perplexity_separates_at_k_max"]
    assert s["accuracy_separates_at_k"] == {"t": [2]}
    k1 = s["per_k"][0]["perplexity"]
    assert not k1["separates"] and k1["random_min"] == 5.5 and k1["random_max"] == 7.0
    assert k1["ratio_to_random_median"] == pytest.approx(6.0 / 6.25)
    assert "k = [2] of [1, 2]" in s["statement"] and "1/3" in s["statement"]
    none = summarise_curve(curve[curve.k != 2], ["t"], n_random=2)
    assert none["perplexity_separates_at_k"] == [] and "k = none" in none["statement"]
    assert not none["perplexity_separates_at_k_max"]


def _keystone_inputs(tmp_path, tiny_model_dir):
    """A prepared tiny model, three task groups' prompt tables and their collected tables."""
    from neuronaudit.interventions.capture import collect_activations
    from neuronaudit.models.loading import load_prepared, prepare_model
    from neuronaudit.prompts import prompt_table

    manifest = prepare_model(str(tiny_model_dir), tmp_path / "model")
    man_path = tmp_path / "model" / "manifest.json"
    model, tokenizer, adapter, _ = load_prepared(man_path)
    sets = {
        "task_knowledge": [("Capital of France?", {"answer": "paris", "aliases": []}),
                           ("Colour of the sky?", {"answer": "blue", "aliases": []}),
                           ("Capital of Italy?", {"answer": "rome", "aliases": []}),
                           ("Colour of grass?", {"answer": "green", "aliases": []})],
        "task_arithmetic": [("What is 7 + 5?", {"answer": 12}), ("What is 3 times 4?", {"answer": 12}),
                            ("What is 9 - 2?", {"answer": 7}), ("What is 2 + 2?", {"answer": 4})],
        "generic": [("The river flows through the old city.", {}), ("Cats are animals.", {}),
                    ("Paris is the capital of France.", {}), ("Hello! How are you today?", {})],
    }
    stats, last, tables = {}, {}, {}
    for name, rows in sets.items():
        ids = [f"{name}-{i}" for i in range(len(rows))]
        df = pd.DataFrame(
            {"prompt_id": ids, "text": [t for t, _ in rows], "split": ["discovery", "heldout"] * 2,
             "extra": [json.dumps(e) for _, e in rows]}
        )
        tables[name] = write_table(prompt_table(df), tmp_path / "prompts" / f"{name}.parquet",
                                   {"prompt_set": name, "prompt_set_hash": f"h-{name}"})
        stats[name], last[name] = tmp_path / f"{name}.stats.parquet", tmp_path / f"{name}.last_token.parquet"
        collect_activations(model, tokenizer, adapter, list(df["text"]), ids, stats[name], last[name],
                            provenance={"weight_sha256": manifest["weight_sha256"], "prompt_set": name},
                            progress=False)
    return manifest, man_path, (model, tokenizer, adapter), sets, stats, last, tables


def test_run_keystone_end_to_end(tmp_path, tiny_model_dir):
    manifest, man_path, (model, tokenizer, adapter), sets, stats, last, tables = _keystone_inputs(tmp_path,
                                                                                                 tiny_model_dir)
    out = tmp_path / "keystone"
    summary = run_keystone(
        stats, last, tables, man_path, out / "scores.parquet", out / "curve.parquet", out / "summary.json",
        out / "stability.parquet",
        stage_options(KeystoneOptions, k_max=4, n_random=2, iou_k=[2, 8], n_splits=2,
                      capability={"max_new_tokens": 3}),
        loaded=(model, tokenizer, adapter),
    )
    scores = pq.read_table(out / "scores.parquet")
    assert scores.num_rows == adapter.n_layers * adapter.n_neurons
    assert scores.schema.remove_metadata() == keystone_schema(list(sets))
    curve = pq.read_table(out / "curve.parquet").to_pandas()
    assert sorted(curve.loc[curve.kind == "keystone", "k"]) == [1, 2, 4]
    assert (curve.kind == "random").sum() == 3 * 2
    assert pq.read_table(out / "stability.parquet").schema.remove_metadata() == STABILITY_SCHEMA
    stab = pq.read_table(out / "stability.parquet").to_pandas()
    assert set(stab["basis"]) == {"task_groups", "prompt_halves"}
    assert stab.loc[stab["basis"] == "task_groups", "split"].nunique() == 3  # 3 groups: {1 | 2} three ways
    written = json.loads((out / "summary.json").read_text())
    assert written["stability"][0]["basis"] == "task_groups"
    assert written["curve"]["perplexity_separates_at_k"] == summary["curve"]["perplexity_separates_at_k"]
    assert {e["k"] for e in written["curve"]["per_k"]} == {1, 2, 4}
    assert written["provenance"]["n_texts"] == 2 and written["provenance"]["eval_split"] == "heldout"
    prov = read_provenance(out / "curve.parquet")
    assert prov["weight_sha256"] == manifest["weight_sha256"] and prov["k_values"] == [1, 2, 4]
    with pytest.raises(NeuronAuditError, match="needs prompt tables"):
        run_keystone(stats, last, {"generic": tables["generic"]}, man_path, out / "a", out / "b", out / "c",
                     out / "d", stage_options(KeystoneOptions, k_max=2), loaded=(model, tokenizer, adapter))


def test_ablation_curve_resumes_from_its_checkpoint(llama, tokenizer, tmp_path, monkeypatch):
    from neuronaudit.methods import keystone

    model, adapter = llama
    ranked = pd.DataFrame({"layer": [1, 3, 2], "neuron": [10, 20, 30]})
    args = (model, tokenizer, adapter, ranked, ["Cats are animals."], {})
    ckpt = tmp_path / "curve.partial.jsonl"
    first = ablation_curve(*args, k_values=(1, 2), n_random=1, checkpoint=RowCheckpoint(ckpt))
    lines = ckpt.read_text().splitlines()
    assert len(lines) == 1 + len(first)
    ckpt.write_text("\n".join(lines[:-2]) + "\n" + lines[-1][:10])  # interrupted mid-write
    calls = []
    real = keystone.capability_report
    monkeypatch.setattr(keystone, "capability_report", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    resumed = ablation_curve(*args, k_values=(1, 2), n_random=1, checkpoint=RowCheckpoint(ckpt))
    assert len(calls) == 2  # only the two rows missing from the checkpoint are measured again
    pd.testing.assert_frame_equal(resumed, first)
    calls.clear()
    # other settings
    ablation_curve(*args, k_values=(1, 2), n_random=1, checkpoint=RowCheckpoint(ckpt), max_new_tokens=2)
    assert len(calls) == len(first)


def test_keystone_part_count_covers_every_ablation_condition():
    from neuronaudit.methods.keystone import ablation_conditions
    from neuronaudit.shards import k_values, keystone_shard_count

    ranked = pd.DataFrame({"layer": [0, 1, 2, 0], "neuron": [1, 2, 3, 4],
                           "super_weight_outlier": [False, True, False, False]})
    with_outliers, outliers = ablation_conditions(ranked, [1, 2], 2, 0, WIDTH)
    assert outliers == {(1, 2)} and len(with_outliers) == 1 + 2 * (2 + 2)  # the upper bound, met
    assert keystone_shard_count(2, 2, 9) == 1 and keystone_shard_count(2, 2, 4) == 3
    clean, _ = ablation_conditions(ranked.assign(super_weight_outlier=False), [1, 2], 2, 0, WIDTH)
    assert [c[:3] for c in clean] == [(0, "baseline", 0), (1, "keystone", 0), (1, "random", 0), (1, "random", 1),
                                      (2, "keystone", 0), (2, "random", 0), (2, "random", 1)]
    assert k_values(32) == [1, 2, 4, 8, 16, 32] and k_values(5) == [1, 2, 4, 5]
    assert keystone_shard_count(32, 3, 0) == 0
    with pytest.raises(NeuronAuditError, match="keystone.shard_size -2"):
        keystone_shard_count(32, 3, -2)


def test_sharded_keystone_equals_the_one_job_and_refuses_bad_parts(tmp_path, tiny_model_dir, monkeypatch):
    from neuronaudit.shards import keystone_shard_count
    from neuronaudit.stages import keystone as stage
    from neuronaudit.stages.keystone import run_keystone_part

    _, man_path, loaded, _, stats, last, tables = _keystone_inputs(tmp_path, tiny_model_dir)
    o = stage_options(KeystoneOptions, k_max=4, n_random=2, iou_k=[2, 8], n_splits=2,
                      capability={"max_new_tokens": 3})
    names = ("scores", "curve", "summary", "stability")
    one = [tmp_path / f"one.{k}" for k in names]
    first = run_keystone(stats, last, tables, man_path, *one, o, loaded=loaded)
    sharded = o.replace(shard_size=3)
    n_parts = keystone_shard_count(4, 2, 3)
    assert n_parts == 5  # up to 1 + 3 k × (keystone, without outliers, 2 random) = 13 conditions
    curve = pq.read_table(one[1]).to_pandas()
    assert len(curve) == 10  # no outlier in the top 4 of this model: parts of 3, 3, 3, 1 and an empty one
    parts = [tmp_path / f"part.{k}.parquet" for k in range(n_parts)]
    for k, path in enumerate(parts[:4]):
        run_keystone_part(stats, tables, man_path, k, path, sharded, loaded=loaded)

    def no_model(*args, **kwargs):
        raise AssertionError("the model is loaded")

    monkeypatch.setattr(stage, "open_model", no_model)
    run_keystone_part(stats, tables, man_path, 4, parts[4], sharded)
    assert pq.read_table(parts[4]).num_rows == 0 and pq.read_table(parts[3]).num_rows == 1
    merged = [tmp_path / f"merged.{k}" for k in names]
    joined = run_keystone(stats, last, tables, man_path, *merged, sharded, parts=parts)
    for a, b in ((one[0], merged[0]), (one[1], merged[1]), (one[3], merged[3])):
        x, y = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-6)
    assert pq.read_table(merged[1]).schema.remove_metadata() == curve_schema(["task_knowledge", "task_arithmetic"])
    assert json.loads(merged[2].read_text()) == json.loads(one[2].read_text())
    assert joined["curve"] == first["curve"] and joined["provenance"]["dtype"] == first["provenance"]["dtype"]
    assert not list(tmp_path.glob("*.partial.jsonl"))

    def refused(paths, match):
        with pytest.raises(NeuronAuditError, match=match):
            run_keystone(stats, last, tables, man_path, *(tmp_path / f"x.{k}" for k in names), sharded, parts=paths)
        assert not (tmp_path / "x.summary").exists()

    refused(parts[:1] + parts[2:], "hold 7 of the run's 10 conditions; missing \\[1, \"random\", 1")
    refused([*parts, parts[1]], "is in more than one part table")
    refused([one[1], *parts], "is not a keystone part table")
    foreign = tmp_path / "foreign.parquet"
    prov = read_provenance(parts[2])
    prov["keystone_part"]["run"]["options"]["seed"] = 99
    write_table(pq.read_table(parts[2]), foreign, prov)
    refused([*parts[:2], foreign, *parts[3:]], "keystone part .* is of another run: its options differ")
    prov = read_provenance(parts[2])
    prov["keystone_part"]["dtype"] = "bfloat16"
    write_table(pq.read_table(parts[2]), foreign, prov)
    refused([*parts[:2], foreign, *parts[3:]], "measured in different dtypes")
    with pytest.raises(NeuronAuditError, match="keystone part 5 out of range: keystone.shard_size 3 makes 5 parts"):
        run_keystone_part(stats, tables, man_path, 5, tmp_path / "y.parquet", sharded)
