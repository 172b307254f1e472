"""Problems with exact answers for the reasoning-critical neuron study (SCIENCE.md section 6).

Four kinds of multi-step problems, each generated from a seed with a difficulty knob:

================ ============================================================ ===================
kind             question (example)                                           difficulty ``d``
================ ============================================================ ===================
``arithmetic``   "What is forty-seven plus twenty-eight?" (operands in words) operands of ``d``
                                                                              digits; three of
                                                                              them from ``d = 3``
``comparison``   "Which is the largest number: 57, 49, 61?" or "Write these   ``d + 1`` numbers of
                 numbers from smallest to largest: 57, 49, 61."                ``1 + ⌈d/2⌉`` digits,
                                                                              drawn close together
``counting``     "How many times does the letter r appear in the word         longer words; longer
                 strawberry?" or "How many times does apple appear in this    lists (``3 + 2d``)
                 list: ...?"
``word_problem`` "Ana has 23 stamps. She buys 17 more. How many stamps does    numbers of ``d``
                 Ana have now?" (one step: +, −, × or exact ÷)                 digits
================ ============================================================ ===================

Every :class:`Problem` has a stable id, its kind, difficulty, split, question text and exact
answer: a number (``number``), one of the question's numbers (``choice``: the largest or
smallest), or an ordered list (``list``). Splits (``discovery``, ``validation``, ``heldout``)
draw from independent seeds derived from one study seed, and no question text appears in two
splits (:func:`problem_splits`).

The checker (:func:`grade`) reads a model's reply deterministically. Numbers are read as digits
(``1,234``) or words (``one hundred and twenty-three``, ``forty-seven``); a lone ``one`` after
"the", "a", "larger", ... is a pronoun, not a number. The final answer is the first number (or
the first ``k`` numbers of a list) after the last answer marker ("answer is", "answer:", "=",
"total is", "result is"); without a marker it is the last number (the last ``k``) of the reply,
except for a ``choice``, where it is the first of the question's numbers the reply names (a
reply leads with its pick: "57 is larger than 49"). A reply with no number (or fewer than ``k``)
is *unparseable*: it is reported apart from wrong answers, and the share of parseable replies
is a precondition of every accuracy figure.

Default difficulties (:data:`DEFAULT_DIFFICULTY`), chosen from the accuracy of the embedded model
(SmolLM2-135M-Instruct, the workflow's GGUF copy de-quantised to float32, its chat template,
greedy, at most 48 new tokens; validation problems of seed 7). Measured per kind, n problems
each (correct / parsed):

============== ===================== ===================== ====================
kind           d = 1                 d = 2                 d = 3
============== ===================== ===================== ====================
arithmetic     35% / 100% (n = 20)   5% / 100% (n = 20)    0% / 100% (n = 8)
comparison     45% / 95% (n = 20)    30% / 95% (n = 20)    0% / 88% (n = 8)
counting       5% / 85% (n = 20)     20% / 85% (n = 20)    25% / 100% (n = 8)
word_problem   45% / 100% (n = 20)   15% / 100% (n = 20)   0% / 100% (n = 8)
============== ===================== ===================== ====================

All four kinds at d = 1: 32.5% correct, 95% parsed (n = 80). Counting stays below the 30–70%
target at every difficulty: the model answers "10 times" to every letter-counting question
(0 of 20 right at d = 1–2), and its right answers on item lists (1 of 12 at d = 1, 4 of 8 at
d = 2) are near what guessing small counts gives. With n = 20 per cell, a 95% Wilson interval
is about ±20 points wide, so these figures choose defaults; they are not results.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from neuronaudit.errors import NeuronAuditError

KINDS: tuple[str, ...] = ("arithmetic", "comparison", "counting", "word_problem")
#: Difficulty per kind for the embedded model (measured in the module docstring).
DEFAULT_DIFFICULTY: dict[str, int] = {"arithmetic": 1, "comparison": 1, "counting": 2, "word_problem": 1}
SPLITS: tuple[str, ...] = ("discovery", "validation", "heldout")
ANSWER_TYPES: tuple[str, ...] = ("number", "choice", "list", "text")

#: The instruction appended to every question.
INSTRUCTION = {
    "number": "Give the final answer as a number.",
    "choice": "Give the final answer as a number.",
    "list": "Give the final answer as a list of numbers.",
}


@dataclass(frozen=True)
class Problem:
    """One problem: ``answer`` is the exact answer as text (``"75"``, ``"12, 15, 19"``, ``"yes"``);
    ``options`` the numbers a ``choice`` picks from (empty otherwise)."""

    problem_id: str
    split: str
    kind: str
    difficulty: int
    question: str
    answer: str
    answer_type: str = "number"
    options: tuple[int, ...] = ()

    @property
    def expected(self) -> tuple[int, ...]:
        """The answer as integers (one, or the ordered list); a ``text`` answer has none."""
        if self.answer_type == "text":
            raise NeuronAuditError(f"problem {self.problem_id!r} has a text answer, not a number")
        return tuple(int(x) for x in self.answer.split(","))


# --------------------------------------------------------------------------------------------
# numbers in words
# --------------------------------------------------------------------------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = {"thousand": 1000, "million": 1_000_000}
_WORD_VALUE = {w: i for i, w in enumerate(_ONES)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_WORD_VALUE |= {"hundred": 100, **_SCALES}
_PRONOUN_BEFORE_ONE = {"the", "a", "an", "each", "this", "that", "which", "larger", "smaller", "bigger",
                       "greater", "largest", "smallest", "no", "any", "every", "another", "right", "correct"}


def number_to_words(n: int) -> str:
    """``47 → "forty-seven"``, ``305 → "three hundred five"``, ``12000 → "twelve thousand"``."""
    n = int(n)
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + (" " + number_to_words(rest) if rest else "")
    for word, scale in sorted(_SCALES.items(), key=lambda kv: -kv[1]):
        if n >= scale:
            high, rest = divmod(n, scale)
            return number_to_words(high) + " " + word + (" " + number_to_words(rest) if rest else "")
    raise AssertionError(n)  # unreachable


def _class(word: str) -> str:
    v = _WORD_VALUE[word]
    if word in _SCALES:
        return "scale"
    if word == "hundred":
        return "hundred"
    if v >= 20:
        return "tens"
    return "ones"


def _words_value(words: Sequence[str]) -> int:
    total, current = 0, 0
    for w in words:
        v = _WORD_VALUE[w]
        if w == "hundred":
            current = max(current, 1) * 100
        elif w in _SCALES:
            total += max(current, 1) * v
            current = 0
        else:
            current += v
    return total + current


_TOKEN = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|[A-Za-z]+")


def numbers_in(text: str) -> list[tuple[int, float]]:
    """Every number of ``text`` in order, as ``(character offset, value)``: digits or words."""
    tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]
    out: list[tuple[int, float]] = []
    span: list[str] = []
    span_start = 0
    last_end = 0
    last_class = ""

    def close():
        nonlocal span
        if span:
            out.append((span_start, float(_words_value(span))))
        span = []

    for k, (start, end, tok) in enumerate(tokens):
        gap = text[last_end:start]
        adjacent = bool(span) and gap.strip(" -") == ""
        if tok[0].isdigit():
            close()
            out.append((start, float(tok.replace(",", ""))))
        else:
            word = tok.lower()
            if word == "and" and span and adjacent and last_class in ("hundred", "scale"):
                nxt = tokens[k + 1][2].lower() if k + 1 < len(tokens) else ""
                if nxt in _WORD_VALUE and _class(nxt) in ("ones", "tens"):
                    last_end = end
                    continue
            if word not in _WORD_VALUE:
                close()
            else:
                cls = _class(word)
                nxt = tokens[k + 1][2].lower() if k + 1 < len(tokens) else ""
                prev = tokens[k - 1][2].lower() if k > 0 else ""
                if word == "one" and not span and prev in _PRONOUN_BEFORE_ONE and nxt not in ("hundred", *_SCALES):
                    close()
                else:
                    breaks = (not adjacent or word == "zero"
                              or (last_class == "ones" and cls in ("ones", "tens"))
                              or (last_class == "tens" and cls == "tens")
                              or (last_class == "hundred" and cls == "hundred"))
                    if breaks:
                        close()
                        span_start = start
                    span.append(word)
                    last_class = cls
        last_end = end
    close()
    return out


# --------------------------------------------------------------------------------------------
# the checker
# --------------------------------------------------------------------------------------------

_MARKER = re.compile(r"answer\s*(?:is|:|=)|=|\btotal\s+is|\bresult\s+is", re.IGNORECASE)


@dataclass(frozen=True)
class Grade:
    """What the checker read: ``parsed`` (a final answer was found), its ``value`` as text
    (``""`` when unparseable) and whether it equals the expected answer."""

    parsed: bool
    value: str
    correct: bool


def extract_answer(reply: str, answer_type: str = "number", n_values: int = 1,
                   options: Sequence[int] = ()) -> tuple[float, ...] | None:
    """The final answer of ``reply`` (see the module docstring), ``None`` when unparseable."""
    if answer_type not in ANSWER_TYPES:
        raise NeuronAuditError(f"answer type {answer_type!r} must be one of {ANSWER_TYPES}")
    k = n_values if answer_type == "list" else 1
    found = numbers_in(reply)
    markers = list(_MARKER.finditer(reply))
    if markers:
        after = [v for pos, v in found if pos >= markers[-1].end()]
        if len(after) >= k:
            return tuple(after[:k])
    if answer_type == "choice":
        named = [v for _, v in found if v in {float(o) for o in options}]
        return (named[0],) if named else None
    if len(found) < k:
        return None
    return tuple(v for _, v in found[-k:])


_TEXT_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def text_words(text: str) -> list[str]:
    """The words of ``text``, lower-cased, punctuation dropped (what a ``text`` answer compares)."""
    return [w.lower() for w in _TEXT_WORD.findall(text)]


def grade_text(answer: str, reply: str) -> Grade:
    """A ``text`` answer: the first as many words as the answer has, read after the reply's last
    answer marker (else from its start), equal the answer's words (case and punctuation ignored)."""
    expected = text_words(answer)
    markers = list(_MARKER.finditer(reply))
    words = text_words(reply[markers[-1].end():] if markers else reply)
    if not words or not expected:
        return Grade(False, "", False)
    got = words[: len(expected)]
    return Grade(True, " ".join(got), got == expected)


def grade(problem: Problem, reply: str) -> Grade:
    """Grade one reply to ``problem``."""
    if problem.answer_type == "text":
        return grade_text(problem.answer, reply)
    expected = problem.expected
    got = extract_answer(reply, problem.answer_type, len(expected), problem.options)
    if got is None:
        return Grade(False, "", False)
    text = ", ".join(f"{v:g}" for v in got)
    return Grade(True, text, tuple(float(e) for e in expected) == tuple(got))


def grade_replies(problems: Sequence[Problem], replies: Sequence[str]) -> pd.DataFrame:
    """One row per (problem, reply): ``problem_id``, ``kind``, ``difficulty``, ``parsed``,
    ``extracted``, ``correct``."""
    if len(problems) != len(replies):
        raise NeuronAuditError(f"{len(replies)} replies for {len(problems)} problems")
    rows = []
    for p, r in zip(problems, replies):
        g = grade(p, r)
        rows.append({"problem_id": p.problem_id, "kind": p.kind, "difficulty": p.difficulty,
                     "parsed": g.parsed, "extracted": g.value, "correct": g.correct})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# generators: one per kind, each (rng, difficulty) -> (question, answer, answer_type, options)
# --------------------------------------------------------------------------------------------

_NAMES = ("Ana", "Ben", "Chloe", "David", "Ella", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Liam")
_PRONOUN = {"Ana": "She", "Ben": "He", "Chloe": "She", "David": "He", "Ella": "She", "Farid": "He",
            "Grace": "She", "Hugo": "He", "Iris": "She", "Jonas": "He", "Kemi": "She", "Liam": "He"}
_ITEMS = ("stamps", "marbles", "apples", "books", "coins", "pencils", "stickers", "shells", "cards", "eggs")
_LIST_ITEMS = ("apple", "pear", "plum", "cherry", "lemon", "mango", "grape", "peach")
_WORDS_BY_LENGTH = {
    1: ("apple", "level", "noon", "kayak", "sleeve", "pepper", "letter", "bubble", "coffee", "banana", "mammal",
        "puppy", "cocoa", "teeth", "radar"),
    2: ("balloon", "success", "address", "giraffe", "tomorrow", "cinnamon", "referee", "raccoon", "parallel",
        "strawberry", "committee", "necessary", "possess", "assassin", "mississippi"),
    3: ("bookkeeper", "assessment", "possession", "occurrence", "embarrassment", "hippopotamus", "mississippi",
        "accommodation", "successfully", "unnecessary", "strawberries", "disappointment", "millennium"),
}


def _digits(rng: np.random.Generator, d: int) -> int:
    low = 10 ** (d - 1) if d > 1 else 1
    return int(rng.integers(low, 10 ** d))


def _arithmetic(rng, d):
    n_operands = 3 if d >= 3 else 2
    values = [_digits(rng, d) for _ in range(n_operands)]
    total, words = values[0], [number_to_words(values[0])]
    for v in values[1:]:
        if rng.random() < 0.5 and total >= v:
            total -= v
            words.append(f"minus {number_to_words(v)}")
        else:
            total += v
            words.append(f"plus {number_to_words(v)}")
    return f"What is {' '.join(words)}?", str(total), "number", ()


def _comparison(rng, d):
    count, digits = d + 1, 1 + (d + 1) // 2
    base = _digits(rng, digits)
    spread = max(count + 2, 10 ** (digits - 1))
    pool = sorted({int(np.clip(base + o, 10 ** (digits - 1), 10 ** digits - 1))
                   for o in rng.integers(-spread, spread + 1, size=4 * count)})
    if len(pool) < count:
        pool = list(range(10 ** (digits - 1), 10 ** (digits - 1) + count + 1))
    values = [int(v) for v in rng.choice(pool, size=count, replace=False)]
    shown = ", ".join(map(str, values))
    form = rng.integers(3)
    if form == 0:
        return f"Which is the largest number: {shown}?", str(max(values)), "choice", tuple(values)
    if form == 1:
        return f"Which is the smallest number: {shown}?", str(min(values)), "choice", tuple(values)
    return (f"Write these numbers from smallest to largest: {shown}.", ", ".join(map(str, sorted(values))), "list",
            ())


def _counting(rng, d):
    level = int(min(max(d, 1), 3))
    if rng.random() < 0.5:
        word = str(rng.choice(_WORDS_BY_LENGTH[level]))
        letters = sorted(set(word))
        weights = np.array([word.count(c) for c in letters], float) ** 2
        letter = str(rng.choice(letters, p=weights / weights.sum()))
        return (f"How many times does the letter {letter} appear in the word {word}?", str(word.count(letter)),
                "number", ())
    length = 3 + 2 * d
    kinds = list(rng.choice(_LIST_ITEMS, size=min(3 + d // 2, len(_LIST_ITEMS)), replace=False))
    items = [str(rng.choice(kinds)) for _ in range(length)]
    target = str(rng.choice(sorted(set(items))))
    return (f"How many times does {target} appear in this list: {', '.join(items)}?", str(items.count(target)),
            "number", ())


def _word_problem(rng, d):
    name = str(rng.choice(_NAMES))
    pronoun = _PRONOUN[name]
    item = str(rng.choice(_ITEMS))
    op = int(rng.integers(4))
    if op == 0:
        a, b = _digits(rng, d), _digits(rng, d)
        return (f"{name} has {a} {item}. {pronoun} buys {b} more. How many {item} does {name} have now?",
                str(a + b), "number", ())
    if op == 1:
        a, b = sorted((_digits(rng, d), _digits(rng, d)), reverse=True)
        return (f"{name} has {a} {item}. {pronoun} gives away {b}. How many {item} does {name} have left?",
                str(a - b), "number", ())
    if op == 2:
        a, b = _digits(rng, d), int(rng.integers(2, 10))
        return (f"{name} has {b} boxes with {a} {item} in each box. How many {item} does {name} have in all?",
                str(a * b), "number", ())
    b = int(rng.integers(2, 10))
    each = _digits(rng, d)
    return (f"{name} shares {each * b} {item} equally among {b} friends. How many {item} does each friend get?",
            str(each), "number", ())


GENERATORS = {"arithmetic": _arithmetic, "comparison": _comparison, "counting": _counting,
              "word_problem": _word_problem}


# --------------------------------------------------------------------------------------------
# problem sets and splits
# --------------------------------------------------------------------------------------------


def split_seed(seed: int, split: str) -> np.random.SeedSequence:
    """The seed sequence of one split, derived from the study seed (independent per split)."""
    if split not in SPLITS:
        raise NeuronAuditError(f"split {split!r} must be one of {SPLITS}")
    return np.random.SeedSequence([int(seed), SPLITS.index(split), 1])


def _difficulty_of(difficulty: int | Mapping[str, int], kind: str) -> int:
    d = int(difficulty[kind]) if isinstance(difficulty, Mapping) else int(difficulty)
    if d < 1:
        raise NeuronAuditError(f"difficulty {d!r} of kind {kind!r} must be at least 1")
    return d


def generate_problems(split: str, n_per_kind: int, seed: int, difficulty: int | Mapping[str, int] = 2,
                      kinds: Sequence[str] = KINDS, exclude: Iterable[str] = (),
                      max_tries: int = 50) -> list[Problem]:
    """``n_per_kind`` problems of each kind for one split, reproducible from ``seed``; question
    texts in ``exclude`` (another split's) and repeats are redrawn, up to ``max_tries`` times each."""
    bad = [k for k in kinds if k not in GENERATORS]
    if bad:
        raise NeuronAuditError(f"unknown problem kinds {bad}; choose from {list(KINDS)}")
    taken = set(exclude)
    out: list[Problem] = []
    for kind, child in zip(kinds, split_seed(seed, split).spawn(len(kinds))):
        rng = np.random.default_rng(child)
        d = _difficulty_of(difficulty, kind)
        for index in range(n_per_kind):
            for _ in range(max_tries):
                question, answer, answer_type, options = GENERATORS[kind](rng, d)
                question = f"{question} {INSTRUCTION[answer_type]}"
                if question not in taken:
                    break
            else:
                raise NeuronAuditError(
                    f"could not draw {n_per_kind} distinct {kind} problems of difficulty {d} for split {split!r}; "
                    "ask for fewer or raise the difficulty"
                )
            taken.add(question)
            out.append(Problem(f"{split}-{kind}-d{d}-{index:03d}", split, kind, d, question, answer, answer_type,
                               tuple(int(o) for o in options)))
    return out


def problem_splits(n_per_kind: Mapping[str, int], seed: int, difficulty: int | Mapping[str, int] = 2,
                   kinds: Sequence[str] = KINDS) -> dict[str, list[Problem]]:
    """Problems of every split (``{"discovery": 40, "validation": 20, "heldout": 40}`` per kind),
    each from its own seed; no question appears in two splits."""
    unknown = [s for s in n_per_kind if s not in SPLITS]
    if unknown:
        raise NeuronAuditError(f"unknown splits {unknown}; choose from {list(SPLITS)}")
    out: dict[str, list[Problem]] = {}
    used: set[str] = set()
    for split in SPLITS:
        if split in n_per_kind:
            out[split] = generate_problems(split, int(n_per_kind[split]), seed, difficulty, kinds, used)
            used |= {p.question for p in out[split]}
    return out


def answer_type_of(answer: str) -> str:
    """The answer type a problem file's answer implies when the row names none: ``number`` for an
    integer, ``list`` for comma-separated integers, ``text`` otherwise."""
    parts = [x.strip() for x in str(answer).split(",")]
    if all(re.fullmatch(r"-?\d+", x) for x in parts):
        return "number" if len(parts) == 1 else "list"
    return "text"


def problems_from_rows(rows: Sequence[Mapping], n_per_kind: Mapping[str, int], seed: int,
                       source: str = "problem set") -> dict[str, list[Problem]]:
    """Problems of a user's problem set split by seed: within each kind (``kind`` field, else one
    kind named ``problems``), the rows are permuted with the seed and the first
    ``n_per_kind["discovery"]`` go to discovery, the next to validation, then held-out. Each row
    has ``prompt_id``, ``text`` and ``answer``; optional ``answer_type`` (else
    :func:`answer_type_of`), ``options`` (a choice's numbers) and ``difficulty``."""
    unknown = [s for s in n_per_kind if s not in SPLITS]
    if unknown:
        raise NeuronAuditError(f"unknown splits {unknown}; choose from {list(SPLITS)}")
    by_kind: dict[str, list[Mapping]] = {}
    for row in rows:
        answer = row.get("answer")
        if answer is None or (isinstance(answer, float) and answer != answer) or str(answer).strip() == "":
            raise NeuronAuditError(f"{source}: problem {row.get('prompt_id')!r} has no answer field")
        kind = row.get("kind")
        by_kind.setdefault(str(kind) if kind is not None and kind == kind else "problems", []).append(row)
    need = sum(int(n_per_kind.get(s, 0)) for s in SPLITS)
    out: dict[str, list[Problem]] = {s: [] for s in SPLITS if s in n_per_kind}
    for k, kind in enumerate(sorted(by_kind)):
        members = by_kind[kind]
        if len(members) < need:
            raise NeuronAuditError(
                f"{source}: kind {kind!r} has {len(members)} problems, fewer than the {need} the splits ask for "
                f"({', '.join(f'{s} {n_per_kind[s]}' for s in SPLITS if s in n_per_kind)} per kind)")
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 2, k])).permutation(len(members))
        start = 0
        for split in SPLITS:
            if split not in n_per_kind:
                continue
            for j in order[start: start + int(n_per_kind[split])]:
                row = members[int(j)]
                answer = str(row["answer"]).strip()
                answer_type = str(row.get("answer_type") or answer_type_of(answer))
                if answer_type not in ANSWER_TYPES:
                    raise NeuronAuditError(f"{source}: problem {row['prompt_id']!r} has answer type {answer_type!r}; "
                                           f"choose from {list(ANSWER_TYPES)}")
                options = row.get("options")
                options = tuple(int(o) for o in options) if isinstance(options, (list, tuple)) else ()
                difficulty = row.get("difficulty")
                difficulty = int(difficulty) if difficulty is not None and difficulty == difficulty else 0
                out[split].append(Problem(str(row["prompt_id"]), split, kind, difficulty, str(row["text"]), answer,
                                          answer_type, options))
            start += int(n_per_kind[split])
    return out


def problems_table(problems: Iterable[Problem]) -> pd.DataFrame:
    """One row per problem (every field; ``options`` as a list)."""
    rows = []
    for p in problems:
        row = asdict(p)
        row["options"] = list(p.options)
        rows.append(row)
    return pd.DataFrame(rows, columns=["problem_id", "split", "kind", "difficulty", "question", "answer",
                                       "answer_type", "options"])
