"""CNA interventions: circuit halves, same-layer random controls, CAA as neuron doses."""

import numpy as np
import pandas as pd

from neuronaudit.methods.cna import cna_interventions, random_circuit, summarise

CIRCUIT = pd.DataFrame({
    "layer": [2, 2, 3, 5], "neuron": [10, 11, 7, 99], "sign": ["pos", "neg", "pos", "pos"],
    "delta": [1.0, -2.0, 0.5, 0.3],
})


def test_random_circuit_keeps_layers_and_avoids_the_circuit():
    control = random_circuit(CIRCUIT, n_neurons=128, seed=3)
    assert sorted(control["layer"]) == sorted(CIRCUIT["layer"])
    taken = set(zip(CIRCUIT.layer, CIRCUIT.neuron))
    assert not taken & set(zip(control.layer, control.neuron))
    assert control.equals(random_circuit(CIRCUIT, 128, 3)) and not control.equals(random_circuit(CIRCUIT, 128, 4))


def test_interventions_cover_factors_halves_controls_and_caa():
    scores = pd.DataFrame({"layer": [2, 2, 3], "neuron": [10, 11, 7], "delta": [1.0, -2.0, 0.5]})
    out = cna_interventions(CIRCUIT, scores, [0.0, 2.0], [-1.0], n_neurons=128)
    assert out["none"] == []
    assert {e.value for e in out["circuit_x0"]} == {0.0} and len(out["circuit_x0"]) == 4
    assert len(out["circuit_pos_x2"]) == 3 and len(out["circuit_neg_x2"]) == 1
    assert len(out["random_x0"]) == 4
    caa = {(e.layer, e.neuron): e.value for e in out["caa_a-1"]}
    assert caa[(2, 11)] == 2.0 and all(e.op == "add" for e in out["caa_a-1"])


def test_summary_reads_refusal_quality_and_capability():
    typed = pd.DataFrame({
        "intervention": ["none", "none", "circuit_x0", "circuit_x0"], "prompt_id": ["a", "b", "a", "b"],
        "horizon": [8] * 4, "sampling": ["greedy"] * 4,
        "rollout_type": ["refusal", "refusal", "coherent_bypass", "refusal"],
        "repetition_ratio": [0.0, 0.2, 0.1, 0.1],
    })
    cap = {"none": {"perplexity": {"median": 10.0}, "accuracy": {"task_knowledge": {"accuracy": 0.5}}}}
    s = summarise(typed, cap, 8).set_index("intervention")
    assert s.loc["none", "refusal_rate"] == 1.0 and s.loc["circuit_x0", "refusal_rate"] == 0.5
    assert s.loc["none", "quality"] == np.float64(0.9)
    assert s.loc["none", "accuracy_task_knowledge"] == 0.5 and np.isnan(s.loc["circuit_x0", "perplexity_median"])
