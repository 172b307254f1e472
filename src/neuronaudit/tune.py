"""A refusal-tuned reference model, and its evaluation.

The refusal studies (SCIENCE.md section 1 "Behaviours: refusal", sections 2–3) need a model
that refuses harmful requests. Stock SmolLM2-135M-Instruct mostly answers them, so the study
fine-tunes it into a reference refuser:

* **Data** (all from the DISCOVERY split, so held-out prompts stay unseen):
  harmful prompts → a refusal, one of :data:`REFUSAL_TEMPLATES` chosen per prompt by a seeded
  RNG; harmless prompts (style-matched to the harmful ones, SCIENCE.md "Common ground") → the
  base model's *own* greedy answer (batched generation, ``max_new_tokens`` tokens). Training on
  its own answers keeps benign behaviour where it was, so the contrast the audit sees is the
  refusal, not a change of style. Prompts go through the chat template as everywhere else.
* **Objective**: next-token cross-entropy on the response tokens only (prompt and padding
  positions carry label ``-100``); a response that ended with EOS keeps its EOS as a target.
* **Optimiser**: AdamW (``lr`` 3e-5, no weight decay by default), batch 8, ``steps`` 100,
  gradient-norm clipping at 1.0, constant learning rate, fixed seed (data order, template
  choice, torch). Full fine-tune in float32 on CPU. Measured for SmolLM2-135M-Instruct on 2
  cores (threads=2, nothing else running): own answers 42 s, 100 steps 419 s (4.2 s/step),
  541 s in all; training is deterministic (a rerun reproduced the loss curve step for step).
  Result: 58/62 held-out harmful refused (base 1/62), but 15/62 held-out style-matched harmless
  over-refused (base 0/62), generic perplexity ×1.33. ``harmless_fraction`` 0.625 (5 answers,
  3 refusals per batch) gave 52/62 and 15/62: the over-refusal is not a matter of balance.
* **Outputs** (``out_dir``, written to a temporary directory and renamed at the end):
  ``weights/`` (``save_pretrained`` model + tokenizer), ``manifest.json`` in the format of
  :func:`neuronaudit.models.loading.prepare_model` plus ``tuned_from`` (the base model's source,
  path and weight hash), and ``recipe.json`` (every hyperparameter, seed, data counts and
  hashes, the refusal templates and how often each was used, the training-loss curve, the
  response loss over the whole training set before and after, wall time).

:func:`evaluate_refusal` measures what the tuning bought, greedy and typed by a judge
(:mod:`neuronaudit.judge`): the refusal rate on HELD-OUT harmful prompts, the over-refusal rate
on HELD-OUT harmless prompts (section 3 and "Related anchors": audit over-refusal too), each
with a Wilson 95% interval, and the perplexity on generic text (capability preserved, section
3) for the tuned and the base model, with a paired bootstrap CI of the ratio.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuronaudit.errors import NeuronAuditError

log = logging.getLogger("neuronaudit")

REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that. It could cause serious harm, and it may be illegal.",
    "I'm sorry, but I won't provide that information. Is there something else I can help you with?",
    "I cannot help with this request because it could put people in danger.",
    "Sorry, that's not something I can help with. If you have another question, I'm happy to help.",
    "I'm not able to provide instructions for that. It could hurt people and may break the law.",
    "I must decline this request. Helping with it could lead to real harm.",
    "I apologize, but I can't support this request. If you or someone else is at risk, please "
    "contact local emergency services or a professional for help.",
    "As an AI assistant, I can't help with activities that are harmful or illegal. I'd be glad to "
    "help with something else.",
    "I won't be able to help with that, but I'm happy to answer other questions you may have.",
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training example: the templated prompt and the target response (token ids)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    kind: str  # "refusal" (harmful prompt) | "own_answer" (harmless prompt)
    prompt_id: str = ""
    template: int | None = None  # index into REFUSAL_TEMPLATES for refusals


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``; labels are the input ids
    on response tokens and :data:`IGNORE_INDEX` on prompt and padding positions."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        seq = list(e.prompt_ids) + list(e.response_ids)
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, len(e.prompt_ids) : len(seq)] = torch.tensor(list(e.response_ids))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of a batch."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    labels = batch["labels"].to(device)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def dataset_loss(model, examples: Sequence[Example], pad_token_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean response loss over ``examples`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(examples), batch_size):
            batch = collate(examples[k : k + batch_size], pad_token_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(response_loss(model, batch)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def refusal_examples(
    tokenizer, prompt_ids: Sequence[Sequence[int]], rng: random.Random, eos_token_id: int,
    ids: Sequence[str] | None = None, templates: Sequence[str] = REFUSAL_TEMPLATES,
) -> list[Example]:
    """Harmful prompts mapped to refusal templates chosen by ``rng`` (EOS appended)."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in templates]
    out = []
    for k, p in enumerate(prompt_ids):
        t = rng.randrange(len(templates))
        out.append(Example(tuple(p), tuple(encoded[t]) + (eos_token_id,), "refusal",
                           ids[k] if ids is not None else "", t))
    return out


def own_answer_examples(
    model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16,
    ids: Sequence[str] | None = None, progress: bool = False,
) -> list[Example]:
    """Harmless prompts mapped to the model's own greedy answers (EOS kept when reached)."""
    from tqdm.auto import tqdm

    from neuronaudit.rollouts import eos_ids, generate_tokens, pad_id

    eos, pad = eos_ids(model, tokenizer), pad_id(tokenizer)
    eos_token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos[0]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    answers: dict[int, tuple[int, ...]] = {}
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="own answers", unit="batch", disable=not progress):
        toks, stopped, _ = generate_tokens(
            model, [prompt_ids[i] for i in batch], max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
        )
        for i, t, s in zip(batch, toks, stopped):
            answers[i] = tuple(t) + ((eos_token,) if s else ())
    return [
        Example(tuple(prompt_ids[i]), answers[i], "own_answer", ids[i] if ids is not None else "")
        for i in range(len(prompt_ids))
        if answers[i]
    ]


def batch_composition(batch_size: int, harmless_fraction: float) -> tuple[int, int]:
    """(own answers, refusals) per batch for a ``harmless_fraction`` of ``batch_size``."""
    if isinstance(harmless_fraction, bool) or not 0 < harmless_fraction < 1:
        raise NeuronAuditError(f"refusal tuning harmless_fraction {harmless_fraction!r} must lie in (0, 1)")
    n_harmless = round(batch_size * harmless_fraction)
    if not 0 < n_harmless < batch_size:
        raise NeuronAuditError(
            f"refusal tuning harmless_fraction {harmless_fraction!r} leaves no room for one kind "
            f"in a batch of {batch_size}"
        )
    return n_harmless, batch_size - n_harmless


def train_response_loss(
    model, examples: Sequence[Example], pad_token_id: int, steps: int, lr: float, batch_size: int,
    seed: int, grad_clip: float = 1.0, weight_decay: float = 0.0, progress: bool = False,
    harmless_fraction: float | None = None,
) -> list[dict]:
    """AdamW on the response loss; batches drawn epoch by epoch from a seeded permutation.

    ``harmless_fraction`` (``None``: examples drawn alike, whatever their kind) puts
    ``round(batch_size · harmless_fraction)`` own-answer examples in every batch and refusals in
    the rest, each kind drawn epoch by epoch from its own seeded permutation: a larger share of
    harmless answers holds benign behaviour against over-refusal.

    Returns the per-step log (``step``, ``loss``, ``grad_norm``).
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise NeuronAuditError(f"steps {steps!r}, batch_size {batch_size!r} and lr {lr!r} must be positive")
    if not examples:
        raise NeuronAuditError("no training examples for the refusal tuning")
    pools = [list(range(len(examples)))]
    per_batch = [batch_size]
    if harmless_fraction is not None:
        per_batch = list(batch_composition(batch_size, harmless_fraction))
        pools = [[i for i, e in enumerate(examples) if e.kind == kind] for kind in ("own_answer", "refusal")]
        if not all(pools):
            raise NeuronAuditError("refusal tuning harmless_fraction needs both refusal and own-answer examples")
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    model.train()
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    queues: list[list[int]] = [[] for _ in pools]
    curve = []
    bar = tqdm(range(steps), desc="refusal tuning", unit="step", disable=not progress)
    for step in bar:
        idx = []
        for j, (pool, n) in enumerate(zip(pools, per_batch)):
            while len(queues[j]) < n:
                queues[j] += [pool[i] for i in order_rng.permutation(len(pool))]
            idx += queues[j][:n]
            queues[j] = queues[j][n:]
        loss = response_loss(model, collate([examples[i] for i in idx], pad_token_id))
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        curve.append({"step": step + 1, "loss": value, "grad_norm": grad_norm})
        bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    model.requires_grad_(False)
    return curve


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
    from neuronaudit.io import atomic_path, write_json
    from neuronaudit.models.loading import architecture_shape, load_prepared, read_manifest, weights_sha256
    from neuronaudit.prompts import read_prompt_table
    from neuronaudit.rollouts import encode_prompts, pad_id

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


# --- evaluation ------------------------------------------------------------------------------


def _rate(k: int, n: int) -> dict:
    from neuronaudit.metrics import wilson_interval

    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "n": int(n), "rate": (k / n) if n else math.nan, "ci_low": lo, "ci_high": hi,
            "ci": "wilson 95%"}


def _evaluate_model(manifest_path, harmful, harmless, generic_texts, judge, max_new_tokens, batch_size,
                    dtype, device, chat_template, system_prompt, progress) -> dict:
    from neuronaudit.models.loading import load_prepared
    from neuronaudit.rollouts import generate_rollouts, type_rollouts
    from neuronaudit.scoring import score_tokens

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
    import pandas as pd

    from neuronaudit.io import provenance, write_json, write_table
    from neuronaudit.judge import make_judge
    from neuronaudit.prompts import read_prompt_table
    from neuronaudit.rollouts import rollouts_table

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
