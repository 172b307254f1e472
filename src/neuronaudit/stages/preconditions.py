"""The preconditions stage: tokenizer coverage of every prompt set, the chat template in use, each
behaviour's rate at baseline on its positive and negative prompts with the oracle's readability,
and the judge's accuracy on the fresh hand-labelled rollouts (checks in
:mod:`neuronaudit.preconditions`). Writes ``results/<study>/preconditions.json``; with
``preconditions.on_fail: stop`` each stage that depends on a failed precondition stops with one
line before it starts (:func:`neuronaudit.preconditions.require`; stages that do not depend on it
run), with ``mark`` the report marks every dependent figure."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neuronaudit.evaluation.calibration import calibrate_sets
from neuronaudit.evaluation.judge import make_judge
from neuronaudit.evaluation.metrics import repetition_ratio
from neuronaudit.evaluation.oracles import LOGIT_ORACLES, logit_pair_margin, oracle_for
from neuronaudit.interventions.generation import encode_prompts, eos_ids, generate_tokens, pad_id
from neuronaudit.io import provenance, write_json
from neuronaudit.methods.window import logit_pair_columns
from neuronaudit.options import PreconditionOptions
from neuronaudit.preconditions import (
    behaviour_rates,
    coverage,
    judge_accuracy,
)
from neuronaudit.prompts import extras, uses_template
from neuronaudit.stages.common import open_model, read_prompts

log = logging.getLogger("neuronaudit")


def _shown(spec: Mapping, texts, types, rows, margins) -> tuple[np.ndarray, np.ndarray]:
    """Per answer: does it show the behaviour, and could the oracle read it."""
    if spec["oracle"] == "refusal":
        return np.array([t == "refusal" for t in types]), np.ones(len(texts), dtype=bool)
    if spec["oracle"] in LOGIT_ORACLES:
        return np.asarray(margins) > 0, np.isfinite(np.asarray(margins, dtype=float))
    oracle = oracle_for(spec)
    labels = [oracle.label(t, r) for t, r in zip(texts, rows)]
    readable = [lab in (oracle.behaviour, oracle.default) for lab in labels]
    return np.array([lab == oracle.behaviour for lab in labels]), np.array(readable)


def behaviour_preconditions(opened, judge, prompt_tables: Mapping[str, str | Path], options: PreconditionOptions,
                            split: str, n_prompts: int | None, behaviours: Sequence[str] | None = None,
                            ) -> tuple[list, dict]:
    """Each behaviour's rate without intervention on its positive and negative prompts (the first
    ``n_prompts`` of ``split``; all of them with None) and its oracle's readability, as
    :func:`~neuronaudit.preconditions.behaviour_rates` checks; ``behaviours`` limits them to those
    names. Returns the checks and ``{behaviour: {"horizon", "positive", "negative"}}``."""
    o = options
    model, tokenizer = opened.model, opened.tokenizer
    checks, rates = [], {}
    for name, spec in o.behaviours.items():
        if behaviours is not None and name not in behaviours:
            continue
        horizon = max(spec.get("horizons") or o.horizons)
        shown, readable = {}, []
        for side in ("positive", "negative"):
            prompts = read_prompts(prompt_tables[spec[side]], split, n_prompts, role=f"prompt set {spec[side]!r}")
            ids = encode_prompts(tokenizer, list(prompts["text"]), o.model.chat_template, o.model.system_prompt)
            margins = np.full(len(ids), np.nan)
            if spec["oracle"] in LOGIT_ORACLES:
                keep, beh, dflt = logit_pair_columns(tokenizer, spec)
                with torch.inference_mode():
                    for j, row in enumerate(ids):
                        logits = model(input_ids=torch.tensor([row], device=opened.device)).logits[0, -1].float()
                        margins[j] = float(logit_pair_margin(logits[keep].cpu().numpy()[None], beh, dflt)[0])
            tokens, _, _ = generate_tokens(model, ids, horizon, eos_token_ids=eos_ids(model, tokenizer),
                                           pad_token_id=pad_id(tokenizer))
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
            metrics = {"repetition_ratio": [repetition_ratio(t) for t in tokens],
                       "perplexity": [np.nan] * len(texts), "entropy": [np.nan] * len(texts)}
            types = judge.classify(list(prompts["text"]), texts, pd.DataFrame(metrics))
            s, r = _shown(spec, texts, types, extras(prompts).to_dict(orient="records"), margins)
            shown[side] = s
            readable += list(r)
        checks += behaviour_rates(name, shown["positive"], shown["negative"], readable, o.min_behaviour_positive,
                                  o.max_behaviour_negative, o.min_oracle_readability)
        rates[name] = {"horizon": horizon, "positive": float(shown["positive"].mean()),
                       "negative": float(shown["negative"].mean())}
    return checks, rates


def run_preconditions(manifest: str | Path, prompt_tables: Mapping[str, str | Path], out_json: str | Path,
                      options: PreconditionOptions, threads: int | None = None) -> dict:
    o = options
    opened = open_model(manifest, o.model, threads)
    tokenizer = opened.tokenizer
    checks = []
    for name, path in prompt_tables.items():
        prompts = read_prompts(path, "all", role=f"prompt set {name!r}")
        checks.append(coverage(name, tokenizer, list(prompts["text"]), o.max_unknown_rate))
    judge = make_judge(o.judge.judge_config())
    behaviour_checks, rates = behaviour_preconditions(opened, judge, prompt_tables, o, "heldout", o.n_prompts)
    checks += behaviour_checks
    fresh = calibrate_sets(judge).get("fresh") or {}
    n = sum(v["n"] for v in fresh.values())
    correct = sum(v["correct"] for v in fresh.values())
    checks.append(judge_accuracy(correct / n if n else None, n, o.min_judge_accuracy,
                                 "labelled rollouts of the default study, src/neuronaudit/data/calibration/fresh/"))
    chat = ("the model's chat template" if uses_template(tokenizer, o.model.chat_template)
            else "raw text (no chat template)")
    for c in checks:
        log.info("%s%s", "" if c.passed else "FAILED ", c.line())
    result = {
        "provenance": provenance(stage="preconditions", model_id=opened.manifest.get("source"),
                                 weight_sha256=opened.manifest.get("weight_sha256"), n_prompts=o.n_prompts,
                                 on_fail=o.on_fail, judge=judge.describe()),
        "chat_template": chat,
        "on_fail": o.on_fail,
        "preconditions": [c.as_dict() for c in checks],
        "failed": [c.as_dict() for c in checks if not c.passed],
        "baseline_rates": rates,
    }
    write_json(result, out_json)
    return result
