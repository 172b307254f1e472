"""Every supported architecture family through the quick DAG: a tiny random model of each family
(neuronaudit.models.architectures.supported_families), saved as a local model directory with the
byte-level tokenizer, is audited by the same config but for ``model.source``,
``model.chat_template`` and the behaviour's prompt sets (drawn for each model, below). The llama
model has the ChatML template (as SmolLM2 and Qwen) and runs with ``auto``; the other families'
models have none (as the base models of those families) and run with the plain prompt format,
``none``.

A random model shows no refusal, so the audited behaviour is a logit-pair one (the first token
is "I" or "1" rather than "The" or "A"). Its positive and negative prompt sets are drawn for each
model from prefixes of the generic prompts: those where this model's first-token logits favour
the behaviour tokens, and those where they favour the default tokens. Then every precondition can
pass, and the baseline rates the preconditions stage measures through its own path (prompt
tables, template, forward) must come out at 1 and 0.

The model is audited as built (refusal.tune false) and no sufficient-set task is declared; every
other rule of the DAG runs, the report included. The families run two at a time, each Snakemake
run on one core. The assertions read the output files only."""

import json
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tiny_study import TINY_STUDY

from neuronaudit.config import deep_update
from neuronaudit.evaluation.oracles import logit_pair_margin
from neuronaudit.interventions.generation import encode_prompts
from neuronaudit.methods.window import logit_pair_columns
from neuronaudit.models.architectures import supported_families
from neuronaudit.models.loading import load_model
from neuronaudit.prompts import is_heldout
from neuronaudit.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]

FAMILIES = tuple(supported_families())

#: The families whose tiny model has the ChatML template and runs with ``chat_template: auto``.
CHAT_FAMILIES = ("llama",)
BEHAVIOUR = "next_word"
SPEC = {"oracle": "logit_pair", "behaviour_tokens": ["I", "1"], "default_tokens": ["The", "A"], "horizons": [2]}
#: The default study's prompt sets the DAG reads besides the behaviour's: refusal (harmful,
#: harmless, generic, and the styled sets of its evaluation), the capability checks of CNA and
#: keystone (generic, task_knowledge, task_arithmetic), which are also the keystone groups.
SETS = ("harmful", "harmless", "harmful_styles", "harmless_styles", "generic", "task_knowledge", "task_arithmetic")
GROUPS = ["generic", "task_knowledge", "task_arithmetic"]
#: Prompts of each split in the drawn behaviour sets (the tiny study keeps 3 of each).
PER_SPLIT = 4
#: Every rule of the DAG but tune_refusal (the model is audited as built) and sufficient (no
#: sufficient-set task: it adds no code path of its own per family, only a job)
RULES = {"all", "prepare_model", "prepare_prompts", "evaluate_refusal", "refusal_rollouts", "collect_activations",
         "preconditions", "screen", "cna", "keystone", "window", "attribution", "reasoning", "report"}


def chat_template(family: str) -> str:
    return "auto" if family in CHAT_FAMILIES else "none"


def draw_behaviour_sets(model_dir: Path, template: str, split: dict, out: Path) -> dict[str, Path]:
    """The positive (``next_on``) and negative (``next_off``) prompt files of the behaviour for
    this model: prefixes of the generic prompts ranked by the model's logit-pair margin, the
    ``PER_SPLIT`` largest of each split with a positive margin and the ``PER_SPLIT`` smallest with
    a negative one."""
    texts = [json.loads(line)["text"] for line in (ROOT / "config/prompts/generic.jsonl").read_text().splitlines()]
    pool = [" ".join(t.split()[:k]) for t in texts for k in (5, 8, 12)]
    model, tokenizer, _ = load_model(model_dir)
    keep, beh, dflt = logit_pair_columns(tokenizer, SPEC)
    margins = []
    with torch.inference_mode():  # one prompt per forward, as the preconditions stage reads them
        for row in encode_prompts(tokenizer, pool, template):
            logits = model(input_ids=torch.tensor([row])).logits[0, -1].float()
            margins.append(float(logit_pair_margin(logits[keep].numpy()[None], beh, dflt)[0]))
    rows = pd.DataFrame({"prompt_id": [f"next-{i:03d}" for i in range(len(pool))], "text": pool, "margin": margins})
    rows["heldout"] = [is_heldout(p, split["split_seed"], split["heldout_fraction"]) for p in rows["prompt_id"]]
    files = {}
    for name, shown in (("next_on", rows[rows["margin"] > 0]), ("next_off", rows[rows["margin"] < 0])):
        shown = shown.sort_values("margin", ascending=name == "next_off", kind="stable")
        chosen = shown.groupby("heldout", sort=False).head(PER_SPLIT)
        assert (chosen.groupby("heldout").size() == PER_SPLIT).all() and len(chosen) == 2 * PER_SPLIT, (
            f"{name}: the random model's margin has this sign on too few prompts ({len(shown)} of {len(rows)})")
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"prompt_id": p, "text": t}) + "\n"
                                       for p, t in zip(chosen["prompt_id"], chosen["text"])))
    return files


def family_config(family: str, model_dir: Path) -> dict:
    """The quick study (config/config.yaml, config/quick.yaml, the tiny study's settings) on this
    model with the logit-pair behaviour in place of the default behaviours (its prompt sets,
    ``next_on`` and ``next_off``, are added once drawn)."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    deep_update(config, yaml.safe_load((ROOT / "config/quick.yaml").read_text()))
    deep_update(config, json.loads(json.dumps(TINY_STUDY)))
    config["study"] = family
    config["model"].update(source=str(model_dir), chat_template=chat_template(family))
    config["prompts"]["sets"] = {name: str(ROOT / f"config/prompts/{name}.jsonl") for name in SETS}
    config["behaviours"] = {BEHAVIOUR: {"positive": "next_on", "negative": "next_off", **SPEC}}
    config["refusal"]["tune"] = False
    config["refusal"]["validation_sounding"] = None  # only the recipe search reads it
    config["collect"]["sets"] = ["next_on", "next_off", *GROUPS]
    config["screen"]["universal_sets"] = ["generic"]
    config["keystone"]["groups"] = GROUPS
    config["cna"]["behaviour"] = BEHAVIOUR
    config["sufficient"]["tasks"] = {}
    # one behaviour: two candidates, so that the two held-out neurons leave one to fit on
    config["window"]["n_candidates"] = 2
    # the tiny window holds out 2 neurons, fewer than the default 5 measured ceilings
    config["preconditions"]["min_measured_ceilings"] = 1
    return config


def prepare_study(family: str, work: Path) -> Path:
    """The family's tiny model, its behaviour prompt sets and its config file in ``work``."""
    model_dir = save_tiny_model(work / "model", family=family, chat_template=family in CHAT_FAMILIES)
    config = family_config(family, model_dir)
    drawn = draw_behaviour_sets(model_dir, chat_template(family), config["prompts"], work)
    config["prompts"]["sets"].update({name: str(path) for name, path in drawn.items()})
    (work / "study.yaml").write_text(yaml.safe_dump(config))
    return work / "study.yaml"


def run_study(work: Path, config: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--cores", "1",
           "--configfile", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def family_runs(request, tmp_path_factory):
    """The selected families' studies, two at a time on one core each (a study's jobs are small
    and mostly in sequence): family -> (work folder, future of the Snakemake run). Models and
    prompt sets are made here, one family after another (the seeded draws share torch's RNG)."""
    chosen = {item.callspec.params.get("family") for item in request.session.items
              if item.path == request.path and hasattr(item, "callspec")}
    selected = [f for f in FAMILIES if f in chosen]
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for family in selected:
        work = tmp_path_factory.mktemp(f"family-{family}")
        try:
            config = prepare_study(family, work)
        except Exception as err:  # reported by that family's tests, not by the others'
            runs[family] = (work, Future())
            runs[family][1].set_exception(err)
            continue
        runs[family] = (work, pool.submit(run_study, work, config))
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def family_study(family, family_runs):
    work, run = family_runs[family]
    return family, work, run.result()


def test_every_job_of_the_dag_finished(family_study):
    family, work, run = family_study
    assert run.returncode == 0, f"{family}: " + run.stderr[-3000:]
    log = run.stdout + run.stderr
    done = re.findall(r"^(\d+) of (\d+) steps \(100%\) done", log, re.M)
    assert done and done[-1][0] == done[-1][1], log[-2000:]
    assert set(re.findall(r"^(?:local)?rule (\w+):", log, re.M)) == RULES
    manifest = json.loads(next((work / "results/models").glob("local-*/manifest.json")).read_text())
    assert manifest["family"] == family
    assert not list(work.rglob(".*.tmp-*"))


def test_every_precondition_passed_on_the_behaviour(family_study):
    family, work, _ = family_study
    doc = json.loads((work / f"results/{family}/preconditions.json").read_text())
    assert doc["failed"] == [] and all(p["passed"] for p in doc["preconditions"]), doc["failed"]
    checks = {(p["name"], p["scope"]): p for p in doc["preconditions"]}
    expected = {("tokenizer_coverage", f"set:{s}") for s in (*SETS, "next_on", "next_off")}
    expected |= {(name, f"behaviour:{BEHAVIOUR}")
                 for name in ("behaviour_on_positive", "behaviour_on_negative", "oracle_readability")}
    assert set(checks) == expected | {("judge_accuracy", "judge")}
    assert all(p["n"] > 0 for p in doc["preconditions"])
    assert checks[("behaviour_on_positive", f"behaviour:{BEHAVIOUR}")]["n"] == 3  # the tiny study's 3 held out
    # the prompts were drawn by this model's margin sign: the stage measures it through its own path
    assert doc["baseline_rates"][BEHAVIOUR] == {"horizon": 2, "positive": 1.0, "negative": 0.0}
    assert doc["chat_template"] == ("the model's chat template" if family in CHAT_FAMILIES
                                    else "raw text (no chat template)")


def test_the_screen_window_and_report_outputs_are_written(family_study):
    family, work, _ = family_study
    study = work / "results" / family
    for table in (f"screen/{BEHAVIOUR}.scores.parquet", f"screen/{BEHAVIOUR}.circuit.parquet",
                  "window/window.parquet", "window/sweeps.parquet", "attribution/scores.parquet",
                  "cna/summary.parquet", "keystone/scores.parquet"):
        assert len(pd.read_parquet(study / table)) > 0, table
    for doc in ("window/summary.json", "attribution/summary.json", "keystone/summary.json", "reasoning/summary.json"):
        assert json.loads((study / doc).read_text()), doc
    figures = list((study / "report/figures").rglob("*.png"))
    assert figures and all(f.stat().st_size > 0 for f in figures)
    html = (study / "report/index.html").read_text()
    assert "Every precondition passed." in html and "Audit preconditions" in html
    assert "not meaningful" not in html
