"""The refusal stages: the refusal-tuned reference model (``tune_refusal``) and its evaluation
against the base model (``evaluate_refusal``). The recipe is
:mod:`neuronaudit.methods.refusal_tuning`.

Evaluation measures what the tuning bought, greedy and typed by a judge
(:mod:`neuronaudit.evaluation.judge`): the refusal rate on HELD-OUT harmful prompts, the
over-refusal rate on HELD-OUT harmless prompts, each with a Wilson 95% interval, and the
perplexity on generic text for the tuned and the base model, with a paired bootstrap CI of the
ratio over texts.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.calibration import judge_calibration
from neuronaudit.evaluation.judge import ROLLOUT_TYPES, make_judge
from neuronaudit.evaluation.rollouts import (
    generate_rollouts,
    rollouts_table,
    type_rollouts,
)
from neuronaudit.evaluation.stats import paired_ratio_ci, wilson_interval
from neuronaudit.interventions.generation import encode_prompts, pad_id
from neuronaudit.interventions.scoring import score_tokens
from neuronaudit.io import atomic_path, provenance, write_json, write_table
from neuronaudit.methods.refusal_tuning import (
    GEN_BATCH_SIZE,
    GRAD_CLIP,
    REFUSAL_TEMPLATES,
    WEIGHT_DECAY,
    batch_composition,
    dataset_loss,
    own_answer_examples,
    refusal_examples,
    train_response_loss,
)
from neuronaudit.models.loading import architecture_shape, read_manifest, weights_sha256
from neuronaudit.options import ModelOptions, RefusalEvalOptions, TuneOptions
from neuronaudit.stages.common import open_model, read_prompts

log = logging.getLogger("neuronaudit")

#: Tuning data come from the discovery split only, so the held-out prompts stay unseen.
TUNE_SPLIT = "discovery"
#: Generation batch of the evaluation rollouts.
EVAL_BATCH_SIZE = 16
#: Bootstrap resamples of the perplexity ratio.
N_BOOT = 1000


def _table_info(df) -> dict:
    return {
        "prompt_set": df.attrs.get("prompt_set"), "prompt_set_hash": df.attrs.get("prompt_set_hash"),
        "source": df.attrs.get("source"),
    }


def check_tune_options(o: TuneOptions) -> None:
    """Every tuning setting checked before the model is loaded."""
    for name in ("steps", "batch_size", "answer_max_new_tokens"):
        value = getattr(o, name)
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise NeuronAuditError(f"refusal.{name} {value!r} must be a positive integer")
    if not (isinstance(o.learning_rate, (int, float)) and math.isfinite(o.learning_rate) and o.learning_rate > 0):
        raise NeuronAuditError(f"refusal.learning_rate {o.learning_rate!r} must be a positive number")
    if o.harmless_fraction is not None:
        batch_composition(o.batch_size, o.harmless_fraction)


def run_refusal_tuning(
    base_manifest_path: str | Path,
    harmful_table: str | Path,
    harmless_table: str | Path,
    out_dir: str | Path,
    options: TuneOptions,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the base model into a refuser; write ``out_dir/{weights,manifest.json,recipe.json}``.

    Tuning is a float32 full fine-tune whatever ``model.dtype`` says (only ``model.device``,
    ``chat_template`` and ``system_prompt`` apply). Returns the recipe dict.
    """
    o = options
    check_tune_options(o)
    base = read_manifest(base_manifest_path)
    harmful = read_prompts(harmful_table, TUNE_SPLIT, role="harmful prompt table")
    harmless = read_prompts(harmless_table, TUNE_SPLIT, role="harmless prompt table")
    t0 = time.perf_counter()
    opened = open_model(base_manifest_path, ModelOptions(**{**o.model.to_dict(), "dtype": "float32"}), threads)
    model, tokenizer = opened.model, opened.tokenizer
    pad, eos_token = pad_id(tokenizer), tokenizer.eos_token_id
    if eos_token is None:
        raise NeuronAuditError("the base tokenizer has no EOS token; refusals need one to end")
    harmful_ids = encode_prompts(tokenizer, harmful["text"], o.model.chat_template, o.model.system_prompt)
    harmless_ids = encode_prompts(tokenizer, harmless["text"], o.model.chat_template, o.model.system_prompt)
    refusals = refusal_examples(tokenizer, harmful_ids, random.Random(o.seed), eos_token, list(harmful["prompt_id"]))
    t_gen = time.perf_counter()
    answers = own_answer_examples(model, tokenizer, harmless_ids, o.answer_max_new_tokens, GEN_BATCH_SIZE,
                                  list(harmless["prompt_id"]), progress)
    gen_seconds = time.perf_counter() - t_gen
    examples = refusals + answers
    loss_before = dataset_loss(model, examples, pad)
    t_train = time.perf_counter()
    curve = train_response_loss(model, examples, pad, o.steps, o.learning_rate, o.batch_size, o.seed, GRAD_CLIP,
                                WEIGHT_DECAY, progress, o.harmless_fraction)
    train_seconds = time.perf_counter() - t_train
    recipe = tuning_recipe(o, base, base_manifest_path, opened.device, refusals, answers, len(harmless_ids))
    recipe.update(
        harmful_table={"path": str(harmful_table), **_table_info(harmful)},
        harmless_table={"path": str(harmless_table), **_table_info(harmless)},
        n_harmless_answers_ended_with_eos=sum(1 for e in answers if e.response_ids[-1] == eos_token),
        loss_before=loss_before, loss_after=dataset_loss(model, examples, pad), train_loss=curve,
        seconds={"own_answers": gen_seconds, "training": train_seconds, "total": None},
    )
    save_tuned(model, tokenizer, base, base_manifest_path, recipe, Path(out_dir), t0)
    log.info("refusal tuning: %d examples, %d steps, loss %.3f -> %.3f in %.0f s -> %s", len(examples), o.steps,
             loss_before, recipe["loss_after"], recipe["seconds"]["total"], out_dir)
    return recipe


def tuning_recipe(o: TuneOptions, base: dict, base_manifest_path, device: str, refusals, answers,
                  n_harmless: int) -> dict:
    """Every hyperparameter and data count of the tuning, named as in the config."""
    examples = refusals + answers
    return {
        "method": "full fine-tune on response tokens: harmful -> refusal template, harmless -> own greedy answer",
        "base_manifest": str(Path(base_manifest_path).resolve()),
        "base_source": base.get("source"),
        "base_weight_sha256": base.get("weight_sha256"),
        "seed": o.seed,
        "steps": o.steps,
        "learning_rate": o.learning_rate,
        "lr_schedule": "constant",
        "optimizer": "AdamW",
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": WEIGHT_DECAY,
        "batch_size": o.batch_size,
        "harmless_fraction": o.harmless_fraction,
        "grad_clip": GRAD_CLIP,
        "dtype": "float32",
        "device": device,
        "threads": torch.get_num_threads(),
        "answer_max_new_tokens": o.answer_max_new_tokens,
        "gen_batch_size": GEN_BATCH_SIZE,
        "chat_template": o.model.chat_template,
        "system_prompt": o.model.system_prompt,
        "split": TUNE_SPLIT,
        "n_harmful": len(refusals),
        "n_harmless": len(answers),
        "n_harmless_dropped_empty": n_harmless - len(answers),
        "n_examples": len(examples),
        "n_response_tokens": sum(len(e.response_ids) for e in examples),
        "epochs": o.steps * o.batch_size / len(examples),
        "refusal_templates": list(REFUSAL_TEMPLATES),
        "refusal_template_counts": [sum(e.template == t for e in refusals) for t in range(len(REFUSAL_TEMPLATES))],
        "packages": {"torch": torch.__version__},
    }


def save_tuned(model, tokenizer, base: dict, base_manifest_path, recipe: dict, out_dir: Path, t0: float) -> None:
    """Weights, manifest and recipe into ``out_dir``, atomically."""
    final_weights = (out_dir / "weights").resolve()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp / "weights")
        tokenizer.save_pretrained(tmp / "weights")
        cfg = json.loads((tmp / "weights" / "config.json").read_text())
        manifest = {
            "source": f"refusal-tuned:{base.get('source')}",
            "kind": "local",
            "original_path": str(final_weights),
            "revision": None,
            "path": str(final_weights),
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            **architecture_shape(tmp / "weights"),
            "weight_sha256": weights_sha256(tmp / "weights"),
            "tuned_from": {
                "source": base.get("source"),
                "path": base.get("path"),
                "weight_sha256": base.get("weight_sha256"),
                "manifest": str(Path(base_manifest_path).resolve()),
            },
            "recipe": "recipe.json",
        }
        recipe["weight_sha256"] = manifest["weight_sha256"]
        recipe["seconds"]["total"] = time.perf_counter() - t0
        write_json(manifest, tmp / "manifest.json")
        write_json(recipe, tmp / "recipe.json")


# --- evaluation ------------------------------------------------------------------------------


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "n": int(n), "rate": (k / n) if n else math.nan, "ci_low": lo, "ci_high": hi,
            "ci": "wilson 95%"}


def _types(df: pd.DataFrame) -> dict:
    return {t: int((df["rollout_type"] == t).sum()) for t in ROLLOUT_TYPES}


def evaluate_model(manifest_path, harmful, harmless, generic_texts, judge, options: RefusalEvalOptions,
                   threads=None, progress=True) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """Greedy typed rollouts on the harmful and harmless prompts and per-text generic NLL of one model."""
    m = options.model
    opened = open_model(manifest_path, m, threads)
    model, tokenizer, adapter, manifest = opened.model, opened.tokenizer, opened.adapter, opened.manifest
    prompts = pd.concat(
        [harmful.assign(prompt_set="harmful"), harmless.assign(prompt_set="harmless")], ignore_index=True,
    )[["prompt_set", "prompt_id", "text"]]
    t0 = time.perf_counter()
    rollouts = generate_rollouts(
        model, tokenizer, adapter, prompts, {"none": []}, horizons=(options.eval_max_new_tokens,),
        batch_size=EVAL_BATCH_SIZE, chat_template=m.chat_template, system_prompt=m.system_prompt, progress=progress,
    )
    typed = type_rollouts(rollouts, judge, harmless_sets=("harmless",))
    gen_seconds = time.perf_counter() - t0
    h = typed[typed["prompt_set"] == "harmful"]
    b = typed[typed["prompt_set"] == "harmless"]
    enc = tokenizer(list(generic_texts), truncation=True, max_length=256)["input_ids"]
    scores = score_tokens(model, adapter, enc, [1] * len(enc), batch_size=EVAL_BATCH_SIZE,
                          pad_token_id=tokenizer.pad_token_id or 0)
    nll = scores.mean_nll()
    n_tok = np.array([len(lp) for lp in scores.logprob])
    out = {
        "manifest": str(manifest_path),
        "source": manifest.get("source"),
        "weight_sha256": manifest.get("weight_sha256"),
        "refusal_harmful": _rate(int((h["rollout_type"] == "refusal").sum()), len(h)),
        "over_refusal_harmless": _rate(int(b["over_refusal"].fillna(False).astype(bool).sum()), len(b)),
        "types_harmful": _types(h),
        "types_harmless": _types(b),
        "perplexity_generic": {
            "mean_of_texts": float(np.mean(np.exp(nll))),
            "token_weighted": float(np.exp(np.sum(nll * n_tok) / np.sum(n_tok))),
            "n_texts": len(enc),
        },
        "generation_seconds": gen_seconds,
        "examples": {
            "harmful": h[["prompt_id", "prompt", "response", "rollout_type"]].head(5).to_dict(orient="records"),
            "harmless": b[["prompt_id", "prompt", "response", "rollout_type"]].head(5).to_dict(orient="records"),
        },
    }
    return out, nll, typed


def evaluate_refusal(
    manifest_path: str | Path,
    base_manifest_path: str | Path,
    harmful_table: str | Path,
    harmless_table: str | Path,
    generic_table: str | Path,
    out_json: str | Path,
    out_rollouts: str | Path,
    options: RefusalEvalOptions,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Refusal on held-out harmful, over-refusal on held-out harmless, generic perplexity:
    tuned model (``manifest_path``) vs base model; written to ``out_json``, the typed rollouts of
    both models to ``out_rollouts``."""
    o = options
    judge = make_judge(o.judge.judge_config())
    tables = {
        "harmful": read_prompts(harmful_table, "heldout", role="harmful prompt table"),
        "harmless": read_prompts(harmless_table, "heldout", role="harmless prompt table"),
        "generic": read_prompts(generic_table, "all", role="generic prompt table"),
    }
    args = (tables["harmful"], tables["harmless"], list(tables["generic"]["text"]), judge, o, threads, progress)
    tuned, nll_tuned, typed_tuned = evaluate_model(manifest_path, *args)
    base, nll_base, typed_base = evaluate_model(base_manifest_path, *args)
    ratio = paired_ratio_ci(np.exp(nll_tuned), np.exp(nll_base), n_boot=N_BOOT, seed=o.seed)
    result = {
        "tuned": tuned,
        "base": base,
        "perplexity_ratio_tuned_over_base": {**ratio, "ci": "paired percentile bootstrap 95% over texts"},
        "judge": getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
        # the same judge (rule or model) on the labelled calibration sets: confusion, Wilson CIs
        "judge_calibration": judge_calibration(judge),
        "max_new_tokens": o.eval_max_new_tokens,
        "decoding": "greedy",
        "splits": {"harmful": "heldout", "harmless": "heldout", "generic": "all"},
        "prompt_sets": {k: {"n": len(v), **_table_info(v)} for k, v in tables.items()},
        "chat_template": o.model.chat_template,
        "system_prompt": o.model.system_prompt,
        "provenance": provenance(seed=o.seed),
    }
    write_json(result, out_json)
    # The intervention column names the model: the "intervention" here is the tuning itself.
    both = pd.concat(
        [typed_tuned.assign(intervention="model=tuned"), typed_base.assign(intervention="model=base")],
        ignore_index=True,
    )
    write_table(rollouts_table(both), out_rollouts, provenance(
        tuned_manifest=str(manifest_path), base_manifest=str(base_manifest_path),
        max_new_tokens=o.eval_max_new_tokens,
    ))
    t, b = tuned, base
    log.info("refusal eval: tuned refuses %d/%d harmful, %d/%d harmless; base %d/%d, %d/%d",
             t["refusal_harmful"]["count"], t["refusal_harmful"]["n"], t["over_refusal_harmless"]["count"],
             t["over_refusal_harmless"]["n"], b["refusal_harmful"]["count"], b["refusal_harmful"]["n"],
             b["over_refusal_harmless"]["count"], b["over_refusal_harmless"]["n"])
    return result
