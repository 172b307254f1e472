"""Study table diff: equal folders, differences within tolerance, and real differences."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from neuronaudit import io
from neuronaudit.study_diff import IGNORED_KEYS, SKIPPED_DIRS, diff_studies, main

N_NEURONS = 8
PROMPTS = ["p0", "p1", "p2"]
LAYERS = [0, 1]


def _last_token(values: np.ndarray) -> pa.Table:
    """The collect stage's last-token table: a fixed-size list of float32 per (prompt, layer)."""
    ids = [p for p in PROMPTS for _ in LAYERS]
    layers = [layer for _ in PROMPTS for layer in LAYERS]
    acts = pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float32).ravel()), N_NEURONS)
    return pa.Table.from_arrays([pa.array(ids), pa.array(layers, pa.int32()), acts],
                                schema=io.last_token_schema(N_NEURONS))


def _base():
    rng = np.random.default_rng(0)
    acts = rng.normal(0, 1, (len(PROMPTS) * len(LAYERS), N_NEURONS))
    scores = pd.DataFrame({
        "layer": np.repeat([0, 1], 4).astype("int64"),
        "neuron": np.tile(np.arange(4), 2),
        "delta": rng.normal(0, 1, 8),
        "ci_low": [np.nan, *rng.normal(0, 1, 7)],
        "universal": [True, False] * 4,
        "behaviour": ["refusal"] * 8,
    })
    summary = {
        "grid": {"horizons": [4, 8], "x": [0.25, 1.0, 4.0]},
        "predictor": {"mae_x": 0.3, "rho": None, "ci95": [0.2, 0.4], "n": 4, "separates": True},
        "pivots": [{"layer": 1, "neuron": 0, "trigger_x": 0.25}, {"layer": 2, "neuron": 3, "trigger_x": float("nan")}],
        "statement": "The gradient anti-predicts measured control.",
        "model_path": "/runs/a/results/models/local-model",
        "provenance": {"git_commit": "aaa", "host": "one"},
        "generation_seconds": 1.5,
        "tasks": {"t": {"prompts": [{"search_seconds": 0.1, "search_forward_calls": 12}]}},
    }
    recipe = {"steps": 8, "loss_after": 1.25, "seconds": {"own_answers": 3.0, "training": 40.0, "total": 50.0},
              "wall_seconds": 55.0, "package_versions": {"torch": "2.13.0"}, "git_commit": "aaa"}
    return acts, scores, summary, recipe


def write_study(root, acts=None, scores=None, summary=None, recipe=None, run="a"):
    """A small fake ``results/<study>``; ``run`` changes only what legitimately differs between runs."""
    base = _base()
    acts = base[0] if acts is None else acts
    scores = base[1] if scores is None else scores
    summary = base[2] if summary is None else summary
    recipe = base[3] if recipe is None else recipe
    prov = {"model_id": "tiny", "run": run, "git_commit": run * 8}
    io.write_table(_last_token(acts), root / "collect" / "harmful.last_token.parquet", prov)
    io.write_table(pa.Table.from_pandas(scores, preserve_index=False), root / "screen" / "refusal.scores.parquet", prov)
    (root / "window").mkdir(parents=True)
    (root / "window" / "summary.json").write_text(json.dumps(summary))
    (root / "tune").mkdir()
    (root / "tune" / "recipe.json").write_text(json.dumps(recipe))
    # never compared: logs, benchmarks, the report, model weights
    for skipped in ("logs/collect", "benchmarks/collect", "report", "tune/weights"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "config.json").write_text(json.dumps({"run": run}))
    io.write_table(pa.table({"x": [run]}), root / "report" / "figures.parquet")
    return root


@pytest.fixture
def study_a(tmp_path):
    return write_study(tmp_path / "a" / "results" / "s", run="a")


def by_where(diffs):
    return {(d.file, d.where): d for d in diffs}


def test_constants_name_what_is_ignored():
    timing = {"generation_seconds", "seconds", "wall_seconds"}
    assert {"provenance", "git_commit", "package_versions"} | timing <= IGNORED_KEYS
    assert set(SKIPPED_DIRS) == {"logs", "benchmarks", "report", "weights"}


def test_two_runs_with_different_provenance_are_equal(study_a, tmp_path, capsys):
    summary = _base()[2]
    summary.update(model_path="/runs/b/elsewhere", provenance={"git_commit": "bbb"}, generation_seconds=99.0,
                   tasks={"t": {"prompts": [{"search_seconds": 0.2, "search_forward_calls": 12}]}})  # *_seconds
    recipe = _base()[3]
    recipe.update(seconds={"own_answers": 1.0}, wall_seconds=1.0, package_versions={}, git_commit="bbb")
    b = write_study(tmp_path / "b" / "results" / "s", summary=summary, recipe=recipe, run="b")
    assert diff_studies(study_a, b) == []
    assert main([str(study_a), str(b)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["4 files compared, 0 differ"]


def test_differences_within_tolerance_are_equal(study_a, tmp_path):
    acts, scores, summary, recipe = _base()
    acts = acts * (1 + 1e-7)  # float32 rounding of a relative 1e-7 change
    scores["delta"] = scores["delta"] + 1e-10
    summary["predictor"]["mae_x"] = 0.3 * (1 + 1e-8)
    summary["grid"]["x"][0] = 0.25 + 1e-12
    b = write_study(tmp_path / "b", acts, scores, summary, recipe)
    assert diff_studies(study_a, b) == []
    # a looser change is within a looser tolerance only
    scores["delta"] = scores["delta"] + 1e-4
    c = write_study(tmp_path / "c", acts, scores, summary, recipe)
    assert [d.where for d in diff_studies(study_a, c)] == ["delta"]
    assert diff_studies(study_a, c, atol=1e-3) == []


def test_cell_differences_are_counted_per_column_with_the_largest_difference(study_a, tmp_path):
    acts, scores, summary, recipe = _base()
    acts[1, 3] += 0.5
    acts[4, 0] -= 0.25
    acts[4, 7] += 0.125
    scores.loc[[2, 5], "delta"] += [0.1, -0.3]
    scores.loc[6, "behaviour"] = "operator"
    scores.loc[0, "neuron"] = 9
    scores.loc[3, "universal"] = not scores.loc[3, "universal"]
    b = write_study(tmp_path / "b", acts, scores, summary, recipe)
    diffs = by_where(diff_studies(study_a, b))
    last = diffs[("collect/harmful.last_token.parquet", "activation")]
    assert last.kind == "cells" and last.n_cells == 2  # rows with any element changed
    assert last.max_abs_diff == pytest.approx(0.5, rel=1e-6)
    delta = diffs[("screen/refusal.scores.parquet", "delta")]
    assert delta.n_cells == 2 and delta.max_abs_diff == pytest.approx(0.3)
    assert "2 of 8 cells differ (max abs diff 0.3)" in str(delta)
    assert diffs[("screen/refusal.scores.parquet", "behaviour")].n_cells == 1
    assert diffs[("screen/refusal.scores.parquet", "neuron")].max_abs_diff == 9
    assert diffs[("screen/refusal.scores.parquet", "universal")].n_cells == 1
    assert set(diffs) == {("collect/harmful.last_token.parquet", "activation")} | {
        ("screen/refusal.scores.parquet", c) for c in ("delta", "behaviour", "neuron", "universal")}


def test_nan_equals_nan_and_differs_from_a_number(study_a, tmp_path):
    acts, scores, summary, recipe = _base()
    a = write_study(tmp_path / "a2", acts.copy(), scores.copy(), summary, recipe)
    acts_nan = acts.copy()
    acts_nan[0, 0] = np.nan
    b = write_study(tmp_path / "b", acts_nan, scores.copy(), summary, recipe)
    c = write_study(tmp_path / "c", acts_nan.copy(), scores.copy(), summary, recipe)
    assert diff_studies(b, c) == []  # NaN in the same cell (row 0 of ci_low and in a list) is equal
    (d,) = diff_studies(a, b)
    assert d.where == "activation" and d.n_cells == 1 and d.max_abs_diff is None
    assert "NaN, inf or null on one side only" in d.detail
    # a Parquet null equals NaN; NaN against a number differs
    scores_null = scores.copy()
    scores_null["ci_low"] = scores_null["ci_low"].astype(object).where(scores_null["ci_low"].notna(), None)
    e = write_study(tmp_path / "e", acts.copy(), scores_null, summary, recipe)
    assert diff_studies(a, e) == []
    scores_num = scores.copy()
    scores_num.loc[0, "ci_low"] = 0.0
    f = write_study(tmp_path / "f", acts.copy(), scores_num, summary, recipe)
    (d,) = diff_studies(a, f)
    assert (d.where, d.n_cells) == ("ci_low", 1)
    # JSON: NaN equals NaN, NaN against a number differs
    summary_nan = json.loads(json.dumps(summary))
    summary_nan["pivots"][1]["trigger_x"] = 0.5
    g = write_study(tmp_path / "g", acts.copy(), scores.copy(), summary_nan, recipe)
    (d,) = diff_studies(a, g)
    assert (d.file, d.where) == ("window/summary.json", "pivots[1].trigger_x")


def test_json_leaves_that_differ_are_named_by_path(study_a, tmp_path):
    acts, scores, summary, recipe = _base()
    summary["predictor"]["mae_x"] = 0.35
    summary["predictor"]["separates"] = 1  # a bool is not the number 1
    summary["predictor"]["rho"] = 0.1
    summary["grid"]["horizons"] = [4, 8, 16]
    summary["pivots"][0]["layer"] = 3
    summary["statement"] = "Something else."
    summary["model_path"] = "relative/path"  # only two absolute paths are taken as equal
    summary["new_key"] = {"a": 1}
    del summary["predictor"]["n"]
    recipe["loss_after"] = 1.5
    recipe["seconds"] = "not compared"
    b = write_study(tmp_path / "b", acts, scores, summary, recipe)
    diffs = by_where(diff_studies(study_a, b))
    f = "window/summary.json"
    assert set(diffs) == {(f, w) for w in ("predictor.mae_x", "predictor.separates", "predictor.rho", "grid.horizons",
                                           "pivots[0].layer", "statement", "model_path", "new_key", "predictor.n")} | {
        ("tune/recipe.json", "loss_after")}
    assert diffs[(f, "predictor.mae_x")].max_abs_diff == pytest.approx(0.05)
    assert str(diffs[(f, "predictor.mae_x")]) == f"{f}: value: predictor.mae_x: 0.3 vs 0.35 (abs diff 0.05)"
    assert diffs[(f, "grid.horizons")].detail == "length 2 vs 3"
    assert diffs[(f, "new_key")].detail.startswith("only in b")
    assert diffs[(f, "predictor.n")].detail.startswith("only in a")


def test_files_columns_types_and_rows(study_a, tmp_path, capsys):
    acts, scores, summary, recipe = _base()
    b = write_study(tmp_path / "b", acts, scores.assign(extra=1.0).drop(columns="universal"), summary, recipe)
    (b / "window" / "summary.json").unlink()
    (b / "window" / "sweeps.parquet").write_bytes(b"not parquet")
    io.write_table(_last_token(acts).slice(0, 4), b / "collect" / "harmful.last_token.parquet")
    diffs = diff_studies(study_a, b)
    kinds = {(d.file, d.kind) for d in diffs}
    assert kinds == {
        ("collect/harmful.last_token.parquet", "rows"),
        ("screen/refusal.scores.parquet", "columns"),
        ("window/summary.json", "only_in_a"),
        ("window/sweeps.parquet", "only_in_b"),
    }
    cols = next(d for d in diffs if d.kind == "columns")
    assert "only in a: ['universal'], only in b: ['extra']" in cols.detail

    c = write_study(tmp_path / "c", acts, scores.astype({"layer": "int32"}), summary, recipe)
    (d,) = diff_studies(study_a, c)
    assert (d.kind, d.where, d.detail) == ("schema", "layer", "type int64 vs int32")

    (b / "window" / "sweeps.json").write_text("{not json")
    (study_a / "window" / "sweeps.json").write_text("{}")
    (study_a / "window" / "sweeps.parquet").write_bytes(b"also not parquet")
    unreadable = {d.file for d in diff_studies(study_a, b) if d.kind == "unreadable"}
    assert unreadable == {"window/sweeps.json", "window/sweeps.parquet"}

    assert main([str(study_a), str(b)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "6 files compared, 5 differ"
    assert "window/summary.json: only_in_a: missing from" in "\n".join(lines)


def test_skipped_folders_are_compared_on_request(study_a, tmp_path):
    b = write_study(tmp_path / "b", run="b")
    assert diff_studies(study_a, b) == []
    diffs = diff_studies(study_a, b, skip_dirs=())
    assert {d.file for d in diffs} == {
        "logs/collect/config.json", "benchmarks/collect/config.json", "report/config.json",
        "tune/weights/config.json", "report/figures.parquet"}


def test_missing_folder_is_a_one_line_error(study_a, tmp_path, capsys):
    assert main([str(study_a), str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"neuronaudit: error: study folder {str(tmp_path / 'nope')!r} not found"


def test_runs_as_a_module(study_a, tmp_path):
    acts, scores, summary, recipe = _base()
    summary["statement"] = "changed"
    b = write_study(tmp_path / "b", acts, scores, summary, recipe)
    run = subprocess.run([sys.executable, "-m", "neuronaudit.study_diff", str(study_a), str(b)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        'window/summary.json: value: statement: "The gradient anti-predicts measured control." vs "changed"',
        "4 files compared, 1 differ",
    ]
