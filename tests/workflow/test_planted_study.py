"""Planted ground truth, end to end: a tiny Llama whose controller, relay, direct and keystone
neurons are known (src/neuronaudit/planted.py), a user-declared behaviour with a logit-pair oracle
and no chat template, run through Snakemake with the default settings of every method. The
assertions read the output tables only."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from neuronaudit.planted import PLANTED, save_planted_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]
TARGETS = ("screen/planted.scores.parquet", "window/window.parquet", "window/summary.json",
           "attribution/scores.parquet", "attribution/summary.json", "keystone/scores.parquet",
           "keystone/summary.json")


@pytest.fixture(scope="module")
def planted_study(tmp_path_factory):
    work = tmp_path_factory.mktemp("planted")
    files = save_planted_model(work / "planted")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    # one config file: the default study with the model, the behaviour and the prompt sets swapped;
    # every method setting stays at its default
    config["study"], config["threads"] = "planted", 1
    config["model"].update(source=str(files["model"]), chat_template="none")
    config["prompts"]["sets"] = {name: str(ROOT / path) for name, path in config["prompts"]["sets"].items()}
    config["prompts"]["sets"].update(planted_on=str(files["on"]), planted_off=str(files["off"]))
    config["behaviours"] = {"planted": {"positive": "planted_on", "negative": "planted_off", "oracle": "logit_pair",
                                        "behaviour_tokens": ["yes"], "default_tokens": ["no"], "horizons": [1]}}
    config["refusal"]["tune"] = False  # the planted model is audited as built
    config["cna"]["behaviour"] = "planted"
    # the sufficient-set tasks that name a default behaviour go with it; those on prompt sets stay
    config["sufficient"]["tasks"] = {t: spec for t, spec in config["sufficient"]["tasks"].items() if "set" in spec}
    (work / "planted.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--cores", "2",
           *[f"results/planted/{t}" for t in TARGETS], "--configfile", str(work / "planted.yaml")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "results" / "planted"


def _row(table: pd.DataFrame, where: tuple[int, int], **match) -> pd.Series:
    sel = (table["layer"] == where[0]) & (table["neuron"] == where[1])
    for column, value in match.items():
        sel &= table[column] == value
    assert sel.sum() == 1, (where, match)
    return table[sel].iloc[0]


def test_screen_ranks_the_planted_contrast_neurons_top_and_flags_the_keystone_universal(planted_study):
    scores = pd.read_parquet(planted_study / "screen/planted.scores.parquet")
    planted = {PLANTED.controller, PLANTED.direct}
    for column in ("delta", "std_delta"):  # the circuit's default ranking and the window's
        top = scores.reindex(scores[column].abs().sort_values(ascending=False).index).head(2)
        assert set(zip(top["layer"], top["neuron"])) == planted, column
    assert not _row(scores, PLANTED.controller)["universal"] and not _row(scores, PLANTED.direct)["universal"]
    assert _row(scores, PLANTED.keystone)["universal"]  # on everywhere: excluded from circuits, and reported


def test_the_dose_sweep_finds_the_controllers_trigger_below_its_ceiling(planted_study):
    window = pd.read_parquet(planted_study / "window/window.parquet")
    summary = json.loads((planted_study / "window/summary.json").read_text())
    assert summary["baseline_unintervened"]["planted"]["baseline_flip"] == 0.0
    controller = _row(window, PLANTED.controller, sign=1)
    # the relay fires between x = 0.5 and 0.75; the dose itself wins the readout at x = 4
    assert controller["verdict"] == "open" and controller["trigger_x"] == 0.75 and controller["ceiling_x"] == 4.0
    direct = _row(window, PLANTED.direct, sign=1)
    assert direct["verdict"] == "open" and direct["trigger_x"] <= 0.2
    # negative controls: no random neuron and no other screened neuron controls the answer
    others = window[~window.set_index(["layer", "neuron"]).index.isin([PLANTED.controller, PLANTED.direct])]
    assert len(others) >= 40 and (others["verdict"] == "closed").all() and others["trigger_x"].isna().all()


def test_the_gradient_misses_the_controller_that_the_sweep_finds(planted_study):
    scores = pd.read_parquet(planted_study / "attribution/scores.parquet")
    summary = json.loads((planted_study / "attribution/summary.json").read_text())
    ranked = scores.sort_values("grad", ascending=False).reset_index(drop=True)
    assert (ranked.loc[0, "layer"], ranked.loc[0, "neuron"]) == PLANTED.direct  # on the readout: found
    controller = _row(scores, PLANTED.controller)
    assert controller["controls"] and controller["control_strength"] == 1.0
    rank = int(ranked.index[(ranked["layer"] == PLANTED.controller[0])
                            & (ranked["neuron"] == PLANTED.controller[1])][0]) + 1
    assert rank > len(ranked) * 0.75, rank  # in the bottom quarter of the candidates by |∂m/∂a|
    assert controller["grad"] < 0.01 * _row(scores, PLANTED.direct)["grad"]
    assert [PLANTED.controller] == [(m["layer"], m["neuron"]) for m in summary["missed_by_gradient"]]
    assert set(zip(scores[scores["controls"]]["layer"], scores[scores["controls"]]["neuron"])) == {
        PLANTED.controller, PLANTED.direct}


def test_keystone_ablation_collapses_the_output_against_random_controls(planted_study):
    scores = pd.read_parquet(planted_study / "keystone/scores.parquet")
    assert _row(scores, PLANTED.keystone)["rank"] == 1 and not _row(scores, PLANTED.keystone)["super_weight_outlier"]
    summary = json.loads((planted_study / "keystone/summary.json").read_text())
    k1 = next(row for row in summary["curve"]["per_k"] if row["k"] == 1)
    assert k1["perplexity"]["separates"] and k1["perplexity"]["ratio_to_random_max"] > 1000
    assert k1["perplexity"]["random_max"] < 1.01 * summary["curve"]["baseline"]["perplexity"]
