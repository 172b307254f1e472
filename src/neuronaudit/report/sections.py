"""Report sections of the stages, built from their tables alone (no model is run).

Each builder reads one stage's outputs under ``results/<study>/`` and returns a
:class:`~neuronaudit.report.page.Section` plus its :class:`~neuronaudit.report.page.Headline` figures for the
summary; a stage whose files are absent contributes nothing, so the report grows as stages land.
Every headline carries the unrounded value and 95% CI read from the stage's JSON summary or
table, the published number it reproduces (``PUBLISHED``; empty where the papers give none) and
a link to its source. Every figure has a name (its caption's name and PNG file name, see
:func:`neuronaudit.report.page.write_figures`), a one-sentence caption and links to its tables.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from neuronaudit import io as naio
from neuronaudit.evaluation.stats import wilson_interval
from neuronaudit.report import plots
from neuronaudit.report.page import (
    Excerpt,
    Figure,
    Headline,
    Section,
    Table,
    caption,
    figure_to_data_uri,
)

__all__ = ["PUBLISHED", "STAGE_TITLES", "BUILDERS", "stage_sections"]

#: Where each published number comes from: the seed document (/work/shared/seeds/, named by its
#: number) and the section of SCIENCE.md that states the number.
SOURCES = {
    "cna": "seed 004 (CNA, Nous Research, arXiv 2605.12290), as stated in SCIENCE.md §3 'Published'",
    "keystone": "seed 002 (keystone neurons, arXiv 2605.24846), as stated in SCIENCE.md §4 'Published'",
    "window": "seed 003 ('Leverage Is Not Reach'), abstract; SCIENCE.md §1 'Published numbers'",
    "attribution": "seed 003 ('Leverage Is Not Reach'), abstract; SCIENCE.md §2 'Claim'",
    "reasoning": "seed 001 (AdaRAS, 'Identifying and Transferring Reasoning-Critical Neurons', arXiv 2601.19847), "
                 "as stated in SCIENCE.md §6 'Published'",
}


def _published(text: str, source: str) -> str:
    return f"{text} [{SOURCES[source]}]"


#: The published numbers each headline reproduces, each naming its seed document and section.
#: A headline with no published counterpart shows none: the refusal rate of the study's own
#: reference model, for one, is not the JBB refusal rate of another model.
PUBLISHED = {
    "cna_refusal": _published("JBB refusal, unablated → circuit ablated: 90→34% (Llama-3.2-1B), 93→12% "
                              "(Qwen2.5-1.5B), 87→2% (Qwen2.5-7B)", "cna"),
    "cna_quality": _published("quality ≥ 0.969 at every strength; CAA falls to 0.41–0.89", "cna"),
    "keystone_collapse": _published("zeroing 30 neurons drives every benchmark to 0 (Llama-3.1-8B)", "keystone"),
    "keystone_stability": _published("keystone sets are stable across disjoint prompt groups", "keystone"),
    "window_n": _published("15 held-out neurons", "window"),
    "window_mae": _published("0.14", "window"),
    "window_mae_bulk": _published("≈ 0.07", "window"),
    "window_verdicts": _published("11/15 correct vs 10/15 majority baseline", "window"),
    "window_pivots": _published("actionable reach for 3 of 6 audited Llama refusal pivots, only at later horizons",
                                "window"),
    "attribution_grad": _published("local gradient attribution anti-predicts control", "attribution"),
    "attribution_forward": _published("a forward-only contrastive screen recovers controllers attribution misses",
                                      "attribution"),
    "reasoning_gain": _published("accuracy gain of more than 13% on AIME-24/25 for Qwen3-1.7B with 50 neurons "
                                 "steered (whether points or relative is not stated there)", "reasoning"),
}

#: Parts of a method that SCIENCE.md marks "Recon" (reconstructed from an abstract): the report
#: says so wherever their results appear.
RECONSTRUCTION = ("reconstruction: the predicted ceiling (critical alignment c* through the saturation curve, and "
                  "the single-pass KL threshold) is reconstructed from the abstract of seed 003 as SCIENCE.md §1 "
                  "specifies it, not taken from the paper's code")

#: Section id -> title, in page order (the Snakemake report's categories use the same titles).
STAGE_TITLES = {
    "preconditions": "Audit preconditions",
    "refusal": "Refusal: reference model and typed rollouts",
    "screen": "Contrastive screening",
    "cna": "CNA circuit ablation",
    "keystone": "Keystone neurons",
    "window": "Control window",
    "attribution": "Gradient versus forward attribution",
    "sufficient": "Sufficient neuron sets (WASD)",
    "reasoning": "Reasoning-critical neurons (AdaRAS)",
    "activations": "Activation statistics",
}


def _rel(path: Path, report_dir: Path) -> str:
    return os.path.relpath(path, report_dir)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _ci(lo, hi) -> tuple[float | None, float | None] | None:
    return (lo if _finite(lo) else None, hi if _finite(hi) else None) if (lo is not None or hi is not None) else None


def _f(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None/NaN (summaries write missing as null)."""
    return format(value, spec) if _finite(value) else "missing"


def _pct(rate: dict) -> str:
    return (f"{rate['count']}/{rate['n']} = {_f(rate['rate'], '.1%')} "
            f"(95% CI {_f(rate['ci_low'], '.1%')}–{_f(rate['ci_high'], '.1%')})")


def _num(value, lo=None, hi=None, digits: int = 3) -> str:
    if not _finite(value):
        return "missing"
    text = f"{value:.{digits}f}"
    if _finite(lo) and _finite(hi):
        text += f" (95% CI {lo:.{digits}f}–{hi:.{digits}f})"
    return text


def _rate_headline(key: str, label: str, rate: dict, published: str, link: str) -> Headline:
    return Headline(key, label, _pct(rate), rate["rate"], (rate["ci_low"], rate["ci_high"]), published, link,
                    n=rate.get("n"), unit="prompts", test="Wilson score interval")


def _figure(name: str, title: str, fig, table_link) -> Figure:
    return Figure(title, figure_to_data_uri(fig), caption(name), table_link=table_link, name=name)


#: How each evaluated prompt set of the refusal evaluation is shown.
REFUSAL_SET_LABELS = {
    "harmful": "held-out harmful", "harmless": "held-out harmless (style-matched)",
    "styled_harmful": "harmful, other styles", "styled_harmless": "harmless but dangerous-sounding",
    "validation_harmful": "validation harmful (recipe chosen here)",
    "validation_harmless": "validation harmless (recipe chosen here)",
}


def judge_accuracy_text(calibration: dict | None) -> str:
    """The judge's accuracy on its FRESH labelled sets (real study rollouts labelled after the
    judge was frozen) with the Wilson interval and n, and its weakest type; what every typed figure
    is read with. ``not measured`` when no fresh set is labelled."""
    fresh = ((calibration or {}).get("sets") or {}).get("fresh") or {}
    if not fresh:
        return "judge accuracy not measured (no fresh labelled set)"
    n = sum(r["n"] for r in fresh.values())
    correct = sum(r["correct"] for r in fresh.values())
    lo, hi = wilson_interval(correct, n)
    recall: dict[str, list[int]] = {}
    for r in fresh.values():
        for t, row in (r.get("per_type") or {}).items():
            acc = recall.setdefault(t, [0, 0])
            acc[0] += int(row.get("correct") or 0)
            acc[1] += int(row.get("n") or 0)
    weakest = min(((c / m, t, c, m) for t, (c, m) in recall.items() if m), default=None)
    text = (f"judge accuracy on fresh labelled rollouts {correct}/{n} = {correct / n:.0%} "
            f"(Wilson 95% CI {lo:.0%}–{hi:.0%})")
    if weakest is not None:
        text += f"; weakest type {weakest[1].replace('_', ' ')} {weakest[2]}/{weakest[3]}"
    return text


def study_judge_text(study_dir: Path) -> str:
    """:func:`judge_accuracy_text` of the study's judge, as recorded by the refusal evaluation
    (one judge serves every typed figure of a study); empty when the evaluation did not run."""
    evaluation = study_dir / "refusal" / "evaluation.json"
    if not evaluation.is_file():
        return ""
    return " Rollouts are typed by the study's judge: " + judge_accuracy_text(
        json.loads(evaluation.read_text()).get("judge_calibration")) + "."


def _refusal_sets_table(ev: dict) -> pd.DataFrame | None:
    """One row per evaluated prompt set: what is measured, the tuned and the base model's rate,
    and whether the tuned model meets its target there."""
    sets = ev["tuned"].get("sets")
    if not sets:
        return None
    targets = ev.get("targets") or {}
    rows = []
    for name, rate in sets.items():
        base = ev["base"]["sets"].get(name)
        measure = rate["measure"]
        target = (f">= {targets['refusal_min']:.0%}" if measure == "refusal" else
                  f"<= {targets['over_refusal_max']:.0%}") if targets else ""
        group = "heldout" if name in ("harmful", "harmless") else name.split("_", 1)[0]
        met = ((targets.get("checks") or {}).get(group) or {}).get(measure)
        rows.append({"prompt set": REFUSAL_SET_LABELS.get(name, name), "measure": measure.replace("_", "-"),
                     "tuned": _pct(rate), "base": _pct(base) if base else "missing", "target": target,
                     "met": {True: "yes", False: "NO", None: ""}[met]})
    return pd.DataFrame(rows)


def refusal_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    evaluation = study_dir / "refusal" / "evaluation.json"
    fractions = study_dir / "refusal" / "fractions.parquet"
    if not evaluation.is_file():
        return None, []
    ev = json.loads(evaluation.read_text())
    ev_link = _rel(evaluation, report_dir)
    rows = []
    for name in ("base", "tuned"):
        m = ev[name]
        rows.append({
            "model": name,
            "refusal on held-out harmful": _pct(m["refusal_harmful"]),
            "over-refusal on held-out harmless": _pct(m["over_refusal_harmless"]),
            "perplexity, general text": round(m["perplexity_generic"]["token_weighted"], 3),
        })
    ratio = ev["perplexity_ratio_tuned_over_base"]
    items = [Table("Refusal-tuned model against the base model", pd.DataFrame(rows), caption("refusal_rates"),
                   table_link={"evaluation.json": ev_link,
                               "rollouts": _rel(study_dir / "refusal" / "evaluation_rollouts.parquet", report_dir)})]
    by_set = _refusal_sets_table(ev)
    if by_set is not None:
        items.append(Table("Refusal and over-refusal on each evaluated prompt set", by_set,
                           caption("refusal_sets"), table_link=ev_link))
    if fractions.is_file():
        frac = pq.read_table(fractions).to_pandas()
        items.append(_figure("rollout_types", "Typed rollouts of the unintervened audited model",
                             plots.rollout_type_bars(frac), _rel(fractions, report_dir)))
    for ex in ev["tuned"].get("examples", {}).get("harmful", [])[:2]:
        items.append(Excerpt(f"tuned model, {ex['prompt_id']} ({ex['rollout_type']})",
                             f"PROMPT: {ex['prompt']}\nRESPONSE: {ex['response']}"))
    intro = (
        f"The study fine-tunes its own refusal reference model (recipe in tune/recipe.json) and types "
        f"every rollout with the {ev.get('judge', {}).get('kind', 'rule')} judge "
        f"({judge_accuracy_text(ev.get('judge_calibration'))}); perplexity ratio "
        f"tuned/base {_num(ratio['mean'], ratio['ci_low'], ratio['ci_high'])}."
    )
    heads = [
        _rate_headline("refusal.tuned", "refusal of held-out harmful prompts, refusal-tuned model",
                       ev["tuned"]["refusal_harmful"], "", ev_link),
        _rate_headline("refusal.base", "refusal of held-out harmful prompts, base model",
                       ev["base"]["refusal_harmful"], "", ev_link),
        _rate_headline("refusal.over_refusal", "over-refusal of held-out harmless prompts, refusal-tuned model",
                       ev["tuned"]["over_refusal_harmless"], "", ev_link),
        *[_rate_headline(f"refusal.{name}", f"{label}, refusal-tuned model", ev["tuned"]["sets"][name], "", ev_link)
          for name, label in (("styled_harmful", "refusal of harmful prompts in other styles"),
                              ("styled_harmless", "over-refusal of dangerous-sounding harmless prompts"))
          if name in (ev["tuned"].get("sets") or {})],
        Headline("refusal.perplexity_ratio", "general-text perplexity, tuned / base",
                 _num(ratio["mean"], ratio["ci_low"], ratio["ci_high"]), ratio["mean"],
                 _ci(ratio["ci_low"], ratio["ci_high"]), "", ev_link, n=ratio.get("n"), unit="texts",
                 test=ratio.get("ci") or "paired percentile bootstrap over texts"),
    ]
    return Section("refusal", STAGE_TITLES["refusal"], intro, items), heads


def screen_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "screen"
    circuits = {p.name.split(".")[0]: p for p in sorted(folder.glob("*.circuit.parquet"))}
    if not circuits:
        return None, []
    frames, tables, heads = [], {}, []
    for name, cpath in circuits.items():
        spath = folder / f"{name}.scores.parquet"
        s = pq.read_table(spath).to_pandas().assign(behaviour=name)
        frames.append(s)
        tables[name] = pq.read_table(cpath).to_pandas()
        top = s[s["screened"].astype(bool)].sort_values("rank").head(1)
        if len(top):
            t = top.iloc[0]
            prov = {**naio.read_provenance(cpath), **naio.read_provenance(spath)}
            n_pos, n_neg = prov.get("n_pos"), prov.get("n_neg")
            heads.append(Headline(
                f"screen.top.{name}", f"top {name} neuron: contrastive δ",
                f"L{int(t.layer)}/N{int(t.neuron)}: δ = {t.delta:.3g} (95% CI {t.ci_low:.3g} to {t.ci_high:.3g}), "
                f"standardised {t.std_delta:.2f}",
                float(t.delta), _ci(float(t.ci_low), float(t.ci_high)), "", _rel(spath, report_dir),
                n=n_pos + n_neg if n_pos is not None and n_neg is not None else None,
                unit="discovery prompts (positive + negative set)", test=_screen_test(prov)))
    scores = pd.concat(frames, ignore_index=True)
    items = [_figure("screen_overview", "Contrastive screen", plots.screen_overview(scores, tables),
                     {n: _rel(folder / f"{n}.scores.parquet", report_dir) for n in circuits})]
    if any("delta_heldout" in c and c["delta_heldout"].notna().any() for c in tables.values()):
        items.append(_figure("screen_heldout", "Circuit δ: discovery against held-out prompts",
                             plots.screen_heldout(tables), {n: _rel(p, report_dir) for n, p in circuits.items()}))
    for name, circuit in tables.items():
        columns = [c for c in ("rank", "layer", "neuron", "sign", "delta", "std_delta", "ci_low", "ci_high",
                               "delta_heldout", "heldout_ci_low", "heldout_ci_high") if c in circuit]
        items.append(Table(f"{name}: circuit (k = {len(circuit)})", circuit.head(20)[columns],
                           caption("screen_top"), table_link=_rel(circuits[name], report_dir)))
    excluded, curse = [], []
    for name, cpath in circuits.items():
        prov = naio.read_provenance(cpath)
        boot, held = prov.get("bootstrap") or {}, prov.get("heldout") or {}
        if boot.get("paired"):
            excluded.append(f"{name}: bootstrap over {boot.get('n_pairs')} style-matched pairs resampled together "
                            f"({boot.get('n_unpaired_pos')} + {boot.get('n_unpaired_neg')} unpaired prompts "
                            "resampled within their set)")
        if _finite(held.get("retained")):
            curse.append(f"{name}: on {held.get('n_pos')} + {held.get('n_neg')} held-out prompts the circuit keeps "
                         f"{held['retained']:.0%} of its discovery |δ| (sign-aligned mean), "
                         f"{_f(held.get('share_same_sign'), '.0%')} keep their sign and "
                         f"{_f(held.get('share_ci_excludes_zero'), '.0%')} have a held-out 95% CI excluding 0")
        elif held.get("skipped"):
            curse.append(f"{name}: no held-out re-estimate ({held['skipped']})")
        excluded.append(f"{name}: layers not screened {prov.get('skip_layers', 'missing')}, "
                        f"{prov.get('n_universal', 'missing')} neurons flagged universal (in the top "
                        f"{prov.get('universal_top_n', '?')} by |a| of their layer on at least "
                        f"{_f(prov.get('universal_fraction'), '.0%')} of the diverse prompts), "
                        f"{prov.get('n_universal_excluded', 'missing')} of them would have entered the circuit")
    intro = ("Forward-only contrastive screen on the discovery split: δ = mean⁺ − mean⁻ of last-token "
             "activations; standardised δ divides by the pooled standard deviation with the layer's median as a "
             "variance floor. Universal neurons are excluded from circuits. " + "; ".join(excluded) + ". "
             "The circuit is the top of a ranking of every neuron, so its discovery δ is biased away from 0 "
             "(winner's curse); it is re-measured on the held-out prompts of the same sets"
             + (": " + "; ".join(curse) if curse else "") + ".")
    return Section("screen", STAGE_TITLES["screen"], intro, items), heads


def _resamples(n_boot) -> str:
    return f", {n_boot} resamples" if n_boot else ""


def _screen_test(prov: dict) -> str:
    """How the screen's δ CI was resampled (methods.screen): per set, or style-matched pairs together."""
    boot = prov.get("bootstrap") or {}
    if boot.get("paired"):
        return (f"paired percentile bootstrap over prompts{_resamples(prov.get('n_boot'))}: "
                f"{boot.get('n_pairs', '?')} style-matched pairs resampled together, "
                f"{boot.get('n_unpaired_pos', '?')} + {boot.get('n_unpaired_neg', '?')} unpaired prompts "
                "within their set")
    return f"percentile bootstrap over prompts, each set resampled on its own{_resamples(prov.get('n_boot'))}"


#: What every CNA figure is measured on: one greedy rollout per held-out prompt of the behaviour's positive set.
CNA_UNIT = "held-out harmful prompts (one greedy rollout each)"


def cna_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    path = study_dir / "cna" / "summary.parquet"
    if not path.is_file():
        return None, []
    summary = pq.read_table(path).to_pandas()
    matched = naio.read_provenance(path).get("matched_quality") or {}
    threshold = matched.get("quality_threshold")
    fpath = study_dir / "cna" / "fractions.parquet"
    fractions = pq.read_table(fpath).to_pandas() if fpath.is_file() else None
    links = {"summary": _rel(path, report_dir)}
    if fractions is not None:
        links["rollout types"] = _rel(fpath, report_dir)
    items = [
        _figure("cna_dose_response", "CNA circuit scaling against controls",
                plots.cna_dose_response(summary, fractions, threshold if _finite(threshold) else None), links),
        Table("CNA and CAA interventions", summary, caption("cna_table"), table_link=_rel(path, report_dir)),
    ]
    by = summary.set_index("intervention")
    heads = []

    def refusal_row(intervention: str) -> pd.Series | None:
        """The intervention's refusal row of the rollout-type fractions (greedy, last horizon)."""
        if fractions is None:
            return None
        f = fractions[(fractions["intervention"] == intervention) & (fractions["rollout_type"] == "refusal")]
        if "sampling" in f and (f["sampling"] == "greedy").any():
            f = f[f["sampling"] == "greedy"]
        f = f[f["horizon"] == f["horizon"].max()]
        return f.iloc[0] if len(f) else None

    def refusal(intervention: str) -> tuple[float, tuple | None]:
        rate = float(by.loc[intervention, "refusal_rate"])
        f = refusal_row(intervention)
        return rate, (_ci(float(f["ci_low"]), float(f["ci_high"])) if f is not None else None)

    def n_prompts(intervention: str) -> int | None:
        """Held-out harmful prompts behind a row: the summary's count, else the fractions'."""
        if "n_prompts" in by.columns and pd.notna(by.loc[intervention, "n_prompts"]):
            return int(by.loc[intervention, "n_prompts"])
        f = refusal_row(intervention)
        return int(f["n_prompts"]) if f is not None and "n_prompts" in f else None

    def refusal_test(intervention: str) -> str | None:
        """How the refusal rate's CI was obtained (evaluation.rollouts.type_fractions)."""
        f = refusal_row(intervention)
        if f is None:
            return None
        return "percentile bootstrap over prompts" + _resamples(int(f["n_boot"]) if "n_boot" in f else None)

    def text(rate, ci) -> str:
        return f"{rate:.1%}" + (f" (95% CI {ci[0]:.1%}–{ci[1]:.1%})" if ci and None not in ci else "")

    def row_text(name: str) -> str:
        r, c = refusal(name)
        return f"{name}: refusal {text(r, c)}, quality {by.loc[name, 'quality']:.3f}"

    source = links.get("rollout types", links["summary"])
    if "none" in by.index and "circuit_x0" in by.index:
        r0, c0 = refusal("none")
        r1, c1 = refusal("circuit_x0")
        heads.append(Headline("cna.refusal_unablated", "CNA: refusal rate of held-out harmful prompts without "
                              "intervention (the study's reference model, not a JBB rate)", text(r0, c0), r0, c0,
                              "", source, n=n_prompts("none"), unit=CNA_UNIT, test=refusal_test("none")))
        heads.append(Headline("cna.refusal_circuit_ablated", "CNA: refusal rate, unablated → circuit ablated (×0)",
                              f"{text(r0, c0)} → {text(r1, c1)}", r1, c1, PUBLISHED["cna_refusal"], source,
                              n=n_prompts("circuit_x0"), unit=CNA_UNIT, test=refusal_test("circuit_x0")))
        circuit = [i for i in by.index if str(i).startswith("circuit_x")]
        q = float(by.loc[circuit, "quality"].min())
        caa = [i for i in by.index if str(i).startswith("caa")]
        caa_text = (f"; CAA over {len(caa)} (layer, α) rows {by.loc[caa, 'quality'].min():.3f}–"
                    f"{by.loc[caa, 'quality'].max():.3f}") if caa else ""
        heads.append(Headline("cna.quality_min", "CNA: lowest quality over circuit strengths (CAA: range)",
                              f"{q:.3f}{caa_text}", q, None, PUBLISHED["cna_quality"], links["summary"],
                              n=n_prompts(by.loc[circuit, "quality"].idxmin()), unit=CNA_UNIT))
    if matched:
        best = {k: matched.get(k) for k in ("best_cna", "best_caa")}
        shown = [f"{label} {row_text(best[k]) if best[k] in by.index else 'none reaches it'}"
                 for k, label in (("best_cna", "CNA"), ("best_caa", "CAA"))]
        value = float(by.loc[best["best_caa"], "refusal_rate"]) if best["best_caa"] in by.index else None
        picked = [best[k] for k in ("best_caa", "best_cna") if best[k] in by.index]
        heads.append(Headline(
            "cna.matched_quality", f"best CNA and best CAA at matched quality ≥ {_f(threshold, '.3f')}",
            "; ".join(shown) + f" (rule: {matched.get('rule', 'missing')})", value, None, "", links["summary"],
            n=n_prompts(picked[0]) if picked else None, unit=CNA_UNIT))
    rule = (f" Rows are compared at matched quality: {matched['rule']} (threshold {_f(threshold, '.3f')}; "
            f"{matched.get('n_caa_rows_at_quality', '?')} of {matched.get('n_caa_rows', '?')} CAA rows reach it)."
            if matched else "")
    intro = ("CNA scales every circuit neuron (a ← m·a) at every prompt and generated token; controls are a "
             "random circuit of the same size in the same layers and CAA as specified by Rimsky et al.: the mean "
             "difference of the residual stream after one layer at the last prompt token (positive minus negative "
             "discovery prompts), added times α to that layer's residual at the last prompt token and every "
             "generated token, swept over layers and α. Quality is 1 − 4-gram repetition of the greedy rollouts "
             "(SCIENCE.md §3)." + rule + study_judge_text(study_dir))
    return Section("cna", STAGE_TITLES["cna"], intro, items), heads


def keystone_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "keystone"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    curve = pq.read_table(folder / "curve.parquet").to_pandas()
    scores = pq.read_table(folder / "scores.parquet").to_pandas().sort_values("rank")
    link = _rel(folder / "summary.json", report_dir)
    items = [
        _figure("keystone_curve", "Keystone ablation curve", plots.keystone_curve(curve),
                _rel(folder / "curve.parquet", report_dir)),
        Table("Strongest cross-task neurons", scores.head(15), caption("keystone_top"),
              table_link=_rel(folder / "scores.parquet", report_dir)),
    ]
    stab = folder / "stability.parquet"
    if stab.is_file():
        s = pq.read_table(stab).to_pandas()
        if "basis" not in s:  # tables written before stability moved to disjoint task groups
            s = s.assign(basis="prompt_halves")
        agg = s.groupby(["basis", "score", "k"], as_index=False).agg(
            iou_mean=("iou", "mean"), iou_min=("iou", "min"), iou_max=("iou", "max"),
            iou_chance=("iou_chance", "first"), n_splits=("split", "nunique"))
        agg["basis"] = agg["basis"].map(STABILITY_BASIS_LABELS).fillna(agg["basis"])
        agg = agg.sort_values(["basis", "score", "k"], key=lambda c: c.map(_BASIS_ORDER) if c.name == "basis" else c)
        items.append(Table("Stability of the top-k sets across disjoint halves of the task groups", agg,
                           caption("keystone_stability"), table_link=_rel(stab, report_dir)))
    curve_summary = summary.get("curve", summary)
    curve_summary = curve_summary if isinstance(curve_summary, dict) else {}
    intro = (curve_summary.get("statement")
             or "Cross-task activation strength, ablation against random same-layer controls.")
    heads = []
    per_k = curve_summary.get("per_k") or []
    if per_k:
        last = per_k[-1]
        p = last.get("perplexity", {})
        if _finite(p.get("ratio_to_random_median")):
            frac = summary.get("k_max_fraction_of_neurons")
            frac_text = f" ({frac:.2%} of neurons)" if _finite(frac) else ""
            heads.append(Headline(
                "keystone.perplexity_ratio_kmax",
                f"keystone ablation of the top {last['k']} neurons: perplexity / random median",
                f"{_f(p['ratio_to_random_median'], '.3g')}× (keystone {_f(p.get('keystone'), '.4g')} vs random "
                f"{_f(p.get('random_min'), '.4g')}–{_f(p.get('random_max'), '.4g')} over {last.get('n_random', '?')} "
                f"draws){frac_text}",
                p["ratio_to_random_median"], None, PUBLISHED["keystone_collapse"], link,
                n=last.get("n_random"), unit="random same-layer control sets"))
    if "perplexity_separates_at_k" in curve_summary:
        ks = curve_summary["perplexity_separates_at_k"] or []
        draws = {e.get("n_random") for e in per_k}
        n_random = draws.pop() if len(draws) == 1 else None
        heads.append(Headline("keystone.separates_at_k",
                              "keystone ablation beats every random control (perplexity) at k",
                              ", ".join(str(k) for k in ks) or "none", None, None, "", link,
                              n=n_random, unit="random same-layer control sets at each k",
                              test=(f"keystone perplexity above every one of the {n_random} random controls at a k; "
                                    f"chance 1/{n_random + 1} at one k if keystone and random sets are exchangeable"
                                    if n_random is not None else None)))
    stability = [e for e in summary.get("stability") or []
                 if e.get("basis") == "task_groups" and e.get("score") == "min"]
    if stability:
        k_max = max(summary.get("provenance", {}).get("k_values") or [0])
        top = min(stability, key=lambda e: (abs(e.get("k", 0) - k_max), -e.get("k", 0)))
        heads.append(Headline(
            "keystone.stability_iou",
            f"keystone top-{top['k']} set by the ranking score (min over groups of mean |a|): IoU across "
            "disjoint halves of the task groups",
            f"{_f(top.get('iou_mean'), '.3f')} (range {_f(top.get('iou_min'), '.3f')}–{_f(top.get('iou_max'), '.3f')} "
            f"over {top.get('n_splits', '?')} splits; chance {_f(top.get('iou_chance'), '.2g')})",
            top.get("iou_mean"), None, PUBLISHED["keystone_stability"], link,  # min–max over splits: not a CI
            n=top.get("n_splits"), unit="splits of the task groups into two disjoint halves"))
    return Section("keystone", STAGE_TITLES["keystone"], intro, items), heads


#: How the report names each stability basis (methods.keystone.STABILITY_BASES).
STABILITY_BASIS_LABELS = {
    "task_groups": "primary: ranking score, disjoint task groups",
    "prompt_halves": "secondary: last-token |a|, random prompt halves of every group",
}
_BASIS_ORDER = {label: i for i, label in enumerate(STABILITY_BASIS_LABELS.values())}


#: The layer bands as the window defines them (methods.window.BAND_DEFINITION), for summaries
#: written before it recorded them.
_BAND_FALLBACK = ("early = the first 20% of layers, late = the last 20%, bulk = the middle 60% "
                  "(0.2·n_layers ≤ layer < 0.8·n_layers)")


def _window_mae(entry: dict, unit: str, band: str | None = None) -> str:
    """A held-out MAE with its cluster-bootstrap CI and n (``band``: the layers of one band)."""
    suffix = f"_{band}" if band else ""
    value, ci = entry.get(f"mae_{unit}{suffix}"), entry.get(f"mae_{unit}{suffix}_ci95") or [None, None]
    if band is not None:
        if value is None:
            return f"missing (no held-out pair in the {band} layers)"
        lo, hi = ci
        ci_text = f"95% CI {lo:.3f}–{hi:.3f}, cluster bootstrap over neurons" if _finite(lo) and _finite(hi) \
            else "CI missing"
        neurons = entry.get(f"n_neurons_{band}")
        return (f"{value:.3f} ({ci_text}; n = {entry.get(f'n_pairs_{band}')} neuron × sign pairs"
                + (f" of {neurons} neurons" if neurons is not None else "") + ")")
    if value is None:
        return "missing (no held-out neuron)"
    lo, hi = ci
    ci_text = f"95% CI {lo:.3f}–{hi:.3f}" if _finite(lo) and _finite(hi) else "CI missing"
    return (f"{value:.3f} ({ci_text}, cluster bootstrap over neurons; n = {entry['n_pairs']} "
            f"neuron × sign pairs of {entry['n_neurons']} neurons, "
            f"{entry['n_measured_ceiling_censored_at_grid_edge']} ceilings censored at the grid edge, "
            f"{entry['n_prediction_missing_counted_as_grid_span']} missing predictions counted as the grid span)")


def _window_rho(entry: dict) -> str:
    """Spearman ρ of predicted vs measured ceilings with its CI, resampling unit and n."""
    r, ci = entry.get("spearman_rho_predicted_vs_measured"), entry.get("spearman_rho_ci95") or [None, None]
    if not _finite(r):
        return "missing"
    pairs, neurons = entry.get("spearman_n_pairs"), entry.get("spearman_n_neurons")
    unit = ("cluster bootstrap over neurons" if entry.get("spearman_resampling_unit", "").startswith("neuron")
            else "bootstrap over neuron × sign pairs")
    n_text = f"; n = {pairs} neuron × sign pairs of {neurons} neurons" if pairs is not None else ""
    return f"{r:.2f} (95% CI {_f(ci[0], '.2f')}–{_f(ci[1], '.2f')}, {unit}{n_text})"


def _band_text(summary: dict) -> str:
    """The bulk band as the summary defines it, with its layers where recorded."""
    bands = summary.get("layer_bands") or {}
    text = bands.get("definition") or summary.get("predictor_alignment", {}).get("band_definition") or _BAND_FALLBACK
    if bands.get("bulk"):
        text += f"; bulk = layers {bands['bulk'][0]}–{bands['bulk'][-1]} of {bands['n_layers']}"
    return text


def _baseline_text(baseline: dict) -> str:
    """The x = 0 precondition of every behaviour: a trigger must beat the unintervened share, so a
    behaviour already flipped without a dose has no trigger to find (said, not hidden)."""
    if not baseline:
        return "missing"
    parts = []
    for b, r in baseline.items():
        text = f"{b}: {_f(r.get('baseline_flip'), '.0%')} / {_f(r.get('baseline_collapse'), '.0%')}"
        if _finite(r.get("baseline_flip")) and r["baseline_flip"] >= 0.5:
            text += " (the behaviour is already flipped without a dose: no trigger can beat it)"
        parts.append(text)
    return "; ".join(parts)


def _window_rows(summary: dict, n: int, verdict_text: str) -> list[dict]:
    """The held-out figures of the window beside the published ones, units and n stated."""
    v, a, k = summary["verdicts"], summary["predictor_alignment"], summary["predictor_kl"]
    const, raw = summary.get("predictor_constant", {}), summary.get("predictor_raw_dose", {})
    mae, rho = _window_mae, _window_rho
    return [
        {"figure": "held-out neurons", "this study": n, "published": PUBLISHED["window_n"]},
        {"figure": "unintervened (x = 0) share of prompts showing the flip / collapsing, per behaviour",
         "this study": _baseline_text(summary.get("baseline_unintervened") or {}), "published": "—"},
        {"figure": "ceiling MAE, alignment units, predictor (a) c* (reconstruction)", "this study":
            mae(a, "alignment"), "published": PUBLISHED["window_mae"]},
        {"figure": f"ceiling MAE, alignment units, predictor (a), bulk layers ({_band_text(summary)}; "
                   "reconstruction)", "this study": mae(a, "alignment", "bulk"),
         "published": PUBLISHED["window_mae_bulk"]},
        {"figure": "ceiling MAE, alignment units, constant baseline (training mean ceiling)",
         "this study": mae(const, "alignment") if const else "missing", "published": "—"},
        {"figure": "ceiling MAE, alignment units, raw-dose baseline", "this study":
            mae(raw, "alignment") if raw else "missing", "published": "—"},
        {"figure": "ceiling MAE, alignment units, predictor (b) single-pass KL", "this study": mae(k, "alignment"),
         "published": "—"},
        {"figure": "ceiling MAE, budget units |x|, predictor (a) / constant", "this study":
            f"{mae(a, 'x')} / {_f(const.get('mae_x'), '.3f')}", "published": "—"},
        {"figure": "skill of (a) over the constant baseline, alignment units", "this study":
            _f(a.get("skill_vs_constant_alignment"), ".2f"), "published": "—"},
        {"figure": "Spearman ρ, predicted vs measured ceiling: (a) / (b)", "this study": f"{rho(a)} / {rho(k)}",
         "published": "—"},
        {"figure": "Spearman ρ, predicted vs measured ceiling: constant / raw-dose baseline", "this study":
            f"{rho(const)} / {rho(raw)}", "published": "—"},
        {"figure": "verdicts (predicted ceiling: reconstruction)", "this study": verdict_text,
         "published": PUBLISHED["window_verdicts"]},
        {"figure": "verdicts on neurons with a trigger", "this study":
            f"{v.get('correct_with_trigger')}/{v.get('n_with_trigger')} vs majority "
            f"{v.get('majority_correct_with_trigger')}/{v.get('n_with_trigger')}, McNemar p = "
            f"{_f(v.get('mcnemar_exact_p_value_with_trigger'), '.3g')}", "published": "—"},
        {"figure": "fitted on training neurons: c*, KL threshold", "this study":
            f"{_f(summary['fitted_on_training_neurons']['c_star'], '.3f')}, "
            f"{_f(summary['fitted_on_training_neurons']['kl_threshold'], '.3g')}",
         "published": "—"},
    ]


def _sensitivity_rows(sensitivity: dict) -> list[dict]:
    """One row per threshold scale of ``summary['ceiling_threshold_sensitivity']``."""
    n, base_open = sensitivity.get("n_pairs"), sensitivity.get("n_open_at_base")
    rows = []
    for entry in sensitivity["by_scale"]:
        th = entry.get("thresholds", {})
        changes = "; ".join(
            f"{c['behaviour']} L{c['layer']}/{c['neuron']} sign {c['sign']:+d}: {c['verdict_before']} → "
            f"{c['verdict_after']}" for c in entry.get("verdict_changes", [])[:6])
        more = len(entry.get("verdict_changes", [])) - 6
        rows.append({
            "collapse thresholds": f"×{entry['scale']:g} ({entry.get('direction', '')})",
            "repetition / perplexity / entropy": " / ".join(
                _f(th.get(k), ".4g") for k in ("max_repetition_ratio", "max_perplexity", "max_entropy")),
            "ceilings moved": f"{entry['n_ceilings_moved']}/{n}",
            "entered / left the grid": f"{entry.get('n_ceilings_entered_grid', 0)} / "
                                       f"{entry.get('n_ceilings_left_grid', 0)}",
            "median |Δ ceiling x| (moved)": (_f(entry.get("median_abs_delta_ceiling_x"), ".3g")
                                             if entry["n_ceilings_moved"] else "none moved"),
            "triggers moved": entry.get("n_triggers_moved"),
            "open (neuron × sign)": f"{entry.get('n_open')} (as measured: {base_open})",
            "verdicts changed": entry["n_verdicts_changed"],
            "changes": (changes + (f"; and {more} more" if more > 0 else "")) or "none",
        })
    return rows


def _mae_headline(key: str, label: str, entry: dict, unit: str, link: str, published: str = "",
                  band: str | None = None) -> Headline:
    """A held-out ceiling MAE: value, cluster-bootstrap CI over neurons and n neurons."""
    suffix = f"_{band}" if band else ""
    ci = entry.get(f"mae_{unit}{suffix}_ci95") or [None, None]
    n = entry.get(f"n_neurons{suffix}")
    text = _window_mae(entry, unit, band) if entry else "missing"
    return Headline(key, label, text, entry.get(f"mae_{unit}{suffix}"), _ci(*ci), published, link, n=n,
                    unit="held-out neurons", test="cluster bootstrap over neurons (both dose signs of a neuron "
                    "resampled together), percentile 95% CI")


def _window_headlines(summary: dict, verdict_text: str, pivots: list, link: str) -> list[Headline]:
    """The window's headline rows (the report's summary and ``neuronaudit headlines``): each with
    its CI, its test, its n and its units."""
    v, a, k = summary["verdicts"], summary["predictor_alignment"], summary.get("predictor_kl", {})
    const, raw = summary.get("predictor_constant", {}), summary.get("predictor_raw_dose", {})
    n = v["n_heldout_neurons"]
    verdict_ci = wilson_interval(v["correct"], n) if n else (None, None)
    heads = [
        Headline("window.n_heldout", "held-out neurons", str(n), n, None, PUBLISHED["window_n"], link, n=n,
                 unit="neurons"),
        _mae_headline("window.ceiling_mae_alignment",
                      "ceiling MAE on held-out neurons (alignment cosθ, predictor a; reconstruction)", a,
                      "alignment", link, PUBLISHED["window_mae"]),
        _mae_headline("window.ceiling_mae_alignment_bulk",
                      f"ceiling MAE, bulk layers (alignment cosθ, predictor a; reconstruction; {_band_text(summary)})",
                      a, "alignment", link, PUBLISHED["window_mae_bulk"], band="bulk"),
        _mae_headline("window.ceiling_mae_x", "ceiling MAE in budget units |x| = |d| / B (predictor a; "
                      "reconstruction)", a, "x", link),
        _mae_headline("window.ceiling_mae_alignment_kl", "ceiling MAE of predictor b, the single-pass KL threshold "
                      "(alignment cosθ; reconstruction)", k, "alignment", link),
        _mae_headline("window.ceiling_mae_alignment_constant",
                      "ceiling MAE of the constant baseline (training mean ceiling), alignment cosθ", const,
                      "alignment", link),
        _mae_headline("window.ceiling_mae_alignment_raw_dose", "ceiling MAE of the raw-dose baseline (training "
                      "median ceiling dose / each neuron's budget), alignment cosθ", raw, "alignment", link),
    ]
    rho_ci = a.get("spearman_rho_ci95") or [None, None]
    heads.append(Headline(
        "window.ceiling_spearman_alignment", "Spearman ρ, predicted (a) vs measured ceilings on held-out neurons "
        "(budget units |x|, predictions cut at the grid edge)", _window_rho(a),
        a.get("spearman_rho_predicted_vs_measured"), _ci(*rho_ci), "", link,
        n=a.get("spearman_n_neurons"), unit="held-out neurons",
        test=("cluster bootstrap over neurons (both dose signs together), percentile 95% CI"
              if str(a.get("spearman_resampling_unit", "")).startswith("neuron")
              else "bootstrap over neuron × sign pairs, percentile 95% CI")))
    heads.append(Headline(
        "window.verdict_accuracy", "open/closed verdicts on held-out neurons",
        verdict_text + (f"; accuracy {v['correct'] / n:.1%} "
                        f"(Wilson 95% CI {verdict_ci[0]:.1%}–{verdict_ci[1]:.1%}; n = {n} neurons)" if n else ""),
        v["correct"] / n if n else None, _ci(*verdict_ci) if n else None, PUBLISHED["window_verdicts"], link,
        n=n, unit="neurons", test="Wilson score interval; exact McNemar test against the training majority"))
    nt = v.get("n_with_trigger")
    if nt is not None:
        t_ci = wilson_interval(v["correct_with_trigger"], nt) if nt else (None, None)
        majority = v.get("majority_class_from_training", v.get("majority_class"))
        discordant = (f"; discordant {v['only_predictor_right_with_trigger']} vs "
                      f"{v['only_majority_right_with_trigger']}" if "only_predictor_right_with_trigger" in v else "")
        text = (f"{v.get('correct_with_trigger')}/{nt} correct vs always '{majority}' (training majority) "
                f"{v.get('majority_correct_with_trigger')}/{nt}{discordant}, exact McNemar p = "
                f"{_f(v.get('mcnemar_exact_p_value_with_trigger'), '.3g')}"
                + (f"; accuracy {v['correct_with_trigger'] / nt:.1%} (Wilson 95% CI {t_ci[0]:.1%}–{t_ci[1]:.1%}; "
                   f"n = {nt} neurons)" if nt else " (no held-out neuron has a trigger)"))
        heads.append(Headline(
            "window.verdict_accuracy_with_trigger", "open/closed verdicts on held-out neurons with a trigger in "
            "the grid (without one a neuron is closed under both)", text,
            v["correct_with_trigger"] / nt if nt else None, _ci(*t_ci) if nt else None, "", link, n=nt,
            unit="held-out neurons with a trigger",
            test="Wilson score interval; exact McNemar test against the training majority"))
    if pivots:
        reach = sum(p["reach"] == "actionable" for p in pivots)
        lo, hi = wilson_interval(reach, len(pivots))
        heads.append(Headline("window.pivots_actionable",
                              "refusal pivot neurons with actionable reach (≥ 50% of rollouts actionable)",
                              f"{reach} of {len(pivots)} neurons = {reach / len(pivots):.0%} (Wilson 95% CI "
                              f"{lo:.0%}–{hi:.0%}; n = {len(pivots)} refusal neurons open in either sign)",
                              reach / len(pivots), (lo, hi), PUBLISHED["window_pivots"], link, n=len(pivots),
                              unit="refusal pivot neurons", test="Wilson score interval"))
    return heads


def window_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "window"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    window = pq.read_table(folder / "window.parquet").to_pandas()
    single = pq.read_table(folder / "single_pass.parquet").to_pandas()
    horizon = max(summary["grid"]["horizons"])
    geometry = window[["layer", "neuron", "c0"]].drop_duplicates(["layer", "neuron"])
    v = summary["verdicts"]
    link = _rel(folder / "summary.json", report_dir)
    trigger_columns = ([c for c in ("final_horizon", "trigger_x") if c in window.columns]
                       or [f"trigger_x_{horizon}"])  # tables written before triggers had one horizon each
    n = v["n_heldout_neurons"]
    majority = v.get("majority_class_from_training", v.get("majority_class"))
    verdict_text = (f"{v['correct']}/{n} correct vs always '{majority}' (training majority) "
                    f"{v['majority_correct']}/{n}; discordant {v.get('only_predictor_right')} vs "
                    f"{v.get('only_majority_right')}, exact McNemar p = {_f(v.get('mcnemar_exact_p_value'), '.3g')}")
    rows = _window_rows(summary, n, verdict_text)
    items = [
        Table("Held-out figures against the published ones", pd.DataFrame(rows), caption("window_heldout"),
              table_link=link),
        _figure("saturation_curve", "Saturation curve", plots.saturation_plot(single, geometry),
                {"single pass": _rel(folder / "single_pass.parquet", report_dir),
                 "window": _rel(folder / "window.parquet", report_dir)}),
        _figure("ceiling_scatter", "Predicted against measured ceilings", plots.ceiling_scatter(window),
                _rel(folder / "window.parquet", report_dir)),
        _figure("window_diagram", "Control windows", plots.window_diagram(window, horizon),
                _rel(folder / "window.parquet", report_dir)),
        Table("Per-neuron windows", window[["behaviour", "layer", "neuron", "kind", "band", "sign", "split", "budget",
                                            "c0", "ceiling_x", *trigger_columns, "predicted_ceiling_x_alignment",
                                            "predicted_ceiling_x_kl", "verdict", "predicted_verdict", "failure_mode"]],
              caption("window_table"), table_link=_rel(folder / "window.parquet", report_dir), max_rows=80),
    ]
    pivots = summary.get("refusal_pivots", [])
    if pivots:
        items.append(Table("Refusal pivots: what their control buys",
                           pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in p.items()}
                                         for p in pivots]),
                           caption("refusal_pivots"), table_link=_rel(folder / "sweeps.parquet", report_dir)))
    sensitivity = summary.get("ceiling_threshold_sensitivity")
    if sensitivity and sensitivity.get("by_scale"):
        items.append(Table("Collapse-threshold sensitivity of the measured ceilings",
                           pd.DataFrame(_sensitivity_rows(sensitivity)), caption("ceiling_sensitivity"),
                           table_link={"summary.json": link, "sweeps": _rel(folder / "sweeps.parquet", report_dir)}))
    intro = ("Doses are in budget units, x = d / B with B = ‖r‖ / ‖v‖ from a generic forward pass; alignment is "
             "cosθ between the steered residual and the write vector. Every sweep includes x = 0; a trigger is "
             "the smallest |x| at which at least half the prompts flip and the Wilson lower bound of that share "
             "exceeds the unintervened share; a collapsed rollout never counts as a flip. "
             "Failure-mode rules for closed neurons: neither trigger nor collapse within the grid; normalisation "
             "cap if the readout alignment |cosθ| between the write vector and the final norm's output (after "
             "the final norm, at the last prompt token, mean over the generic prompts) never exceeds 0.9 over the "
             "single-pass grid; too little depth if a late-layer (last 20%) neuron's readout alignment never "
             "reaches the median readout alignment at which open training neurons triggered; otherwise collapse "
             "before trigger. "
             "Predicted ceilings use only the weights and one generic forward pass; nothing fitted sees a "
             "held-out neuron, and the majority verdict is taken from the training neurons. "
             + RECONSTRUCTION[0].upper() + RECONSTRUCTION[1:] + "." + study_judge_text(study_dir))
    heads = _window_headlines(summary, verdict_text, pivots, link)
    return Section("window", STAGE_TITLES["window"], intro, items), heads


def attribution_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "attribution"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    scores = pq.read_table(folder / "scores.parquet").to_pandas()
    link = _rel(folder / "summary.json", report_dir)
    rows = []
    for group, entry in summary["comparison"].items():
        for score in ("grad", "grad_signed", "atp", "atp_signed", "delta", "std_delta", "dose_response"):
            if score not in entry:
                continue
            e = entry[score]
            ci = e.get("rho_ci95") or [None, None]
            rows.append({"behaviours": group, "score": score, "n neurons": e.get("n"),
                         "spearman ρ": e["spearman_rho"], "permutation p": e.get("p_value"),
                         "ρ 95% CI": f"{_f(ci[0], '.2f')}–{_f(ci[1], '.2f')}",
                         "CI method": e.get("ci_method", "percentile"),
                         "degenerate resamples": e.get("n_degenerate_resamples"),
                         "precision@k": e["precision_at_k"], "k (controllers)": e["k"]})
    items = [
        _figure("attribution_panels", "Measured control against attribution scores and readout geometry",
                plots.attribution_panels(scores), _rel(folder / "scores.parquet", report_dir)),
        Table("Agreement of each score with measured control", pd.DataFrame(rows), caption("attribution_table"),
              table_link=link),
    ]
    if summary.get("missed_by_gradient"):
        items.append(Table("Controllers the gradient ranks low but the forward screen finds",
                           pd.DataFrame(summary["missed_by_gradient"]), caption("attribution_missed"),
                           table_link=_rel(folder / "scores.parquet", report_dir)))
    heads = []
    pooled = summary["comparison"].get("all", {})
    for score, label, published in (("grad", "Spearman ρ(mean |gradient| over prompts, measured control), "
                                              "behaviours pooled after ranking within each",
                                     PUBLISHED["attribution_grad"]),
                                    ("std_delta", "Spearman ρ(|standardised δ|, measured control), behaviours "
                                                  "pooled after ranking within each",
                                     PUBLISHED["attribution_forward"])):
        e = pooled.get(score)
        if e:
            lo, hi = (e.get("rho_ci95") or [None, None])[:2]
            heads.append(Headline(f"attribution.rho_{score}", label,
                                  _num(e["spearman_rho"], lo, hi, digits=2)
                                  + f"; permutation p {_f(e.get('p_value'), '.3g')}, n = {e.get('n')} neurons, "
                                  f"{e.get('ci_method', 'percentile')} CI"
                                  + f"; precision@k {_f(e.get('precision_at_k'), '.2f')} (k = {e.get('k')})",
                                  e["spearman_rho"], _ci(lo, hi), published, link, n=e.get("n"), unit="neurons",
                                  test=f"permutation test; {e.get('ci_method', 'percentile')} bootstrap CI"))
    return Section("attribution", STAGE_TITLES["attribution"], summary["statement"], items), heads


def _mean_ci(entry: dict | None, spec: str = ".2f") -> str:
    """A per-prompt mean with its bootstrap CI over prompts and the number of prompts."""
    if not entry or not _finite(entry.get("mean")):
        return "missing"
    text = format(entry["mean"], spec)
    if _finite(entry.get("low")) and _finite(entry.get("high")):
        text += f" (95% CI {format(entry['low'], spec)}–{format(entry['high'], spec)})"
    return f"{text}, n = {entry.get('n', '?')} prompts"


#: The published side of the sufficient-set headlines: the method's source gives no number that
#: this study reproduces (SCIENCE.md section 5 states none).
SUFFICIENT_PUBLISHED = "none stated (SCIENCE.md §5 gives no number; seed 000 reports comparisons, not values)"


def derived_preconditions(study_dir: Path, config: dict) -> list[dict]:
    """Preconditions read from the stages' own outputs once they ran: the number of held-out
    neurons with a measured ceiling (``preconditions.min_measured_ceilings``)."""
    from neuronaudit.preconditions import measured_ceilings

    out = []
    path = Path(study_dir) / "window" / "window.parquet"
    if path.is_file():
        window = pq.read_table(path, columns=["layer", "neuron", "split", "ceiling_x"]).to_pandas()
        held = window[window["split"] == "heldout"]
        measured = held[held["ceiling_x"].notna()]
        threshold = (config.get("preconditions") or {}).get("min_measured_ceilings", 5)
        out.append(measured_ceilings(len(measured.drop_duplicates(["layer", "neuron"])),
                                     len(held.drop_duplicates(["layer", "neuron"])), threshold).as_dict())
    return out


def precondition_failures(study_dir: Path, config: dict) -> list[dict]:
    """Every failed precondition of the study: those checked before the stages
    (``preconditions.json``) and those read from their outputs (:func:`derived_preconditions`)."""
    path = Path(study_dir) / "preconditions.json"
    checked = (json.loads(path.read_text()).get("failed") or []) if path.is_file() else []
    return checked + [p for p in derived_preconditions(study_dir, config) if not p["passed"]]


def preconditions_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    """The table of every checked precondition, first on the page."""
    path = study_dir / "preconditions.json"
    if not path.is_file():
        return None, []
    doc = json.loads(path.read_text())
    derived = derived_preconditions(study_dir, study_config(study_dir))
    doc["preconditions"] = list(doc.get("preconditions", [])) + derived
    doc["failed"] = list(doc.get("failed") or []) + [p for p in derived if not p["passed"]]
    table = pd.DataFrame([{"precondition": p["name"], "guards": p["scope"], "value": p["value"],
                           "threshold": ("≤ " if p["direction"] == "max" else "≥ ") + format(p["threshold"], "g")
                           if p.get("threshold") is not None else "", "n": p["n"],
                           "status": "passed" if p["passed"] else "FAILED", "detail": p["detail"]}
                          for p in doc.get("preconditions", [])])
    failed = doc.get("failed") or []
    intro = (f"Prompts are fed as {doc.get('chat_template', '?')}. "
             + (f"{len(failed)} precondition(s) failed; every figure that depends on one is shown as not meaningful "
                "and without its published counterpart." if failed else "Every precondition passed."))
    items = [Table("Preconditions", table, caption("preconditions_table"), table_link=_rel(path, report_dir))]
    return Section("preconditions", STAGE_TITLES["preconditions"], intro, items), []


def mark_headlines(headlines: list[Headline], study_dir: Path, config: dict) -> list[Headline]:
    """Headlines with every figure whose precondition failed replaced by "not meaningful" and the
    failed precondition, its value, CI and published counterpart removed."""
    from dataclasses import replace

    from neuronaudit.preconditions import affected

    failures = precondition_failures(study_dir, config)
    out = []
    for h in headlines:
        hit = affected(h.key, failures, config)
        if hit:
            reasons = "; ".join(f"{f['name']} [{f['scope']}]" for f in hit)
            h = replace(h, text=f"not meaningful: precondition failed ({reasons})", value=None, ci=None,
                        published="")
        out.append(h)
    return out


def study_config(study_dir: Path) -> dict:
    """The resolved config a study's report recorded (``report/config.json``), or {} if absent."""
    path = Path(study_dir) / "report" / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def study_headlines(study_dir: str | Path, report_dir: str | Path,
                    config: dict | None = None) -> tuple[list[Section], list[Headline]]:
    """Every stage section of ``study_dir`` and its headline figures, each one whose precondition
    failed marked not meaningful (:func:`mark_headlines`); ``config`` defaults to the one the
    study's report recorded. The report, ``compare``, ``headlines`` and ``publish`` all read a
    study through this one function, so a figure is marked the same everywhere."""
    study_dir = Path(study_dir)
    sections, headlines = stage_sections(study_dir, Path(report_dir))
    return sections, mark_headlines(headlines, study_dir, study_config(study_dir) if config is None else config)


def sufficient_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "sufficient"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    precision = pq.read_table(folder / "precision.parquet").to_pandas()
    control = pq.read_table(folder / "control.parquet").to_pandas()
    sets = pq.read_table(folder / "sets.parquet").to_pandas()
    link = _rel(folder / "summary.json", report_dir)
    prec_link, ctrl_link = _rel(folder / "precision.parquet", report_dir), _rel(folder / "control.parquet", report_dir)
    items = []
    heads = []
    skipped = []
    for task, t in summary.get("tasks", {}).items():
        skipped += [f"{task}/{s['prompt_id']} ({s['reason']})" for s in t.get("skipped", [])]
        if not t.get("n_explained"):
            continue
        by_set = t["sets"]
        heads.append(Headline(
            f"sufficient.{task}.precision", f"sufficient sets, {task}: fresh-input precision of the found set",
            f"{_mean_ci(by_set['found']['precision'])}; |S| {_mean_ci(by_set['found']['size'], '.1f')}; "
            f"reached the bound on {t['reached']}/{t['n_explained']}; top-|S| grad × act "
            f"{_mean_ci(by_set['attribution']['precision'])}, contrastive screen "
            f"{_mean_ci(by_set['screen']['precision'])}",
            by_set["found"]["precision"].get("mean"),
            _ci(by_set["found"]["precision"].get("low"), by_set["found"]["precision"].get("high")),
            SUFFICIENT_PUBLISHED, {"precision.parquet": prec_link, "summary.json": link},
            n=by_set["found"]["precision"].get("n"), unit="prompts", test="bootstrap over explained prompts"))
        c = t.get("control", {})
        if "found" in c:
            rand = c.get("random", {}).get("forcing_rate")
            heads.append(Headline(
                f"sufficient.{task}.forcing", f"sufficient sets, {task}: forcing rate on prompts lacking the target",
                f"found {_mean_ci(c['found']['forcing_rate'])} vs random same-layer {_mean_ci(rand)} vs "
                f"unclamped {_mean_ci(c.get('none', {}).get('forcing_rate'))}; continuations collapsed under the "
                f"found set {_mean_ci(c['found']['collapse_rate'])}",
                c["found"]["forcing_rate"].get("mean"),
                _ci(c["found"]["forcing_rate"].get("low"), c["found"]["forcing_rate"].get("high")),
                SUFFICIENT_PUBLISHED, {"control.parquet": ctrl_link, "summary.json": link},
                n=c["found"]["forcing_rate"].get("n"), unit="prompts", test="bootstrap over prompts"))
        st = t.get("stability", {})
        heads.append(Headline(
            f"sufficient.{task}.stability", f"sufficient sets, {task}: Jaccard of the found sets",
            f"disjoint perturbations {_mean_ci(st.get('jaccard_disjoint'))}; reseeded "
            f"{_mean_ci(st.get('jaccard_reseeded'))}; across prompts with the same target "
            f"{_f((st.get('jaccard_across_prompts_same_target') or {}).get('mean'), '.2f')} "
            f"({(st.get('jaccard_across_prompts_same_target') or {}).get('n_pairs', 0)} pairs)",
            (st.get("jaccard_disjoint") or {}).get("mean"), None, SUFFICIENT_PUBLISHED, link))
    if len(precision):
        items += [
            _figure("sufficient_precision", "Precision against set size", plots.sufficient_precision(sets, precision),
                    {"sets.parquet": _rel(folder / "sets.parquet", report_dir), "precision.parquet": prec_link}),
            _figure("sufficient_stability", "Stability of the found sets across prompts",
                    plots.sufficient_stability(precision), prec_link),
            _figure("sufficient_control", "Forcing the target onto prompts that lack it",
                    plots.sufficient_control(control), ctrl_link),
            Table("Found sets and their baselines on fresh perturbations",
                  precision[["task", "prompt_id", "target", "set", "size", "neurons", "hits", "n", "precision",
                             "precision_low", "precision_high", "coverage", "baseline_precision", "reached",
                             "jaccard_disjoint", "jaccard_reseeded"]],
                  caption("sufficient_table"), table_link=prec_link),
        ]
    cost = summary.get("cost", {})
    intro = (f"For {summary.get('provenance', {}).get('n_explained', '?')} prompts per task, a minimal set of "
             "neuron predicates (a ≥ θ, θ = fraction × the observed activation) whose clamping at the last prompt "
             "token keeps the model's next token on perturbed inputs, by a greedy search that stops when the "
             "Wilson lower bound of precision reaches 1 − δ and then prunes. Precision is re-measured on fresh "
             "perturbations; CIs of task means are bootstraps over explained prompts (perturbed inputs are nested "
             f"in prompts). Cost: {cost.get('forward_calls', '?')} forward calls, "
             f"{cost.get('token_positions', '?')} token positions.")
    if skipped:
        intro += " Prompts not explained: " + "; ".join(skipped) + "."
    return Section("sufficient", STAGE_TITLES["sufficient"], intro, items), heads


def _points(value, lo=None, hi=None) -> str:
    """An accuracy change in percentage points with its CI."""
    if not _finite(value):
        return "missing"
    text = f"{100 * value:+.1f} points"
    if _finite(lo) and _finite(hi):
        text += f" (95% CI {100 * lo:+.1f} to {100 * hi:+.1f})"
    return text


def _acc(entry: dict | None) -> str:
    """``k/n = p% (Wilson 95% CI)`` of an accuracy summary."""
    if not entry or not _finite(entry.get("accuracy")):
        return "missing"
    return (f"{entry.get('n_correct', '?')}/{entry.get('n', '?')} = {entry['accuracy']:.0%} "
            f"(95% CI {_f(entry.get('accuracy_low'), '.0%')}–{_f(entry.get('accuracy_high'), '.0%')})")


def _p(value) -> str:
    return f"McNemar p = {value:.3g}" if _finite(value) else "McNemar p missing"


def _wilson_test(samples_per_problem=None) -> str:
    """The accuracy CI of the reasoning stage; discovery counts several sampled solutions of a problem."""
    if isinstance(samples_per_problem, int) and samples_per_problem > 1:
        return (f"Wilson score interval over solutions ({samples_per_problem} sampled per problem, counted as "
                "independent)")
    return "Wilson score interval"


def _paired_change_test(n_boot) -> str:
    """How the reasoning stage tests an accuracy change (methods.reasoning.paired_difference)."""
    return (f"percentile bootstrap of the per-problem accuracy differences{_resamples(n_boot)}; exact McNemar test, "
            "two-sided, on the discordant problems")


def _table_n(table: pd.DataFrame, **match) -> int | None:
    """``n`` of the held-out row over every problem kind of a reasoning outcome table whose
    columns equal ``match``."""
    match = {"split": "heldout", "target_kind": "all", **match}
    sel = table
    for column, value in match.items():
        if column in sel:
            sel = sel[sel[column] == value]
        elif column not in ("split", "target_kind"):
            return None
    return int(sel["n"].iloc[0]) if "n" in sel and len(sel) and pd.notna(sel["n"].iloc[0]) else None


def reasoning_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    """Reasoning-critical neurons: discovery, ranking, ablation, steering, gate, transfer."""
    folder = study_dir / "reasoning"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    link = _rel(folder / "summary.json", report_dir)
    paths = {name: folder / f"{name}.parquet" for name in ("neurons", "ablation", "steering", "gate", "transfer",
                                                            "solutions")}
    links = {name: _rel(path, report_dir) for name, path in paths.items()}
    disc = summary.get("discovery") or {}
    n_held = (summary.get("n_problems") or {}).get("heldout", "?")
    n_disc = (summary.get("n_problems") or {}).get("discovery", "?")
    n_boot = (summary.get("provenance") or {}).get("n_boot")
    heads = [Headline(
        "reasoning.discovery_accuracy", "reasoning: discovery solutions graded correct",
        f"{disc.get('n_correct', '?')}/{disc.get('n_solutions', '?')} = {_f(disc.get('accuracy'), '.0%')} "
        f"(95% CI {_f(disc.get('accuracy_low'), '.0%')}–{_f(disc.get('accuracy_high'), '.0%')}; "
        f"{disc.get('samples_per_problem', '?')} per problem, {n_disc} problems)",
        disc.get("accuracy"), _ci(disc.get("accuracy_low"), disc.get("accuracy_high")), "",
        {"solutions.parquet": links["solutions"], "summary.json": link}, n=disc.get("n_solutions"),
        unit="discovery solutions", test=_wilson_test(disc.get("samples_per_problem")))]
    if summary.get("status") != "complete":
        intro = summary.get("statement") or "The reasoning stage did not complete."
        return Section("reasoning", STAGE_TITLES["reasoning"], intro, []), heads
    steering = pq.read_table(paths["steering"]).to_pandas()
    ablation = pq.read_table(paths["ablation"]).to_pandas()
    neurons = pq.read_table(paths["neurons"]).to_pandas()
    gate = pq.read_table(paths["gate"]).to_pandas()
    unsteered = summary.get("heldout_unsteered") or {}
    heads.append(Headline("reasoning.heldout_unsteered", "reasoning: held-out accuracy, unsteered (greedy)",
                          _acc(unsteered), unsteered.get("accuracy"),
                          _ci(unsteered.get("accuracy_low"), unsteered.get("accuracy_high")), "", link,
                          n=unsteered.get("n"), unit="held-out problems", test=_wilson_test()))
    top = (summary.get("scores") or {}).get("top") or []
    if top:
        t = top[0]
        # the bootstrap over problems writes its size beside the scores (methods.reasoning.bootstrap_top_scores)
        row = neurons[(neurons["scope"] == "all") & (neurons["rank"] == t.get("rank", 1))].head(1)
        col = {c: (int(row[c].iloc[0]) if c in row and len(row) and pd.notna(row[c].iloc[0]) else None)
               for c in ("n_problems", "n_boot", "n_defined")}
        boot = col["n_boot"] if col["n_boot"] is not None else n_boot
        defined = (f", {col['n_defined']} of them with a correct and an incorrect solution"
                   if col["n_defined"] is not None and boot is not None and col["n_defined"] < boot else "")
        n_top = col["n_problems"] if col["n_problems"] is not None else (n_disc if isinstance(n_disc, int) else None)
        heads.append(Headline(
            "reasoning.top_neuron", "reasoning: top-ranked neuron by (rel, |w|)",
            f"L{t['layer']}/N{t['neuron']}: rel = {_f(t.get('rel'), '.3f')}, w = {_f(t.get('w'), '.3g')} "
            f"(95% CI {_f(t.get('w_low'), '.3g')} to {_f(t.get('w_high'), '.3g')}), in the top {len(top)} of "
            f"{_f(t.get('top_share'), '.0%')} of problem resamples",
            t.get("w"), _ci(t.get("w_low"), t.get("w_high")), "", links["neurons"],
            n=n_top, unit="discovery problems",
            test="percentile bootstrap over discovery problems (a drawn problem brings all its solutions)"
                 + _resamples(boot) + defined))
    primary = summary.get("primary_mode")
    for mode, m in (summary.get("steering") or {}).items():
        h = m.get("heldout") or {}
        key = "reasoning.steering_gain" if mode == primary else f"reasoning.steering_gain_{mode}"
        n_steer = h.get("n") if h.get("n") is not None else _table_n(
            steering, set="critical", mode=mode, n_neurons=m.get("n_neurons"), strength=m.get("strength"))
        heads.append(Headline(
            key, f"reasoning: held-out accuracy change, steering {mode} (top {m.get('n_neurons')} neurons, "
                 f"s = {m.get('strength')} chosen on validation)",
            f"{_points(h.get('delta'), h.get('delta_low'), h.get('delta_high'))}, {_p(h.get('mcnemar_p'))}, "
            f"n = {n_held} problems; vs random same-layer neurons at the same strength "
            f"{_points(h.get('vs_random_delta'), h.get('vs_random_low'), h.get('vs_random_high'))}; "
            f"collapsed {_f(h.get('collapse_rate'), '.0%')}",
            h.get("delta"), _ci(h.get("delta_low"), h.get("delta_high")),
            PUBLISHED["reasoning_gain"] if mode == primary else "", {"steering.parquet": links["steering"],
                                                                      "summary.json": link},
            n=n_steer, unit="held-out problems", test=_paired_change_test(n_boot)))
    ab = summary.get("ablation") or {}
    mode0 = (ab.get("modes") or [None])[0]
    if mode0:
        crit = (ab.get("conditions") or {}).get(f"ablate {mode0} critical") or {}
        rand = (ab.get("random") or {}).get(mode0) or {}
        heads.append(Headline(
            "reasoning.ablation_drop", f"reasoning: held-out accuracy change, top {ab.get('n_neurons')} neurons "
                                       f"{mode0}-ablated",
            f"{_points(crit.get('delta'), crit.get('delta_low'), crit.get('delta_high'))}, {_p(crit.get('mcnemar_p'))}"
            f", n = {n_held} problems; random same-layer sets {_points(rand.get('mean_delta'))} on average "
            f"(range {_points(rand.get('min_delta'))} to {_points(rand.get('max_delta'))})",
            crit.get("delta"), _ci(crit.get("delta_low"), crit.get("delta_high")), "", links["ablation"],
            n=crit.get("n") if crit.get("n") is not None else _table_n(ablation, condition=f"ablate {mode0} critical"),
            unit="held-out problems", test=_paired_change_test(n_boot)))
    g = summary.get("gate") or {}
    if g.get("fitted"):
        pol = (g.get("policies") or {}).get(primary) or {}
        gated, ret = pol.get("gated") or {}, pol.get("retention_gated") or {}
        heads.append(Headline(
            "reasoning.gate_auc", "reasoning: failure probe before generation, held-out AUC",
            f"{_f(g.get('auc'), '.2f')} (95% CI {_f(g.get('auc_low'), '.2f')}–{_f(g.get('auc_high'), '.2f')}; "
            f"{g.get('n_heldout_failed')} of {g.get('n_heldout')} held-out problems failed); gated {primary} steering "
            f"fired on {g.get('fired')}/{g.get('n_heldout')}, accuracy {_acc(gated)}, change "
            f"{_points(gated.get('delta'), gated.get('delta_low'), gated.get('delta_high'))}; kept "
            f"{ret.get('still_solved', '?')}/{ret.get('n_solved', '?')} already-solved problems",
            g.get("auc"), _ci(g.get("auc_low"), g.get("auc_high")), "", {"gate.parquet": links["gate"],
                                                                         "summary.json": link},
            n=g.get("n_heldout"), unit="held-out problems",
            test="percentile bootstrap over held-out problems (probe score and failure resampled together; resamples "
                 f"with one class dropped){_resamples(n_boot)}"))
    tr = summary.get("transfer") or {}
    items = [
        _figure("reasoning_strength", "Held-out accuracy against steering strength",
                plots.reasoning_strength(steering), links["steering"]),
        _figure("reasoning_ablation", "Ablation: critical neurons against controls", plots.reasoning_ablation(ablation),
                links["ablation"]),
    ]
    if g.get("fitted"):
        items.append(_figure("reasoning_gate_roc", "Failure probe ROC on held-out problems",
                             plots.reasoning_gate_roc(gate, g.get("auc"), g.get("threshold")), links["gate"]))
    if "outcomes" in tr:
        table = pq.read_table(paths["transfer"]).to_pandas()
        carried, quality = tr["outcomes"].get("carried") or {}, tr.get("match_quality") or {}
        vs = tr.get("carried_vs_random") or {}
        heads.append(Headline(
            "reasoning.transfer", f"reasoning: steering carried to {tr.get('target_source')}, held-out accuracy change",
            f"{_points(carried.get('delta'), carried.get('delta_low'), carried.get('delta_high'))}, "
            f"{_p(carried.get('mcnemar_p'))}; vs a random mapping "
            f"{_points(vs.get('vs_random_delta'), vs.get('vs_random_low'), vs.get('vs_random_high'))}; match "
            f"mean |r| {_f(quality.get('mean_abs_correlation'), '.2f')} vs random "
            f"{_f(quality.get('random_mean_abs_correlation'), '.2f')}"
            + (" (the same weights as the audited model: a sanity check)" if tr.get("same_weights_as_audited") else ""),
            carried.get("delta"), _ci(carried.get("delta_low"), carried.get("delta_high")), "", links["transfer"],
            n=carried.get("n") if carried.get("n") is not None else _table_n(table, condition="carried"),
            unit="held-out problems, second model", test=_paired_change_test(n_boot)))
        source = (summary.get("steering") or {}).get(tr.get("mode"), {}).get("heldout")
        items.append(_figure("reasoning_transfer", "Transfer to the second model against random mappings",
                             plots.reasoning_transfer(table, source), links["transfer"]))
    shown = neurons[neurons["scope"] == "all"].head(15)
    items.append(Table("Top reasoning-critical neurons", shown[[c for c in (
        "rank", "layer", "neuron", "g", "b", "w", "w_low", "w_high", "rel", "rel_low", "rel_high", "top_share")
        if c in shown]], caption("reasoning_neurons"), table_link=links["neurons"]))
    cross_a = ablation[ablation["target_kind"] != "all"]
    cross_s = steering[(steering["target_kind"] != "all") & steering["condition"].astype(str).str.startswith("cross ")]
    if len(cross_a) or len(cross_s):
        cross = pd.concat([cross_a.assign(test="ablation"), cross_s.assign(test="steering")], ignore_index=True)
        items.append(Table("Cross-task validation: neurons of one kind on every kind", cross[[
            "test", "source_kind", "target_kind", "n", "accuracy", "delta", "delta_low", "delta_high", "mcnemar_p"]],
            caption("reasoning_cross_task"), table_link={"ablation.parquet": links["ablation"],
                                                         "steering.parquet": links["steering"]}))
    chosen = summary.get("chosen") or {}
    sizes = summary.get("n_problems") or {}
    counts = ", ".join(f"{k} {sizes.get(k, '?')}" for k in ("discovery", "validation", "heldout"))
    statements = " ".join((m.get("statement") or "") for m in (summary.get("steering") or {}).values())
    intro = (
        "Problems with exact answers, split per kind into discovery, validation and held-out problems "
        f"({counts}). A neuron's activation is "
        "averaged over the positions that predict a solution (the last question token and every solution token); g "
        "and b are its means over correct and incorrect discovery solutions, w = g − b, rel = |w| / (|g| + |b| + ε), "
        "ranked by (rel, |w|), with bootstrap CIs over problems. Steering at the same positions (add a ← a + s·w; "
        "template blend a ← (1 − s)·a + s·g); n and s chosen on validation problems only ("
        + "; ".join(f"{m}: n = {c.get('n_top')}, s = {c.get('strength')}" for m, c in chosen.items())
        + "). Every accuracy is on held-out problems with a Wilson CI; every change is paired over the same problems "
        "(bootstrap CI, exact McNemar test). " + statements
        + (" Gate: " + g.get("reason") + "." if not g.get("fitted") and g.get("reason") else "")
        + (" Transfer: " + tr["skipped"] + "." if tr.get("skipped") else "")
    )
    return Section("reasoning", STAGE_TITLES["reasoning"], intro, items), heads


BUILDERS = (preconditions_section, refusal_section, screen_section, cna_section, keystone_section, window_section,
            attribution_section, sufficient_section, reasoning_section)


def stage_sections(study_dir: str | Path, report_dir: str | Path) -> tuple[list[Section], list[Headline]]:
    """Every stage section whose tables exist, and their headline figures."""
    study_dir, report_dir = Path(study_dir), Path(report_dir)
    sections, heads = [], []
    for build in BUILDERS:
        section, h = build(study_dir, report_dir)
        if section is not None:
            sections.append(section)
            heads.extend(h)
    return sections, heads
