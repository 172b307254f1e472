"""Capability report: perplexity under a plan, exact-answer accuracy, batched greedy generation."""

import json

import numpy as np
import pandas as pd
import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation import capability
from neuronaudit.evaluation.capability import (
    ablation_plan,
    answer_kind,
    capability_report,
    check_answers,
    generate_responses,
)
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit
from neuronaudit.interventions.scoring import text_perplexity

KNOWLEDGE = pd.DataFrame(
    {
        "prompt_id": ["k1", "k2", "k3", "k4"],
        "text": ["Capital of France?", "Capital of China?", "Colour of grass?", "Legs of a spider?"],
        "answer": ["paris", "beijing", "green", "8"],
        "aliases": [[], ["peking"], [], ["eight"]],
    }
)
# a prepared prompt table: answers live in the JSON 'extra' column
ARITHMETIC = pd.DataFrame(
    {
        "prompt_id": ["a1", "a2", "a3"],
        "text": ["What is 7 + 8?", "What is 12 - 6?", "What is 3 times 4?"],
        "split": ["heldout"] * 3,
        "extra": [json.dumps({"answer": v}) for v in (15, 6, 12)],
    }
)
GENERIC = ["The river flows through the old city.", "Cats are animals and the sky is blue."]


def test_accuracy_with_a_monkeypatched_generation(llama, tokenizer, monkeypatch):
    model, adapter = llama
    canned = {
        "Capital of France?": "The capital is Paris.",
        "Capital of China?": "Peking!",
        "Colour of grass?": "It is blue.",
        "Legs of a spider?": "Spiders have eight legs",
        "What is 7 + 8?": "7 + 8 = 15",
        "What is 12 - 6?": "12 - 6 = 6",
        "What is 3 times 4?": "3 times 4 is 7",
    }
    seen = {}

    def fake(model_, tokenizer_, adapter_, prompts, plan=None, **kw):
        seen.setdefault("plans", []).append(plan)
        seen.setdefault("prompts", []).extend(prompts)
        out = []
        for p in prompts:
            user = next(q for q in canned if q in p)
            out.append(canned[user])
        return out

    monkeypatch.setattr(capability, "generate_responses", fake)
    plan = ablation_plan([(1, 3), (2, 5)])
    rep = capability_report(
        model, tokenizer, adapter, GENERIC, {"task_knowledge": KNOWLEDGE, "task_arithmetic": ARITHMETIC},
        plan=plan, return_responses=True,
    )
    assert rep["accuracy"]["task_knowledge"] == {"accuracy": 0.75, "n_correct": 3, "n": 4, "kind": "knowledge"}
    assert rep["accuracy"]["task_arithmetic"] == {
        "accuracy": pytest.approx(2 / 3), "n_correct": 2, "n": 3, "kind": "arithmetic"
    }
    assert rep["responses"]["task_knowledge"][0] == "The capital is Paris."
    assert all(p is plan for p in seen["plans"])  # the plan is active during generation
    assert len(seen["plans"]) == 1 and len(seen["prompts"]) == 7  # every group in one generation
    assert all("<|im_start|>assistant" in p for p in seen["prompts"])  # chat template applied
    expected = text_perplexity(model, tokenizer, adapter, GENERIC, plan=plan)
    assert rep["perplexity"]["median"] == pytest.approx(float(np.median(expected)))
    assert rep["perplexity"]["mean"] == pytest.approx(float(np.mean(expected)))
    assert rep["perplexity"]["n"] == 2


def test_ablation_changes_perplexity_and_covers_every_position(llama, tokenizer):
    model, adapter = llama
    plan = ablation_plan([(l, i) for l in range(adapter.n_layers) for i in range(0, adapter.n_neurons, 2)])
    assert all(e.positions == ("prompt", "generated") and e.op == "scale" and e.value == 0 for e in plan.rows[0])
    plain = capability_report(model, tokenizer, adapter, GENERIC, {})["perplexity"]
    ablated = capability_report(model, tokenizer, adapter, GENERIC, {}, plan=plan)["perplexity"]
    assert plain["median"] != pytest.approx(ablated["median"], rel=1e-3)


def test_batched_left_padded_generation_equals_one_at_a_time(llama, tokenizer):
    model, adapter = llama
    prompts = ["How do I bake bread at home?", "Hello!", "Paris is the capital of"]
    batched = generate_responses(model, tokenizer, adapter, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_responses(model, tokenizer, adapter, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(r, str) and r for r in batched)
    stored = model.generation_config
    try:  # a model's stored sampling / penalty settings never leak into the measurement
        model.generation_config = stored.__class__(do_sample=True, temperature=5.0, repetition_penalty=50.0)
        assert generate_responses(model, tokenizer, adapter, prompts, max_new_tokens=6, batch_size=3) == batched
    finally:
        model.generation_config = stored
    dosed = InterventionPlan.broadcast([NeuronEdit.dose(3, i, 300.0) for i in range(8)])
    steered = generate_responses(model, tokenizer, adapter, prompts, plan=dosed, max_new_tokens=6, batch_size=3)
    assert steered != batched
    per_row = InterventionPlan.per_row([[], [NeuronEdit.dose(3, i, 300.0) for i in range(8)], []])
    mixed = generate_responses(model, tokenizer, adapter, prompts, plan=per_row, max_new_tokens=6, batch_size=2)
    assert mixed[0] == batched[0] and mixed[2] == batched[2] and mixed[1] == steered[1]
    with pytest.raises(NeuronAuditError, match="plan has 2 rows"):
        generate_responses(model, tokenizer, adapter, prompts, plan=InterventionPlan.per_row([[], []]))


def test_check_answers_and_kinds():
    assert answer_kind("task_arithmetic", ["x"]) == "arithmetic"
    assert answer_kind("task_knowledge", [1]) == "knowledge"
    assert answer_kind("mine", [1, 2]) == "arithmetic" and answer_kind("mine", ["a"]) == "knowledge"
    ok = check_answers(["15", "The answer is 6", "3 × 4 = 12"], ARITHMETIC, "arithmetic")
    assert ok.tolist() == [True, True, True]
    ok = check_answers(["7", "12", "3"], ARITHMETIC, "arithmetic")  # echoes of an operand are wrong
    assert ok.tolist() == [False, False, False]
    with pytest.raises(NeuronAuditError, match="responses for"):
        check_answers(["1"], ARITHMETIC, "arithmetic")
    with pytest.raises(NeuronAuditError, match="no 'answer'"):
        check_answers(["1"], pd.DataFrame({"text": ["x"]}), "arithmetic")
