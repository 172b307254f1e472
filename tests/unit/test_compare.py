"""``neuronaudit compare``: two studies' headline figures and figures side by side, one page."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest
from report_study import EVIL_IMG, EVIL_SCRIPT, write_study

from neuronaudit.cli import main
from neuronaudit.errors import NeuronAuditError
from neuronaudit.report import compare


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a = write_study(root, name="model-a", seed=0)
    b = write_study(root, name="model-b", seed=1, evil=True)
    out = root / "comparison" / "index.html"
    compare.build_comparison({"model-a": a["study"], "model-b": b["study"]}, out)
    return {"a": a, "b": b, "out": out, "html": out.read_text(encoding="utf-8")}


def cells(page: str) -> dict[tuple[str, str], dict[str, str]]:
    found = {}
    for attrs in re.findall(r'<td class="headline"([^>]*)>', page):
        a = {k: html.unescape(v) for k, v in re.findall(r'\s(data-[a-z-]+)="([^"]*)"', attrs)}
        found[(a["data-key"], a["data-column"])] = a
    return found


def test_headlines_of_both_studies_side_by_side(studies):
    page = studies["html"]
    header = re.search(r'<table class="headlines".*?<thead><tr>(.*?)</tr></thead>', page, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["headline figure", "model-a", "model-b", "published"]
    found = cells(page)
    for name in ("model-a", "model-b"):
        study = studies["a" if name == "model-a" else "b"]["study"]
        window = json.loads((study / "window" / "summary.json").read_text())
        ev = json.loads((study / "refusal" / "evaluation.json").read_text())
        a = window["predictor_alignment"]
        c = found[("window.ceiling_mae_alignment", name)]
        assert float(c["data-value"]) == a["mae_alignment"]
        assert [float(c["data-ci-low"]), float(c["data-ci-high"])] == a["mae_alignment_ci95"]
        assert float(found[("refusal.tuned", name)]["data-value"]) == ev["tuned"]["refusal_harmful"]["rate"]
    # the two synthetic studies differ, and the page shows both values
    assert found[("window.ceiling_mae_alignment", "model-a")]["data-value"] != \
        found[("window.ceiling_mae_alignment", "model-b")]["data-value"]
    row = re.search(r'<tr data-key="window.ceiling_mae_alignment">.*?<td class="published">(.*?)</td>', page, re.S)
    from neuronaudit.report.sections import PUBLISHED

    assert html.unescape(row.group(1)) == PUBLISHED["window_mae"]
    assert PUBLISHED["window_mae"].startswith("0.14 [seed 003")


def test_figures_side_by_side_one_row_per_figure(studies):
    page = studies["html"]
    grids = re.findall(r'<div class="figuregrid">\s*<h3>(.*?)</h3>(.*?)</div>\s*</div>', page, re.S)
    manifest_titles = {"Typed rollouts of the unintervened audited model", "Contrastive screen",
                       "Circuit δ: discovery against held-out prompts",
                       "CNA circuit scaling against controls", "Keystone ablation curve", "Saturation curve",
                       "Predicted against measured ceilings", "Control windows",
                       "Measured control against attribution scores and readout geometry",
                       "Activation profile over layers", "Precision against set size",
                       "Stability of the found sets across prompts", "Forcing the target onto prompts that lack it",
                       "Held-out accuracy against steering strength", "Ablation: critical neurons against controls",
                       "Failure probe ROC on held-out problems", "Transfer to the second model against random mappings"}
    assert {html.unescape(t) for t, _ in grids} == manifest_titles
    for _, body in grids:
        columns = re.findall(r'<figure data-column="([^"]+)">', body)
        assert columns == ["model-a", "model-b"]
        images = re.findall(r'src="data:image/png;base64,([^"]+)"', body)
        assert len(images) == 2
        assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
        assert re.search(r'<p class="caption">[^<]+\.</p>', body)  # one caption per row


def test_links_point_to_each_studys_tables(studies):
    out = studies["out"]
    hrefs = [html.unescape(h) for h in re.findall(r'href="([^"#][^"]*)"', studies["html"])]
    assert any("model-a/" in h for h in hrefs) and any("model-b/" in h for h in hrefs)
    for h in hrefs:
        assert (out.parent / h).resolve().is_file(), h


def test_same_escaping_and_csp_as_the_audit_page(studies, tmp_path):
    page = studies["html"]
    assert "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|javascript:)""", page, re.I)
    # study names are shown in headers, column labels and data-* attributes: plant markup there
    out = tmp_path / "evil.html"
    compare.build_comparison({EVIL_SCRIPT: studies["a"]["study"], EVIL_IMG: studies["b"]["study"]}, out)
    page = out.read_text()
    assert "<script" not in page.lower() and "<img src=x" not in page.lower()
    header = re.search(r'<table class="headlines".*?<thead><tr>(.*?)</tr></thead>', page, re.S).group(1)
    assert [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", header)][1:3] == [EVIL_SCRIPT, EVIL_IMG]
    assert {c[1] for c in cells(page)} == {EVIL_SCRIPT, EVIL_IMG}


def test_a_study_lacking_a_stage_shows_missing(tmp_path, studies):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(studies["a"]["study"], partial)
    shutil.rmtree(partial / "attribution")
    out = tmp_path / "c.html"
    compare.build_comparison({"full": studies["b"]["study"], "partial": partial}, out)
    page = out.read_text()
    assert ">missing<" in page
    c = cells(page)
    assert "data-value" in c[("attribution.rho_grad", "full")]
    assert "data-value" not in c[("attribution.rho_grad", "partial")]


def test_needs_two_studies_with_tables(tmp_path, studies):
    with pytest.raises(NeuronAuditError, match="two or more"):
        compare.build_comparison({"a": studies["a"]["study"]}, tmp_path / "c.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuronAuditError, match="no stage tables"):
        compare.build_comparison({"a": studies["a"]["study"], "e": tmp_path / "empty"}, tmp_path / "c.html")
    with pytest.raises(NeuronAuditError, match="not found"):
        compare.build_comparison({"a": studies["a"]["study"], "x": tmp_path / "nope"}, tmp_path / "c.html")
    assert not (tmp_path / "c.html").exists()


def test_cli_compare(tmp_path, studies, capsys):
    out = tmp_path / "cmp.html"
    assert main(["compare", f"A={studies['a']['study']}", str(studies["b"]["study"]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<title>neuronaudit comparison: A vs model-b</title>" in page
    assert main(["compare", f"A={studies['a']['study']}", f"A={studies['b']['study']}", "--out", str(out)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_cli_headlines_prints_the_reports_summary_as_markdown(studies, capsys, tmp_path):
    study = studies["a"]["study"]
    assert main(["headlines", str(study)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| figure | this study | published | read from |"
    window = json.loads((study / "window" / "summary.json").read_text())
    mae = next(line for line in table if line.startswith("| ceiling MAE on held-out neurons"))
    _, headlines = compare.study_headlines(study, study)
    published = next(h.published for h in headlines if h.label.startswith("ceiling MAE on held-out neurons"))
    assert f"{window['predictor_alignment']['mae_alignment']:.3f}" in mae and "0.14" in published
    assert f"| {published} |" in mae  # the published figure with its source, as the page shows it
    assert "`window/summary.json`" in mae  # the file it is read from, relative to the study folder
    # every headline of the page is a row, none invented: the markdown rows are the report's headlines
    assert len(table) == 2 + len(headlines)
    assert main(["headlines", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
