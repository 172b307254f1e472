"""The audit report: self-contained HTML, escaping, numbers taken from the inputs, run times."""

from __future__ import annotations

import base64
import html
import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from neuronaudit import io
from neuronaudit.errors import NeuronAuditError
from neuronaudit.report import captions, plots
from neuronaudit.report import page as report

EVIL_SCRIPT = "<script>alert(1)</script>"
EVIL_IMG = "<img src=x onerror=alert(1)>"
N_LAYERS, N_NEURONS = 3, 16
SPIKE = (1, 5, 1000.0)  # layer, neuron, max_abs planted in the EVIL_SCRIPT set
COUNTS = {"harmless": 40, EVIL_SCRIPT: 25}
MANIFEST = {
    "source": "https://huggingface.co/example/tiny-model",
    "path": "/models/tiny",
    "model_type": "llama",
    "n_layers": N_LAYERS,
    "d_model": 24,
    "n_neurons": N_NEURONS,
    "weight_sha256": "ab" * 32,
}
CONFIG = {"study": "unit", "prompt_sets": {"harmless": {"n": 40}}, "note": EVIL_IMG}


def stats_table(rng: np.random.Generator, count: int, spike: tuple[int, int, float] | None) -> pa.Table:
    n = N_LAYERS * N_NEURONS
    mean_abs = rng.uniform(0.1, 1.0, n)
    max_abs = mean_abs * rng.uniform(2.0, 4.0, n)
    if spike is not None:
        max_abs[spike[0] * N_NEURONS + spike[1]] = spike[2]
    cols = {
        "layer": np.repeat(np.arange(N_LAYERS), N_NEURONS).astype("int32"),
        "neuron": np.tile(np.arange(N_NEURONS), N_LAYERS).astype("int32"),
        "count": np.full(n, count, dtype="int64"),
        "mean": rng.normal(0.0, 0.5, n),
        "std": rng.uniform(0.1, 1.0, n),
        "mean_abs": mean_abs,
        "max_abs": max_abs,
        "frac_positive": rng.uniform(0.0, 1.0, n),
    }
    return pa.Table.from_pydict(cols, schema=io.NEURON_STATS_SCHEMA)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    paths = {}
    for i, name in enumerate(COUNTS):
        prov = io.provenance(
            model_id="example/tiny-model",
            weight_sha256=MANIFEST["weight_sha256"],
            dtype=EVIL_IMG if i == 1 else "float32",
            hook_site="mlp.down_proj",
            prompt_set=name,
            prompt_set_hash=f"hash-{i}",
            positions="all",
            seed=7,
            **({"n_prompts": 12} if i == 0 else {}),
        )
        paths[name] = io.write_table(
            stats_table(rng, COUNTS[name], SPIKE if name == EVIL_SCRIPT else None),
            root / "results" / "stats" / f"set{i}.parquet",
            prov,
        )
    bench = root / "benchmarks" / "collect_stats.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                     "3.25\t0:00:03\t512.5\t900.1\t500.0\t505.0\t1.0\t2.0\t95.0\t3.1\n")
    out = root / "results" / "report" / "report.html"
    returned = report.build_report("unit-study", paths, MANIFEST, CONFIG, [bench], out)
    return {"root": root, "paths": paths, "out": out, "returned": returned,
            "html": out.read_text(encoding="utf-8")}


def summary_items(page: str) -> dict[str, str]:
    block = re.search(r'<section id="summary">(.*?)</section>', page, re.S).group(1)
    pairs = re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", block, re.S)
    return {html.unescape(k): html.unescape(v) for k, v in pairs}


# ---------------------------------------------------------------------------------------------
# build_report


def test_writes_one_html_file_atomically(study):
    out = study["out"]
    assert study["returned"] == out
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary left behind
    page = study["html"]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<html") == 1


def test_no_external_references(study):
    page = study["html"]
    external = r"""(src|href|srcset|action|data)\s*=\s*["']?\s*(https?:|//|javascript:)"""
    assert not re.search(external, page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    # the http URL in the manifest is shown as text, never as a link
    assert html.escape(MANIFEST["source"]) in page
    assert "default-src 'none'" in page


def test_images_are_embedded_pngs(study):
    imgs = re.findall(r"<img\b[^>]*>", study["html"])
    assert imgs
    for tag in imgs:
        src = re.search(r'src="([^"]*)"', tag).group(1)
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_captions_appear(study):
    text = html.unescape(study["html"])
    for name in ("layer_activation_profile", "neuron_outliers"):
        cap = captions.caption(name)
        assert cap and cap in text
        file = captions.CAPTION_DIR / f"{name}.rst"
        if file.exists():
            assert cap == " ".join(file.read_text(encoding="utf-8").split())


def test_figure_links_point_to_the_parquet_tables(study):
    page, out = study["html"], study["out"]
    hrefs = [html.unescape(h) for h in re.findall(r'href="([^"#][^"]*)"', page)]
    expected = {os.path.relpath(p, out.parent) for p in study["paths"].values()}
    assert set(hrefs) == expected
    for h in hrefs:
        assert not os.path.isabs(h) and (out.parent / h).resolve().is_file()


def test_summary_numbers_equal_inputs(study):
    s = summary_items(study["html"])
    assert s["study"] == "unit-study"
    assert s["model"] == "example/tiny-model"
    assert s["model type"] == MANIFEST["model_type"]
    assert s["layers × neurons"] == f"{MANIFEST['n_layers']} × {MANIFEST['n_neurons']}"
    assert s["total neurons"] == str(MANIFEST["n_layers"] * MANIFEST["n_neurons"])
    assert s["d_model"] == str(MANIFEST["d_model"])
    assert s["neurons with statistics"] == f"{N_LAYERS * N_NEURONS} in {N_LAYERS} layers"
    assert s["weights vs stats provenance"] == "match (2 of 2 tables)"
    assert s["prompt sets"] == f"2: harmless, {EVIL_SCRIPT}"
    assert s["prompt set harmless"] == "prompts: 12; activations per neuron: 40; positions: all"
    assert s[f"prompt set {EVIL_SCRIPT}"] == "prompts: missing; activations per neuron: 25; positions: all"


def test_outlier_table_in_page_matches_data(study):
    text = html.unescape(study["html"])
    layer, neuron, value = SPIKE
    first_row = re.search(r"<tbody>\s*<tr>(.*?)</tr>", text, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", first_row, re.S)
    assert cells[:3] == [str(layer), str(neuron), f"{value:.5g}"]
    assert cells[-1] == EVIL_SCRIPT


def test_planted_markup_is_escaped(study):
    page = study["html"]
    for evil in (EVIL_SCRIPT, EVIL_IMG):
        assert evil not in page
        assert html.escape(evil) in page  # it was rendered, as text
    assert "<script" not in page.lower()
    assert "<img src=x" not in page.lower()
    prov = page[page.index('<section id="provenance">'):]
    assert html.escape(EVIL_IMG) in prov  # provenance value and config value
    assert html.escape(EVIL_SCRIPT) in prov  # prompt-set name as a key


def test_render_report_escapes_every_field():
    df = pd.DataFrame({EVIL_IMG: [EVIL_SCRIPT, None], "x": [1.5, float("nan")]})
    fig = report.Figure(EVIL_SCRIPT, "data:image/png;base64,iVBORw0KGgo=", EVIL_IMG,
                        {EVIL_SCRIPT: "tables/a b.parquet"})
    section = report.Section("s1", EVIL_SCRIPT, EVIL_IMG, [
        fig,
        report.Table(EVIL_IMG, df, EVIL_SCRIPT),
        report.Excerpt("generation", f"Sure! {EVIL_SCRIPT}\n{EVIL_IMG}", EVIL_IMG),
    ])
    page = report.render_report(EVIL_SCRIPT, [(EVIL_IMG, EVIL_SCRIPT)], [section],
                                {EVIL_SCRIPT: {"k": EVIL_IMG, "t": df}, "none": None})
    for evil in (EVIL_SCRIPT, EVIL_IMG):
        assert evil not in page
        assert page.count(html.escape(evil)) >= 5
    assert "<script" not in page.lower() and "<img src=x" not in page.lower()
    assert 'href="tables/a%20b.parquet"' in page
    assert page.count(f">{report.MISSING}<") >= 3  # None cell, NaN cell, None provenance value


def test_external_or_script_links_and_images_are_refused():
    with pytest.raises(ValueError):
        report.Figure("t", "https://example.com/x.png", "c")
    for bad in ("https://example.com/t.parquet", "//example.com/t.parquet", "javascript:alert(1)",
                "/abs/t.parquet"):
        with pytest.raises(ValueError):
            report.Figure("t", "data:image/png;base64,iVBORw0KGgo=", "c", bad)
    with pytest.raises(ValueError):
        report.Section('x" onclick="alert(1)', "t")


def test_missing_manifest_values_show_missing(study, tmp_path):
    manifest = {k: v for k, v in MANIFEST.items() if k not in ("n_layers", "weight_sha256")}
    out = report.build_report("partial", study["paths"], manifest, {}, [], tmp_path / "r.html")
    s = summary_items(out.read_text(encoding="utf-8"))
    assert s["layers × neurons"] == f"missing × {N_NEURONS}"
    assert s["total neurons"] == "missing"
    assert s["weights vs stats provenance"] == "missing"


def test_weight_hash_mismatch_is_flagged(study, tmp_path):
    manifest = dict(MANIFEST, weight_sha256="cd" * 32)
    out = report.build_report("bad", study["paths"], manifest, {}, [], tmp_path / "r.html")
    check = summary_items(out.read_text(encoding="utf-8"))["weights vs stats provenance"]
    assert check.startswith("MISMATCH")


def test_missing_stats_file_is_an_error(tmp_path):
    with pytest.raises(NeuronAuditError):
        report.build_report("x", {"a": tmp_path / "nope.parquet"}, MANIFEST, {}, [], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_caption_falls_back_to_inline_default(monkeypatch, tmp_path):
    monkeypatch.setattr(captions, "CAPTION_DIR", tmp_path)
    assert captions.caption("neuron_outliers") == captions._DEFAULT_CAPTIONS["neuron_outliers"]
    with pytest.raises(NeuronAuditError):
        captions.caption("no_such_caption")


# ---------------------------------------------------------------------------------------------
# rule_runtimes


def test_rule_runtimes(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    a = tmp_path / "collect" / "collect_stats.tsv"
    a.parent.mkdir()
    a.write_text(header + "10.0\t0:00:10\t100.5\t1\t1\t1\t0\t0\t50\t9\n"
                          "20.0\t0:00:20\t300.25\t1\t1\t1\t0\t0\t50\t19\n")  # two repeats
    b = tmp_path / "report.benchmark.tsv"
    b.write_text(header + "1.5\t0:00:01\t-\t-\t-\t-\t-\t-\t-\t-\n")  # memory not measured
    df = report.rule_runtimes([a, b])
    assert list(df.columns) == ["rule", "seconds", "max_rss_mb", "benchmark"]
    assert df["rule"].tolist() == ["collect_stats", "report"]
    assert df["seconds"].tolist() == [15.0, 1.5]
    assert df["max_rss_mb"].iloc[0] == 300.25
    assert np.isnan(df["max_rss_mb"].iloc[1])
    assert df["benchmark"].tolist() == ["collect/collect_stats", "report.benchmark"]
    assert report.rule_runtimes([]).empty


def test_rule_runtimes_rejects_a_file_without_seconds(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_text("foo\tbar\n1\t2\n")
    with pytest.raises(NeuronAuditError):
        report.rule_runtimes([bad])


def test_runtimes_in_provenance(study):
    prov = html.unescape(study["html"][study["html"].index('<section id="provenance">'):])
    row = re.search(r"<tr><td>collect_stats</td>(.*?)</tr>", prov).group(1)
    assert re.findall(r">([^<]+)</td>", row) == ["3.25", "512.5", "collect_stats"]


# ---------------------------------------------------------------------------------------------
# plots


@pytest.fixture(scope="module")
def stats(study):
    stats, _ = report.read_stats(study["paths"])
    return stats


def test_neuron_outliers(stats):
    top = plots.neuron_outliers(stats, top=5)
    assert len(top) == 5
    assert list(top.columns) == ["layer", "neuron", "max_abs", "mean_abs", "ratio_to_layer_median",
                                 "peak_prompt_set"]
    assert top["max_abs"].is_monotonic_decreasing
    layer, neuron, value = SPIKE
    first = top.iloc[0]
    assert (first["layer"], first["neuron"], first["max_abs"]) == (layer, neuron, value)
    assert first["peak_prompt_set"] == EVIL_SCRIPT
    per_neuron = stats.groupby(["layer", "neuron"])["max_abs"].max()
    assert first["ratio_to_layer_median"] == pytest.approx(value / per_neuron.loc[layer].median())
    rows = stats[(stats.layer == layer) & (stats.neuron == neuron)]
    expected_mean = (rows["mean_abs"] * rows["count"]).sum() / rows["count"].sum()
    assert first["mean_abs"] == pytest.approx(expected_mean)


def test_layer_activation_profile(stats):
    fig = plots.layer_activation_profile(stats)
    ax0, ax1 = fig.axes[:2]
    assert ax0.get_xlabel() == "layer" and ax0.get_ylabel() == "mean |a| over neurons"
    assert ax1.get_ylabel() == "max |a|" and ax1.get_yscale() == "log"
    colors = plots.palette_for(COUNTS)
    for ax in (ax0, ax1):
        assert len(ax.lines) == len(COUNTS)
        assert {line.get_color() for line in ax.lines} == set(colors.values())
    prof = plots.layer_profile_table(stats)
    spike_row = prof[(prof.prompt_set == EVIL_SCRIPT) & (prof.layer == SPIKE[0])]
    assert spike_row["max_abs_max"].item() == SPIKE[2]
    assert (prof["mean_abs_q10"] <= prof["mean_abs_mean"]).all()
    assert (prof["mean_abs_mean"] <= prof["mean_abs_q90"]).all()
    uri = report.figure_to_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")


def test_palette_is_fixed_and_distinct():
    assert plots.color_for("refusal") == plots.PALETTE["refusal"]
    names = ["refusal", "collapse", "coherent_bypass", "actionable", "set-a", "set-b", "set-c"]
    a, b = plots.palette_for(names), plots.palette_for(reversed(names))
    assert a == b
    assert len(set(a.values())) == len(names)
    assert all(a[n] == plots.PALETTE[n] for n in names if n in plots.PALETTE)


# ---------------------------------------------------------------------------------------------
# a whole synthetic study: stage sections, headlines, figure files, Snakemake helpers


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from report_study import build_study_report, write_study

    info = write_study(tmp_path_factory.mktemp("full"), name="fixture", seed=0, evil=True)
    info["page"] = build_study_report(info)
    info["html"] = info["page"].read_text(encoding="utf-8")
    info["figures"] = info["study"] / "report" / "figures"
    info["manifest_entries"] = json.loads((info["figures"] / "manifest.json").read_text())["figures"]
    return info


def headline_cells(page: str) -> dict[str, dict[str, str]]:
    cells = {}
    for attrs, body in re.findall(r'<td class="headline"([^>]*)>(.*?)</td>', page, re.S):
        a = {k: html.unescape(v) for k, v in re.findall(r'\s(data-[a-z-]+)="([^"]*)"', attrs)}
        a["text"] = html.unescape(re.search(r'<span class="value">(.*?)</span>', body, re.S).group(1))
        a["hrefs"] = [html.unescape(h) for h in re.findall(r'href="([^"]*)"', body)]
        cells[a["data-key"]] = a
    return cells


def test_every_stage_has_its_section_in_order(full):
    ids = re.findall(r'<section id="([^"]+)">', full["html"])
    assert ids == ["summary", "preconditions", "refusal", "screen", "cna", "keystone", "window", "attribution",
                   "sufficient", "reasoning", "activations", "provenance"]
    s = summary_items(full["html"])
    assert s["behaviours audited"] == "refusal (harmful vs harmless); operator (operator_mul vs operator_add)"


def test_headline_attributes_equal_the_json_summaries(full):
    cells = headline_cells(full["html"])
    ev = json.loads((full["study"] / "refusal" / "evaluation.json").read_text())
    window = json.loads((full["study"] / "window" / "summary.json").read_text())
    tuned = ev["tuned"]["refusal_harmful"]
    c = cells["refusal.tuned"]
    assert float(c["data-value"]) == tuned["rate"]
    assert (float(c["data-ci-low"]), float(c["data-ci-high"])) == (tuned["ci_low"], tuned["ci_high"])
    assert f"{tuned['rate']:.1%} (95% CI {tuned['ci_low']:.1%}–{tuned['ci_high']:.1%})" in c["text"]
    a = window["predictor_alignment"]
    c = cells["window.ceiling_mae_alignment"]
    assert float(c["data-value"]) == a["mae_alignment"]
    assert [float(c["data-ci-low"]), float(c["data-ci-high"])] == a["mae_alignment_ci95"]
    # every headline links to an existing table, relative to the page
    for key, c in cells.items():
        assert c["hrefs"], key
        for h in c["hrefs"]:
            assert (full["page"].parent / h).resolve().is_file(), (key, h)


def test_window_headlines_state_their_ci_test_n_and_units(full):
    """Every window headline row (the report's summary, ``neuronaudit headlines`` for README) carries
    its n and units; MAEs, ρ, verdicts and the pivot count carry a CI read from the summary."""
    from neuronaudit.report.compare import headlines_markdown

    cells = headline_cells(full["html"])
    w = json.loads((full["study"] / "window" / "summary.json").read_text())
    a, v = w["predictor_alignment"], w["verdicts"]
    expected = {  # key: (summary entry, value key, CI key)
        "window.ceiling_mae_alignment": (a, "mae_alignment", "mae_alignment_ci95"),
        "window.ceiling_mae_alignment_bulk": (a, "mae_alignment_bulk", "mae_alignment_bulk_ci95"),
        "window.ceiling_mae_x": (a, "mae_x", "mae_x_ci95"),
        "window.ceiling_mae_alignment_kl": (w["predictor_kl"], "mae_alignment", "mae_alignment_ci95"),
        "window.ceiling_mae_alignment_raw_dose": (w["predictor_raw_dose"], "mae_alignment", "mae_alignment_ci95"),
        "window.ceiling_spearman_alignment": (a, "spearman_rho_predicted_vs_measured", "spearman_rho_ci95"),
    }
    for key, (entry, value, ci) in expected.items():
        c = cells[key]
        assert float(c["data-value"]) == entry[value], key
        assert [float(c["data-ci-low"]), float(c["data-ci-high"])] == entry[ci], key
        assert "n = " in c["text"] and "cluster bootstrap over neurons" in c["text"], key
    bulk = cells["window.ceiling_mae_alignment_bulk"]["text"]
    assert f"n = {a['n_pairs_bulk']} neuron × sign pairs of {a['n_neurons_bulk']} neurons" in bulk
    assert "spearman" not in cells["window.ceiling_spearman_alignment"]["text"].lower()
    t = cells["window.verdict_accuracy_with_trigger"]
    assert float(t["data-value"]) == v["correct_with_trigger"] / v["n_with_trigger"] and "data-ci-low" in t
    assert f"n = {v['n_with_trigger']} neurons" in t["text"] and "McNemar p = 1" in t["text"]
    p = cells["window.pivots_actionable"]
    assert float(p["data-value"]) == 0.5 and "Wilson 95% CI" in p["text"] and "n = 2 refusal neurons" in p["text"]
    assert "data-ci-low" in p and "data-ci-low" in cells["window.verdict_accuracy"]
    table = html.unescape(headlines_markdown(full["study"]))
    assert "(the middle 60% of depth)" in table and "bulk = layers 1–2 of 4" in table
    assert "budget units |x| = |d| / B" in table.replace("\\|", "|")
    for label in ("single-pass KL threshold (alignment cosθ", "raw-dose baseline", "Spearman ρ, predicted (a)",
                  "with a trigger in the grid"):
        assert label in table, label


def test_headlines_sit_next_to_the_published_numbers(full):
    from neuronaudit.report.sections import PUBLISHED

    rows = dict(re.findall(r'<tr data-key="([^"]+)">.*?<td class="published">(.*?)</td></tr>', full["html"], re.S))
    assert html.unescape(rows["window.ceiling_mae_alignment"]) == PUBLISHED["window_mae"]
    assert html.unescape(rows["window.verdict_accuracy"]) == PUBLISHED["window_verdicts"]
    assert html.unescape(rows["cna.refusal_circuit_ablated"]) == PUBLISHED["cna_refusal"]
    assert html.unescape(rows["attribution.rho_grad"]) == PUBLISHED["attribution_grad"]


def test_keystone_stability_headline_is_the_ranking_score_on_disjoint_task_groups(full):
    cells = headline_cells(full["html"])
    c = cells["keystone.stability_iou"]
    assert float(c["data-value"]) == 0.6  # the task-group rows of the fixture, not the prompt halves (0.8)
    assert "disjoint halves of the task groups" in full["html"]
    assert "secondary: last-token |a|, random prompt halves of every group" in html.unescape(full["html"])


def test_every_published_number_names_its_seed_and_section():
    from neuronaudit.report.sections import PUBLISHED

    for key, text in PUBLISHED.items():
        assert re.search(r"seed 00[0-4]", text) and re.search(r"SCIENCE\.md §[1-6]", text), key
    assert "refusal_start" not in PUBLISHED  # another model's JBB rate reproduces nothing here


def test_headlines_without_a_published_counterpart_show_none(full):
    rows = dict(re.findall(r'<tr data-key="([^"]+)">.*?<td class="published">(.*?)</td></tr>', full["html"], re.S))
    for key in ("refusal.tuned", "cna.refusal_unablated", "keystone.separates_at_k", "cna.matched_quality"):
        assert html.unescape(rows[key]) in ("", "—"), key


def test_cna_section_states_the_caa_spec_and_the_matched_quality_picks(full):
    page = html.unescape(full["html"])
    cells = headline_cells(full["html"])
    c = cells["cna.matched_quality"]
    assert "CNA circuit_x0: refusal" in c["text"] and "CAA caa_L2_a-1: refusal" in c["text"]
    assert "the lowest refusal rate at quality" in c["text"]
    assert "residual stream after one layer at the last prompt token" in page
    assert "1 of 2 CAA rows reach it" in page


def test_screen_section_shows_the_held_out_re_estimate(full):
    page = html.unescape(full["html"])
    assert 'data-figure="screen_heldout"' in full["html"]
    assert "keeps 50% of its discovery |δ|" in page and "style-matched pairs resampled together" in page


def test_reconstructed_parts_are_marked(full):
    page = html.unescape(full["html"])
    assert "reconstruction: the predicted ceiling" in page.lower()
    assert "(alignment cosθ, predictor a; reconstruction)" in page


def test_every_figure_has_a_caption_a_table_link_and_a_file(full):
    page, figures = full["html"], full["figures"]
    blocks = re.findall(r'<figure data-figure="([^"]+)">(.*?)</figure>', page, re.S)
    assert {name for name, _ in blocks} == {e["name"] for e in full["manifest_entries"]}
    embedded = {}
    for name, block in blocks:
        cap = html.unescape(re.search(r"<figcaption>(.*?)<span", block, re.S).group(1)).strip()
        assert cap == captions.caption(name) and cap.endswith(".") and cap.count(". ") == 0  # one sentence
        hrefs = re.findall(r'href="([^"]*)"', block)
        assert hrefs and all(h.endswith((".parquet", ".json")) for h in hrefs)
        assert all((full["page"].parent / html.unescape(h)).resolve().is_file() for h in hrefs)
        embedded[name] = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', block).group(1))
    for e in full["manifest_entries"]:
        assert (figures / e["file"]).read_bytes() == embedded[e["name"]]  # the same image, byte for byte
        assert e["file"] == f"{e['stage']}/{e['name']}.png"
        assert all((full["study"] / t).is_file() for t in e["tables"].values())


def test_planted_prompt_and_rollout_text_are_escaped(full):
    from report_study import EVIL_IMG as IMG
    from report_study import EVIL_SCRIPT as SCRIPT

    page = full["html"]
    assert "<script" not in page.lower() and "<img src=x" not in page.lower()
    pre = html.unescape("\n".join(re.findall(r"<pre>(.*?)</pre>", page, re.S)))
    assert f"PROMPT: {full['prompt']}" in pre and f"RESPONSE: {full['response']}" in pre
    assert SCRIPT in full["prompt"] and IMG in full["response"]


def test_snakemake_report_helpers_read_the_figure_manifest(full):
    from types import SimpleNamespace

    output = SimpleNamespace(figures=str(full["figures"]))
    e = next(x for x in full["manifest_entries"] if x["name"] == "saturation_curve")
    wildcards = SimpleNamespace(stage=e["stage"], figure=e["name"])
    assert captions.snakemake_category(wildcards, output) == "Control window"
    assert captions.snakemake_labels(wildcards, output) == {
        "figure": "Saturation curve", "data": "window/single_pass.parquet, window/window.parquet"}
    with pytest.raises(NeuronAuditError):
        captions.snakemake_category(SimpleNamespace(stage="window", figure="nope"), output)


def test_rst_captions_are_escaped_and_cover_every_figure(full):
    caps = captions.rst_captions()
    assert "figure" not in caps and "workflow" not in caps
    assert r"\|a\|" in caps["keystone_top"]  # |a| would be an RST substitution
    assert {e["name"] for e in full["manifest_entries"]} <= set(caps)


def test_cli_report_writes_page_and_figures(full, tmp_path):
    from neuronaudit.cli import main

    study = full["study"]
    out = tmp_path / "report" / "index.html"
    stats = [f"{name}={path}" for name, path in full["stats"].items()]
    code = main(["report", "--study", "cli", "--manifest", str(study / "tune" / "manifest.json"), "--stats", *stats,
                 "--config-json", str(study / "report" / "config.json"), "--study-dir", str(study),
                 "--figures-dir", str(tmp_path / "report" / "figures"), "--out", str(out)])
    assert code == 0 and out.is_file()
    manifest = json.loads((tmp_path / "report" / "figures" / "manifest.json").read_text())["figures"]
    assert [e["file"] for e in manifest] == [e["file"] for e in full["manifest_entries"]]
    assert headline_cells(out.read_text())["refusal.tuned"]["data-value"] == \
        headline_cells(full["html"])["refusal.tuned"]["data-value"]


def test_headline_keys_are_checked_and_duplicates_refused():
    with pytest.raises(ValueError):
        report.Headline("Bad Key", "l", "t")
    h = report.Headline("a.b", "l", "t")
    with pytest.raises(ValueError):
        report.render_report("t", [], [], {}, headlines=[h, h])


def test_figure_names_are_checked_and_written_once(tmp_path):
    img = "data:image/png;base64,iVBORw0KGgo="
    with pytest.raises(ValueError):
        report.Figure("t", img, "c", name="Bad name")
    two = report.Section("s", "S", items=[report.Figure("a", img, "c", name="x"),
                                          report.Figure("b", img, "c", name="x")])
    with pytest.raises(NeuronAuditError):
        report.write_figures([two], tmp_path / "f", tmp_path, tmp_path)


def test_colours_are_fixed_per_rollout_type_behaviour_and_family():
    for name in (*plots.ROLLOUT_TYPES, "refusal", "operator", "format", "circuit", "random", "caa", "none"):
        assert plots.color_for(name) == plots.PALETTE[name]
        assert plots.palette_for([name, "something-else"])[name] == plots.PALETTE[name]
    types = [plots.PALETTE[t] for t in plots.ROLLOUT_TYPES]
    assert len(set(types)) == len(types)
    behaviours = [plots.PALETTE[b] for b in ("refusal", "operator", "format")]
    assert len(set(behaviours)) == 3
    assert not set(plots._CYCLE) & set(plots.PALETTE.values())


def test_null_values_in_the_summaries_show_missing(full, tmp_path):
    """Stage summaries write missing values as JSON null: the page says ``missing``, no data-value."""
    import shutil

    from neuronaudit.report.sections import stage_sections

    study = tmp_path / "nulls"
    shutil.copytree(full["study"], study)
    path = study / "window" / "summary.json"
    w = json.loads(path.read_text())
    w["predictor_alignment"].update(mae_alignment=None, mae_alignment_ci95=[None, None], mae_alignment_bulk=None)
    w["verdicts"]["mcnemar_exact_p_value"] = None
    path.write_text(json.dumps(w))
    path = study / "attribution" / "summary.json"
    a = json.loads(path.read_text())
    a["comparison"]["all"]["grad"].update(spearman_rho=None, rho_ci95=[None, None], precision_at_k=None)
    path.write_text(json.dumps(a))
    sections, heads = stage_sections(study, study / "report")
    page = report.render_report("nulls", [], sections, {}, headlines=heads)
    c = headline_cells(page)
    mae = c["window.ceiling_mae_alignment"]
    assert "data-value" not in mae and "missing" in mae["text"]
    assert "data-value" not in c["attribution.rho_grad"] and c["attribution.rho_grad"]["text"].startswith("missing")
    assert "McNemar p = missing" in c["window.verdict_accuracy"]["text"]


def test_window_section_shows_the_threshold_sensitivity(full):
    text = html.unescape(full["html"])
    assert "Collapse-threshold sensitivity of the measured ceilings" in text
    assert captions.caption("ceiling_sensitivity") in text
    assert "×0.75 (stricter)" in text and "×1.25 (looser)" in text
    assert "0.3 / 112.5 / 3.75" in text and "4/18" in text and "none moved" in text
    assert "refusal L1/0 sign -1: open → closed" in text


def test_refusal_section_shows_every_evaluated_set_and_the_judges_fresh_accuracy(full):
    ev = json.loads((full["study"] / "refusal" / "evaluation.json").read_text())
    page = html.unescape(full["html"])
    refusal = page[page.index('<section id="refusal">'):page.index('<section id="screen">')]
    assert "Refusal and over-refusal on each evaluated prompt set" in refusal
    for label in ("held-out harmful", "harmful, other styles", "harmless but dangerous-sounding",
                  "validation harmful (recipe chosen here)"):
        assert label in refusal, label
    styled = ev["tuned"]["sets"]["styled_harmful"]
    assert f"{styled['count']}/{styled['n']}" in refusal
    # the fixture's fresh set: 150/200 right, collapse the weakest type (12/40), stated in the sections
    # whose figures the judge types
    judge = "judge accuracy on fresh labelled rollouts 150/200 = 75%"
    for section in ("refusal", "cna", "window"):
        body = page[page.index(f'<section id="{section}">'):]
        body = body[:body.index("</section>")]
        assert judge in body and "weakest type collapse 12/40" in body, section
    cells = headline_cells(full["html"])
    c = cells["refusal.styled_harmless"]
    assert float(c["data-value"]) == ev["tuned"]["sets"]["styled_harmless"]["rate"]


def test_judge_accuracy_text_says_when_no_fresh_set_was_labelled():
    from neuronaudit.report.sections import judge_accuracy_text

    assert judge_accuracy_text(None) == "judge accuracy not measured (no fresh labelled set)"
    assert judge_accuracy_text({"sets": {"fresh": {}}}).endswith("(no fresh labelled set)")
    text = judge_accuracy_text({"sets": {"fresh": {"a": {"n": 10, "correct": 9, "per_type": {}},
                                                   "b": {"n": 10, "correct": 5, "per_type": {}}}}})
    assert text.startswith("judge accuracy on fresh labelled rollouts 14/20 = 70%")
