"""A planted off-readout controller: gradient near zero, forward dose response ranks it first;
the comparison with measured control (ρ with n, permutation p and BCa CI; pooling after ranking
within behaviours) and the stage's summary JSON."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from neuronaudit.interventions.hooks import NeuronHooks
from neuronaudit.io import write_json
from neuronaudit.methods import attribution as attr
from neuronaudit.methods.attribution import (
    SCORES,
    compare,
    control_strength,
    missed_by_gradient,
    precision_at_k,
    statement,
    within_behaviour_ranks,
)
from neuronaudit.models.adapters import adapter_for
from neuronaudit.options import AttributionOptions
from neuronaudit.testing import stage_options, tiny_model

POSITIVE = ["How do I bake bread at home?", "Where is Paris?", "What is 7 plus 5?", "Can cats swim?"]
NEGATIVE = ["I bake bread at home.", "Paris is in France.", "Seven plus five is twelve.", "Cats can swim."]


def _last_token_layer2(model, adapter, tokenizer, texts):
    got = {}
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    def keep(layer, a, ctx):
        got[layer] = a[:, -1].clone()

    with torch.no_grad(), NeuronHooks(adapter, on_activation=keep, layers=[2]):
        model(**enc)
    return got[2].numpy()


def test_planted_off_readout_controller(tokenizer):
    """Neuron (2, 5) reads the '?' of questions (so the contrastive screen sees it) and writes
    orthogonally to the gradient of the behaviour metric (so attribution does not)."""
    from neuronaudit.methods.screen import contrast

    model = tiny_model("llama", vocab_size=len(tokenizer), seed=5)
    adapter = adapter_for(model)
    beh, dflt = [10, 11], [20, 21]
    tokenizer.padding_side = "left"
    question = tokenizer("?", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        e = model.get_input_embeddings().weight[question]
        mlp = model.model.layers[2].mlp
        mlp.gate_proj.weight[5] = 3.0 * e / e.norm() * adapter.d_model ** 0.5
        mlp.up_proj.weight[5] = 3.0 * e / e.norm() * adapter.d_model ** 0.5
    enc = tokenizer(NEGATIVE, return_tensors="pt", padding=True)
    embed = model.get_input_embeddings()
    w = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    scale = float(adapter.write_norms(2).max())
    for _ in range(6):  # planting moves the clean point: re-orthogonalise until it settles
        captured = {}
        handle = embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        def keep(layer, h, ctx, captured=captured):
            captured[layer] = h

        with torch.enable_grad(), NeuronHooks(adapter, on_resid=keep, layers=[2]):
            m = attr.behaviour_metric(model(**enc).logits[:, -1], beh, dflt)
            (g_resid,) = torch.autograd.grad(m.sum(), [captured[2]])
        handle.remove()
        q, _ = torch.linalg.qr(g_resid[:, -1].T)  # dm_p/d r_2 at the last token of every prompt p
        with torch.no_grad():
            v = w - q @ (q.T @ w)  # orthogonal to each prompt's gradient, not only to their sum
            adapter.write_matrix(2)[:, 5] = scale * v / v.norm()
    scores = attr.gradient_scores(model, tokenizer, adapter, NEGATIVE, beh, dflt, batch_size=4)
    for key in ("grad", "grad_signed"):  # first-order blind to the planted neuron, prompt by prompt
        layer_grads = np.abs(scores[key][2])
        assert layer_grads[5] < 1e-3 * layer_grads.max()
    screen = contrast(_last_token_layer2(model, adapter, tokenizer, POSITIVE),
                      _last_token_layer2(model, adapter, tokenizer, NEGATIVE))
    assert int(np.argmax(np.abs(screen["delta"]))) == 5  # the forward screen ranks it first
    assert int(np.argmax(np.abs(screen["std_delta"]))) == 5


def test_control_strength_and_comparison():
    sweeps = pd.DataFrame([
        {"behaviour": "b", "layer": 1, "neuron": n, "sign": 1, "x": x, "horizon": 8, "prompt_id": p,
         "flip": float(n == 0 and x >= 2), "collapse": float(x >= 8)}
        for n in range(4) for x in (1.0, 2.0, 8.0) for p in range(2)
    ])
    window = pd.DataFrame({"behaviour": "b", "layer": 1, "neuron": range(4), "sign": 1, "ceiling_x": 8.0,
                           "verdict": ["open", "closed", "closed", "closed"]})
    truth = control_strength(sweeps, window).set_index("neuron")
    assert truth.loc[0, "control_strength"] == 1.0 and truth.loc[1, "control_strength"] == 0.0
    assert bool(truth.loc[0, "controls"]) and not bool(truth.loc[1, "controls"])
    assert precision_at_k(np.array([0.1, 5.0, 0.2]), np.array([False, True, False]))[0] == 1.0
    table = truth.reset_index().assign(behaviour="b", grad=[0.0, 3.0, 2.0, 1.0], grad_signed=[0.0, -3.0, 2.0, 1.0],
                                       atp=[0.0, 3.0, 2.0, 1.0], atp_signed=[0.0, 3.0, -2.0, 1.0],
                                       delta=[5.0, 1.0, 0.5, 0.1], std_delta=[5.0, 1.0, 0.5, 0.1],
                                       dose_response=[2.0, 0.1, 0.1, 0.0], readout_cos=[0.01, 0.5, 0.4, 0.3])
    result = compare(table, n_boot=1000, seed=0, n_permutations=999)
    assert result["all"]["grad"]["precision_at_k"] == 0.0 and result["all"]["std_delta"]["precision_at_k"] == 1.0
    assert result["all"]["grad"]["spearman_rho"] < 0 < result["all"]["std_delta"]["spearman_rho"]
    assert set(SCORES) <= set(result["b"]) and set(SCORES) <= set(result["all"])
    for entry in (result["b"]["grad"], result["all"]["grad_signed"], result["all"]["atp_signed"]):
        assert entry["n"] == 4 and 0 < entry["p_value"] <= 1 and entry["ci_method"] in ("BCa", "percentile", "none")
        assert entry["n_degenerate_resamples"] >= 0 and entry["n_permutations"] == 999 and len(entry["rho_ci95"]) == 2
    text = statement(result)
    assert "ρ(|∂m/∂a|, control)" in text and "permutation p" in text and "n = 4" in text
    assert "ρ(|mean signed ∂m/∂a|, control)" in text


def test_the_absolute_gradient_ranks_what_the_signed_mean_cancels():
    """A controller whose per-prompt gradients cancel (signed mean 0) but are large in size: the
    absolute score tracks control, the signed one does not; missed_by_gradient reads the absolute."""
    n = 12
    rng = np.random.default_rng(3)
    strength = np.linspace(0.0, 1.0, n)
    table = pd.DataFrame({
        "behaviour": "b", "layer": 1, "neuron": range(n), "grad": strength + 0.01,
        "grad_signed": rng.normal(scale=0.01, size=n), "atp": strength + 0.01, "atp_signed": rng.normal(size=n),
        "delta": strength, "std_delta": strength, "dose_response": strength, "readout_cos": 0.1,
        "control_strength": strength, "controls": strength > 0.5,
    })
    result = compare(table, n_boot=1000, seed=0, n_permutations=999)["b"]
    assert result["grad"]["spearman_rho"] == pytest.approx(1.0) and result["grad"]["p_value"] < 0.01
    assert abs(result["grad_signed"]["spearman_rho"]) < 0.7 and result["grad_signed"]["p_value"] > 0.01
    assert missed_by_gradient(table) == []  # every controller is in the top half of |grad|


def _two_behaviours_with_an_offset(seed=0, n=20):
    """Within each behaviour, |score| and control are independent; behaviour 'high' has both larger."""
    rng = np.random.default_rng(seed)
    frames = []
    for name, offset in (("high", 10.0), ("low", 0.0)):
        frames.append(pd.DataFrame({
            "behaviour": name, "layer": 1, "neuron": range(n),
            "score": offset + rng.uniform(size=n), "control_strength": offset / 20 + rng.uniform(0, 0.1, size=n),
        }))
    return pd.concat(frames, ignore_index=True)


def test_pooling_after_ranking_within_behaviours_removes_an_offset():
    t = _two_behaviours_with_an_offset()
    naive = stats.spearmanr(t["score"], t["control_strength"]).statistic
    assert naive > 0.6  # pooling raw values: the offset alone makes a strong correlation
    table = t.assign(**{s: t["score"] for s in SCORES}, readout_cos=0.1, controls=t["control_strength"] > 0.3)
    result = compare(table, n_boot=1000, seed=0, n_permutations=999)
    pooled = result["all"]["grad"]
    within = [result[b]["grad"]["spearman_rho"] for b in ("high", "low")]
    assert abs(pooled["spearman_rho"]) < 0.3 and pooled["p_value"] > 0.05
    assert min(within) - 0.15 < pooled["spearman_rho"] < max(within) + 0.15
    assert pooled["n"] == 40 and pooled["behaviours_pooled"] == ["high", "low"]
    ranks = stats.spearmanr(within_behaviour_ranks(table, "grad"),
                            within_behaviour_ranks(table, "control_strength", absolute=False)).statistic
    assert pooled["spearman_rho"] == pytest.approx(ranks)
    assert result["all"]["pooling"].startswith("within-behaviour percentile ranks")


def test_a_behaviour_without_variation_in_control_is_left_out_of_the_pool():
    t = _two_behaviours_with_an_offset()
    t.loc[t["behaviour"] == "low", "control_strength"] = 0.0
    table = t.assign(**{s: t["score"] for s in SCORES}, readout_cos=0.1, controls=t["control_strength"] > 0.3)
    result = compare(table, n_boot=1000, seed=0, n_permutations=999)
    assert result["all"]["grad"]["behaviours_pooled"] == ["high"] and result["all"]["grad"]["n"] == 20
    low = result["low"]["grad"]
    assert low["spearman_rho"] is None and low["ci_method"] == "none" and low["n"] == 20
    assert low["null_reasons"]["spearman_rho"].startswith("undefined: ")


def _write_parquet(df, path):
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def test_stage_summary_holds_every_figure(tmp_path, monkeypatch, llama, tokenizer):
    """run_attribution on a tiny model: the scores table has the absolute and signed gradient
    columns (AtP = |ā⁺ − ā⁻| · grad) and the summary JSON every figure of the comparison."""
    from neuronaudit.io import write_table
    from neuronaudit.prompts import prompt_table
    from neuronaudit.stages import attribution as stage
    from neuronaudit.stages.common import OpenedModel

    model, adapter = llama
    o = stage_options(AttributionOptions, n_prompts=3, n_boot=1000, batch_size=2, n_permutations=999,
                      model={"chat_template": "none"})
    monkeypatch.setattr(stage, "open_model", lambda *a, **k: OpenedModel(model, tokenizer, adapter, {}, o.model))
    neurons = [(1, 3), (2, 7), (2, 40), (3, 11), (3, 100)]
    window = pd.DataFrame([{"behaviour": "refusal", "layer": l, "neuron": i, "sign": s, "ceiling_x": 8.0,
                            "verdict": "open" if (l, i) in [(2, 7), (3, 11)] else "closed", "kind": "top",
                            "budget": 1.0} for l, i in neurons for s in (1, -1)])
    sweeps = pd.DataFrame([{"behaviour": "refusal", "layer": l, "neuron": i, "sign": s, "x": x, "horizon": 4,
                            "prompt_id": p, "flip": float(j * x / 8 > p), "collapse": 0.0}
                           for j, (l, i) in enumerate(neurons) for s in (1, -1) for x in (1.0, 4.0) for p in range(3)])
    rng = np.random.default_rng(0)
    screen = pd.DataFrame([{"layer": l, "neuron": i, "delta": float(rng.normal()), "std_delta": float(rng.normal()),
                            "mean_pos": float(rng.normal()), "mean_neg": float(rng.normal())}
                           for l in range(adapter.n_layers) for i in range(adapter.n_neurons)])
    write_table(pa.Table.from_pandas(screen, preserve_index=False), tmp_path / "screen.parquet",
                {"positive_set": "harmful", "negative_set": "harmless", "split": "discovery", "n_pos": 8, "n_neg": 8})
    prompts = pd.DataFrame({"prompt_id": [f"p{k}" for k in range(4)], "text": POSITIVE, "split": "heldout",
                            "extra": "{}"})
    write_table(prompt_table(prompts), tmp_path / "prompts.parquet", {"prompt_set": "harmful"})
    spec = {"oracle": "refusal", "behaviour_tokens": ["I", "Sorry"], "default_tokens": ["Here", "Sure"]}
    summary = stage.run_attribution(
        "unused", _write_parquet(window, tmp_path / "window.parquet"),
        _write_parquet(sweeps, tmp_path / "sweeps.parquet"), {"refusal": tmp_path / "screen.parquet"},
        {"refusal": tmp_path / "prompts.parquet"}, {"refusal": spec}, tmp_path / "scores.parquet",
        tmp_path / "summary.json", o,
    )
    scores = pq.read_table(tmp_path / "scores.parquet").to_pandas()
    assert {"grad", "grad_signed", "atp", "atp_signed"} <= set(scores.columns)
    assert (scores["grad"] >= scores["grad_signed"].abs() - 1e-12).all()
    diff = screen.set_index(["layer", "neuron"]).loc[list(zip(scores["layer"], scores["neuron"]))]
    np.testing.assert_allclose(scores["atp"], np.abs(diff["mean_pos"] - diff["mean_neg"]).to_numpy() * scores["grad"])
    doc = json.loads((tmp_path / "summary.json").read_text())
    for group in ("all", "refusal"):
        for score in SCORES:
            entry = doc["comparison"][group][score]
            assert {"n", "spearman_rho", "p_value", "rho_ci95", "ci_method", "ci_fallback_reason",
                    "n_degenerate_resamples", "n_boot", "n_permutations", "precision_at_k", "recall_at_k",
                    "k"} <= set(entry)
            assert entry["n"] == len(neurons) and entry["n_permutations"] == 999
    assert doc["n_permutations"] == 999 and doc["n_boot"] == 1000 and set(doc["scores"]) == set(SCORES)
    assert doc["prompts"]["refusal"]["gradient"] == {"prompt_set": "harmful", "split": "heldout", "n": 3}
    assert doc["prompts"]["refusal"]["atp_means"]["split"] == "discovery"
    assert doc["statement"] == summary["statement"] and "permutation p" in doc["statement"]


def test_an_undefined_statistic_is_written_as_null_with_its_reason(tmp_path):
    """No controller and a constant control strength: ρ, p, CI and precision@k are undefined; the
    summary holds None and says why, and writes as strict JSON (a NaN there would be refused)."""
    table = pd.DataFrame({"behaviour": "b", "layer": 1, "neuron": range(6), "grad": np.arange(6.0),
                          "grad_signed": np.arange(6.0), "atp": np.arange(6.0), "atp_signed": np.arange(6.0),
                          "delta": np.arange(6.0), "std_delta": np.arange(6.0), "dose_response": np.arange(6.0),
                          "readout_cos": 0.1, "control_strength": 0.0, "controls": False})
    entry = compare(table, n_boot=1000, seed=0, n_permutations=999)["b"]["grad"]
    assert entry["spearman_rho"] is None and entry["p_value"] is None and entry["rho_ci95"] == [None, None]
    assert entry["precision_at_k"] is None and entry["k"] == 0
    reasons = entry["null_reasons"]
    assert "constant" in reasons["spearman_rho"] and reasons["precision_at_k"] == "no measured controller (k = 0)"
    write_json({"comparison": {"b": {"grad": entry}}}, tmp_path / "summary.json")
