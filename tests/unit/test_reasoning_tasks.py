"""Problems with exact answers: reproducible generators, disjoint splits, and the checker that reads
digits and number words and reports unparseable replies apart."""

import re

import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.methods.reasoning_tasks import (
    DEFAULT_DIFFICULTY,
    KINDS,
    SPLITS,
    Problem,
    extract_answer,
    generate_problems,
    grade,
    grade_replies,
    number_to_words,
    numbers_in,
    problem_splits,
    problems_table,
)

# --- tasks and checker ------------------------------------------------------------------------


def _recompute(p: Problem) -> str:
    """The answer of a generated problem, recomputed from its question text alone."""
    q = p.question
    if p.kind == "arithmetic":
        body = q[len("What is "): q.index("?")]
        parts = re.split(r"\s+(plus|minus)\s+", body)
        total = int(numbers_in(parts[0])[0][1])
        for op, word in zip(parts[1::2], parts[2::2]):
            total += int(numbers_in(word)[0][1]) * (1 if op == "plus" else -1)
        return str(total)
    if p.kind == "comparison":
        values = [int(v) for v in re.findall(r"\d+", q.split(":")[1])]
        if "largest number:" in q:
            return str(max(values))
        if "smallest number:" in q:
            return str(min(values))
        return ", ".join(map(str, sorted(values)))
    if p.kind == "counting":
        m = re.match(r"How many times does the letter (\w) appear in the word (\w+)\?", q)
        if m:
            return str(m.group(2).count(m.group(1)))
        m = re.match(r"How many times does (\w+) appear in this list: ([\w, ]+)\?", q)
        return str(m.group(2).split(", ").count(m.group(1)))
    values = [int(v) for v in re.findall(r"\d+", q)]
    if "buys" in q:
        return str(values[0] + values[1])
    if "gives away" in q:
        return str(values[0] - values[1])
    if "boxes" in q:
        return str(values[0] * values[1])
    return str(values[0] // values[1])


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_problems_are_reproducible_correct_and_the_splits_disjoint(difficulty):
    sizes = {"discovery": 12, "validation": 6, "heldout": 12}
    first = problem_splits(sizes, seed=5, difficulty=difficulty)
    assert first == problem_splits(sizes, seed=5, difficulty=difficulty)  # the seed fixes everything
    assert first != problem_splits(sizes, seed=6, difficulty=difficulty)
    questions = {s: {p.question for p in ps} for s, ps in first.items()}
    assert set(first) == set(SPLITS)
    for a in SPLITS:
        assert len(questions[a]) == len(first[a]) == sizes[a] * len(KINDS)
        for b in SPLITS:
            if a < b:
                assert not questions[a] & questions[b]
    every = [p for ps in first.values() for p in ps]
    assert len({p.problem_id for p in every}) == len(every)
    for p in every:
        assert p.difficulty == difficulty and p.answer == _recompute(p), p
        assert grade(p, f"The answer is {p.answer}.").correct
    table = problems_table(every)
    assert list(table["problem_id"]) == [p.problem_id for p in every] and table["answer"].notna().all()


def test_difficulty_per_kind_and_bad_requests_fail_by_name():
    problems = generate_problems("heldout", 4, seed=1, difficulty={"arithmetic": 3, "comparison": 1,
                                                                   "counting": 2, "word_problem": 1})
    by_kind = {p.kind: p.difficulty for p in problems}
    assert by_kind == {"arithmetic": 3, "comparison": 1, "counting": 2, "word_problem": 1}
    defaults = generate_problems("heldout", 2, seed=1, difficulty=DEFAULT_DIFFICULTY)
    assert {p.kind: p.difficulty for p in defaults} == DEFAULT_DIFFICULTY and set(DEFAULT_DIFFICULTY) == set(KINDS)
    assert all(len(numbers_in(p.question)) == 3 for p in problems if p.kind == "arithmetic")
    with pytest.raises(NeuronAuditError, match="unknown problem kinds"):
        generate_problems("heldout", 1, seed=1, kinds=["poetry"])
    with pytest.raises(NeuronAuditError, match="split 'train'"):
        generate_problems("train", 1, seed=1)
    with pytest.raises(NeuronAuditError, match="could not draw 500 distinct arithmetic"):
        generate_problems("heldout", 500, seed=1, difficulty=1, kinds=["arithmetic"])


def test_number_words_round_trip_and_read_inside_text():
    for n in [0, 7, 13, 20, 47, 100, 305, 999, 1000, 1234, 12000, 99999, 250_017]:
        assert numbers_in(number_to_words(n)) == [(0, float(n))]
    assert [v for _, v in numbers_in("one hundred and twenty-three apples, then 1,204 pears and seventy five")] \
        == [123.0, 1204.0, 75.0]
    assert [v for _, v in numbers_in("twelve, fifteen and nineteen")] == [12.0, 15.0, 19.0]
    assert [v for _, v in numbers_in("seven five")] == [7.0, 5.0]  # two numbers, not twelve
    assert [v for _, v in numbers_in("the larger one is 57")] == [57.0]  # a pronoun, not a number


def test_checker_reads_digits_and_words_and_flags_unparseable_replies():
    p = Problem("p", "heldout", "arithmetic", 2, "What is forty-seven plus twenty-eight?", "75")
    assert grade(p, "47 + 28 = 75") == grade(p, "It is seventy-five.") == grade(p, "75")
    assert grade(p, "The answer is seventy-five.").correct and grade(p, "So the answer is 75. Done").correct
    assert grade(p, "The answer is 75, since 47 and 28 make 75.").value == "75"
    wrong = grade(p, "I think it is 76.")
    assert wrong.parsed and not wrong.correct and wrong.value == "76"
    blank = grade(p, "I do not know.")
    assert not blank.parsed and not blank.correct and blank.value == ""
    order = Problem("o", "heldout", "comparison", 2, "Order: 19, 12, 15.", "12, 15, 19", "list")
    assert grade(order, "From smallest to largest: 12, 15, 19.").correct
    assert grade(order, "twelve, fifteen and nineteen").correct
    assert not grade(order, "Only 12.").parsed
    choice = Problem("c", "heldout", "comparison", 1, "Which is the largest number: 49, 57?", "57", "choice",
                     (49, 57))
    assert grade(choice, "57 is larger than 49.").correct and grade(choice, "The larger one is 57.").correct
    assert not grade(choice, "49 is the largest.").correct and not grade(choice, "Neither.").parsed
    assert extract_answer("x = 3, y = 4", "number") == (4.0,)
    table = grade_replies([p, p], ["75", "no idea"])
    assert list(table["parsed"]) == [True, False] and list(table["correct"]) == [True, False]


def test_text_answers_compare_words_after_the_last_marker():
    from neuronaudit.methods.reasoning_tasks import grade_text

    p = Problem("t", "heldout", "note", 0, "Is it red?", "yes", "text")
    assert grade(p, " yes").correct and grade(p, "Yes.").correct and grade(p, "The answer is: YES!").correct
    wrong = grade(p, " qq")
    assert wrong.parsed and not wrong.correct and wrong.value == "qq"
    assert not grade(p, " ...").parsed
    assert grade_text("New York", "The answer is new york, of course").correct
    assert not grade_text("New York", "new").correct
    with pytest.raises(NeuronAuditError, match="text answer"):
        _ = p.expected


def test_a_problem_set_is_split_by_seed_within_each_kind():
    from neuronaudit.methods.reasoning_tasks import answer_type_of, problems_from_rows

    assert [answer_type_of(a) for a in ("12", "-3", "1, 2, 3", "yes", "3.5")] == ["number", "number", "list",
                                                                                 "text", "text"]
    rows = [{"prompt_id": f"{k}-{i}", "text": f"q {k} {i}", "answer": str(i), "kind": k}
            for k in ("a", "b") for i in range(10)]
    sizes = {"discovery": 4, "validation": 2, "heldout": 3}
    split = problems_from_rows(rows, sizes, seed=1)
    assert {s: len(v) for s, v in split.items()} == {"discovery": 8, "validation": 4, "heldout": 6}
    ids = [p.problem_id for s in SPLITS for p in split[s]]
    assert len(ids) == len(set(ids))
    assert sum(p.kind == "a" for p in split["heldout"]) == 3 and split["heldout"][0].answer_type == "number"
    assert split == problems_from_rows(rows, sizes, seed=1) and split != problems_from_rows(rows, sizes, seed=2)
    with pytest.raises(NeuronAuditError, match="kind 'a' has 10 problems, fewer than the 12"):
        problems_from_rows(rows, {**sizes, "heldout": 6}, seed=1)
    with pytest.raises(NeuronAuditError, match="has no answer"):
        problems_from_rows([{"prompt_id": "x", "text": "q"}], sizes, seed=1)
