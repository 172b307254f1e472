"""The published page as a person looks at it: rendered in headless Chromium.

Debian's ``chromium`` (``/usr/bin/chromium``, or ``$NEURONAUDIT_CHROMIUM``) is driven through
Playwright (the ``test`` extra; its own browser downloads are never used). ``make test`` installs
chromium when it is absent; where it still cannot run, or Playwright is missing, these tests skip
and say why. The pages are built from a small synthetic study (``tests/report_study.py``), not a
real model.

Checked: every figure image loads (``naturalWidth > 0``), nothing is logged as a console error,
the page makes no network request, the headline numbers shown (and their ``data-*`` attributes)
equal the JSON summaries, and planted ``<script>`` / ``<img onerror>`` markup in a prompt and a
rollout stays inert text, with the Content-Security-Policy in force and with it bypassed (so
escaping alone is proven to be enough).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from report_study import EVIL_IMG, EVIL_SCRIPT, build_study_report, write_study

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("NEURONAUDIT_CHROMIUM", "/usr/bin/chromium")
#: Launch flags; Playwright adds --headless itself (headless=True) and --user-data-dir (a fresh
#: folder per launch).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (it is in the 'test' extra: pip install -e '.[test]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: Debian's chromium package is needed "
                    "(`make test` runs `apt-get install -y chromium` when it can)")
    pw = sync_playwright().start()
    yield pw
    pw.stop()


class Browser:
    """One fresh Chromium profile; records console errors, page errors and every request."""

    def __init__(self, pw, user_data_dir: Path, bypass_csp: bool = False) -> None:
        try:
            self.context = pw.chromium.launch_persistent_context(
                str(user_data_dir), executable_path=CHROMIUM, headless=True, args=FLAGS, bypass_csp=bypass_csp,
                viewport={"width": 1200, "height": 900})
        except Exception as err:  # a browser that cannot start here is an environment limit
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            pytest.skip(f"Chromium at {CHROMIUM} cannot start here: {first}")
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[str] = []
        self.context.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        self.requests.append(url)
        if url == self._document:
            route.continue_()
        else:
            route.abort()

    def open(self, path: Path):
        self._document = path.resolve().as_uri()
        page = self.context.new_page()
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.goto(self._document, wait_until="load")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        return page

    def external_requests(self) -> list[str]:
        return [u for u in self.requests if u != self._document and not u.startswith("data:")]

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    info = write_study(tmp_path_factory.mktemp("browser"), name="fixture", seed=0)
    info["page"] = build_study_report(info)
    return info


@pytest.fixture(scope="module")
def rendered(playwright, study, tmp_path_factory):
    browser = Browser(playwright, tmp_path_factory.mktemp("profile"))
    page = browser.open(study["page"])
    state = {
        "images": page.evaluate("Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
                                "width: i.naturalWidth, height: i.naturalHeight, "
                                "data: i.src.startsWith('data:image/png')}))"),
        "headlines": page.evaluate("Array.from(document.querySelectorAll('td.headline'))"
                                   ".map(td => ({key: td.dataset.key, "
                                   "value: td.dataset.value, lo: td.dataset.ciLow, hi: td.dataset.ciHigh, "
                                   "text: td.querySelector('.value').innerText, visible: td.offsetParent !== null}))"),
        "figures": page.evaluate("Array.from(document.querySelectorAll('figure[data-figure]'))"
                                 ".map(f => f.dataset.figure)"),
        "title": page.title(),
    }
    page.close()
    yield browser, state
    browser.close()


def test_every_figure_loads(rendered, study):
    _, state = rendered
    manifest = json.loads((study["study"] / "report" / "figures" / "manifest.json").read_text())["figures"]
    assert sorted(state["figures"]) == sorted(e["name"] for e in manifest)
    assert len(state["images"]) == len(manifest)
    for img in state["images"]:
        assert img["complete"] and img["data"], img["alt"]
        assert img["width"] > 0 and img["height"] > 0, img["alt"]


def test_no_console_errors_and_no_network_requests(rendered):
    browser, _ = rendered
    assert browser.console_errors == []
    assert browser.page_errors == []
    assert browser.external_requests() == []


def _shown(state) -> dict[str, dict]:
    return {h["key"]: h for h in state["headlines"]}


def test_headline_numbers_shown_equal_the_json_summaries(rendered, study):
    _, state = rendered
    shown = _shown(state)
    folder = study["study"]
    ev = json.loads((folder / "refusal" / "evaluation.json").read_text())
    window = json.loads((folder / "window" / "summary.json").read_text())
    attribution = json.loads((folder / "attribution" / "summary.json").read_text())
    keystone = json.loads((folder / "keystone" / "summary.json").read_text())
    cna = pd.read_parquet(folder / "cna" / "summary.parquet").set_index("intervention")
    assert all(h["visible"] for h in shown.values())

    def check(key, value, lo=None, hi=None, text=None):
        h = shown[key]
        assert float(h["value"]) == pytest.approx(value, abs=0, rel=1e-12), key
        if lo is not None:
            assert (float(h["lo"]) == pytest.approx(lo, rel=1e-12)
                    and float(h["hi"]) == pytest.approx(hi, rel=1e-12)), key
        if text is not None:
            assert text in h["text"], (key, text, h["text"])

    for key, rate in (("refusal.tuned", ev["tuned"]["refusal_harmful"]),
                      ("refusal.base", ev["base"]["refusal_harmful"]),
                      ("refusal.over_refusal", ev["tuned"]["over_refusal_harmless"])):
        check(key, rate["rate"], rate["ci_low"], rate["ci_high"],
              f"{rate['count']}/{rate['n']} = {rate['rate']:.1%} (95% CI {rate['ci_low']:.1%}–{rate['ci_high']:.1%})")
    ratio = ev["perplexity_ratio_tuned_over_base"]
    check("refusal.perplexity_ratio", ratio["mean"], ratio["ci_low"], ratio["ci_high"],
          f"{ratio['mean']:.3f} (95% CI {ratio['ci_low']:.3f}–{ratio['ci_high']:.3f})")
    a = window["predictor_alignment"]
    check("window.ceiling_mae_alignment", a["mae_alignment"], *a["mae_alignment_ci95"],
          text=f"{a['mae_alignment']:.3f} (95% CI {a['mae_alignment_ci95'][0]:.3f}–{a['mae_alignment_ci95'][1]:.3f}")
    v = window["verdicts"]
    check("window.verdict_accuracy", v["correct"] / v["n_heldout_neurons"],
          text=f"{v['correct']}/{v['n_heldout_neurons']} correct vs always "
               f"'{v['majority_class_from_training']}' (training majority) "
               f"{v['majority_correct']}/{v['n_heldout_neurons']}; discordant {v['only_predictor_right']} vs "
               f"{v['only_majority_right']}, exact McNemar p = {v['mcnemar_exact_p_value']:.3g}")
    check("window.n_heldout", v["n_heldout_neurons"], text=str(v["n_heldout_neurons"]))
    g = attribution["comparison"]["all"]["grad"]
    check("attribution.rho_grad", g["spearman_rho"], *g["rho_ci95"], text=f"{g['spearman_rho']:.2f}")
    p = keystone["curve"]["per_k"][-1]["perplexity"]
    check("keystone.perplexity_ratio_kmax", p["ratio_to_random_median"], text=f"{p['ratio_to_random_median']:.3g}×")
    check("cna.refusal_circuit_ablated", cna.loc["circuit_x0", "refusal_rate"],
          text=f"{cna.loc['circuit_x0', 'refusal_rate']:.1%}")


@pytest.fixture(scope="module")
def evil_study(tmp_path_factory):
    info = write_study(tmp_path_factory.mktemp("evil"), name="evil", seed=1, evil=True)
    info["page"] = build_study_report(info)
    return info


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "csp-bypassed"])
def test_planted_markup_stays_inert_text(playwright, evil_study, tmp_path, bypass_csp):
    browser = Browser(playwright, tmp_path / "profile", bypass_csp=bypass_csp)
    try:
        page = browser.open(evil_study["page"])
        page.wait_for_timeout(300)  # room for an onerror handler to have fired
        assert page.title() == "neuronaudit report: evil"
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.evaluate("document.scripts.length") == 0
        assert page.evaluate("Array.from(document.images).every(i => i.src.startsWith('data:image/png'))")
        text = page.evaluate("document.body.innerText")
        pre = page.evaluate("Array.from(document.querySelectorAll('pre')).map(p => p.innerText).join('\\n')")
        for planted in (EVIL_SCRIPT, EVIL_IMG):
            assert planted in text and planted in pre  # shown as the literal text
        assert f"PROMPT: {evil_study['prompt']}" in pre and f"RESPONSE: {evil_study['response']}" in pre
        assert browser.external_requests() == []
        assert browser.page_errors == []
        assert browser.console_errors == []
    finally:
        browser.close()
