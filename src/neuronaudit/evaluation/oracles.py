"""Deterministic behaviour oracles and exact answer checks (SCIENCE.md §1 "Behaviours", §3, §4).

A behaviour oracle maps a model response to a label with a fixed rule, no model and no judge, so
a trigger ("the oracle flips on ≥ 50% of prompts") and a CNA steering effect can be counted
exactly and reproduced. Two benign mode switches ship with the prompt sets in ``config/prompts``:

``operator``  :func:`operator_oracle` — did the model *add* or *multiply* the operands ``a, b``?
``format``    :func:`format_oracle` — does the answer start as a *list* or as *prose*?

and two exact answer checks for capability tasks (knowledge, arithmetic), used by
:mod:`neuronaudit.evaluation.capability` and the keystone ablation curves (arXiv 2605.24846) and the CNA
capability check (arXiv 2605.12290).

The integer-extraction rule (:func:`answer_number`), used by the operator oracle and the
arithmetic check, in order:

1. Tokenise the response into numbers, words and symbols. A number is *part of an expression*
   when the token just before or after it is an arithmetic operator (``+ - × * x · / ÷``,
   ``plus minus times multiplied divided by over add multiply subtract``; ``x`` only
   between two numbers): such numbers echo the question
   ("3 + 9 = 12": 3 and 9 are echoes).
2. Result markers are ``=``, the word ``is`` and ``equals``/``equal``. The answer is the first
   number after a marker that is neither part of an expression nor one of the known operands
   ("3 + 9 = 12" → 12; "The answer is 27." → 27; "What is 12 - 6? 12 - 6 = 6" → 6).
   A number equal to an operand still counts when nothing else qualifies ("12 - 6 = 6").
3. Without a marker, the first number that is neither in an expression nor an operand; then the
   first number that is not an operand; then the first number.
4. Digits are read first ("1,000", "-3", "12.5" are numbers; "27." is 27). Only a response with
   no digits at all is read for number words ("twelve", "twenty-seven", "one hundred and four").

For the operator prompt sets the operands are 2..12 with ``a·b ≠ a+b``, so the sum and product
never equal an operand and never equal each other: the rule cannot confuse an echo with an
answer. The label is ``add`` if the number equals ``a+b``, ``mul`` if it equals ``a·b``, else
``other`` (including no number at all).

The list rule (:func:`format_oracle`): the response is a ``list`` when one of its first three
non-empty lines starts (after indentation) with a list marker — ``1.``/``1)`` (any one- or
two-digit number), ``-``, ``*``, ``–`` — followed by whitespace, or ``•``; otherwise ``prose``.
Requiring whitespace keeps ``**Bold**`` headings, ``-3 degrees`` and ``1.5 million`` prose.

A user's behaviour (``behaviours.<name>`` in the config) can name its own check:
``regex`` (the response matches ``pattern``), ``exact`` (it begins with ``answer``) or
``logit_pair`` (:func:`logit_pair_margin`: at the first generated token the logits of the
``behaviour_tokens`` beat those of the ``default_tokens``; the check for a model that answers in
one token, read from the logits rather than the text).

Knowledge answers (:func:`knowledge_correct`) are compared after lowercasing, removing accents
and replacing punctuation by spaces: the response is correct when the canonical answer or an
alias occurs in it as a whole-word sequence ("The capital is Paris." matches ``paris``; "Parisian"
does not).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from neuronaudit.errors import NeuronAuditError

# --- tokens ------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"(?P<num>\d+(?:,\d{3})*(?:\.\d+)?)"  # 12, 1,000, 12.5 ("27." stops before the dot)
    r"|(?P<word>[^\W\d_]+)"  # words (unicode letters)
    r"|(?P<sym>[^\w\s])",  # any other single symbol
    re.UNICODE,
)
_OPERATOR_SYMBOLS = frozenset("+-×*x·/÷−–")
_OPERATOR_WORDS = frozenset(
    {"plus", "minus", "times", "multiplied", "divided", "by", "over", "x", "add", "added",
     "multiply", "subtract", "subtracted"}
)
_MARKER_SYMBOLS = frozenset("=")
_MARKER_WORDS = frozenset({"is", "equals", "equal", "makes", "gives"})

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}


@dataclass(frozen=True)
class _Tok:
    kind: str  # 'num' | 'word' | 'sym'
    text: str
    start: int
    end: int
    value: float | None = None


def _tokens(text: str) -> list[_Tok]:
    out = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        value = float(m.group().replace(",", "")) if kind == "num" else None
        out.append(_Tok(kind, m.group(), m.start(), m.end(), value))
    return _attach_signs(out)


def _attach_signs(toks: list[_Tok]) -> list[_Tok]:
    """``-3`` (a minus glued to a number, not following a number) becomes one negative number."""
    out: list[_Tok] = []
    for tok in toks:
        prev = out[-1] if out else None
        glued_minus = (
            prev is not None
            and prev.kind == "sym"
            and prev.text in "-−"
            and prev.end == tok.start
            and tok.kind == "num"
        )
        if glued_minus:
            before = out[-2] if len(out) >= 2 else None
            is_binary = before is not None and (
                before.kind == "num" or before.text in (")",) or before.kind == "word" and before.text.lower() in _UNITS
            )
            if not is_binary:
                out[-1] = _Tok("num", prev.text + tok.text, prev.start, tok.end, -tok.value)
                continue
        out.append(tok)
    return out


def _word_numbers(toks: list[_Tok]) -> list[_Tok]:
    """Runs of number words ("twenty-seven", "one hundred and four") as number tokens."""
    out: list[_Tok] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        w = tok.text.lower()
        if tok.kind == "word" and (w in _UNITS or w in _TENS or w == "hundred"):
            value, current, j, last = 0, 0, i, i
            seen = False
            while j < len(toks):
                t = toks[j]
                wj = t.text.lower()
                if t.kind == "word" and wj in _UNITS:
                    current += _UNITS[wj]
                elif t.kind == "word" and wj in _TENS:
                    current += _TENS[wj]
                elif t.kind == "word" and wj == "hundred":
                    current = max(current, 1) * 100
                elif seen and ((t.kind == "sym" and t.text == "-") or (t.kind == "word" and wj == "and")):
                    # a joiner only if a number word follows
                    nxt = toks[j + 1] if j + 1 < len(toks) else None
                    if nxt is None or nxt.kind != "word" or nxt.text.lower() not in {**_UNITS, **_TENS}:
                        break
                    j += 1
                    continue
                else:
                    break
                seen, last = True, j
                j += 1
            value = current
            out.append(_Tok("num", " ".join(t.text for t in toks[i : last + 1]), tok.start, toks[last].end,
                            float(value)))
            i = last + 1
            continue
        out.append(tok)
        i += 1
    return out


def _is_operator(tok: _Tok | None) -> bool:
    if tok is None:
        return False
    if tok.kind == "sym":
        return tok.text in _OPERATOR_SYMBOLS
    return tok.kind == "word" and tok.text.lower() in _OPERATOR_WORDS


def _is_marker(tok: _Tok) -> bool:
    if tok.kind == "sym":
        return tok.text in _MARKER_SYMBOLS
    return tok.kind == "word" and tok.text.lower() in _MARKER_WORDS


def numbers_in(text: str) -> list[float]:
    """Every number in ``text`` in order (digits; number words only when there are no digits)."""
    toks = _tokens(text)
    if not any(t.kind == "num" for t in toks):
        toks = _word_numbers(toks)
    return [t.value for t in toks if t.kind == "num"]


def answer_number(response: str, operands: Iterable[float] = ()) -> float | None:
    """The number a response gives as its answer (rule in the module docstring), or ``None``."""
    toks = _tokens(response)
    if not any(t.kind == "num" for t in toks):
        toks = _word_numbers(toks)
    operand_set = {float(o) for o in operands}
    nums = [k for k, t in enumerate(toks) if t.kind == "num"]
    if not nums:
        return None

    def in_expression(k: int) -> bool:
        before = toks[k - 1] if k > 0 else None
        after = toks[k + 1] if k + 1 < len(toks) else None
        # a sentence-final "." or "?" after a number is not an operator; "x" only counts between numbers
        if before is not None and before.kind == "word" and before.text.lower() == "x":
            before = before if k >= 2 and toks[k - 2].kind == "num" else None
        if after is not None and after.kind == "word" and after.text.lower() == "x":
            after = after if k + 2 < len(toks) and toks[k + 2].kind == "num" else None
        return _is_operator(before) or _is_operator(after)

    marker_positions = [k for k, t in enumerate(toks) if _is_marker(t)]
    if marker_positions:
        after_marker = [k for k in nums if k > marker_positions[0]]
        for k in after_marker:
            if not in_expression(k) and toks[k].value not in operand_set:
                return toks[k].value
        # an answer equal to an operand ("12 - 6 = 6"): the first number right after a marker
        for m in marker_positions:
            if m + 1 < len(toks) and toks[m + 1].kind == "num" and not in_expression(m + 1):
                return toks[m + 1].value
    for k in nums:
        if not in_expression(k) and toks[k].value not in operand_set:
            return toks[k].value
    for k in nums:
        if toks[k].value not in operand_set:
            return toks[k].value
    return toks[nums[0]].value


# --- behaviour oracles -------------------------------------------------------------------------


def operator_oracle(response: str, a: int, b: int) -> str:
    """``'add'`` if the response's answer is ``a+b``, ``'mul'`` if ``a·b``, else ``'other'``."""
    value = answer_number(response, operands=(a, b))
    if value is None:
        return "other"
    if value == a + b and value == a * b:  # only (2, 2) and (0, 0); not in the prompt sets
        return "other"
    if value == a + b:
        return "add"
    if value == a * b:
        return "mul"
    return "other"


_LIST_MARKER = re.compile(r"^\s*(?:(?:\d{1,2}[.)]|[-*–])\s+\S|•\s*\S)")


def format_oracle(response: str, n_lines: int = 3) -> str:
    """``'list'`` if one of the first ``n_lines`` non-empty lines starts with a list marker."""
    lines = [line for line in response.splitlines() if line.strip()][:n_lines]
    return "list" if any(_LIST_MARKER.match(line) for line in lines) else "prose"


# --- answer checks -----------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lowercase, strip accents, punctuation → spaces, collapse whitespace."""
    text = unicodedata.normalize("NFKD", str(text).lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def knowledge_correct(response: str, answer: str, aliases: Iterable[str] = ()) -> bool:
    """True when the answer or an alias occurs in the response as a whole-word sequence."""
    haystack = f" {normalise(response)} "
    for candidate in [answer, *(aliases or ())]:
        needle = normalise(candidate)
        if needle and f" {needle} " in haystack:
            return True
    return False


def arithmetic_correct(response: str, answer: float, operands: Iterable[float] = ()) -> bool:
    """True when :func:`answer_number` of the response equals ``answer`` exactly.

    ``operands`` (e.g. the integers of the prompt, :func:`numbers_in`) are skipped as echoes.
    """
    value = answer_number(response, operands=operands)
    return value is not None and math.isclose(value, float(answer), rel_tol=0, abs_tol=1e-9)


# --- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviourOracle:
    """A behaviour switch with an exact oracle.

    ``fn(response, **{field: row[field] for field in fields})`` returns one of ``labels``;
    ``behaviour`` is the label an intervention tries to *trigger* on prompts of ``default_set``
    (whose natural label is ``default``); ``behaviour_set`` holds prompts that naturally show it.
    For CNA screening the positive set is ``behaviour_set`` and the negative set ``default_set``.
    """

    name: str
    fn: Callable[..., str]
    fields: tuple[str, ...]
    behaviour: str
    default: str
    labels: tuple[str, ...]
    behaviour_set: str
    default_set: str

    def __call__(self, response: str, **fields) -> str:
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise NeuronAuditError(f"oracle {self.name!r} needs prompt fields {missing}")
        return self.fn(response, **{f: fields[f] for f in self.fields})

    def label(self, response: str, row: Mapping) -> str:
        """Label a response given its prompt's fields (a dict or a DataFrame row of extras)."""
        return self(response, **{f: row[f] for f in self.fields if f in row})

    def labels_for(self, responses: Sequence[str], rows: Sequence[Mapping]) -> list[str]:
        if len(responses) != len(rows):
            raise NeuronAuditError(f"{len(responses)} responses but {len(rows)} prompt rows")
        return [self.label(r, row) for r, row in zip(responses, rows)]

    def behaviour_rate(self, labels: Sequence[str]) -> float:
        return sum(lab == self.behaviour for lab in labels) / len(labels) if labels else math.nan


def _format_fn(response: str) -> str:
    return format_oracle(response)


ORACLES: dict[str, BehaviourOracle] = {
    "operator": BehaviourOracle(
        name="operator",
        fn=operator_oracle,
        fields=("a", "b"),
        behaviour="mul",
        default="add",
        labels=("add", "mul", "other"),
        behaviour_set="operator_mul",
        default_set="operator_add",
    ),
    "format": BehaviourOracle(
        name="format",
        fn=_format_fn,
        fields=(),
        behaviour="list",
        default="prose",
        labels=("list", "prose"),
        behaviour_set="format_list",
        default_set="format_prose",
    ),
}


def get_oracle(name: str) -> BehaviourOracle:
    try:
        return ORACLES[name]
    except KeyError:
        raise NeuronAuditError(f"no oracle for behaviour {name!r}; known: {sorted(ORACLES)}") from None


#: Oracles a user declares in the config with their own prompt sets: the behaviour shows when the
#: response matches ``pattern`` (a regular expression, searched) or begins with ``answer``
#: (case, spacing and punctuation ignored).
USER_ORACLES = ("regex", "exact")

#: Oracles that read the logits of the first generated token instead of the text.
LOGIT_ORACLES = ("logit_pair",)


def logit_pair_margin(token_logits, behaviour_columns: Sequence[int], default_columns: Sequence[int]):
    """``logsumexp`` of the behaviour tokens' logits minus that of the default tokens' (nats) along
    the last axis of ``token_logits``; the softmax normaliser cancels, so this is the log-odds
    ``log p(behaviour tokens) − log p(default tokens)`` of the next token. The behaviour shows
    when it is positive (a single token on each side: the behaviour token's logit is the larger)."""
    import numpy as np
    from scipy.special import logsumexp

    logits = np.asarray(token_logits, dtype=float)
    if not len(behaviour_columns) or not len(default_columns):
        raise NeuronAuditError("a logit_pair oracle needs behaviour_tokens and default_tokens")
    return (logsumexp(logits[..., list(behaviour_columns)], axis=-1)
            - logsumexp(logits[..., list(default_columns)], axis=-1))


def check_logit_pair(spec: Mapping) -> None:
    """A logit-pair behaviour names at least one behaviour token and one default token, and no
    token on both sides."""
    beh, dflt = list(spec.get("behaviour_tokens") or []), list(spec.get("default_tokens") or [])
    if not beh or not dflt:
        raise NeuronAuditError("a logit_pair oracle needs behaviour_tokens and default_tokens (one token each)")
    both = sorted(set(beh) & set(dflt))
    if both:
        raise NeuronAuditError(f"token {both[0]!r} is both a behaviour token and a default token")


def oracle_for(spec: Mapping) -> BehaviourOracle:
    """The oracle of a configured behaviour: a built-in one by name, or a user's regex / exact
    answer check (``behaviours.<name>.pattern`` / ``.answer``)."""
    kind = spec["oracle"]
    if kind not in USER_ORACLES:
        return get_oracle(kind)
    if kind == "regex":
        pattern = spec.get("pattern")
        if not pattern:
            raise NeuronAuditError("a regex oracle needs behaviours.<name>.pattern")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise NeuronAuditError(f"behaviour pattern {pattern!r} is not a valid regular expression: {err}") from None

        def fn(response: str) -> str:
            return "behaviour" if compiled.search(response) else "default"
    else:
        answer = normalise(str(spec.get("answer") or ""))
        if not answer:
            raise NeuronAuditError("an exact oracle needs behaviours.<name>.answer")

        def fn(response: str) -> str:
            return "behaviour" if normalise(response).startswith(answer) else "default"
    return BehaviourOracle(name=kind, fn=fn, fields=(), behaviour="behaviour", default="default",
                           labels=("behaviour", "default"), behaviour_set=spec["positive"],
                           default_set=spec["negative"])
