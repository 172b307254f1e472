"""Audit preconditions: each check measures what it names, fails where it should, and a failed one
marks exactly the figures that depend on it."""

import json

import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.preconditions import (
    Precondition,
    affected,
    behaviour_rates,
    coverage,
    failed,
    judge_accuracy,
    require,
    unknown_token_rate,
)
from neuronaudit.report.page import Headline
from neuronaudit.report.sections import mark_headlines
from neuronaudit.testing import narrow_tokenizer

CONFIG = {
    "behaviours": {"refusal": {"positive": "harmful", "negative": "harmless", "oracle": "refusal"},
                   "format": {"positive": "format_list", "negative": "format_prose", "oracle": "format"}},
    "cna": {"behaviour": "refusal"},
    "keystone": {"groups": ["task_knowledge", "generic"]},
    "sufficient": {"tasks": {"sentiment": {"set": "sentiment"}, "format": {"behaviour": "format"}}},
}


def test_unknown_token_rate_counts_the_unknown_token():
    tokenizer = narrow_tokenizer()
    known = " ".join([w for w in tokenizer.get_vocab() if not w.startswith("<")][:20])
    assert unknown_token_rate(tokenizer, [known]) == (0.0, len(known.split()))
    rate, n = unknown_token_rate(tokenizer, ["zqxjv vvqqzz " + known.split()[0]])
    assert n == 3 and rate == pytest.approx(2 / 3)
    check = coverage("odd", tokenizer, ["zqxjv vvqqzz"], max_rate=0.05)
    assert not check.passed and check.scope == "set:odd"
    assert "100.0% of the 2 tokens of prompt set 'odd'" in check.line()


def test_a_byte_level_tokenizer_spells_everything():
    class Bytes:
        unk_token_id = None
        unk_token = None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [list(t.encode()) for t in texts]}

    check = coverage("any", Bytes(), ["ünïcode ✓"], 0.05)
    assert check.passed and check.value == 0.0 and "no unknown token" in check.detail


def test_behaviour_rates_need_the_behaviour_on_positives_and_not_always_on_negatives():
    ok = behaviour_rates("b", [1, 1, 0, 1], [0, 0, 1, 0], [1] * 8, 0.25, 0.75, 0.5)
    assert all(c.passed for c in ok)
    absent = behaviour_rates("b", [0, 0, 0, 0], [0, 0, 0, 0], [1] * 8, 0.25, 0.75, 0.5)
    assert [c.name for c in absent if not c.passed] == ["behaviour_on_positive"]
    always = behaviour_rates("b", [1, 1, 1, 1], [1, 1, 1, 1], [1] * 8, 0.25, 0.75, 0.5)
    assert [c.name for c in always if not c.passed] == ["behaviour_on_negative"]
    unreadable = behaviour_rates("b", [1, 0], [0, 0], [0, 0, 0, 1], 0.25, 0.75, 0.5)
    assert [c.name for c in unreadable if not c.passed] == ["oracle_readability"]


def test_a_missing_value_never_passes_and_stop_names_the_first_failure_of_the_stage(tmp_path):
    assert not judge_accuracy(None, 0, 0.7, "none").passed
    checks = [Precondition("tokenizer_coverage", "set:harmful", 0.74, 0.05, "max", 900, "74% unknown"),
              Precondition("judge_accuracy", "judge", 0.9, 0.7, "min", 220, "fine"),
              Precondition("judge_accuracy", "judge", 0.5, 0.7, "min", 220, "poor")]
    assert [f["name"] for f in failed(checks)] == ["tokenizer_coverage", "judge_accuracy"]
    path = tmp_path / "preconditions.json"
    for on_fail in ("stop", "mark"):
        path.write_text(json.dumps({"on_fail": on_fail, "failed": failed(checks)}))
        require(path, ["set:generic"], "keystone")  # a stage that does not read a failed scope runs
        if on_fail == "mark":
            require(path, ["set:harmful", "judge"], "cna")  # marks, never raises
            continue
        with pytest.raises(NeuronAuditError, match=r"^cna not run: precondition tokenizer_coverage \[set:harmful\]: "
                                                   r"0.74 \(needs ≤ 0.05\): 74% unknown \(and 1 more\)"):
            require(path, ["set:harmful", "judge"], "cna")


def test_a_failed_precondition_marks_exactly_the_figures_that_depend_on_it(tmp_path):
    bad_set = Precondition("tokenizer_coverage", "set:sentiment", 0.5, 0.05, "max", 10, "x").as_dict()
    bad_format = Precondition("behaviour_on_positive", "behaviour:format", 0.0, 0.25, "min", 12, "y").as_dict()
    assert affected("sufficient.sentiment.precision", [bad_set], CONFIG) == [bad_set]
    assert affected("sufficient.format.precision", [bad_set], CONFIG) == []
    assert affected("sufficient.format.precision", [bad_format], CONFIG) == [bad_format]
    assert affected("window.ceiling_mae_alignment", [bad_format], CONFIG) == [bad_format]
    assert affected("keystone.stability_iou", [bad_format], CONFIG) == []
    assert affected("cna.refusal_circuit_ablated", [bad_format], CONFIG) == []
    (tmp_path / "preconditions.json").write_text(json.dumps({"failed": [bad_format]}))
    heads = [Headline("window.ceiling_mae_alignment", "MAE", "0.1 (0.05–0.2)", 0.1, (0.05, 0.2), "0.14 [seed]"),
             Headline("keystone.stability_iou", "IoU", "0.9", 0.9, None, "stable [seed]")]
    marked = mark_headlines(heads, tmp_path, CONFIG)
    assert marked[0].text.startswith("not meaningful") and "behaviour_on_positive [behaviour:format]" in marked[0].text
    assert marked[0].value is None and marked[0].ci is None and marked[0].published == ""
    assert marked[1] == heads[1]


def test_too_few_measured_ceilings_mark_the_ceiling_figures_or_stop_the_report(tmp_path):
    from report_study import write_study

    from neuronaudit.report.sections import study_headlines
    from neuronaudit.stages.report import stop_on_derived_failures

    info = write_study(tmp_path)
    study = info["study"]
    config = dict(info["config"], preconditions={"on_fail": "mark", "min_measured_ceilings": 5})
    _, heads = study_headlines(study, study, config)
    by_key = {h.key: h for h in heads}
    assert by_key["window.ceiling_mae_alignment"].text.startswith("not meaningful")
    assert "measured_ceilings [ceilings]" in by_key["window.ceiling_mae_alignment"].text
    assert by_key["window.ceiling_mae_alignment"].published == ""
    assert not by_key["window.verdict_accuracy"].text.startswith("not meaningful")  # no ceiling in it
    with pytest.raises(NeuronAuditError, match=r"^report not built: precondition measured_ceilings \[ceilings\]: "
                                               r"1 \(needs ≥ 5\): 1 of 1 held-out neurons"):
        stop_on_derived_failures(study, config)
    stop_on_derived_failures(study, dict(config, preconditions={"min_measured_ceilings": 1}))  # passes
