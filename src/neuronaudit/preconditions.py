"""Audit preconditions: what must hold for a study's figures to mean anything.

A figure computed on prompts the tokenizer cannot spell, on a behaviour the model never shows (or
always shows), or from answers the oracle cannot read, is a number without a meaning. Each check
here returns a :class:`Precondition` with its measured value, its threshold from config
(``preconditions.*``), whether it passed and the *scope* it guards (``set:<name>``,
``behaviour:<name>``, ``judge``, ``window``); :func:`affected` tells which headline figures
depend on a failed one. With ``preconditions.on_fail: stop`` a failed precondition stops the
workflow with one line naming it; with ``mark`` the study finishes and every dependent figure is
shown as "not meaningful" with the reason, never beside a published number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from neuronaudit.errors import NeuronAuditError


@dataclass(frozen=True)
class Precondition:
    """One checked precondition: ``name`` (what), ``scope`` (what it guards), the measured
    ``value`` against ``threshold`` (``direction`` ``max``: value ≤ threshold passes; ``min``:
    value ≥ threshold), ``n`` (what the value was measured on) and a one-line ``detail``."""

    name: str
    scope: str
    value: float | None
    threshold: float | None
    direction: str
    n: int
    detail: str

    @property
    def passed(self) -> bool:
        if self.value is None or not np.isfinite(self.value):
            return False
        if self.threshold is None:
            return True
        return self.value <= self.threshold if self.direction == "max" else self.value >= self.threshold

    def line(self) -> str:
        """The one-line statement of a failure (or a pass)."""
        op = "≤" if self.direction == "max" else "≥"
        value = "missing" if self.value is None else f"{self.value:.3g}"
        need = "" if self.threshold is None else f" (needs {op} {self.threshold:g})"
        return f"precondition {self.name} [{self.scope}]: {value}{need}: {self.detail}"

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def unknown_token_rate(tokenizer, texts: Sequence[str]) -> tuple[float, int]:
    """Share of the texts' tokens that are the tokenizer's unknown token, and the token count.
    A tokenizer without an unknown token (byte-level BPE) spells every text: rate 0."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    n = sum(len(x) for x in ids)
    if unk is None or n == 0:
        return 0.0, n
    return sum(int(t == unk) for x in ids for t in x) / n, n


def coverage(name: str, tokenizer, texts: Sequence[str], max_rate: float) -> Precondition:
    rate, n = unknown_token_rate(tokenizer, texts)
    unk = getattr(tokenizer, "unk_token", None)
    detail = (f"{rate:.1%} of the {n} tokens of prompt set {name!r} are {unk!r}" if unk is not None
              else f"the tokenizer has no unknown token: every text of {name!r} is spelled")
    return Precondition("tokenizer_coverage", f"set:{name}", rate, max_rate, "max", n, detail)


def behaviour_rates(name: str, shown_positive: Sequence[bool], shown_negative: Sequence[bool],
                    readable: Sequence[bool], min_positive: float, max_negative: float,
                    min_readable: float) -> list[Precondition]:
    """The behaviour at baseline (no intervention): it must occur on its positive prompts
    (rate ≥ ``min_positive``) and must not always occur on its negative prompts (rate ≤
    ``max_negative``), or the contrast has nothing to find; and the oracle must read most answers."""
    pos, neg, read = (np.asarray(x, dtype=bool) for x in (shown_positive, shown_negative, readable))
    out = []
    for label, arr, threshold, direction, where in (
        ("behaviour_on_positive", pos, min_positive, "min", "positive"),
        ("behaviour_on_negative", neg, max_negative, "max", "negative"),
    ):
        rate = float(arr.mean()) if arr.size else None
        out.append(Precondition(label, f"behaviour:{name}", rate, threshold, direction, int(arr.size),
                                f"behaviour {name!r} shown on {int(arr.sum())}/{arr.size} {where} prompts "
                                "without intervention"))
    rate = float(read.mean()) if read.size else None
    out.append(Precondition("oracle_readability", f"behaviour:{name}", rate, min_readable, "min", int(read.size),
                            f"the oracle of {name!r} could read {int(read.sum())}/{read.size} answers"))
    return out


def judge_accuracy(accuracy: float | None, n: int, min_accuracy: float, source: str) -> Precondition:
    return Precondition("judge_accuracy", "judge", accuracy, min_accuracy, "min", n,
                        f"the rollout judge's agreement with blind hand labels on {n} fresh rollouts ({source})")


def failed(preconditions: Iterable[Precondition | Mapping]) -> list[dict]:
    """The failed ones, as dicts."""
    out = []
    for p in preconditions:
        d = p.as_dict() if isinstance(p, Precondition) else dict(p)
        if not d.get("passed"):
            out.append(d)
    return out


def measured_ceilings(n_measured: int, n_heldout: int, threshold: int) -> Precondition:
    """Held-out neurons whose collapse ceiling the dose grid measured (not censored at its edge):
    a ceiling error computed on fewer is not meaningful."""
    return Precondition("measured_ceilings", "ceilings", float(n_measured), float(threshold), "min", n_heldout,
                        f"{n_measured} of {n_heldout} held-out neurons have a collapse ceiling inside the dose "
                        "grid (the rest are censored at its edge)")


def require(preconditions_json, scopes: Iterable[str], stage: str) -> None:
    """Before a stage starts: with ``on_fail: stop`` recorded in ``preconditions.json``, a failed
    precondition whose scope the stage depends on (``scopes``) stops it with one line. Failures of
    scopes the stage does not read never stop it (they mark the figures that do)."""
    import json
    from pathlib import Path

    doc = json.loads(Path(preconditions_json).read_text())
    scopes = set(scopes)
    bad = [f for f in doc.get("failed") or [] if f["scope"] in scopes]
    if bad and doc.get("on_fail", "stop") == "stop":
        raise stop_error(f"{stage} not run", bad)


def stop_error(what: str, failures: Sequence[Mapping]) -> NeuronAuditError:
    """The one-line error that stops a step on failed preconditions (as written by
    :meth:`Precondition.as_dict`): the first named, the rest counted."""
    first = Precondition(**{k: failures[0][k] for k in ("name", "scope", "value", "threshold", "direction", "n",
                                                        "detail")})
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return NeuronAuditError(f"{what}: " + first.line() + more +
                            "; set preconditions.on_fail: mark to finish with these figures marked")


def scopes_of(headline_key: str, config: Mapping) -> set[str]:
    """The scopes a headline figure depends on, from its key (``stage.what``) and the config:
    the prompt sets it reads, the behaviours it measures, the judge where rollouts are typed."""
    stage, _, rest = headline_key.partition(".")
    behaviours = config.get("behaviours") or {}

    def behaviour(b: str) -> set[str]:
        spec = behaviours.get(b) or {}
        return {f"behaviour:{b}", *(f"set:{spec[k]}" for k in ("positive", "negative") if k in spec)}

    if stage == "refusal":
        return {"set:harmful", "set:harmless", "judge"}
    if stage == "screen":
        b = rest.split(".")[0]
        return behaviour(b) if b in behaviours else set().union(*(behaviour(x) for x in behaviours))
    if stage == "cna":
        return behaviour((config.get("cna") or {}).get("behaviour", "")) | {"judge", "set:generic"}
    if stage == "keystone":
        return {f"set:{g}" for g in (config.get("keystone") or {}).get("groups", [])}
    if stage in ("window", "attribution"):
        scopes = set().union(*(behaviour(b) for b in behaviours), {"judge", "window"}) if behaviours else {"window"}
        return scopes | ({"ceilings"} if stage == "window" and "ceiling" in rest else set())
    if stage == "sufficient":
        task = rest.split(".")[0]
        spec = ((config.get("sufficient") or {}).get("tasks") or {}).get(task) or {}
        if spec.get("set"):
            return {f"set:{spec['set']}"}
        return behaviour(spec.get("behaviour", "")) if spec.get("behaviour") else set()
    if stage == "reasoning":
        # the problems are generated (no prompt set, nothing to check but the model) or a user's
        # problem set, whose tokenizer coverage then guards every reasoning figure
        problem_set = (config.get("reasoning") or {}).get("problem_set")
        return {f"set:{problem_set}"} if problem_set else set()
    return set()


def affected(headline_key: str, failures: Sequence[Mapping], config: Mapping) -> list[dict]:
    """The failed preconditions a headline figure depends on (empty: the figure stands)."""
    scopes = scopes_of(headline_key, config)
    return [f for f in failures if f["scope"] in scopes]
