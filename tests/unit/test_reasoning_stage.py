"""The reasoning stage in process: every table written with provenance, the gate read from the
steered and unsteered rollouts, transfer onto a tiny model of another family (other width and
depth), and a model that solves nothing gets a plain statement instead of a ranking."""

import json

import numpy as np
import pandas as pd
import pytest

from neuronaudit.io import read_provenance
from neuronaudit.options import PromptOptions, ReasoningOptions
from neuronaudit.planted_reasoning import CARRY, save_planted_reasoning_model
from neuronaudit.stages.prepare import run_prepare_model, run_prepare_prompts
from neuronaudit.stages.reasoning import run_reasoning
from neuronaudit.testing import save_tiny_model, stage_options

TABLES = ("problems", "solutions", "neurons", "ablation", "steering", "gate", "transfer")


def _run(out, manifest, options, **kw):
    paths = [out / f"{name}.parquet" for name in TABLES]
    summary = run_reasoning(manifest, *paths, out / "summary.json", options, threads=1, **kw)
    return summary, {name: pd.read_parquet(p) for name, p in zip(TABLES, paths)}


@pytest.fixture(scope="module")
def planted_stage(tmp_path_factory):
    work = tmp_path_factory.mktemp("reasoning_stage")
    files = save_planted_reasoning_model(work / "planted")
    run_prepare_model(str(files["model"]), work / "planted_prepared")
    run_prepare_prompts("planted_problems", str(files["problems"]), work / "problems.parquet",
                        stage_options(PromptOptions))
    gpt2 = save_tiny_model(work / "gpt2", family="gpt2", n_layers=3)
    run_prepare_model(str(gpt2), work / "gpt2_prepared")
    options = stage_options(ReasoningOptions, problem_set="planted_problems", transfer_model=str(gpt2),
                            model={"chat_template": "none"})
    summary, tables = _run(work / "out", work / "planted_prepared" / "manifest.json", options,
                           problems=work / "problems.parquet",
                           transfer_manifest=work / "gpt2_prepared" / "manifest.json")
    return {"summary": summary, "tables": tables, "out": work / "out"}


def test_every_table_carries_provenance_and_the_summary_is_strict_json(planted_stage):
    out = planted_stage["out"]
    for name in TABLES:
        prov = read_provenance(out / f"{name}.parquet")
        assert prov["stage"] == "reasoning" and prov["score_positions"] == ["last_prompt", "generated"], name
        assert prov["weight_sha256"] and prov["git_commit"]
    summary = json.loads((out / "summary.json").read_text())  # strict: NaN would not parse back
    assert summary["status"] == "complete" and summary["scores"]["top"][0]["neuron"] == CARRY[1]
    solutions = planted_stage["tables"]["solutions"]
    assert set(solutions["split"]) == {"discovery", "validation", "heldout"}
    assert set(solutions["model"]) == {"audited", "transfer"}
    discovery = solutions[solutions["split"] == "discovery"]
    assert len(discovery) == summary["discovery"]["n_solutions"] == 24 * 4  # 12 per kind × 4 samples


def test_the_gate_is_the_steered_rollout_where_the_probe_fires_and_the_unedited_one_elsewhere(planted_stage):
    gate = planted_stage["tables"]["gate"]
    held = gate[gate["split"] == "heldout"]
    solutions = planted_stage["tables"]["solutions"]
    none = solutions[(solutions["split"] == "heldout") & (solutions["model"] == "audited")
                     & (solutions["condition"] == "none")].set_index("problem_id")["correct"]
    steered = held["steered_correct_add"].to_numpy(bool)
    expected = np.where(held["fires"], steered, none.loc[held["problem_id"]].to_numpy())
    assert (held["gated_correct_add"].to_numpy(bool) == expected).all()
    assert held["fires"].to_numpy().tolist() == held["failed"].to_numpy().tolist()  # the carry foretells failure


def test_transfer_onto_another_family_is_measured_against_random_mappings(planted_stage):
    transfer = planted_stage["summary"]["transfer"]
    assert transfer["target_layers"] == 3 and not transfer["same_weights_as_audited"]
    assert set(transfer["outcomes"]) == {"none", "carried", "random map0", "random map1"}
    table = planted_stage["tables"]["transfer"]
    carried = table[table["condition"] == "carried"].iloc[0]
    assert len(carried["matches"]) == planted_stage["summary"]["chosen"][transfer["mode"]]["n_top"]
    # relative depth: layer 1 of 2 (the last) maps onto layer 2 of 3
    assert {m["target_layer"] for m in carried["matches"] if m["source_layer"] == 1} == {2}


def test_a_model_without_correct_solutions_gets_a_statement_not_a_ranking(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    run_prepare_model(str(model), tmp_path / "prepared")
    options = stage_options(ReasoningOptions, n_discovery=2, n_validation=1, n_heldout=2, n_samples=1,
                            temperature=0.0, max_new_tokens=3, transfer_model="none", kinds=["arithmetic"])
    summary, tables = _run(tmp_path / "out", tmp_path / "prepared" / "manifest.json", options)
    assert summary["status"] == "no contrast" and "no contrast" in summary["statement"]
    assert summary["discovery"]["n_correct"] == 0 and len(tables["solutions"]) == 2
    assert tables["neurons"].empty and tables["steering"].empty
