"""The sufficient stage's planted ground truth through Snakemake with the default settings: a tiny
Llama whose answer `` yes`` needs two planted neurons together, correlated noise neurons that a
contrastive screen ranks first, and an always-on neuron that gradient × activation ranks first
(src/neuronaudit/planted.py). The user declares the task as any user would (a prompt set with an
answer span and the substitutions that make its perturbations); the assertions read the output
tables only."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from neuronaudit.planted import SUFFICIENT, planted_sufficient_task, save_planted_sufficient_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]
PAIR = {tuple(SUFFICIENT.first), tuple(SUFFICIENT.second)}


@pytest.fixture(scope="module")
def planted_sufficient(tmp_path_factory):
    work = tmp_path_factory.mktemp("planted_sufficient")
    files = save_planted_sufficient_model(work / "planted")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["study"], config["threads"] = "planted_sufficient", 1
    config["model"].update(source=str(files["model"]), chat_template="none")
    config["prompts"]["sets"] = {name: str(ROOT / path) for name, path in config["prompts"]["sets"].items()}
    config["prompts"]["sets"]["planted_notes"] = str(files["notes"])
    config["refusal"]["tune"] = False
    config["sufficient"]["tasks"] = {"planted": planted_sufficient_task()}  # every search setting at its default
    (work / "planted.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--cores", "2",
           "results/planted_sufficient/sufficient/summary.json", "--configfile", str(work / "planted.yaml")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "results" / "planted_sufficient" / "sufficient"


def _neurons(cell) -> set:
    return {tuple(int(x) for x in n) for n in cell}


def test_the_search_returns_exactly_the_planted_pair_on_every_yes_prompt(planted_sufficient):
    precision = pd.read_parquet(planted_sufficient / "precision.parquet")
    yes = precision[precision["target"] == " yes"]
    assert yes["prompt_id"].nunique() >= 2
    found = yes[yes["set"] == "found"]
    for row in found.itertuples():
        assert row.reached and _neurons(row.neurons) == PAIR, row.prompt_id
        assert row.precision >= 0.95 and row.precision_low >= 0.9  # fresh perturbations
        assert row.baseline_precision < 0.5  # the perturbations do move the answer
        assert row.jaccard_disjoint == 1.0 and row.jaccard_reseeded == 1.0
    # the attribution-graph baseline of the same size is reported beside it, and misses
    for kind in ("attribution", "screen"):
        rows = yes[yes["set"] == kind]
        assert len(rows) == len(found)
        assert all(_neurons(r.neurons) != PAIR for r in rows.itertuples())
        assert (rows["precision"].to_numpy() < found["precision"].to_numpy()).all()


def test_the_pair_forces_yes_where_it_is_absent_and_random_sets_do_not(planted_sufficient):
    control = pd.read_parquet(planted_sufficient / "control.parquet")
    yes = control[control["target"] == " yes"]
    found = yes[yes["set"] == "found"]
    assert (found["forcing_rate"] == 1.0).all() and (yes[yes["set"] == "none"]["forcing_rate"] == 0.0).all()
    assert (yes[yes["set"] == "random"]["forcing_rate"] == 0.0).all()
    summary = json.loads((planted_sufficient / "summary.json").read_text())
    task = summary["tasks"]["planted"]
    assert task["stability"]["jaccard_across_prompts_same_target"]["mean"] == 1.0
    assert summary["cost"]["forward_calls"] > 0 and summary["cost"]["token_positions"] > 0
    perturbations = pd.read_parquet(planted_sufficient / "perturbations.parquet")
    assert set(perturbations["split"]) >= {"search", "fresh", "disjoint", "reseeded"}
    assert perturbations["text"].str.startswith("Note about").all()
