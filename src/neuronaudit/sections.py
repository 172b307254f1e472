"""Report sections of the stages, built from their tables alone (no model is run).

Each builder reads one stage's outputs under ``results/<study>/`` and returns a
:class:`~neuronaudit.report.Section` plus headline items for the summary; a stage whose files
are absent contributes nothing, so the report grows as stages land.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from neuronaudit import plots
from neuronaudit.report import Excerpt, Figure, Section, Table, caption, figure_to_data_uri

Headline = tuple[str, str]


def _rel(path: Path, report_dir: Path) -> str:
    return os.path.relpath(path, report_dir)


def _pct(rate: dict) -> str:
    return f"{rate['count']}/{rate['n']} = {rate['rate']:.1%} (95% CI {rate['ci_low']:.1%}–{rate['ci_high']:.1%})"


def refusal_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    evaluation = study_dir / "refusal" / "evaluation.json"
    fractions = study_dir / "refusal" / "fractions.parquet"
    if not evaluation.is_file():
        return None, []
    ev = json.loads(evaluation.read_text())
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
                   table_link=_rel(study_dir / "refusal" / "evaluation_rollouts.parquet", report_dir))]
    if fractions.is_file():
        frac = pq.read_table(fractions).to_pandas()
        items.append(Figure("Typed rollouts of the unintervened audited model",
                            figure_to_data_uri(plots.rollout_type_bars(frac)), caption("rollout_types"),
                            table_link=_rel(fractions, report_dir)))
    for ex in ev["tuned"].get("examples", {}).get("harmful", [])[:2]:
        items.append(Excerpt(f"tuned model, {ex['prompt_id']} ({ex['rollout_type']})",
                             f"PROMPT: {ex['prompt']}\nRESPONSE: {ex['response']}"))
    intro = (
        f"The study fine-tunes its own refusal reference model (recipe in tune/recipe.json) and types "
        f"every rollout with the {ev.get('judge', {}).get('kind', 'rule')} judge; perplexity ratio "
        f"tuned/base {ratio['mean']:.3f} (95% CI {ratio['ci_low']:.3f}–{ratio['ci_high']:.3f})."
    )
    heads = [
        ("refusal (tuned vs base)", f"{_pct(ev['tuned']['refusal_harmful'])} vs {_pct(ev['base']['refusal_harmful'])}"),
        ("over-refusal of the tuned model", _pct(ev["tuned"]["over_refusal_harmless"])),
    ]
    return Section("refusal", "Refusal: reference model and typed rollouts", intro, items), heads


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
            heads.append((f"top {name} neuron", f"L{int(t.layer)}/N{int(t.neuron)}: δ = {t.delta:.3g} "
                          f"(95% CI {t.ci_low:.3g}–{t.ci_high:.3g}), standardised {t.std_delta:.2f}"))
    scores = pd.concat(frames, ignore_index=True)
    items = [Figure("Contrastive screen", figure_to_data_uri(plots.screen_overview(scores, tables)),
                    caption("screen_overview"),
                    table_link={n: _rel(folder / f"{n}.scores.parquet", report_dir) for n in circuits})]
    for name, circuit in tables.items():
        items.append(Table(f"{name}: circuit (k = {len(circuit)})",
                           circuit.head(20)[["rank", "layer", "neuron", "sign", "delta", "std_delta", "ci_low", "ci_high"]],
                           caption("screen_top"), table_link=_rel(circuits[name], report_dir)))
    intro = ("Forward-only contrastive screen on the discovery split: δ = mean⁺ − mean⁻ of last-token "
             "activations, with universal neurons excluded from circuits.")
    return Section("screen", "Contrastive screening", intro, items), heads


def cna_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    path = study_dir / "cna" / "summary.parquet"
    if not path.is_file():
        return None, []
    summary = pq.read_table(path).to_pandas()
    items = [
        Figure("CNA circuit scaling against controls", figure_to_data_uri(plots.cna_dose_response(summary)),
               caption("cna_dose_response"), table_link=_rel(path, report_dir)),
        Table("CNA interventions", summary, caption("cna_dose_response"), table_link=_rel(path, report_dir)),
    ]
    by = summary.set_index("intervention")
    heads = []
    if "none" in by.index and "circuit_x0" in by.index:
        heads.append(("CNA circuit ablation, refusal rate",
                      f"{by.loc['none', 'refusal_rate']:.0%} → {by.loc['circuit_x0', 'refusal_rate']:.0%} "
                      f"(quality {by.loc['circuit_x0', 'quality']:.3f}; published Llama-3.2-1B 90→34%)"))
    intro = ("CNA scales every circuit neuron (a ← m·a) at every prompt and generated token; controls are a "
             "random circuit of the same size in the same layers and the CAA mean-difference baseline.")
    return Section("cna", "CNA circuit ablation", intro, items), heads


def keystone_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "keystone"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    curve = pq.read_table(folder / "curve.parquet").to_pandas()
    scores = pq.read_table(folder / "scores.parquet").to_pandas().sort_values("rank")
    items = [
        Figure("Keystone ablation curve", figure_to_data_uri(plots.keystone_curve(curve)), caption("keystone_curve"),
               table_link=_rel(folder / "curve.parquet", report_dir)),
        Table("Strongest cross-task neurons", scores.head(15), caption("keystone_top"),
              table_link=_rel(folder / "scores.parquet", report_dir)),
    ]
    stab = folder / "stability.parquet"
    if stab.is_file():
        s = pq.read_table(stab).to_pandas()
        agg = s.groupby(["score", "k"], as_index=False)[["iou", "iou_chance"]].mean()
        items.append(Table("Stability of the top-k sets across disjoint prompt halves", agg,
                           caption("keystone_stability"), table_link=_rel(stab, report_dir)))
    statement = summary.get("curve", summary).get("statement") if isinstance(summary.get("curve", summary), dict) else None
    intro = statement or "Cross-task activation strength, ablation against random same-layer controls."
    heads = []
    curve_summary = summary.get("curve", summary)
    if isinstance(curve_summary, dict) and "perplexity_separates_at_k" in curve_summary:
        heads.append(("keystone ablation beats random (perplexity) at k", str(curve_summary["perplexity_separates_at_k"] or "none")))
    return Section("keystone", "Keystone neurons", intro, items), heads


def window_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "window"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    window = pq.read_table(folder / "window.parquet").to_pandas()
    single = pq.read_table(folder / "single_pass.parquet").to_pandas()
    horizon = max(summary["grid"]["horizons"])
    geometry = window[["layer", "neuron", "c0"]].drop_duplicates(["layer", "neuron"])
    v, a, k = summary["verdicts"], summary["predictor_alignment"], summary["predictor_kl"]

    def mae(entry: dict, unit: str) -> str:
        value, ci = entry.get(f"mae_{unit}"), entry.get(f"mae_{unit}_ci95", [None, None])
        if value is None:
            return "missing (no held-out neuron with a measured ceiling)"
        lo, hi = ci
        ci_text = f"95% CI {lo:.3f}–{hi:.3f}" if lo is not None and lo == lo else "CI missing"
        return f"{value:.3f} ({ci_text}; n = {entry['n_with_measured_ceiling']})"

    verdict_text = (f"{v['correct']}/{v['n_heldout_neurons']} correct vs majority ({v['majority_class']}) "
                    f"{v['majority_correct']}/{v['n_heldout_neurons']}, binomial p = {v['binomial_p_value_vs_majority']:.3g}")
    rows = [
        {"figure": "held-out neurons", "this study": v["n_heldout_neurons"], "published": 15},
        {"figure": "ceiling MAE, alignment units, predictor (a)", "this study": mae(a, "alignment"), "published": "0.14 (≈0.07 bulk)"},
        {"figure": "ceiling MAE, |x|, predictor (a)", "this study": mae(a, "x"), "published": "—"},
        {"figure": "ceiling MAE, alignment units, predictor (b)", "this study": mae(k, "alignment"), "published": "—"},
        {"figure": "verdicts", "this study": verdict_text, "published": "11/15 vs 10/15"},
        {"figure": "fitted c*, KL threshold", "this study":
            f"{summary['fitted_on_training_neurons']['c_star']}, {summary['fitted_on_training_neurons']['kl_threshold']}",
         "published": "—"},
    ]
    items = [
        Table("Held-out figures against the published ones", pd.DataFrame(rows), caption("window_heldout"),
              table_link=_rel(folder / "summary.json", report_dir)),
        Figure("Saturation curve", figure_to_data_uri(plots.saturation_plot(single, geometry)), caption("saturation_curve"),
               table_link=_rel(folder / "single_pass.parquet", report_dir)),
        Figure("Predicted against measured ceilings", figure_to_data_uri(plots.ceiling_scatter(window)),
               caption("ceiling_scatter"), table_link=_rel(folder / "window.parquet", report_dir)),
        Figure("Control windows", figure_to_data_uri(plots.window_diagram(window, horizon)), caption("window_diagram"),
               table_link=_rel(folder / "window.parquet", report_dir)),
        Table("Per-neuron windows", window[["behaviour", "layer", "neuron", "kind", "band", "sign", "split", "budget", "c0",
                                            "ceiling_x", f"trigger_x_{horizon}", "predicted_ceiling_x_alignment",
                                            "predicted_ceiling_x_kl", "verdict", "predicted_verdict", "failure_mode"]],
              caption("window_table"), table_link=_rel(folder / "window.parquet", report_dir), max_rows=80),
    ]
    pivots = summary.get("refusal_pivots", [])
    if pivots:
        items.append(Table("Refusal pivots: what their control buys",
                           pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in p.items()} for p in pivots]),
                           caption("refusal_pivots"), table_link=_rel(folder / "sweeps.parquet", report_dir)))
    intro = ("Failure-mode rules for closed neurons: normalisation cap if the write-layer alignment never exceeds "
             "0.9 over the single-pass grid; too little depth if a late-layer (last 20%) neuron's readout "
             "alignment never reaches the median readout alignment at which open training neurons triggered; "
             "otherwise collapse before trigger. Predicted ceilings use only the weights and one generic "
             "forward pass; nothing fitted sees a held-out neuron.")
    heads = [
        ("ceiling MAE on held-out neurons (alignment, predictor a)", f"{mae(a, 'alignment')}; published 0.14"),
        ("open/closed verdicts on held-out neurons", f"{verdict_text}; published 11/15 vs 10/15"),
    ]
    if pivots:
        reach = sum(p["reach"] == "actionable" for p in pivots)
        heads.append(("refusal pivots with actionable reach", f"{reach} of {len(pivots)} (published: 3 of 6 Llama pivots)"))
    return Section("window", "Control window", intro, items), heads


def attribution_section(study_dir: Path, report_dir: Path) -> tuple[Section | None, list[Headline]]:
    folder = study_dir / "attribution"
    if not (folder / "summary.json").is_file():
        return None, []
    summary = json.loads((folder / "summary.json").read_text())
    scores = pq.read_table(folder / "scores.parquet").to_pandas()
    rows = []
    for group, entry in summary["comparison"].items():
        for score in ("grad", "atp", "delta", "std_delta", "dose_response"):
            e = entry[score]
            rows.append({"behaviours": group, "score": score, "spearman ρ": e["spearman_rho"],
                         "ρ 95% CI": f"{e['rho_ci95'][0]:.2f}–{e['rho_ci95'][1]:.2f}",
                         "precision@k": e["precision_at_k"], "k (controllers)": e["k"]})
    items = [
        Figure("Measured control against attribution scores and readout geometry",
               figure_to_data_uri(plots.attribution_panels(scores)), caption("attribution_panels"),
               table_link=_rel(folder / "scores.parquet", report_dir)),
        Table("Agreement of each score with measured control", pd.DataFrame(rows), caption("attribution_table"),
              table_link=_rel(folder / "summary.json", report_dir)),
    ]
    if summary.get("missed_by_gradient"):
        items.append(Table("Controllers the gradient ranks low but the forward screen finds",
                           pd.DataFrame(summary["missed_by_gradient"]), caption("attribution_missed"),
                           table_link=_rel(folder / "scores.parquet", report_dir)))
    heads = [("gradient vs forward attribution", summary["statement"])]
    return Section("attribution", "Gradient versus forward attribution", summary["statement"], items), heads


BUILDERS = (refusal_section, screen_section, cna_section, keystone_section, window_section,
            attribution_section)


def stage_sections(study_dir: str | Path, report_dir: str | Path) -> tuple[list[Section], list[Headline]]:
    """Every stage section whose tables exist, and their headline items."""
    study_dir, report_dir = Path(study_dir), Path(report_dir)
    sections, heads = [], []
    for build in BUILDERS:
        section, h = build(study_dir, report_dir)
        if section is not None:
            sections.append(section)
            heads.extend(h)
    return sections, heads
