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

import itertools
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
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
from neuronaudit.io import atomic_path, provenance, read_provenance, write_json, write_table
from neuronaudit.methods.refusal_tuning import (
    GEN_BATCH_SIZE,
    GRAD_CLIP,
    HARMLESS_LOSSES,
    REFUSAL_TARGETS,
    REFUSAL_TEMPLATES,
    VALIDATION_SALT,
    WEIGHT_DECAY,
    batch_composition,
    choose_recipe,
    dataset_loss,
    own_answer_examples,
    refusal_examples,
    target_checks,
    train_response_loss,
    validation_mask,
    with_lora_adapters,
    worst_over_refusal,
)
from neuronaudit.models.loading import architecture_shape, read_manifest, weights_sha256
from neuronaudit.options import ModelOptions, PreconditionOptions, RefusalEvalOptions, TuneOptions
from neuronaudit.prompts import extras
from neuronaudit.shards import shard_rows
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
    if isinstance(o.harmless_loss_weight, bool) or not (isinstance(o.harmless_loss_weight, (int, float))
                                                        and math.isfinite(o.harmless_loss_weight)
                                                        and o.harmless_loss_weight > 0):
        raise NeuronAuditError(f"refusal.harmless_loss_weight {o.harmless_loss_weight!r} must be a positive number")
    if o.harmless_loss not in HARMLESS_LOSSES:
        raise NeuronAuditError(f"refusal.harmless_loss {o.harmless_loss!r} must be one of {list(HARMLESS_LOSSES)}")
    if isinstance(o.decision_tokens, bool) or int(o.decision_tokens) != o.decision_tokens or o.decision_tokens < 0:
        raise NeuronAuditError(f"refusal.decision_tokens {o.decision_tokens!r} must be a whole number >= 0")
    if isinstance(o.decision_weight, bool) or not (isinstance(o.decision_weight, (int, float))
                                                   and math.isfinite(o.decision_weight) and o.decision_weight > 0):
        raise NeuronAuditError(f"refusal.decision_weight {o.decision_weight!r} must be a positive number")
    if o.lora_rank is not None and (isinstance(o.lora_rank, bool) or int(o.lora_rank) != o.lora_rank
                                    or o.lora_rank < 1):
        raise NeuronAuditError(f"refusal.lora_rank {o.lora_rank!r} must be a positive integer or null")


def run_refusal_tuning(
    base_manifest_path: str | Path,
    harmful_table: str | Path,
    harmless_table: str | Path,
    out_dir: str | Path,
    options: TuneOptions,
    threads: int | None = None,
    progress: bool = True,
    extra_harmless: dict[str, str | Path] | None = None,
) -> dict:
    """Fine-tune the base model into a refuser; write ``out_dir/{weights,manifest.json,recipe.json}``.

    ``extra_harmless`` maps each of ``refusal.extra_harmless_sets`` to its prepared table: their
    discovery prompts' own answers join the harmless training data (more varied benign answers).

    Tuning runs in float32 (full fine-tune, or LoRA merged back) whatever ``model.dtype`` says (only ``model.device``,
    ``chat_template`` and ``system_prompt`` apply). Returns the recipe dict.
    """
    o = options
    check_tune_options(o)
    base = read_manifest(base_manifest_path)
    discovery = {
        "harmful": read_prompts(harmful_table, TUNE_SPLIT, role="harmful prompt table"),
        "harmless": read_prompts(harmless_table, TUNE_SPLIT, role="harmless prompt table"),
    }
    validation = {k: validation_mask(df, o.validation_fraction, o.seed) for k, df in discovery.items()}
    harmful, harmless = (discovery[k][~validation[k]].reset_index(drop=True) for k in ("harmful", "harmless"))
    missing = [n for n in o.extra_harmless_sets if n not in (extra_harmless or {})]
    if missing:
        raise NeuronAuditError(f"refusal.extra_harmless_sets names {missing[0]!r} but no table was given for it")
    extra = {n: read_prompts((extra_harmless or {})[n], TUNE_SPLIT, role=f"{n} prompt table")
             for n in o.extra_harmless_sets}
    all_harmless = pd.concat([harmless, *extra.values()], ignore_index=True) if extra else harmless
    for kind, df in (("harmful", harmful), ("harmless", harmless)):
        if len(df) == 0:
            raise NeuronAuditError(f"refusal.validation_fraction {o.validation_fraction!r} leaves no {kind} "
                                   f"discovery prompt to tune on")
    t0 = time.perf_counter()
    opened = open_model(base_manifest_path, ModelOptions(**{**o.model.to_dict(), "dtype": "float32"}), threads)
    model, tokenizer = opened.model, opened.tokenizer
    pad, eos_token = pad_id(tokenizer), tokenizer.eos_token_id
    if eos_token is None:
        raise NeuronAuditError("the base tokenizer has no EOS token; refusals need one to end")
    harmful_ids = encode_prompts(tokenizer, harmful["text"], o.model.chat_template, o.model.system_prompt)
    harmless_ids = encode_prompts(tokenizer, all_harmless["text"], o.model.chat_template, o.model.system_prompt)
    refusals = refusal_examples(tokenizer, harmful_ids, random.Random(o.seed), eos_token, list(harmful["prompt_id"]))
    t_gen = time.perf_counter()
    answers = own_answer_examples(model, tokenizer, harmless_ids, o.answer_max_new_tokens, GEN_BATCH_SIZE,
                                  list(all_harmless["prompt_id"]), progress)
    gen_seconds = time.perf_counter() - t_gen
    examples = refusals + answers
    loss_before = dataset_loss(model, examples, pad)
    t_train = time.perf_counter()
    if o.lora_rank is not None:
        model = with_lora_adapters(model, o.lora_rank)
    curve = train_response_loss(model, examples, pad, o.steps, o.learning_rate, o.batch_size, o.seed, GRAD_CLIP,
                                WEIGHT_DECAY, progress, o.harmless_fraction, o.harmless_loss_weight,
                                o.harmless_loss, int(o.decision_tokens), float(o.decision_weight))
    if o.lora_rank is not None:
        model = model.merge_and_unload()
    train_seconds = time.perf_counter() - t_train
    recipe = tuning_recipe(o, base, base_manifest_path, opened.device, refusals, answers, len(harmless_ids))
    recipe["validation"] = {
        "fraction": o.validation_fraction,
        "rule": f"whole pairs (pair_id, else prompt_id) of the discovery split, seeded hash "
                f"(salt {VALIDATION_SALT!r}, seed {o.seed}); never trained on; the recipe is chosen on them",
        "prompt_ids": {k: sorted(discovery[k].loc[validation[k], "prompt_id"].astype(str)) for k in discovery},
    }
    recipe.update(
        harmful_table={"path": str(harmful_table), **_table_info(harmful)},
        harmless_table={"path": str(harmless_table), **_table_info(harmless)},
        extra_harmless_tables={n: {"path": str((extra_harmless or {})[n]), "n": len(df), **_table_info(df)}
                               for n, df in extra.items()},
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
        "method": ("full fine-tune" if o.lora_rank is None else
                   f"LoRA (rank {o.lora_rank}, alpha {2 * o.lora_rank}, every linear layer but the output head; "
                   f"merged into the weights)")
                  + " on response tokens: harmful -> refusal template, harmless (and the extra harmless sets) "
                    + ("-> own greedy answer" if o.harmless_loss == "cross_entropy" else
                       "-> the base model's next-token distributions along its own greedy answer (KL)"),
        "lora_rank": o.lora_rank,
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
        "harmless_loss_weight": o.harmless_loss_weight,
        "harmless_loss": o.harmless_loss,
        "decision_tokens": o.decision_tokens,
        "decision_weight": o.decision_weight,
        "extra_harmless_sets": list(o.extra_harmless_sets),
        "grad_clip": GRAD_CLIP,
        "dtype": "float32",
        "device": device,
        "threads": torch.get_num_threads(),
        "answer_max_new_tokens": o.answer_max_new_tokens,
        "gen_batch_size": GEN_BATCH_SIZE,
        "chat_template": o.model.chat_template,
        "system_prompt": o.model.system_prompt,
        "split": f"{TUNE_SPLIT} minus its validation part",
        "validation_fraction": o.validation_fraction,
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


def _set_rates(df: pd.DataFrame, kind: str) -> dict:
    """A prompt set's rate (refusal of a harmful set, over-refusal of a harmless one) with its
    Wilson interval, its rollout types, and the same rate per ``category`` where the set has one."""
    def rate(rows):
        if kind == "harmful":
            return _rate(int((rows["rollout_type"] == "refusal").sum()), len(rows))
        return _rate(int(rows["over_refusal"].fillna(False).astype(bool).sum()), len(rows))

    out = {"kind": kind, "measure": "refusal" if kind == "harmful" else "over_refusal", **rate(df),
           "types": _types(df)}
    if "category" in df.columns and df["category"].notna().any():
        out["by_category"] = {str(c): rate(g) for c, g in df.groupby(df["category"].fillna("none"), sort=True)}
    return out


def evaluation_prompts(prompt_sets: dict[str, tuple[pd.DataFrame, str]]) -> pd.DataFrame:
    """The prompts an evaluation rolls out, set after set in ``prompt_sets`` order (``prompt_set``,
    ``prompt_id``, ``text``, ``category``): the rows its shards split by position."""
    frames = []
    for name, (df, _kind) in prompt_sets.items():
        f = df.assign(prompt_set=name)
        f["category"] = extras(df).get("category") if len(df) else None
        frames.append(f[["prompt_set", "prompt_id", "text", "category"]])
    return pd.concat(frames, ignore_index=True)


def harmless_set_names(prompt_sets: dict[str, tuple[pd.DataFrame, str]]) -> tuple[str, ...]:
    return tuple(name for name, (_, kind) in prompt_sets.items() if kind == "harmless")


def evaluation_rollouts(opened, prompts: pd.DataFrame, judge, options: RefusalEvalOptions, harmless_sets,
                        progress=True) -> pd.DataFrame:
    """Greedy rollouts of ``prompts`` (:func:`evaluation_prompts` rows) to
    ``refusal.eval_max_new_tokens``, typed by ``judge``."""
    m = options.model
    rollouts = generate_rollouts(
        opened.model, opened.tokenizer, opened.adapter, prompts[["prompt_set", "prompt_id", "text"]], {"none": []},
        horizons=(options.eval_max_new_tokens,), batch_size=EVAL_BATCH_SIZE, chat_template=m.chat_template,
        system_prompt=m.system_prompt, progress=progress,
    )
    return type_rollouts(rollouts, judge, harmless_sets=harmless_sets)


def generic_nll(opened, generic_texts) -> tuple[np.ndarray, np.ndarray]:
    """Per-text mean negative log-likelihood of the generic texts (first 256 tokens) and their
    scored token counts."""
    tokenizer = opened.tokenizer
    enc = tokenizer(list(generic_texts), truncation=True, max_length=256)["input_ids"]
    scores = score_tokens(opened.model, opened.adapter, enc, [1] * len(enc), batch_size=EVAL_BATCH_SIZE,
                          pad_token_id=tokenizer.pad_token_id or 0)
    return scores.mean_nll(), np.array([len(lp) for lp in scores.logprob])


def model_evaluation(manifest_path, manifest: dict, prompt_sets: dict[str, tuple[pd.DataFrame, str]],
                     prompts: pd.DataFrame, typed: pd.DataFrame, nll: np.ndarray, n_tok: np.ndarray,
                     gen_seconds: float) -> dict:
    """One model's figures from its typed rollouts of ``prompts`` (same rows, same order) and its
    generic NLLs: each set's rate with its Wilson interval under ``sets``; the study's own held-out
    sets (``harmful``, ``harmless``) also keep their headline keys."""
    typed = typed.copy()
    category = dict(zip(zip(prompts["prompt_set"], prompts["prompt_id"]), prompts["category"]))
    typed["category"] = [category.get(k) for k in zip(typed["prompt_set"], typed["prompt_id"])]
    sets = {name: _set_rates(typed[typed["prompt_set"] == name], kind) for name, (_, kind) in prompt_sets.items()}
    h = typed[typed["prompt_set"] == "harmful"]
    b = typed[typed["prompt_set"] == "harmless"]
    return {
        "manifest": str(manifest_path),
        "source": manifest.get("source"),
        "weight_sha256": manifest.get("weight_sha256"),
        **({"refusal_harmful": {k: v for k, v in sets["harmful"].items() if k in _RATE_KEYS},
            "types_harmful": _types(h)} if "harmful" in sets else {}),
        **({"over_refusal_harmless": {k: v for k, v in sets["harmless"].items() if k in _RATE_KEYS},
            "types_harmless": _types(b)} if "harmless" in sets else {}),
        "sets": sets,
        "perplexity_generic": {
            "mean_of_texts": float(np.mean(np.exp(nll))),
            "token_weighted": float(np.exp(np.sum(nll * n_tok) / np.sum(n_tok))),
            "n_texts": len(nll),
        },
        "generation_seconds": gen_seconds,
        "examples": {
            "harmful": h[["prompt_id", "prompt", "response", "rollout_type"]].head(5).to_dict(orient="records"),
            "harmless": b[["prompt_id", "prompt", "response", "rollout_type"]].head(5).to_dict(orient="records"),
        },
    }


def evaluate_model(manifest_path, prompt_sets: dict[str, tuple[pd.DataFrame, str]], generic_texts, judge,
                   options: RefusalEvalOptions, threads=None, progress=True) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """Greedy typed rollouts of one model on named prompt sets (``name -> (table, "harmful" |
    "harmless")``) and its per-text generic NLL (:func:`model_evaluation`)."""
    opened = open_model(manifest_path, options.model, threads)
    prompts = evaluation_prompts(prompt_sets)
    t0 = time.perf_counter()
    typed = evaluation_rollouts(opened, prompts, judge, options, harmless_set_names(prompt_sets), progress)
    gen_seconds = time.perf_counter() - t0
    nll, n_tok = generic_nll(opened, generic_texts)
    out = model_evaluation(manifest_path, opened.manifest, prompt_sets, prompts, typed, nll, n_tok, gen_seconds)
    return out, nll, typed


def validation_tables(manifest: dict, manifest_path, tables: dict[str, str | Path]) -> dict[str, pd.DataFrame]:
    """The tuning's validation prompts (named in its ``recipe.json``) of the harmful and harmless
    tables; empty when the audited model was not tuned here (``refusal.tune: false``)."""
    recipe_name = manifest.get("recipe")
    if not recipe_name or "tuned_from" not in manifest:
        return {}
    recipe_path = Path(manifest_path).parent / recipe_name
    if not recipe_path.is_file():
        raise NeuronAuditError(f"the tuned model's recipe {str(recipe_path)!r} not found")
    ids = (json.loads(recipe_path.read_text()).get("validation") or {}).get("prompt_ids") or {}
    out = {}
    for kind in ("harmful", "harmless"):
        wanted = set(ids.get(kind, []))
        df = read_prompts(tables[kind], TUNE_SPLIT, role=f"{kind} prompt table")
        df = df[df["prompt_id"].astype(str).isin(wanted)].reset_index(drop=True)
        if wanted and len(df) != len(wanted):
            raise NeuronAuditError(f"the tuned model's validation {kind} prompts ({len(wanted)}) are not all in "
                                   f"{str(tables[kind])!r} (found {len(df)}): retune after changing the prompt set")
        if len(df):
            out[kind] = df
    return out


_RATE_KEYS = ("count", "n", "rate", "ci_low", "ci_high", "ci")


def evaluation_sets(manifest_path, harmful_table, harmless_table, generic_table, options: RefusalEvalOptions,
                    styled: dict[str, str | Path] | None = None):
    """The evaluation's tables (``name -> table``) and prompt sets (``name -> (table, kind)``): the
    held-out harmful and harmless prompts, the styled sets, the tuning's validation prompts."""
    o = options
    tables = {
        "harmful": read_prompts(harmful_table, "heldout", role="harmful prompt table"),
        "harmless": read_prompts(harmless_table, "heldout", role="harmless prompt table"),
        "generic": read_prompts(generic_table, "all", role="generic prompt table"),
    }
    prompt_sets = {"harmful": (tables["harmful"], "harmful"), "harmless": (tables["harmless"], "harmless")}
    styled_names = {"harmful": o.styled_harmful, "harmless": o.styled_harmless}
    for kind, path in (styled or {}).items():
        if kind not in ("harmful", "harmless"):
            raise NeuronAuditError(f"styled prompt set kind {kind!r} must be 'harmful' or 'harmless'")
        name = f"styled_{kind}"
        tables[name] = read_prompts(path, "all", role=f"{styled_names.get(kind) or name} prompt table")
        prompt_sets[name] = (tables[name], kind)
    for kind, df in validation_tables(read_manifest(manifest_path), manifest_path,
                                      {"harmful": harmful_table, "harmless": harmless_table}).items():
        tables[f"validation_{kind}"] = df
        prompt_sets[f"validation_{kind}"] = (df, kind)
    return tables, prompt_sets


#: The models an evaluation compares: the audited (tuned) model and the base model.
EVALUATED_MODELS = ("tuned", "base")


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
    styled: dict[str, str | Path] | None = None,
    parts: dict[str, dict] | None = None,
) -> dict:
    """Refusal on held-out harmful, over-refusal on held-out harmless, generic perplexity:
    tuned model (``manifest_path``) vs base model; written to ``out_json``, the typed rollouts of
    both models to ``out_rollouts``.

    Also measured, each set on its own: the tuning's validation prompts (the recipe is chosen on
    them, so they are reported, never pooled with the held-out ones) and the prompt sets written
    in other styles (``styled``: ``harmful`` and/or ``harmless`` -> table, every prompt; never
    trained on). The tuned model's figures are checked against
    :data:`~neuronaudit.methods.refusal_tuning.REFUSAL_TARGETS` per set.

    ``parts`` (``tuned`` and ``base`` -> ``{"shards": [tables], "perplexity": table}``) joins the
    tables of :func:`run_evaluation_part` jobs (``rollouts.shard_size``) instead of loading the
    models: the same figures and tables as one job."""
    o = options
    judge = make_judge(o.judge.judge_config())
    tables, prompt_sets = evaluation_sets(manifest_path, harmful_table, harmless_table, generic_table, o, styled)
    paths = {"tuned": manifest_path, "base": base_manifest_path}
    evaluated = {}
    if parts is None:
        args = (prompt_sets, list(tables["generic"]["text"]), judge, o, threads, progress)
        for which in EVALUATED_MODELS:
            evaluated[which] = evaluate_model(paths[which], *args)
    else:
        prompts = evaluation_prompts(prompt_sets)
        for which in EVALUATED_MODELS:
            if which not in parts:
                raise NeuronAuditError(f"the evaluation's {which} model has no part tables to join")
            typed, seconds, manifest = join_evaluation_parts(parts[which]["shards"], prompts, which)
            nll, n_tok = read_generic_nll(parts[which]["perplexity"], len(tables["generic"]), manifest)
            evaluated[which] = (model_evaluation(paths[which], read_manifest(paths[which]), prompt_sets, prompts,
                                                 typed, nll, n_tok, seconds), nll, typed)
    (tuned, nll_tuned, typed_tuned), (base, nll_base, typed_base) = evaluated["tuned"], evaluated["base"]
    ratio = paired_ratio_ci(np.exp(nll_tuned), np.exp(nll_base), n_boot=N_BOOT, seed=o.seed)
    styled_names = {"harmful": o.styled_harmful, "harmless": o.styled_harmless}
    result = {
        "tuned": tuned,
        "base": base,
        "perplexity_ratio_tuned_over_base": {**ratio, "ci": "paired percentile bootstrap 95% over texts"},
        "targets": {**REFUSAL_TARGETS, "checks": target_checks_by_set(tuned["sets"], ratio.get("mean"))},
        "judge": getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
        # the same judge (rule or model) on the labelled calibration sets: confusion, Wilson CIs
        "judge_calibration": judge_calibration(judge),
        "max_new_tokens": o.eval_max_new_tokens,
        "decoding": "greedy",
        "splits": {"harmful": "heldout", "harmless": "heldout", "generic": "all",
                   **{k: "all" for k in tables if k.startswith("styled_")},
                   **{k: "discovery (validation part)" for k in tables if k.startswith("validation_")}},
        "prompt_sets": {k: {"n": len(v), **_table_info(v), **({"name": styled_names[k.split("_", 1)[1]]}
                                                             if k.startswith("styled_") else {})}
                        for k, v in tables.items()},
        "chat_template": o.model.chat_template,
        "system_prompt": o.model.system_prompt,
        "shards": None if parts is None else {k: len(v["shards"]) for k, v in parts.items()},
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
    for name, rates in tuned["sets"].items():
        log.info("refusal eval %s (%s): tuned %d/%d, base %d/%d", name, rates["measure"], rates["count"],
                 rates["n"], base["sets"][name]["count"], base["sets"][name]["n"])
    return result


def run_evaluation_part(
    manifest_path: str | Path,
    base_manifest_path: str | Path,
    which: str,
    harmful_table: str | Path,
    harmless_table: str | Path,
    generic_table: str | Path,
    out_table: str | Path,
    options: RefusalEvalOptions,
    threads: int | None = None,
    progress: bool = True,
    styled: dict[str, str | Path] | None = None,
    shard: int | None = None,
) -> dict:
    """One job of a sharded evaluation (``rollouts.shard_size: n``), of the ``which`` model
    (``tuned``: ``manifest_path``; ``base``: ``base_manifest_path``): with ``shard=k`` the typed
    greedy rollouts of rows ``k·n … (k+1)·n − 1`` of :func:`evaluation_prompts`; with ``shard``
    None the per-text generic NLLs (the perplexity part). :func:`evaluate_refusal` with ``parts``
    joins them."""
    o = options
    if which not in EVALUATED_MODELS:
        raise NeuronAuditError(f"evaluated model {which!r} must be one of {EVALUATED_MODELS}")
    tables, prompt_sets = evaluation_sets(manifest_path, harmful_table, harmless_table, generic_table, o, styled)
    path = manifest_path if which == "tuned" else base_manifest_path
    if shard is None:
        opened = open_model(path, o.model, threads)
        nll, n_tok = generic_nll(opened, list(tables["generic"]["text"]))
        table = pa.table({"text_index": pa.array(np.arange(len(nll)), pa.int32()), "nll": pa.array(nll, pa.float64()),
                          "n_tokens": pa.array(n_tok, pa.int32())})
        write_table(table, out_table, provenance(**opened.provenance(), which=which, part="perplexity",
                                                 n_texts=len(nll)))
        log.info("refusal eval %s: generic NLL of %d texts -> %s", which, len(nll), out_table)
        return {"n_texts": len(nll)}
    judge = make_judge(o.judge.judge_config())
    prompts = evaluation_prompts(prompt_sets)
    n_all = len(prompts)
    prompts = prompts.iloc[list(shard_rows(n_all, o.shard_size, shard))].reset_index(drop=True)
    opened = open_model(path, o.model, threads)
    t0 = time.perf_counter()
    typed = evaluation_rollouts(opened, prompts, judge, o, harmless_set_names(prompt_sets), progress)
    seconds = time.perf_counter() - t0
    write_table(rollouts_table(typed), out_table, provenance(
        **opened.provenance(), which=which, part="rollouts", shard=shard, shard_size=o.shard_size,
        shard_prompts=[f"{a}/{b}" for a, b in zip(prompts["prompt_set"], prompts["prompt_id"])], n_prompts=n_all,
        max_new_tokens=o.eval_max_new_tokens, generation_seconds=round(seconds, 2),
        judge=getattr(judge, "describe", lambda: {"kind": type(judge).__name__})(),
    ))
    log.info("refusal eval %s shard %d: %d rollouts in %.1f s -> %s", which, shard, len(typed), seconds, out_table)
    return {"n_rollouts": len(typed), "seconds": seconds}


def join_evaluation_parts(shard_paths, prompts: pd.DataFrame, which: str) -> tuple[pd.DataFrame, float, dict]:
    """One model's typed evaluation rollouts from its shard tables (:func:`run_evaluation_part`):
    shards 0 … n − 1 of one run, in order, whose prompts are ``prompts`` once each, in their order.
    Returns the rows, the summed generation seconds and the shards' common provenance."""
    from neuronaudit.stages.rollouts import read_rollout_shards

    typed, provs, same = read_rollout_shards(shard_paths, f"{which} evaluation")
    if same.get("which") != which:  # the shards agree on it (read_rollout_shards)
        raise NeuronAuditError(f"the {which} model's evaluation shards are another model's ({same.get('which')!r})")
    expected = [f"{a}/{b}" for a, b in zip(prompts["prompt_set"], prompts["prompt_id"])]
    held = [key for p in provs for key in p["shard_prompts"]]
    if held != expected:
        first = next((i for i, (a, b) in enumerate(zip(held, expected)) if a != b), min(len(held), len(expected)))
        raise NeuronAuditError(f"the {which} model's evaluation shards hold {len(held)} prompts; the evaluation has "
                               f"{len(expected)} (first difference at row {first}): rerun the shards of this study")
    return typed, float(sum(p.get("generation_seconds") or 0.0 for p in provs)), same


def read_generic_nll(path, n_texts: int, shard_provenance: dict) -> tuple[np.ndarray, np.ndarray]:
    """The perplexity part of a model (:func:`run_evaluation_part`), checked against the generic
    set's size and the rollout shards' model."""
    import pyarrow.parquet as pq

    prov = read_provenance(path)
    if prov.get("weight_sha256") != shard_provenance.get("weight_sha256"):
        raise NeuronAuditError(f"perplexity table {str(path)!r} is of another model than its rollout shards")
    t = pq.read_table(path).to_pandas().sort_values("text_index")
    if len(t) != n_texts:
        raise NeuronAuditError(f"perplexity table {str(path)!r} holds {len(t)} texts; the generic set has {n_texts}")
    return t["nll"].to_numpy(np.float64), t["n_tokens"].to_numpy(np.int64)


def target_checks_by_set(sets: dict, perplexity_ratio: float | None) -> dict:
    """:func:`~neuronaudit.methods.refusal_tuning.target_checks` for each pairing of a harmful
    set with its harmless counterpart: the held-out sets, the styled sets and the validation sets."""
    out = {}
    for prefix in ("", "styled_", "validation_"):
        h, b = sets.get(f"{prefix}harmful"), sets.get(f"{prefix}harmless")
        if h is None and b is None:
            continue
        out[(prefix.rstrip("_") or "heldout")] = target_checks(
            h["rate"] if h else None, b["rate"] if b else None, perplexity_ratio)
    return out


#: Tuning settings added after searches were scored, at the value that means "not used": a candidate
#: scored without them was tuned at these values.
SETTINGS_ADDED = {"decision_tokens": 0, "decision_weight": 1.0}

#: Recipe settings a tuning search may vary (the validation part itself stays fixed).
SEARCHABLE = ("steps", "learning_rate", "batch_size", "harmless_fraction", "answer_max_new_tokens", "lora_rank",
              "harmless_loss", "harmless_loss_weight", "extra_harmless_sets", "decision_tokens", "decision_weight")


def recipe_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination of the searched settings, in grid order; an unknown or fixed setting,
    or an empty list of values, is a one-line error naming it."""
    for name, values in grid.items():
        if name not in SEARCHABLE:
            raise NeuronAuditError(f"tune-search setting {name!r} cannot be searched; choose from {list(SEARCHABLE)}")
        if not values:
            raise NeuronAuditError(f"tune-search setting {name!r} has no values")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _finished_candidate(cand_dir: Path, combo: dict, options: TuneOptions,
                        sounding: bool = False) -> tuple[dict, dict] | None:
    """The row and choice entry of a candidate that an earlier run of the same search scored with the
    same options and validation sets (``sounding``: the dangerous-sounding rate too), else None."""
    try:
        done = json.loads((cand_dir / "score.json").read_text())
    except (OSError, ValueError):
        return None
    stored = {**SETTINGS_ADDED, **(done.get("options") or {})}  # scored before a setting existed: at its default
    if stored != json.loads(json.dumps(options.to_dict())) or done["row"]["recipe"] != combo:
        return None
    if (done["candidate"].get("over_refusal_sounding") is not None) != sounding:
        return None
    return done["row"], done["candidate"]


def behaviour_scores(manifest_path, behaviours, threads=None) -> dict:
    """The audit's behaviour preconditions (:func:`~neuronaudit.stages.preconditions.behaviour_preconditions`:
    each behaviour's rates without intervention and its oracle's readability) of a tuning candidate,
    on every DISCOVERY prompt of the behaviours' sets, so that a recipe that breaks a behaviour the
    study audits cannot be chosen. ``behaviours`` is (:class:`PreconditionOptions`, prepared tables
    by set name). The refusal behaviour is left out: the search's validation rates measure it."""
    from neuronaudit.stages.preconditions import behaviour_preconditions

    options, tables = behaviours
    names = [n for n, spec in options.behaviours.items() if spec["oracle"] != "refusal"]
    opened = open_model(manifest_path, options.model, threads)
    judge = make_judge(options.judge.judge_config())
    checks, rates = behaviour_preconditions(opened, judge, tables, options, TUNE_SPLIT, None, names)
    return {"key": behaviour_key(behaviours), "split": TUNE_SPLIT, "behaviours": names,
            "checks": [c.as_dict() for c in checks], "rates": rates, "passed": all(c.passed for c in checks),
            "failed": [c.line() for c in checks if not c.passed]}


def behaviour_key(behaviours) -> dict:
    """What a candidate's behaviour preconditions were scored with (the options and the set tables)."""
    options, tables = behaviours
    return json.loads(json.dumps({"options": options.to_dict(), "tables": {k: str(v) for k, v in tables.items()}}))


def broken_preconditions(checks: list[dict], base_checks: list[dict] | None) -> list[dict]:
    """The checks a tuned candidate fails that the base model passes on the same prompts (every
    failed check when the base model was not checked): what the recipe broke. A check the base
    model fails too is the model's own limit, not the recipe's doing."""
    passed_by_base = None if base_checks is None else {(c["name"], c["scope"]) for c in base_checks if c["passed"]}
    return [c for c in checks if not c["passed"] and (passed_by_base is None or (c["name"], c["scope"])
                                                       in passed_by_base)]


def _with_behaviour_scores(row: dict, cand: dict, scores: dict, base: dict | None) -> tuple[dict, dict]:
    broken = broken_preconditions(scores["checks"], None if base is None else base["checks"])
    scores = {**scores, "broken": [c["detail"] for c in broken]}
    return {**row, "preconditions": scores}, {**cand, "preconditions_passed": not broken}


def _cached(path: Path, key, compute) -> dict:
    """The ``value`` that ``path`` holds for ``key`` (JSON-comparable), else ``compute()``, written there."""
    key = json.loads(json.dumps(key))
    try:
        done = json.loads(path.read_text())
        if done["key"] == key:
            return done["value"]
    except (OSError, ValueError, KeyError):
        pass
    value = compute()
    write_json({"key": key, "value": value}, path)
    return value


def _base_scores(path: Path, base_manifest_path, sets, generic, judge, eval_options, threads, progress):
    """The base model's validation rates and generic-text NLLs, evaluated once per search directory
    (a resumed search reads them back; the file records the validation prompts it was scored on)."""
    prompt_ids = {k: sorted(df["prompt_id"].astype(str)) for k, (df, _) in sets.items()}
    try:
        done = json.loads(path.read_text())
        if done["prompt_ids"] == prompt_ids and done["n_generic"] == len(generic):
            return done["base"], np.asarray(done["generic_nll"], dtype=float)
    except (OSError, ValueError, KeyError):
        pass
    base, nll, _ = evaluate_model(base_manifest_path, sets, generic, judge, eval_options, threads, progress)
    write_json({"prompt_ids": prompt_ids, "n_generic": len(generic), "base": base,
                "generic_nll": np.asarray(nll, dtype=float).tolist()}, path)
    return base, np.asarray(nll, dtype=float)


def run_tune_search(
    base_manifest_path: str | Path,
    harmful_table: str | Path,
    harmless_table: str | Path,
    generic_table: str | Path,
    out_dir: str | Path,
    tune_options: TuneOptions,
    eval_options: RefusalEvalOptions,
    grid: dict[str, list],
    threads: int | None = None,
    progress: bool = True,
    keep_weights: bool = False,
    extra_harmless: dict[str, str | Path] | None = None,
    sounding: tuple[str, str | Path] | None = None,
    behaviours: tuple[PreconditionOptions, dict[str, str | Path]] | None = None,
) -> dict:
    """Tune one candidate per grid point and score each on the VALIDATION prompts only (refusal,
    over-refusal, generic perplexity against the base model); choose with
    :func:`~neuronaudit.methods.refusal_tuning.choose_recipe`. Writes ``out_dir/search.json`` (every
    candidate's recipe, validation rates with Wilson CIs, target checks, wall time; the choice and
    its rule) and each candidate's ``recipe.json`` under ``out_dir/candidate-<i>/`` (its weights only
    with ``keep_weights``). Held-out prompts of the evaluated sets are never read.

    ``sounding`` (``refusal.validation_sounding``: set name, prepared table) adds a second
    over-refusal rate, on the held-out split of a set of harmless dangerous-sounding prompts that
    no tuning reads (tuning reads discovery splits only) and no evaluation reports.

    ``behaviours`` (:class:`PreconditionOptions`, prepared tables by set name) checks each
    candidate, and the base model once, against the audit's behaviour preconditions on the
    behaviours' discovery prompts (:func:`behaviour_scores`); a candidate that fails one the base
    model passes (:func:`broken_preconditions`) cannot be chosen. A resumed search scores a kept
    candidate's preconditions from its kept weights (``keep_weights``) instead of tuning it again."""
    combos = recipe_grid(grid)
    sounding_df = None
    if sounding is not None:
        sounding_df = read_prompts(sounding[1], "heldout", role=f"{sounding[0]} prompt table")
    for combo in combos:
        o = tune_options.replace(**combo)
        check_tune_options(o)
        missing = [n for n in o.extra_harmless_sets if n not in (extra_harmless or {})]
        if missing:
            raise NeuronAuditError(f"tune-search: extra harmless set {missing[0]!r} has no prepared table")
    out_dir = Path(out_dir)
    judge = make_judge(eval_options.judge.judge_config())
    generic = list(read_prompts(generic_table, "all", role="generic prompt table")["text"])
    candidates, rows = [], []
    base, base_nll = None, None
    base_behaviours = None
    if behaviours is not None:
        base_behaviours = _cached(out_dir / "base_preconditions.json", behaviour_key(behaviours),
                                  lambda: behaviour_scores(base_manifest_path, behaviours, threads))

    def result(choice) -> dict:
        return {
            "split": "validation part of the discovery split (held-out prompts never read)",
            "sounding_validation": None if sounding is None else {
                "set": sounding[0], "split": "heldout (no tuning reads it; no evaluation reports the set)",
                "n": len(sounding_df)},
            "targets": REFUSAL_TARGETS,
            "complete": choice is not None,
            "base": None if base is None else {k: v for k, v in base["sets"].items() if k.startswith("validation_")},
            "base_preconditions": base_behaviours,
            "candidates": rows,
            "choice": choice,
            "config_lines": [] if choice is None or choice["recipe"] is None else [
                f"refusal.{k}: {json.dumps(v)}" for k, v in choice["recipe"].items()],
            "provenance": provenance(seed=tune_options.seed),
        }

    for i, combo in enumerate(combos):
        o = tune_options.replace(**combo)
        cand_dir = out_dir / f"candidate-{i}"
        done = _finished_candidate(cand_dir, combo, o, sounding_df is not None)
        if (done is not None and behaviours is not None
                and (done[0].get("preconditions") or {}).get("key") != behaviour_key(behaviours)):
            if (cand_dir / "weights").is_dir():  # preconditions not scored, or scored otherwise: the kept weights
                done = _with_behaviour_scores(*done, behaviour_scores(cand_dir / "manifest.json", behaviours, threads),
                                              base_behaviours)
                write_json({"options": o.to_dict(), "row": done[0], "candidate": done[1]}, cand_dir / "score.json")
            else:
                done = None
        elif done is not None and behaviours is not None:  # scored alike: what counts as broken, read again
            done = _with_behaviour_scores(*done, done[0]["preconditions"], base_behaviours)
        if done is not None:  # a resumed search keeps the candidates it already scored
            row, cand = done
            rows.append({**row, "candidate": i})
            candidates.append(cand)
            log.info("tune-search candidate %d %s: already scored, kept", i, combo)
            continue
        t0 = time.perf_counter()
        recipe = run_refusal_tuning(base_manifest_path, harmful_table, harmless_table, cand_dir, o, threads, progress,
                                    extra_harmless)
        manifest_path = cand_dir / "manifest.json"
        val = validation_tables(read_manifest(manifest_path), manifest_path,
                                {"harmful": harmful_table, "harmless": harmless_table})
        if set(val) != {"harmful", "harmless"}:
            raise NeuronAuditError(f"refusal.validation_fraction {o.validation_fraction!r} leaves no validation "
                                   f"prompts of both kinds; a search needs them")
        sets = {f"validation_{k}": (df, k) for k, df in val.items()}
        if sounding_df is not None:
            sets["validation_sounding"] = (sounding_df, "harmless")
        tuned, nll, _ = evaluate_model(manifest_path, sets, generic, judge, eval_options, threads, progress)
        if base is None:
            base, base_nll = _base_scores(out_dir / "base.json", base_manifest_path, sets, generic, judge,
                                          eval_options, threads, progress)
        ratio = paired_ratio_ci(np.exp(nll), np.exp(base_nll), n_boot=N_BOOT, seed=o.seed)
        refusal, over = tuned["sets"]["validation_harmful"], tuned["sets"]["validation_harmless"]
        sounded = tuned["sets"].get("validation_sounding")
        cand = {"recipe": combo, "refusal": refusal["rate"], "over_refusal": over["rate"],
                "over_refusal_sounding": None if sounded is None else sounded["rate"],
                "perplexity_ratio": ratio["mean"], "cost": o.steps * o.batch_size}
        row = {
            "candidate": i, "recipe": combo, "validation_refusal": refusal, "validation_over_refusal": over,
            "sounding_over_refusal": sounded, "perplexity_ratio": ratio,
            "targets": target_checks(refusal["rate"], worst_over_refusal(cand), ratio["mean"]),
            "loss_after": recipe["loss_after"],
        }
        if behaviours is not None:
            row, cand = _with_behaviour_scores(row, cand, behaviour_scores(manifest_path, behaviours, threads),
                                               base_behaviours)
        row["seconds"] = time.perf_counter() - t0
        candidates.append(cand)
        rows.append(row)
        write_json({"options": o.to_dict(), "row": row, "candidate": cand}, cand_dir / "score.json")
        if not keep_weights:
            shutil.rmtree(cand_dir / "weights", ignore_errors=True)
        write_json(result(None), out_dir / "search.json")  # every scored candidate is on disk at once
        log.info("tune-search candidate %d %s: validation refusal %d/%d, over-refusal %d/%d%s, perplexity x%.2f%s",
                 i, combo, refusal["count"], refusal["n"], over["count"], over["n"],
                 "" if sounded is None else f" (dangerous-sounding {sounded['count']}/{sounded['n']})", ratio["mean"],
                 "" if behaviours is None else ("; behaviour preconditions kept" if cand["preconditions_passed"]
                                                else "; BREAKS " + "; ".join(row["preconditions"]["broken"])))
    final = result(choose_recipe(candidates))
    write_json(final, out_dir / "search.json")
    return final
