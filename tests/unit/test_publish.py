"""Audit bundles: every table loads with ``datasets``, ``audit.json`` follows its schema and marks
what its preconditions do not support, no local path leaves the machine, and compare and the
gallery read bundles."""

import json
import re

import pandas as pd
import pyarrow as pa
import pytest
from report_study import build_study_report, write_study

from neuronaudit import io
from neuronaudit.cli import main
from neuronaudit.errors import NeuronAuditError
from neuronaudit.preconditions import Precondition
from neuronaudit.publish import (
    audit_schema,
    config_name,
    publish,
    read_audit,
    scrub_html,
    scrub_text,
    validate_audit,
)
from neuronaudit.report.compare import build_comparison


def _plant_local_paths(study, root):
    """A model source, a provenance field and a table cell holding absolute paths under ``root``."""
    manifest = json.loads((study / "tune" / "manifest.json").read_text())
    manifest["source"] = str(root / "models" / "my-model")
    (study / "tune" / "manifest.json").write_text(json.dumps(manifest))
    io.write_table(pa.table({"prompt_set": ["harmful"], "source": [str(root / "prompts" / "harmful.jsonl")]}),
                   study / "prompts" / "index.parquet", io.provenance(origin=str(root / "prompts")))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    info = write_study(root)
    _plant_local_paths(info["study"], root)
    build_study_report(info)
    out = publish(info["study"], root / "bundle")
    return root, info, out


def test_no_local_path_appears_anywhere_in_the_bundle(bundle):
    root, _, out = bundle
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert str(root).encode() not in data, path
        assert str(root.resolve()).encode() not in data, path
    # the manifest keeps the model's name, without the folder it came from
    assert json.loads((out / "tune" / "manifest.json").read_text())["source"] == "models/my-model"
    index = pd.read_parquet(out / "prompts" / "index.parquet")
    assert index["source"].tolist() == ["prompts/harmful.jsonl"]


def test_scrub_rewrites_paths_relative_to_the_study_or_the_workflow_and_hides_the_rest(tmp_path):
    study = tmp_path / "results" / "s"
    roots = [(str(study), ""), (str(tmp_path), ""), ("/home/someone", "<local>/")]
    text = f"{study}/window/x.parquet and {tmp_path}/results/models/m/manifest.json and /home/someone/cache/w.bin"
    assert scrub_text(text, roots, sweep=False) == ("window/x.parquet and results/models/m/manifest.json and "
                                                    "<local>/cache/w.bin")
    assert scrub_text("weights at /usr/share/foo/model.bin; ratio 3/4", []) == "weights at <local>/model.bin; ratio 3/4"


def test_the_page_loses_paths_outside_the_known_roots_and_keeps_its_images():
    # a prepared model in a cache outside the study, the workflow, home and tmp (e.g. shared scratch)
    image = "data:image/png;base64,iVBORw0KGgo/usr/lib/AAAA+/bin/x=="
    page = f'<dd>/usr/lib/models/cache/weights</dd><img src="{image}"><p>3/4 of /opt</p>'
    got = scrub_html(page, [])
    assert "/usr/lib/models" not in got and "<dd>&lt;local&gt;/weights</dd>" in got  # shown as text
    assert f'src="{image}"' in got  # base64 is left alone
    assert "3/4 of" in got


def test_audit_json_follows_its_schema_and_carries_every_headline(bundle):
    _, info, out = bundle
    audit = json.loads((out / "audit.json").read_text())
    validate_audit(audit)
    assert audit["schema_version"].startswith("1.") and audit["model"]["weight_sha256"] == "cd" * 32
    keys = [h["key"] for h in audit["headlines"]]
    assert "refusal.tuned" in keys and "sufficient.capitals.precision" in keys and len(keys) == len(set(keys))
    tuned = next(h for h in audit["headlines"] if h["key"] == "refusal.tuned")
    assert tuned["status"] == "reported" and tuned["n"] == 40 and tuned["unit"] == "prompts"
    assert tuned["test"] == "Wilson score interval" and tuned["ci_low"] <= tuned["value"] <= tuned["ci_high"]
    for h in audit["headlines"]:
        for source in h["sources"]:
            assert (out / source).is_file(), source
    # a document that breaks the schema is a one-line error naming the place
    broken = dict(audit, headlines=[dict(tuned, status="fine")])
    with pytest.raises(NeuronAuditError, match=r"^audit.json headlines/0/status: 'fine' is not one of"):
        validate_audit(broken)
    assert audit_schema()["properties"]["schema"]["const"] == "neuronaudit-audit"


def test_screen_cna_keystone_and_reasoning_headlines_state_n_unit_and_test(bundle):
    _, _, out = bundle
    audit = json.loads((out / "audit.json").read_text())
    heads = {h["key"]: h for h in audit["headlines"] if h["stage"] in ("screen", "cna", "keystone", "reasoning")}
    assert {h["stage"] for h in heads.values()} == {"screen", "cna", "keystone", "reasoning"}
    for key, h in heads.items():
        assert isinstance(h["n"], int) and h["n"] > 0 and h["unit"], key
        if h["ci_low"] is not None or h["ci_high"] is not None:
            assert h["test"], key  # a CI says how it was obtained
    # n is the count of the table or summary each figure is read from
    screen = io.read_provenance(out / "screen" / "refusal.scores.parquet")
    h = heads["screen.top.refusal"]
    assert h["n"] == screen["n_pos"] + screen["n_neg"] and f"{screen['n_boot']} resamples" in h["test"]
    assert f"{screen['bootstrap']['n_pairs']} style-matched pairs" in h["test"]
    cna = pd.read_parquet(out / "cna" / "summary.parquet").set_index("intervention")
    fractions = pd.read_parquet(out / "cna" / "fractions.parquet")
    h = heads["cna.refusal_circuit_ablated"]
    assert h["n"] == cna.loc["circuit_x0", "n_prompts"]
    assert h["test"] == f"percentile bootstrap over prompts, {fractions['n_boot'].iloc[0]} resamples"
    assert heads["cna.quality_min"]["test"] is None  # a mean with no CI
    curve = pd.read_parquet(out / "keystone" / "curve.parquet")
    stability = pd.read_parquet(out / "keystone" / "stability.parquet")
    k_max = curve["k"].max()
    n_random = int(((curve["k"] == k_max) & (curve["kind"] == "random")).sum())
    assert heads["keystone.perplexity_ratio_kmax"]["n"] == n_random
    assert f"chance 1/{n_random + 1}" in heads["keystone.separates_at_k"]["test"]
    groups = stability[(stability["basis"] == "task_groups") & (stability["k"] == k_max)]
    assert heads["keystone.stability_iou"]["n"] == groups["split"].nunique()
    assert heads["keystone.stability_iou"]["ci_low"] is None  # a min–max over splits is no CI
    reasoning = json.loads((out / "reasoning" / "summary.json").read_text())
    ablation = pd.read_parquet(out / "reasoning" / "ablation.parquet").set_index("condition")
    neurons = pd.read_parquet(out / "reasoning" / "neurons.parquet")
    assert heads["reasoning.discovery_accuracy"]["n"] == reasoning["discovery"]["n_solutions"]
    assert heads["reasoning.top_neuron"]["n"] == neurons.loc[neurons["rank"] == 1, "n_problems"].iloc[0]
    h = heads["reasoning.ablation_drop"]  # the summary's entry holds no n: the table's row gives it
    assert h["n"] == ablation.loc["ablate zero critical", "n"]
    assert "exact McNemar" in h["test"] and f"{reasoning['provenance']['n_boot']} resamples" in h["test"]
    assert heads["reasoning.gate_auc"]["n"] == reasoning["gate"]["n_heldout"]


def test_every_table_loads_as_a_dataset_config(bundle, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, _, out = bundle
    audit = json.loads((out / "audit.json").read_text())
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "configs:" in front and "weight_sha256: " + "cd" * 32 in front
    assert len(audit["tables"]) == len(list(out.rglob("*.parquet")))
    for table in audit["tables"]:
        assert table["config_name"] == config_name(table["path"])
        assert f"config_name: {table['config_name']}" in front
        # datasets read HF_DATASETS_CACHE when imported: only cache_dir keeps a stale cache out
        loaded = datasets.load_dataset(str(out), table["config_name"], split="train",
                                       cache_dir=str(tmp_path / "cache"))
        assert loaded.num_rows == table["rows"] and loaded.column_names == table["columns"], table["path"]


def test_a_failed_precondition_is_marked_in_audit_json_and_the_card(tmp_path):
    info = write_study(tmp_path)
    study = info["study"]
    doc = json.loads((study / "preconditions.json").read_text())
    bad = Precondition("behaviour_on_positive", "behaviour:refusal", 0.0, 0.25, "min", 12,
                       "behaviour 'refusal' shown on 0/12 positive prompts").as_dict()
    doc["failed"] = [bad]
    doc["preconditions"].append(bad)
    (study / "preconditions.json").write_text(json.dumps(doc))
    (study / "report" / "index.html").write_text("<html></html>")  # audit.json is read from the tables
    out = publish(study, tmp_path / "bundle")
    audit = json.loads((out / "audit.json").read_text())
    marked = {h["key"]: h for h in audit["headlines"] if h["status"] == "not meaningful"}
    assert "screen.top.refusal" in marked and "refusal.tuned" not in marked
    assert marked["screen.top.refusal"]["value"] is None and marked["screen.top.refusal"]["published"] is None
    assert marked["screen.top.refusal"]["failed_preconditions"] == ["behaviour_on_positive [behaviour:refusal]"]
    card = (out / "README.md").read_text()
    assert "behaviour_on_positive [behaviour:refusal]" in card and "not meaningful" in card


def test_publish_refuses_a_study_without_its_report_and_an_output_inside_it(tmp_path):
    info = write_study(tmp_path)
    with pytest.raises(NeuronAuditError, match="has no report/index.html"):
        publish(info["study"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(NeuronAuditError, match="must lie outside the study folder"):
        publish(info["study"], info["study"] / "bundle")


def test_compare_and_the_gallery_read_bundles(bundle, tmp_path, capsys):
    root, info, out = bundle
    other = write_study(tmp_path, name="second", seed=1)
    build_study_report(other)
    second = publish(other["study"], tmp_path / "second-bundle")
    page = build_comparison({"first": out, "second": second}, tmp_path / "compare.html").read_text()
    assert "first" in page and "second" in page and "Precision against set size" in page
    assert main(["gallery", str(out), str(second), "--out", str(tmp_path / "gallery" / "index.html")]) == 0
    gallery = (tmp_path / "gallery" / "index.html").read_text()
    assert gallery.count('href="../') >= 4  # each audit's report and audit.json, relative to the page
    for audit in (read_audit(out), read_audit(second)):
        tuned = next(h for h in audit["headlines"] if h["key"] == "refusal.tuned")
        assert re.search(re.escape(format(tuned["value"], ".3g")) + r" \(95% CI", gallery)
    assert str(tmp_path) not in gallery and str(root) not in gallery
