"""Seeded, label-keeping input perturbations for the sufficient-set search (SCIENCE.md section 5).

A prompt to perturb has a *span*: the substring that carries its answer (the sentiment phrase of a
review, the country of a capital question). The span is the label: every perturbation keeps it
verbatim and edits only the text around it, so each perturbed input keeps the label that defines
the target. Three kinds of edit (:class:`PerturbationSpec`):

``substitute``  replace a word or phrase outside the span by another member of its group of
                interchangeable words (``substitutions``: "movie"/"film"/"picture", ...)
``paraphrase``  re-render the prompt with another template of the task: ``templates`` hold a
                ``{body}`` slot, the prompt's text must match one of them, and its body (which
                contains the span) moves into another
``filler``      add a filler phrase before the body (``fillers``: "Honestly,") or drop a
                droppable word outside the span (``droppable``: "very", "really")

Each perturbation applies between one and ``max_edits`` edits drawn at random among those that
apply. Generation is seeded per prompt (the seed and a hash of the prompt's text), so a prompt's
perturbations do not depend on which other prompts are perturbed; repeats and the original text
are rejected. Every perturbation records its edits (:func:`perturbation_rows`), so stored tables
say exactly how each input was made.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuronaudit.errors import NeuronAuditError

OPERATIONS = ("substitute", "paraphrase", "filler")

DEFAULT_SUBSTITUTIONS: tuple[tuple[str, ...], ...] = (
    ("movie", "film", "picture"),
    ("book", "novel", "story"),
    ("restaurant", "diner", "cafe"),
    ("yesterday", "last week", "on Sunday", "recently"),
    ("my friend", "my sister", "my neighbour", "a colleague"),
    ("watched", "saw", "caught"),
    ("read", "finished"),
    ("visited", "tried", "went to"),
)
DEFAULT_FILLERS: tuple[str, ...] = ("Honestly,", "To be fair,", "Well,", "In short,", "All things considered,")
DEFAULT_DROPPABLE: tuple[str, ...] = ("very", "really", "just", "quite", "pretty", "simply")
#: Sentence-opening words written in lower case after an added filler ("Honestly, the film ...").
_LOWERED_AFTER_FILLER = frozenset({"The", "This", "That", "A", "An", "It", "My", "Our", "We", "They"})


@dataclass(frozen=True)
class PerturbationSpec:
    """How a task's prompts are perturbed; see the module docstring."""

    templates: tuple[str, ...] = ()
    substitutions: tuple[tuple[str, ...], ...] = DEFAULT_SUBSTITUTIONS
    fillers: tuple[str, ...] = DEFAULT_FILLERS
    droppable: tuple[str, ...] = DEFAULT_DROPPABLE
    operations: tuple[str, ...] = OPERATIONS
    max_edits: int = 2

    def __post_init__(self):
        bad = [op for op in self.operations if op not in OPERATIONS]
        if bad or not self.operations:
            raise NeuronAuditError(f"unknown perturbation operations {bad or list(self.operations)}; "
                                   f"choose from {list(OPERATIONS)}")
        if self.max_edits < 1:
            raise NeuronAuditError(f"max_edits {self.max_edits!r} must be at least 1")
        for t in self.templates:
            if t.count("{body}") != 1:
                raise NeuronAuditError(f"perturbation template {t!r} needs exactly one {{body}} slot")
        for group in self.substitutions:
            if len(set(group)) < 2:
                raise NeuronAuditError(f"substitution group {list(group)!r} needs two different members")


@dataclass(frozen=True)
class Perturbation:
    """A perturbed text and the edits that made it (``"substitute:movie->film"``, ...)."""

    text: str
    edits: tuple[str, ...]


def _span_bounds(text: str, span: str) -> tuple[int, int]:
    start = text.find(span)
    if not span or start < 0:
        raise NeuronAuditError(f"answer span {span!r} does not occur in prompt {text!r}")
    return start, start + len(span)


def _outside(start: int, end: int, bounds: tuple[int, int]) -> bool:
    return end <= bounds[0] or start >= bounds[1]


def _occurrences(text: str, phrase: str, bounds: tuple[int, int]) -> list[tuple[int, int]]:
    pattern = r"(?<![\w'])" + re.escape(phrase) + r"(?![\w'])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text) if _outside(m.start(), m.end(), bounds)]


def _substitute(text, span, spec, rng):
    bounds = _span_bounds(text, span)
    options = [(group, member, at) for group in spec.substitutions for member in group
               for at in _occurrences(text, member, bounds)]
    if not options:
        return None
    group, member, (start, end) = options[rng.integers(len(options))]
    choices = [m for m in group if m != member]
    new = choices[rng.integers(len(choices))]
    return text[:start] + new + text[end:], f"substitute:{member}->{new}"


def _template_of(text: str, templates: Sequence[str]) -> tuple[int, str] | None:
    for k, template in enumerate(templates):
        prefix, suffix = template.split("{body}")
        if text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix):
            return k, text[len(prefix): len(text) - len(suffix)]
    return None


def _paraphrase(text, span, spec, rng):
    found = _template_of(text, spec.templates)
    if found is None or len(spec.templates) < 2:
        return None
    k, body = found
    if span not in body:
        return None
    others = [j for j in range(len(spec.templates)) if j != k]
    j = others[rng.integers(len(others))]
    return spec.templates[j].replace("{body}", body), f"paraphrase:{k}->{j}"


def _filler(text, span, spec, rng):
    bounds = _span_bounds(text, span)
    options = []
    if spec.fillers:
        found = _template_of(text, spec.templates)
        at = len(spec.templates[found[0]].split("{body}")[0]) if found else 0
        options += [("add", at, f) for f in spec.fillers if f not in text]
    options += [("drop", at, w) for w in spec.droppable for at in _occurrences(text, w, bounds)]
    if not options:
        return None
    kind, at, word = options[rng.integers(len(options))]
    if kind == "add":
        rest = text[at:]
        first = rest.split(" ", 1)[0]
        if first in _LOWERED_AFTER_FILLER and _outside(at, at + len(first), bounds):
            rest = first.lower() + rest[len(first):]
        return text[:at] + word + " " + rest, f"filler:add:{word}"
    start, end = at
    if text[end: end + 1] == " ":
        end += 1
    elif start > 0 and text[start - 1] == " ":
        start -= 1
    return text[:start] + text[end:], f"filler:drop:{word}"


_EDIT = {"substitute": _substitute, "paraphrase": _paraphrase, "filler": _filler}


def prompt_seed(seed: int, text: str) -> np.random.Generator:
    """The generator of one prompt's perturbations: from ``seed`` and a hash of its text."""
    return np.random.default_rng([int(seed), zlib.crc32(text.encode("utf-8"))])


def perturb(text: str, span: str, spec: PerturbationSpec, n: int, seed: int,
            max_attempts_per_item: int = 50) -> list[Perturbation]:
    """Up to ``n`` distinct perturbations of ``text`` that keep ``span`` verbatim (fewer only when
    the edits cannot make more; the caller checks the count it needs)."""
    _span_bounds(text, span)
    rng = prompt_seed(seed, text)
    out: list[Perturbation] = []
    seen = {text}
    for _ in range(max_attempts_per_item * max(n, 1)):
        if len(out) >= n:
            break
        current, edits = text, []
        for _ in range(int(rng.integers(1, spec.max_edits + 1))):
            ops = [spec.operations[i] for i in rng.permutation(len(spec.operations))]
            for op in ops:
                made = _EDIT[op](current, span, spec, rng)
                if made is not None:
                    current, edit = made
                    edits.append(edit)
                    break
        if current not in seen and span in current:
            seen.add(current)
            out.append(Perturbation(current, tuple(edits)))
    return out


def disjoint_splits(n_items: int, n_splits: int, seed: int) -> list[np.ndarray]:
    """Indices ``0..n_items−1`` shuffled (seeded) and cut into ``n_splits`` disjoint parts of equal
    size (the remainder left out)."""
    if n_splits < 1 or n_items < n_splits:
        raise NeuronAuditError(f"cannot cut {n_items} perturbations into {n_splits} non-empty disjoint sets")
    order = np.random.default_rng(seed).permutation(n_items)
    size = n_items // n_splits
    return [np.sort(order[k * size: (k + 1) * size]) for k in range(n_splits)]


def perturbation_rows(prompt_id: str, label: str | None, perturbations: Sequence[Perturbation], seed: int,
                      split: str) -> list[dict]:
    """Table rows for stored perturbations: ``prompt_id``, ``perturbation_id``, ``label``,
    ``split``, ``seed``, ``text`` and ``edits`` (joined by ``"; "``)."""
    return [
        {"prompt_id": prompt_id, "perturbation_id": f"{prompt_id}~{split}~{k:04d}", "label": label,
         "split": split, "seed": int(seed), "text": p.text, "edits": "; ".join(p.edits)}
        for k, p in enumerate(perturbations)
    ]
