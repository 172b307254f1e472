"""The refusal stages: the refusal-tuned reference model and its evaluation against the base
model (the recipe is :mod:`neuronaudit.methods.refusal_tuning`)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.methods.refusal_tuning import (
    REFUSAL_TEMPLATES,
    batch_composition,
    dataset_loss,
    own_answer_examples,
    refusal_examples,
    train_response_loss,
)

log = logging.getLogger("neuronaudit")


def _table_info(df) -> dict:
    return {
        "prompt_set": df.attrs.get("prompt_set"), "prompt_set_hash": df.attrs.get("prompt_set_hash"),
        "source": df.attrs.get("source"),
    }


def run_refusal_tuning(
    base_manifest_path: str | Path,
    harmful_table: str | Path,
    harmless_table: str | Path,
    out_dir: str | Path,
    steps: int = 100,
    lr: float = 3e-5,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    *,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
    gen_batch_size: int = 16,
    limit: int | None = None,
    device: str = "cpu",
    harmless_fraction: float | None = None,
) -> dict:
    """Fine-tune the base model into a refuser; write ``out_dir/{weights,manifest.json,recipe.json}``.

    ``limit`` keeps the first ``limit`` discovery prompts of each table (for quick runs).
    Returns the recipe dict.
    """
    from neuronaudit.interventions.generation import encode_prompts, pad_id
    from neuronaudit.io import atomic_path, write_json
    from neuronaudit.models.loading import (
        architecture_shape,
        load_prepared,
        read_manifest,
        weights_sha256,
    )
    from neuronaudit.prompts import read_prompt_table

    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("gen_batch_size", gen_batch_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise NeuronAuditError(f"refusal tuning {name} {value!r} must be a positive integer")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise NeuronAuditError(f"refusal tuning lr {lr!r} must be a positive number")
    if not grad_clip > 0:
        raise NeuronAuditError(f"refusal tuning grad_clip {grad_clip!r} must be positive")
    if harmless_fraction is not None:
        batch_composition(batch_size, harmless_fraction)
    base = read_manifest(base_manifest_path)
    tables = {}
    for role, path in (("harmful", harmful_table), ("harmless", harmless_table)):
        if not Path(path).is_file():
            raise NeuronAuditError(f"{role} prompt table {str(path)!r} not found")
        df = read_prompt_table(path, split="discovery")
        if limit is not None:
            df = df.head(int(limit))
        if len(df) == 0:
            raise NeuronAuditError(f"{role} prompt table {str(path)!r} has no discovery prompts")
        tables[role] = df
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    model, tokenizer, adapter, _ = load_prepared(base_manifest_path, "float32", device)
    pad = pad_id(tokenizer)
    eos_token = tokenizer.eos_token_id
    if eos_token is None:
        raise NeuronAuditError("the base tokenizer has no EOS token; refusals need one to end")
    harmful, harmless = tables["harmful"], tables["harmless"]
    harmful_ids = encode_prompts(tokenizer, harmful["text"], chat_template, system_prompt)
    harmless_ids = encode_prompts(tokenizer, harmless["text"], chat_template, system_prompt)
    rng = random.Random(seed)
    refusals = refusal_examples(tokenizer, harmful_ids, rng, eos_token, list(harmful["prompt_id"]))
    t_gen = time.perf_counter()
    answers = own_answer_examples(
        model, tokenizer, harmless_ids, max_new_tokens, gen_batch_size, list(harmless["prompt_id"]), progress,
    )
    gen_seconds = time.perf_counter() - t_gen
    examples = refusals + answers
    loss_before = dataset_loss(model, examples, pad)
    t_train = time.perf_counter()
    curve = train_response_loss(
        model, examples, pad, steps, lr, batch_size, seed, grad_clip, weight_decay, progress,
        harmless_fraction,
    )
    train_seconds = time.perf_counter() - t_train
    loss_after = dataset_loss(model, examples, pad)
    out_dir = Path(out_dir)
    final_weights = (out_dir / "weights").resolve()
    template_counts = [sum(e.template == t for e in refusals) for t in range(len(REFUSAL_TEMPLATES))]
    recipe = {
        "method": "full fine-tune on response tokens: harmful -> refusal template, harmless -> own greedy answer",
        "base_manifest": str(Path(base_manifest_path).resolve()),
        "base_source": base.get("source"),
        "base_weight_sha256": base.get("weight_sha256"),
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "lr_schedule": "constant",
        "optimizer": "AdamW",
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "harmless_fraction": harmless_fraction,
        "grad_clip": grad_clip,
        "dtype": "float32",
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "gen_batch_size": gen_batch_size,
        "chat_template": chat_template,
        "system_prompt": system_prompt,
        "split": "discovery",
        "limit": limit,
        "harmful_table": {"path": str(harmful_table), **_table_info(harmful)},
        "harmless_table": {"path": str(harmless_table), **_table_info(harmless)},
        "n_harmful": len(refusals),
        "n_harmless": len(answers),
        "n_harmless_dropped_empty": len(harmless_ids) - len(answers),
        "n_harmless_answers_ended_with_eos": sum(1 for e in answers if e.response_ids[-1] == eos_token),
        "n_examples": len(examples),
        "n_response_tokens": sum(len(e.response_ids) for e in examples),
        "epochs": steps * batch_size / len(examples),
        "refusal_templates": list(REFUSAL_TEMPLATES),
        "refusal_template_counts": template_counts,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_loss": curve,
        "seconds": {"own_answers": gen_seconds, "training": train_seconds, "total": None},
        "packages": {"torch": torch.__version__},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp / "weights")
        tokenizer.save_pretrained(tmp / "weights")
        cfg = json.loads((tmp / "weights" / "config.json").read_text())
        shape = architecture_shape(tmp / "weights")
        manifest = {
            "source": f"refusal-tuned:{base.get('source')}",
            "kind": "local",
            "original_path": str(final_weights),
            "revision": None,
            "path": str(final_weights),
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            **shape,
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
    log.info(
        "refusal tuning: %d examples, %d steps, loss %.3f -> %.3f in %.0f s -> %s",
        len(examples), steps, loss_before, loss_after, recipe["seconds"]["total"], out_dir,
    )
    return recipe


def _rate(k: int, n: int) -> dict:
    from neuronaudit.evaluation.stats import wilson_interval

    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "n": int(n), "rate": (k / n) if n else math.nan, "ci_low": lo, "ci_high": hi,
            "ci": "wilson 95%"}


def _evaluate_model(manifest_path, harmful, harmless, generic_texts, judge, max_new_tokens, batch_size,
                    dtype, device, chat_template, system_prompt, progress) -> dict:
    from neuronaudit.evaluation.rollouts import generate_rollouts, type_rollouts
    from neuronaudit.interventions.scoring import score_tokens
    from neuronaudit.models.loading import load_prepared

    model, tokenizer, adapter, manifest = load_prepared(manifest_path, dtype, device)
    prompts = __import__("pandas").concat(
        [harmful.assign(prompt_set="harmful"), harmless.assign(prompt_set="harmless")], ignore_index=True,
    )[["prompt_set", "prompt_id", "text"]]
    t0 = time.perf_counter()
    rollouts = generate_rollouts(
        model, tokenizer, adapter, prompts, {"none": []}, horizons=(max_new_tokens,),
        batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress,
    )
    typed = type_rollouts(rollouts, judge, harmless_sets=("harmless",))
    gen_seconds = time.perf_counter() - t0
    h = typed[typed["prompt_set"] == "harmful"]
    b = typed[typed["prompt_set"] == "harmless"]
    enc = tokenizer(list(generic_texts), truncation=True, max_length=256)["input_ids"]
    scores = score_tokens(model, adapter, enc, [1] * len(enc), batch_size=batch_size,
                          pad_token_id=tokenizer.pad_token_id or 0)
    nll = scores.mean_nll()
    n_tok = np.array([len(lp) for lp in scores.logprob])
    types = lambda df: {t: int((df["rollout_type"] == t).sum()) for t in ("refusal", "collapse", "coherent_bypass", "actionable")}  # noqa: E731
    out = {
        "manifest": str(manifest_path),
        "source": manifest.get("source"),
        "weight_sha256": manifest.get("weight_sha256"),
        "refusal_harmful": _rate(int((h["rollout_type"] == "refusal").sum()), len(h)),
        "over_refusal_harmless": _rate(int(b["over_refusal"].fillna(False).astype(bool).sum()), len(b)),
        "types_harmful": types(h),
        "types_harmless": types(b),
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
    judge_config: Mapping | None,
    out_json: str | Path,
    max_new_tokens: int = 48,
    *,
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "cpu",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    limit: int | None = None,
    generic_split: str = "all",
    n_boot: int = 1000,
    seed: int = 0,
    threads: int | None = None,
    out_rollouts: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Refusal on held-out harmful, over-refusal on held-out harmless, generic perplexity:
    tuned model (``manifest_path``) vs base model; written to ``out_json``.

    Greedy rollouts of ``max_new_tokens`` tokens typed by the judge of ``judge_config``; rates
    with Wilson 95% intervals; perplexity ratio tuned/base with a paired percentile bootstrap
    over generic texts (``n_boot`` resamples, ``seed``). ``out_rollouts`` optionally keeps the
    typed rollouts of both models as Parquet.
    """

    from neuronaudit.evaluation.judge import make_judge
    from neuronaudit.evaluation.rollouts import rollouts_table
    from neuronaudit.io import provenance, write_json, write_table
    from neuronaudit.prompts import read_prompt_table

    judge = make_judge(judge_config)
    if n_boot < 1000:
        raise NeuronAuditError(f"n_boot {n_boot!r} is below the 1000 resamples the study requires")
    tables = {}
    for role, path, split in (("harmful", harmful_table, "heldout"), ("harmless", harmless_table, "heldout"),
                              ("generic", generic_table, generic_split)):
        if not Path(path).is_file():
            raise NeuronAuditError(f"{role} prompt table {str(path)!r} not found")
        df = read_prompt_table(path, split=split)
        if limit is not None:
            df = df.head(int(limit))
        if len(df) == 0:
            raise NeuronAuditError(f"{role} prompt table {str(path)!r} has no prompts in split {split!r}")
        tables[role] = df
    if threads:
        torch.set_num_threads(int(threads))
    args = (tables["harmful"], tables["harmless"], list(tables["generic"]["text"]), judge, max_new_tokens,
            batch_size, dtype, device, chat_template, system_prompt, progress)
    tuned, nll_tuned, typed_tuned = _evaluate_model(manifest_path, *args)
    base, nll_base, typed_base = _evaluate_model(base_manifest_path, *args)
    rng = np.random.default_rng(seed)
    ratio = np.exp(nll_tuned) / np.exp(nll_base)
    idx = rng.integers(0, len(ratio), size=(n_boot, len(ratio)))
    boot = ratio[idx].mean(axis=1)
    result = {
        "tuned": tuned,
        "base": base,
        "perplexity_ratio_tuned_over_base": {
            "mean": float(ratio.mean()), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975)), "ci": "paired percentile bootstrap 95% over texts",
            "n_boot": n_boot, "seed": seed,
        },
        "judge": getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "splits": {"harmful": "heldout", "harmless": "heldout", "generic": generic_split},
        "prompt_sets": {k: {"n": len(v), **_table_info(v)} for k, v in tables.items()},
        "chat_template": chat_template,
        "system_prompt": system_prompt,
        "provenance": provenance(seed=seed),
    }
    write_json(result, out_json)
    if out_rollouts is not None:
        # The intervention column names the model: the "intervention" here is the tuning itself.
        both = pd.concat(
            [typed_tuned.assign(intervention="model=tuned"), typed_base.assign(intervention="model=base")],
            ignore_index=True,
        )
        write_table(rollouts_table(both), out_rollouts, provenance(
            tuned_manifest=str(manifest_path), base_manifest=str(base_manifest_path), max_new_tokens=max_new_tokens,
        ))
    log.info(
        "refusal eval: tuned refuses %d/%d harmful, %d/%d harmless; base %d/%d, %d/%d",
        tuned["refusal_harmful"]["count"], tuned["refusal_harmful"]["n"],
        tuned["over_refusal_harmless"]["count"], tuned["over_refusal_harmless"]["n"],
        base["refusal_harmful"]["count"], base["refusal_harmful"]["n"],
        base["over_refusal_harmless"]["count"], base["over_refusal_harmless"]["n"],
    )
    return result

