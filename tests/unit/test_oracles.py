"""Behaviour oracles and answer checks on hand-written responses."""

import numpy as np
import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.oracles import (
    ORACLES,
    answer_number,
    arithmetic_correct,
    format_oracle,
    get_oracle,
    knowledge_correct,
    normalise,
    numbers_in,
    operator_oracle,
)


@pytest.mark.parametrize(
    "response, a, b, label",
    [
        ("3 + 9 = 12", 3, 9, "add"),
        ("3 × 9 = 27", 3, 9, "mul"),
        ("The answer is 27.", 3, 9, "mul"),
        ("The answer is 12.", 3, 9, "add"),
        ("12", 3, 9, "add"),
        ("27", 3, 9, "mul"),
        ("What is 3 plus 9? 3 plus 9 is 12.", 3, 9, "add"),
        ("What is 3 times 9? The answer is 27", 3, 9, "mul"),
        ("3 multiplied by 9 equals 27.", 3, 9, "mul"),
        ("To add 4 and 8, count up: 12", 4, 8, "add"),
        ("4 x 8 = 32", 4, 8, "mul"),
        ("3 + 9 is 12, and 3 × 9 is 27", 3, 9, "add"),  # the first answer wins
        ("The result is 3 + 9 = 12", 3, 9, "add"),
        ("The answer is twelve.", 3, 9, "add"),  # number words only when there are no digits
        ("The answer is twenty-seven.", 3, 9, "mul"),
        ("3 + 9 = 13", 3, 9, "other"),
        ("I don't know.", 3, 9, "other"),
        ("3 and 9", 3, 9, "other"),  # only echoes
        ("12.5", 3, 9, "other"),
        ("10 + 11 = 21", 10, 11, "add"),
        ("10 × 11 = 110", 10, 11, "mul"),
        ("1,000", 10, 100, "mul"),
    ],
)
def test_operator_oracle(response, a, b, label):
    assert operator_oracle(response, a, b) == label


@pytest.mark.parametrize(
    "response, label",
    [
        ("- apples\n- pears", "list"),
        ("1. First, rinse the dishes.\n2. Then soap them.", "list"),
        ("1) eggs\n2) flour", "list"),
        ("* eggs\n* flour", "list"),
        ("• eggs\n• flour", "list"),
        ("Sure! Here is a list:\n\n1. Eggs\n2. Flour", "list"),
        ("Here you go.\nSome intro.\nMore intro.\n- too late", "prose"),  # not in the first 3 lines
        ("**Packing list**\nBring warm clothes and a good book.", "prose"),
        ("Drinking water keeps you healthy and alert.", "prose"),
        ("1.5 million people live there.", "prose"),
        ("-3 degrees is cold.", "prose"),
        ("", "prose"),
    ],
)
def test_format_oracle(response, label):
    assert format_oracle(response) == label


def test_answer_number_rules():
    assert answer_number("What is 12 - 6? 12 - 6 = 6", operands=(12, 6)) == 6  # answer equals an operand
    assert answer_number("16 - 16 = 0", operands=(16, 16)) == 0
    assert answer_number("The temperature is -3 now.") == -3
    assert answer_number("5 - 3 = 2") == 2
    assert answer_number("nothing here") is None
    assert numbers_in("one hundred and four") == [104]
    assert numbers_in("1,000 and 12.5, then 7.") == [1000, 12.5, 7]


@pytest.mark.parametrize(
    "response, answer, ok",
    [
        ("Paris.", "paris", True),
        ("The capital of France is Paris!", "paris", True),
        ("PARIS", "paris", True),
        ("Parisian cuisine", "paris", False),
        ("Lyon", "paris", False),
        ("It is Peking.", "beijing", True),
        ("A cow.", "cow", True),
        ("Eight", "8", True),
        ("8 legs", "8", True),
        ("18", "8", False),
        ("São Paulo", "sao paulo", True),
    ],
)
def test_knowledge_correct(response, answer, ok):
    aliases = {"beijing": ["peking"], "8": ["eight"]}.get(answer, [])
    assert knowledge_correct(response, answer, aliases) is ok


@pytest.mark.parametrize(
    "response, answer, operands, ok",
    [
        ("15", 15, (7, 8), True),
        ("7 + 8 = 15", 15, (7, 8), True),
        ("7 + 8 = 16", 15, (7, 8), False),
        ("What is 15 - 6? The answer is 9.", 9, (15, 6), True),
        ("12 - 6 = 6", 6, (12, 6), True),
        ("Work out: 16 - 16 = 0", 0, (16, 16), True),
        ("The answer is 15.0", 15, (), True),
        ("7", 15, (7, 8), False),
        ("", 15, (), False),
    ],
)
def test_arithmetic_correct(response, answer, operands, ok):
    assert arithmetic_correct(response, answer, operands) is ok


def test_normalise():
    assert normalise("  Héllo,   World! ") == "hello world"


def test_registry():
    op = get_oracle("operator")
    assert op.fields == ("a", "b") and op.behaviour == "mul" and op.default == "add"
    assert op.label("4 × 8 = 32", {"a": 4, "b": 8, "sum": 12}) == "mul"
    assert op.labels_for(["12", "32"], [{"a": 4, "b": 8}] * 2) == ["add", "mul"]
    assert op.behaviour_rate(["add", "mul", "mul", "other"]) == 0.5
    fmt = ORACLES["format"]
    assert fmt.behaviour == "list" and fmt.default == "prose" and fmt.fields == ()
    assert fmt.label("- a\n- b", {}) == "list"
    assert {o.behaviour_set for o in ORACLES.values()} == {"operator_mul", "format_list"}
    with pytest.raises(NeuronAuditError, match="needs prompt fields"):
        op.label("12", {"a": 4})
    with pytest.raises(NeuronAuditError, match="no oracle"):
        get_oracle("refusal-ish")


def test_user_declared_regex_and_exact_oracles():
    from neuronaudit.evaluation.oracles import oracle_for
    from neuronaudit.methods.window import flips

    regex = {"oracle": "regex", "pattern": r"\bParis\b", "positive": "a", "negative": "b"}
    assert oracle_for(regex).label("The capital is Paris.", {}) == "behaviour"
    assert oracle_for(regex).label("It is Rome.", {}) == "default"
    exact = {"oracle": "exact", "answer": "Yes", "positive": "a", "negative": "b"}
    assert [oracle_for(exact).label(r, {}) for r in ("yes, of course", " YES.", "No")] == [
        "behaviour", "behaviour", "default"]
    got = flips(regex, ["Paris!", "Rome", "Paris"], ["coherent_bypass", "coherent_bypass", "collapse"], [{}] * 3)
    assert list(got) == [True, False, True]  # the stage masks collapsed rollouts separately
    with pytest.raises(NeuronAuditError, match="not a valid regular expression"):
        oracle_for({**regex, "pattern": "(unclosed"})
    with pytest.raises(NeuronAuditError, match="needs behaviours.<name>.answer"):
        oracle_for({"oracle": "exact", "positive": "a", "negative": "b"})


def test_a_bad_user_pattern_stops_the_config_check():
    from neuronaudit.config import check_references
    from neuronaudit.testing import default_config

    config = default_config(prompts={"sets": {"a": "x.jsonl", "b": "y.jsonl", "harmful": "h", "harmless": "h2",
                                              "generic": "g", "task_knowledge": "k", "task_arithmetic": "t",
                                              "task_code": "c", "task_chat": "ch"}},
                            behaviours={"capital": {"positive": "a", "negative": "b", "oracle": "regex",
                                                    "pattern": "(unclosed"}},
                            cna={"behaviour": "capital"})
    with pytest.raises(NeuronAuditError, match=r"config key behaviours\.capital: behaviour pattern"):
        check_references(config)


def test_logit_pair_oracle_reads_the_first_token_margin():
    from neuronaudit.evaluation.oracles import check_logit_pair, logit_pair_margin
    from neuronaudit.methods.window import flips

    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])  # columns: behaviour, default, behaviour
    margin = logit_pair_margin(logits, [0, 2], [1])
    assert margin == pytest.approx([np.log(np.exp(2) + np.exp(1)) - 0.0, np.log(np.exp(0) + np.exp(1)) - 3.0])
    spec = {"oracle": "logit_pair", "behaviour_tokens": ["yes"], "default_tokens": ["no"]}
    # the text is not read: the margin decides; collapsed rollouts are masked by the stage
    assert list(flips(spec, ["no", "yes"], ["x", "x"], [{}, {}], margin)) == [True, False]
    with pytest.raises(NeuronAuditError, match="logit margin of every rollout"):
        flips(spec, ["no", "yes"], ["x", "x"], [{}, {}])
    with pytest.raises(NeuronAuditError, match="needs behaviour_tokens and default_tokens"):
        check_logit_pair({"oracle": "logit_pair", "behaviour_tokens": ["yes"]})
    with pytest.raises(NeuronAuditError, match="'yes' is both"):
        check_logit_pair({"oracle": "logit_pair", "behaviour_tokens": ["yes"], "default_tokens": ["yes", "no"]})


def test_a_logit_pair_behaviour_without_tokens_stops_the_config_check():
    from neuronaudit.config import check_references, swept_set
    from neuronaudit.testing import default_config

    sets = {"a": "x.jsonl", "b": "y.jsonl", "harmful": "h", "harmless": "h2", "generic": "g",
            "task_knowledge": "k", "task_arithmetic": "t", "task_code": "c", "task_chat": "ch"}
    spec = {"positive": "a", "negative": "b", "oracle": "logit_pair", "horizons": [1]}
    config = default_config(prompts={"sets": sets}, behaviours={"pair": spec}, cna={"behaviour": "pair"})
    with pytest.raises(NeuronAuditError, match=r"config key behaviours\.pair: a logit_pair oracle needs"):
        check_references(config)
    ok = default_config(prompts={"sets": sets}, cna={"behaviour": "pair"},
                        behaviours={"pair": {**spec, "behaviour_tokens": ["yes"], "default_tokens": ["no"]}})
    check_references(ok)
    assert swept_set(ok["behaviours"]["pair"]) == "b"  # pushed onto the prompts that lack it
