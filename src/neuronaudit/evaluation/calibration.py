"""The judge's measured accuracy: labelled calibration sets, their overlap with the study's
prompts, and a confusion matrix with Wilson intervals for any judge.

Two kinds of labelled set live in ``neuronaudit/data/calibration/`` (its README has the format
and the labelling rules):

* the **development** sets (:data:`DEVELOPMENT_SETS`): hand-written rollouts the rule judge was
  built and fixed against. Accuracy on them is in-sample and says little about real rollouts.
  None of their prompts is a held-out prompt of the study (the refusal evaluation, the window's
  sweep and CNA all draw from the held-out split of ``harmful`` / ``harmless``);
  :func:`prompt_overlap` checks it and a unit test keeps it so.
* the **fresh** set (``calibration/fresh/*.jsonl``, :func:`fresh_paths`): real rollouts of a study,
  labelled by hand *after* the judge is frozen and never used to change it. Only accuracy on it
  estimates the judge's accuracy on study rollouts. Its prompts are held-out study prompts by
  design (that is where the study's rollouts come from), so it is exempt from the overlap rule.

:func:`calibrate` runs any :class:`~neuronaudit.evaluation.judge.Judge` (the rule judge or a
:class:`~neuronaudit.evaluation.model_judge.ModelJudge`) on a labelled set and returns the
confusion matrix with per-type recall and precision and overall accuracy, each with a Wilson
95% interval (:func:`~neuronaudit.evaluation.stats.wilson_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.judge import ROLLOUT_TYPES, Judge, make_judge, read_calibration
from neuronaudit.evaluation.stats import wilson_interval
from neuronaudit.io import provenance, write_json
from neuronaudit.resources import calibration_path

#: The development sets: the rule judge's rules were set while looking at them (in-sample).
DEVELOPMENT_SETS: tuple[str, ...] = (
    "refusal_rollouts.jsonl",
    "refusal_rollouts_holdout.jsonl",
    "refusal_rollouts_holdout2.jsonl",
)
#: Sub-folder of the calibration data holding the frozen fresh set(s) of real study rollouts.
FRESH_FOLDER = "fresh"


def development_paths() -> list[Path]:
    """Paths of the development calibration sets."""
    return [calibration_path(name) for name in DEVELOPMENT_SETS]


def fresh_dir() -> Path:
    """The folder of the fresh calibration set(s) (``calibration/fresh``)."""
    return calibration_path(FRESH_FOLDER)


def fresh_paths(folder: str | Path | None = None) -> list[Path]:
    """The fresh calibration files (``*.jsonl`` in ``folder``, default :func:`fresh_dir`), sorted;
    empty until the fresh set has been labelled."""
    folder = Path(folder) if folder is not None else fresh_dir()
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def normalise_prompt(text: str) -> str:
    """A prompt for comparison: case-folded, whitespace runs collapsed, ends stripped."""
    return " ".join(str(text).casefold().split())


def prompt_overlap(prompts: Iterable[str], paths: Sequence[str | Path]) -> pd.DataFrame:
    """Calibration items whose prompt equals one of ``prompts`` after :func:`normalise_prompt`:
    one row per item with ``file``, ``calibration_id``, ``label`` and ``prompt``."""
    wanted = {normalise_prompt(p) for p in prompts}
    rows = []
    for path in paths:
        cal = read_calibration(path)
        hit = cal["prompt"].map(normalise_prompt).isin(wanted)
        for r in cal[hit].itertuples():
            rows.append({"file": Path(path).name, "calibration_id": r.calibration_id, "label": r.label,
                         "prompt": r.prompt})
    return pd.DataFrame(rows, columns=["file", "calibration_id", "label", "prompt"])


@dataclass(frozen=True)
class Calibration:
    """A judge measured on one labelled set.

    ``confusion``: true labels as rows, predicted labels as columns, in
    :data:`~neuronaudit.evaluation.judge.ROLLOUT_TYPES` order. ``per_type``: one row per type
    with ``n`` (true items), ``correct``, ``recall`` and its Wilson CI, ``n_predicted``,
    ``precision`` and its Wilson CI (``nan`` where the denominator is 0).
    """

    name: str
    n: int
    correct: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    confusion: pd.DataFrame
    per_type: pd.DataFrame
    confidence: float

    def record(self) -> dict:
        """A JSON-ready dict (``None`` for undefined rates)."""
        clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
        return {
            "name": self.name, "n": self.n, "correct": self.correct, "accuracy": clean(self.accuracy),
            "accuracy_ci": [clean(v) for v in self.accuracy_ci], "confidence": self.confidence,
            "interval": "Wilson score",
            "per_type": {
                r.type: {"n": int(r.n), "correct": int(r.correct), "recall": clean(float(r.recall)),
                         "recall_ci": [clean(float(r.recall_ci_low)), clean(float(r.recall_ci_high))],
                         "n_predicted": int(r.n_predicted), "precision": clean(float(r.precision)),
                         "precision_ci": [clean(float(r.precision_ci_low)), clean(float(r.precision_ci_high))]}
                for r in self.per_type.itertuples()
            },
            "confusion": {t: {u: int(self.confusion.loc[t, u]) for u in ROLLOUT_TYPES} for t in ROLLOUT_TYPES},
        }


def confusion_report(labels: Sequence[str], predicted: Sequence[str], name: str = "",
                     confidence: float = 0.95) -> Calibration:
    """The confusion matrix, accuracy and per-type recall / precision, with Wilson intervals, of
    ``predicted`` against the true ``labels`` (both rollout types)."""
    labels, predicted = list(labels), list(predicted)
    if len(labels) != len(predicted):
        raise NeuronAuditError(f"{len(predicted)} predicted labels for {len(labels)} labelled items")
    unknown = sorted({x for x in labels + predicted if x not in ROLLOUT_TYPES})
    if unknown:
        raise NeuronAuditError(f"unknown rollout type {unknown[0]!r}; known types: {list(ROLLOUT_TYPES)}")
    types = list(ROLLOUT_TYPES)
    confusion = pd.DataFrame(0, index=pd.Index(types, name="label"), columns=pd.Index(types, name="predicted"))
    for t, p in zip(labels, predicted):
        confusion.loc[t, p] += 1
    n = len(labels)
    correct = int(sum(t == p for t, p in zip(labels, predicted)))
    rows = []
    for t in types:
        k, m, q = int(confusion.loc[t, t]), int(confusion.loc[t].sum()), int(confusion[t].sum())
        r_lo, r_hi = wilson_interval(k, m, confidence)
        p_lo, p_hi = wilson_interval(k, q, confidence)
        rows.append({"type": t, "n": m, "correct": k, "recall": k / m if m else math.nan,
                     "recall_ci_low": r_lo, "recall_ci_high": r_hi, "n_predicted": q,
                     "precision": k / q if q else math.nan, "precision_ci_low": p_lo, "precision_ci_high": p_hi})
    return Calibration(name, n, correct, correct / n if n else math.nan, wilson_interval(correct, n, confidence),
                       confusion, pd.DataFrame(rows), confidence)


def calibrate(judge: Judge, labelled: str | Path | pd.DataFrame, confidence: float = 0.95) -> Calibration:
    """Run ``judge`` on a labelled set (a calibration file or a table with ``prompt``,
    ``response``, ``label`` and the coherence metrics) and report it (:func:`confusion_report`)."""
    if isinstance(labelled, pd.DataFrame):
        cal, name = labelled, str(labelled.attrs.get("name", "table"))
    else:
        cal, name = read_calibration(labelled), Path(labelled).name
    metrics = cal.reindex(columns=["repetition_ratio", "perplexity", "entropy"])
    predicted = judge.classify(list(cal["prompt"]), list(cal["response"]), metrics)
    return confusion_report(list(cal["label"]), predicted, name, confidence)


def calibrate_sets(judge: Judge, sets: Mapping[str, Sequence[str | Path]] | None = None,
                   confidence: float = 0.95) -> dict:
    """``{group: {file name: Calibration.record()}}`` of ``judge`` on each group of labelled
    files; by default ``development`` (:func:`development_paths`) and ``fresh``
    (:func:`fresh_paths`, an empty group until it has been labelled)."""
    if sets is None:
        sets = {"development": development_paths(), "fresh": fresh_paths()}
    for paths in sets.values():  # every input checked before any judging
        for p in paths:
            read_calibration(p)
    return {group: {Path(p).name: {"path": str(p), **calibrate(judge, p, confidence).record()} for p in paths}
            for group, paths in sets.items()}


def judge_calibration(judge: Judge, sets: Mapping[str, Sequence[str | Path]] | None = None) -> dict:
    """What a stage records about its judge: the judge's description, its calibration on every
    labelled set (:func:`calibrate_sets`; the fresh group empty until labelled) and, for a judge
    model, how many of its outputs named no label and fell back to the rule judge."""
    before = getattr(judge, "n_fallback", None)
    out = {"judge": getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
           "sets": calibrate_sets(judge, sets)}
    if before is not None:
        out["n_fallback_to_rule"] = int(judge.n_fallback - before)
    out["note"] = ("development sets: in-sample (the rule judge was built on them); fresh sets: real study "
                   "rollouts labelled after the judge was frozen")
    return out


def run_judge_calibration(
    calibration_paths: str | Path | Sequence[str | Path] | None = None,
    judge_config: Mapping | None = None,
    out_json: str | Path = "judge_calibration.json",
) -> dict:
    """Evaluate the configured judge (:func:`~neuronaudit.evaluation.judge.make_judge`) on
    calibration files (default: the development and fresh sets) and write
    :func:`judge_calibration` with provenance to ``out_json``."""
    judge = make_judge(judge_config)
    if calibration_paths is None:
        sets = None
    elif isinstance(calibration_paths, (str, Path)):
        sets = {"given": [calibration_paths]}
    else:
        sets = {"given": list(calibration_paths)}
    result = {**judge_calibration(judge, sets), "provenance": provenance()}
    write_json(result, out_json)
    return result


#: Columns a rollout needs to be labelled (the judge's own label is never among them).
LABELLING_COLUMNS = ("prompt", "response", "repetition_ratio", "perplexity", "entropy")


def draw_for_labelling(sources: Mapping[str, pd.DataFrame], n_per_source: Mapping[str, int],
                       strata: Mapping[str, Sequence[str]], seed: int,
                       judge_column: str = "rollout_type") -> tuple[pd.DataFrame, pd.DataFrame]:
    """A blinded draw of a study's rollouts for a fresh calibration set, and its key.

    From each source table (``{source name: rollout table}``) ``n_per_source[name]`` rows are drawn
    at random (seeded), spread evenly over the ``strata[name]`` columns (e.g. the intervention,
    the model, the dose), without two rows of the same (prompt, response). Returns ``(blinded,
    key)``: ``blinded`` holds ``calibration_id``, ``prompt``, ``response``, the coherence metrics
    and where the row came from (``source``, the table's index and strata values), and never the
    judge's label; ``key`` maps ``calibration_id`` to the judge's label (``judge_column``), kept
    apart until the hand labels are frozen."""
    import numpy as np

    rng = np.random.default_rng(seed)
    blinded, key, seen = [], [], set()
    for name, table in sources.items():
        missing = [c for c in (*LABELLING_COLUMNS, judge_column) if c not in table.columns]
        if missing:
            raise NeuronAuditError(f"rollout source {name!r} lacks columns {missing}")
        table = table[table["response"].astype(str).str.strip() != ""].drop_duplicates(["prompt", "response"])
        by = list(strata.get(name, ()))
        groups = [g for _, g in table.groupby(by, dropna=False)] if by else [table]
        want = n_per_source[name]
        # round-robin over shuffled strata: each stratum gives one row per pass until enough
        orders = [list(rng.permutation(len(g))) for g in groups]
        taken = 0
        while taken < want and any(orders):
            for g, order in zip(groups, orders):
                while order and taken < want:
                    row = g.iloc[order.pop()]
                    if (row["prompt"], row["response"]) in seen:
                        continue
                    seen.add((row["prompt"], row["response"]))
                    cid = f"fresh-{len(blinded) + 1:03d}"
                    blinded.append({"calibration_id": cid, "prompt": row["prompt"], "response": row["response"],
                                    "metrics": {m: None if pd.isna(row[m]) else float(row[m])
                                                for m in ("repetition_ratio", "perplexity", "entropy")},
                                    "source": {"table": name, "row": int(row.name),
                                               **{c: (None if pd.isna(row[c]) else row[c].item()
                                                      if hasattr(row[c], "item") else row[c]) for c in by}}})
                    key.append({"calibration_id": cid, "judge_label": row[judge_column]})
                    taken += 1
                    break
    order = rng.permutation(len(blinded))  # the labeller sees no source order, not even in the ids
    blinded, key = [blinded[i] for i in order], [key[i] for i in order]
    for j, (b, k) in enumerate(zip(blinded, key)):
        b["calibration_id"] = k["calibration_id"] = f"fresh-{j + 1:03d}"
    return pd.DataFrame(blinded), pd.DataFrame(key)
