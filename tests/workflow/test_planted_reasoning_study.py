"""The reasoning stage's planted ground truth through Snakemake with the default reasoning settings: a
tiny Llama whose answer is right only when one planted "carry" neuron fires, which it does on the
easy cues and not on the hard ones (src/neuronaudit/planted_reasoning.py). The user declares the
problems as any user would (a prompt set whose rows carry the exact answer and a kind); the
assertions read the output tables only."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from neuronaudit.planted_reasoning import CARRY, planted_problem_file_rows, save_planted_reasoning_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def planted_reasoning(tmp_path_factory):
    work = tmp_path_factory.mktemp("planted_reasoning")
    files = save_planted_reasoning_model(work / "planted")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["study"], config["threads"] = "planted_reasoning", 1
    config["model"].update(source=str(files["model"]), chat_template="none")
    # the prompt sets the run reads: the keystone task groups (also the screen's universal sets) and the planted ones
    keep = set(config["keystone"]["groups"]) | set(config["screen"]["universal_sets"])
    config["prompts"]["sets"] = {name: str(ROOT / path) for name, path in config["prompts"]["sets"].items()
                                 if name in keep}
    config["prompts"]["sets"]["planted_problems"] = str(files["problems"])
    config["refusal"]["tune"] = False  # the planted model is audited as built; transfer then maps it onto itself
    # their prompt sets are not kept
    config["refusal"].update(styled_harmful=None, styled_harmless=None, validation_sounding=None)
    # the default behaviours need a chat model: one planted behaviour replaces them (the answer "yes" on the
    # colour notes, not on the animal notes), so the stage also ablates its screen's top set (and the
    # keystone ranking's); the sufficient-set tasks go with the default prompt sets
    rows = planted_problem_file_rows()
    for kind in ("colour", "animal"):
        (work / f"{kind}.jsonl").write_text("".join(json.dumps({"prompt_id": r["prompt_id"], "text": r["text"]}) + "\n"
                                                    for r in rows if r["kind"] == kind))
        config["prompts"]["sets"][f"planted_{kind}"] = str(work / f"{kind}.jsonl")
    config["behaviours"] = {"says_yes": {"positive": "planted_colour", "negative": "planted_animal",
                                         "oracle": "logit_pair", "behaviour_tokens": ["yes"], "default_tokens": ["no"],
                                         "horizons": [1]}}
    config["cna"]["behaviour"] = "says_yes"
    config["sufficient"]["tasks"] = {}
    config["reasoning"]["problem_set"] = "planted_problems"  # every reasoning setting at its default
    (work / "planted.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--cores", "2",
           "results/planted_reasoning/reasoning/summary.json", "--configfile", str(work / "planted.yaml")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "results" / "planted_reasoning" / "reasoning"


def test_the_carry_neuron_ranks_first_with_a_tight_bootstrap(planted_reasoning):
    neurons = pd.read_parquet(planted_reasoning / "neurons.parquet")
    top = neurons[neurons["scope"] == "all"].sort_values("rank").iloc[0]
    assert (top["layer"], top["neuron"]) == CARRY
    assert top["top_share"] == 1.0 and top["w_low"] > 3.0 and top["rel_low"] > 0.99
    for kind in ("colour", "animal"):  # found again on each kind alone
        first = neurons[neurons["scope"] == kind].sort_values("rank").iloc[0]
        assert (first["layer"], first["neuron"]) == CARRY, kind
    problems = pd.read_parquet(planted_reasoning / "problems.parquet")
    assert problems.groupby("split")["problem_id"].nunique().to_dict() == {"discovery": 24, "validation": 10,
                                                                           "heldout": 20}
    assert problems["problem_id"].is_unique


def test_steering_toward_g_raises_heldout_accuracy_and_random_neurons_do_not(planted_reasoning):
    steering = pd.read_parquet(planted_reasoning / "steering.parquet")
    held = steering[(steering["split"] == "heldout") & (steering["target_kind"] == "all")]
    for mode in ("add", "blend"):
        chosen = held[(held["mode"] == mode) & (held["chosen"] == True)]  # noqa: E712 (a nullable column)
        critical = chosen[chosen["set"] == "critical"].iloc[0]
        assert critical["accuracy"] == 1.0 and critical["delta_low"] > 0.2 and critical["mcnemar_p"] < 0.01, mode
        assert critical["vs_random_delta"] > 0.3 and critical["vs_random_low"] > 0.2, mode
        random = chosen[chosen["set"] == "random"]
        assert len(random) == 2 and (random["delta"] == 0).all(), mode
        # coherence is measured: no loops; the flipped answers are improbable to the unsteered model (it
        # answers "qq" there by construction), so its perplexity flags them
        assert critical["repetition_ratio"] == 0.0 and critical["collapse_rate"] <= 0.6
    summary = json.loads((planted_reasoning / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["steering"][summary["primary_mode"]]["statement"].endswith("distinguishable from no change.")


def test_ablating_the_carry_breaks_the_easy_problems_and_random_sets_do_not(planted_reasoning):
    ablation = pd.read_parquet(planted_reasoning / "ablation.parquet")
    rows = ablation[ablation["target_kind"] == "all"].set_index("condition")
    none_accuracy = rows.loc["none", "accuracy"]
    assert 0.3 <= none_accuracy <= 0.7
    for mode in ("zero", "mean"):
        assert rows.loc[f"ablate {mode} critical", "accuracy"] == 0.0
        for r in range(2):
            assert rows.loc[f"ablate {mode} random{r}", "delta"] == 0.0
    # the top sets of the other stages, ablated beside them: the screen contrasts the yes and no cues
    # (the carry fires on easy cues of both), the keystone ranking is cross-task strength
    assert {"ablate zero keystone", "ablate zero screen:says_yes"} <= set(rows.index)


def test_the_gate_sees_failure_coming_and_transfer_beats_a_random_mapping(planted_reasoning):
    summary = json.loads((planted_reasoning / "summary.json").read_text())
    gate = summary["gate"]
    assert gate["fitted"] and gate["auc"] == 1.0
    primary = gate["policies"][summary["primary_mode"]]
    assert primary["gated"]["accuracy"] == 1.0 and primary["retention_gated"]["retention"] == 1.0
    assert gate["fire_rate"] < 1.0  # it steers only the problems it expects to fail
    transfer = summary["transfer"]
    assert transfer["same_weights_as_audited"] and transfer["match_quality"]["same_index_share"] == 1.0
    assert transfer["outcomes"]["carried"]["delta"] > 0.3
    assert all(transfer["outcomes"][f"random map{r}"]["delta"] == 0.0 for r in range(2))
    gate_table = pd.read_parquet(planted_reasoning / "gate.parquet")
    assert set(gate_table["split"]) == {"discovery", "heldout"}
