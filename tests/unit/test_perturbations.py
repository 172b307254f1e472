"""Label-keeping perturbations: seeded, stored with their edits, the answer span never touched."""

import pytest

from neuronaudit.errors import NeuronAuditError
from neuronaudit.methods.perturbations import (
    PerturbationSpec,
    disjoint_splits,
    perturb,
    perturbation_rows,
)

SENTIMENT = PerturbationSpec(templates=("Review: {body}\nSentiment:", "Here is a review. {body}\nThe sentiment is"))
CAPITAL = PerturbationSpec(
    templates=("The capital of {body} is", "The capital city of {body} is", "{body}'s capital is"))

REVIEWS = [
    # (text, span carrying the label, label)
    ("Review: I watched the movie yesterday with my friend and I really loved it.\nSentiment:", "loved it",
     "positive"),
    ("Review: We visited the restaurant last week and the food was very bad.\nSentiment:", "was very bad",
     "negative"),
]


@pytest.mark.parametrize("text,span,label", REVIEWS)
def test_every_perturbation_keeps_the_span_and_changes_only_what_its_edits_say(text, span, label):
    out = perturb(text, span, SENTIMENT, n=30, seed=0)
    assert len(out) == 30
    assert len({p.text for p in out}) == 30 and text not in {p.text for p in out}
    kinds = set()
    for p in out:
        assert span in p.text and p.edits
        kinds |= {e.split(":")[0] for e in p.edits}
        if all(e.startswith("substitute") for e in p.edits):
            # a substitution changes words, never the template nor the span
            assert p.text.startswith("Review: ") and p.text.endswith("\nSentiment:")
        for e in p.edits:
            if e.startswith("filler:drop:"):
                assert e.split(":")[2] not in span  # droppable words inside the span stay
    assert kinds == {"substitute", "paraphrase", "filler"}
    # the label words of the other class never appear: the label is kept
    other = {"positive": "bad", "negative": "loved"}[label]
    assert not any(other in p.text for p in out)


def test_a_droppable_word_inside_the_span_is_never_dropped():
    text, span = REVIEWS[1][0], REVIEWS[1][1]  # "very" sits inside the span
    spec = PerturbationSpec(templates=SENTIMENT.templates, operations=("filler",), fillers=())
    out = perturb(text, span, spec, n=5, seed=1)
    assert out == []  # the only droppable word is in the span: nothing can be made


def test_paraphrase_moves_the_body_between_templates():
    out = perturb("The capital of France is", "France", CAPITAL, n=10, seed=0)
    texts = {p.text for p in out}
    assert {"The capital city of France is", "France's capital is"} <= texts
    assert all(p.text.endswith(" is") and "France" in p.text for p in out)


def test_generation_is_seeded_per_prompt():
    text, span = REVIEWS[0][0], REVIEWS[0][1]
    assert perturb(text, span, SENTIMENT, 12, seed=3) == perturb(text, span, SENTIMENT, 12, seed=3)
    assert perturb(text, span, SENTIMENT, 12, seed=3) != perturb(text, span, SENTIMENT, 12, seed=4)


def test_rows_and_disjoint_splits():
    out = perturb(REVIEWS[0][0], REVIEWS[0][1], SENTIMENT, 8, seed=0)
    rows = perturbation_rows("rev-1", "positive", out, seed=0, split="search")
    assert [r["perturbation_id"] for r in rows][:2] == ["rev-1~search~0000", "rev-1~search~0001"]
    assert all(r["text"] == p.text and r["edits"] == "; ".join(p.edits) for r, p in zip(rows, out))
    parts = disjoint_splits(11, 2, seed=0)
    assert [len(p) for p in parts] == [5, 5] and not set(parts[0]) & set(parts[1])
    with pytest.raises(NeuronAuditError):
        disjoint_splits(1, 2, seed=0)


def test_bad_specs_and_spans_fail_with_one_line():
    with pytest.raises(NeuronAuditError, match="span"):
        perturb("The capital of France is", "Spain", CAPITAL, 3, seed=0)
    with pytest.raises(NeuronAuditError, match="body"):
        PerturbationSpec(templates=("no slot",))
    with pytest.raises(NeuronAuditError, match="operations"):
        PerturbationSpec(operations=("shuffle",))
