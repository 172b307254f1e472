"""Capability kept under an intervention: perplexity on general text and exact-answer accuracy.

Both CNA (arXiv 2605.12290, "capability preserved") and the keystone-neuron ablation curves
(arXiv 2605.24846, "collapse") need the same two measurements, with and without an
:class:`~neuronaudit.interventions.InterventionPlan`:

``perplexity``  of each general text (e.g. the ``generic`` prompt set, raw text, no chat
                template) under the plan, via :func:`neuronaudit.interventions.scoring.text_perplexity`.
                That scorer treats the first token as the prompt and every later token as
                ``generated``, so an edit at positions ``("prompt", "generated")`` acts on every
                token of the text. Reported as median and mean over texts.
``accuracy``    on task prompts with a deterministic answer (``task_knowledge``: answer +
                aliases; ``task_arithmetic``: integer answer), from greedy generation of at most
                ``max_new_tokens`` (32) new tokens, batched with left padding, the chat template
                applied by :func:`neuronaudit.prompts.render_prompts`, and the plan active during
                the whole generation (its edits say where: CNA and keystone ablations use
                ``("prompt", "generated")``, every prompt token and every generated token).
                Answers are checked by :mod:`neuronaudit.evaluation.oracles` (whole-word match after
                normalisation for knowledge; the answer number, with the prompt's numbers
                treated as echoed operands, for arithmetic).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from transformers import GenerationConfig

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.oracles import (
    arithmetic_correct,
    knowledge_correct,
    numbers_in,
)
from neuronaudit.interventions.capture import length_sorted_batches
from neuronaudit.interventions.generation import neutral_generation_defaults
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.interventions.scoring import text_perplexity
from neuronaudit.prompts import extras, render_prompts, uses_template

DEFAULT_POSITIONS: tuple[str, ...] = ("prompt", "generated")
ANSWER_KINDS = ("knowledge", "arithmetic")


def ablation_plan(
    neurons: Iterable[tuple[int, int]], positions: Sequence[str] = DEFAULT_POSITIONS
) -> InterventionPlan:
    """Scale-0 ablation of ``(layer, neuron)`` pairs at ``positions`` (every token by default)."""
    return InterventionPlan.broadcast(NeuronEdit.ablate(int(l), int(i), tuple(positions)) for l, i in neurons)


def _plan_for_rows(plan: InterventionPlan | None, rows: Sequence[int], n_total: int) -> InterventionPlan | None:
    if plan is None or len(plan.rows) == 1:
        return plan
    if len(plan.rows) != n_total:
        raise NeuronAuditError(
            f"intervention plan has {len(plan.rows)} rows but there are {n_total} prompts; "
            "use one row (broadcast) or one row per prompt"
        )
    return InterventionPlan(tuple(plan.rows[r] for r in rows))


def greedy_config(model, tokenizer, max_new_tokens: int, pad_token_id: int) -> GenerationConfig:
    """An explicit greedy config that stops at the model's or tokenizer's EOS.

    Transformers fills every field left unset here from ``model.generation_config`` (e.g. the
    ``repetition_penalty=1.05`` Qwen2.5-Instruct ships), so :func:`generate_responses` also swaps
    in a default ``GenerationConfig`` for the call: stored settings never change what is measured.
    """
    eos: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            eos.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return GenerationConfig(
        max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
        pad_token_id=int(pad_token_id), eos_token_id=sorted(eos) or None,
    )


def generate_responses(
    model,
    tokenizer,
    adapter,
    prompts: Sequence[str],
    plan: InterventionPlan | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    add_special_tokens: bool = True,
    max_length: int = 256,
) -> list[str]:
    """Greedy continuations of already-rendered ``prompts`` (new tokens only, special tokens
    dropped), in input order. Batches group prompts of similar length; left padding; decoding
    uses :func:`greedy_config`. ``plan`` is one row (broadcast) or one row per prompt. A batch that
    runs out of memory runs as two halves, each padded to the whole batch's width
    (:func:`~neuronaudit.interventions.memory.split_on_oom`)."""
    if len(prompts) == 0:
        return []
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(
            list(prompts), add_special_tokens=add_special_tokens, truncation=True, max_length=max_length
        )["input_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = greedy_config(model, tokenizer, max_new_tokens, pad_id)
        out: list[str] = [""] * len(prompts)

        def run(batch: Sequence[int], part: tuple[int, ...], width: int) -> list[str]:
            # a half of a split batch is padded to the whole batch's width: the same shapes
            enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding="max_length", max_length=width,
                                return_tensors="pt").to(device)
            batch_plan = _plan_for_rows(plan, batch, len(prompts))
            kwargs = dict(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=config,
            )
            with torch.inference_mode(), neutral_generation_defaults(model):
                if batch_plan is not None:
                    with NeuronHooks(adapter, batch_plan):
                        generated = model.generate(**kwargs)
                else:
                    generated = model.generate(**kwargs)
            new = generated[:, enc["input_ids"].shape[1] :]
            return tokenizer.batch_decode(new, skip_special_tokens=True)

        for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
            width = max(len(encoded[i]) for i in batch)
            texts = split_on_oom(functools.partial(run, width=width), batch, "capability answers")
            for r, i in enumerate(batch):
                out[i] = texts[r]
    finally:
        tokenizer.padding_side = previous_side
    return out


def _with_answers(df: pd.DataFrame) -> pd.DataFrame:
    """A prompt table with its ``answer``/``aliases`` as columns (expanding ``extra`` if needed)."""
    if "answer" in df.columns:
        return df
    if "extra" in df.columns:
        ex = extras(df)
        return pd.concat([df, ex[[c for c in ex.columns if c not in df.columns]]], axis=1)
    raise NeuronAuditError(f"task prompts have no 'answer' field; columns: {list(df.columns)}")


def answer_kind(group: str, answers: Sequence) -> str:
    """``arithmetic`` or ``knowledge``: by the group name, else by the answers' type."""
    name = group.lower()
    if "arith" in name:
        return "arithmetic"
    if "knowledge" in name:
        return "knowledge"
    if all(isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, bool) for a in answers):
        return "arithmetic"
    return "knowledge"


def check_answers(responses: Sequence[str], df: pd.DataFrame, kind: str) -> np.ndarray:
    """Boolean correctness of each response against its row of ``df`` (``answer``, ``aliases``)."""
    if kind not in ANSWER_KINDS:
        raise NeuronAuditError(f"answer kind {kind!r} must be one of {ANSWER_KINDS}")
    df = _with_answers(df)
    if len(responses) != len(df):
        raise NeuronAuditError(f"{len(responses)} responses for {len(df)} prompts")
    out = np.zeros(len(df), dtype=bool)
    for r, (response, (_, row)) in enumerate(zip(responses, df.iterrows())):
        if kind == "arithmetic":
            out[r] = arithmetic_correct(response, float(row["answer"]), operands=numbers_in(str(row["text"])))
        else:
            aliases = (row["aliases"] if "aliases" in row and isinstance(row["aliases"], (list, tuple, np.ndarray))
                       else [])
            out[r] = knowledge_correct(response, str(row["answer"]), list(aliases))
    return out


def perplexity_summary(ppl: np.ndarray) -> dict:
    finite = np.asarray(ppl, dtype=float)
    return {
        "median": float(np.median(finite)) if finite.size else math.nan,
        "mean": float(np.mean(finite)) if finite.size else math.nan,
        "n": int(finite.size),
    }


def capability_report(
    model,
    tokenizer,
    adapter,
    generic_texts: Sequence[str],
    task_prompts: Mapping[str, pd.DataFrame],
    plan: InterventionPlan | None = None,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    max_length: int = 256,
    answer_kinds: Mapping[str, str] | None = None,
    return_responses: bool = False,
    generate: Callable[..., list[str]] | None = None,
) -> dict:
    """Perplexity on ``generic_texts`` and accuracy per task group, under ``plan`` (or none).

    ``task_prompts`` maps a group name to a DataFrame with ``text`` and ``answer`` (+ ``aliases``)
    columns, or a prepared prompt table whose ``extra`` holds them. Returns::

        {"perplexity": {"median", "mean", "n"},
         "accuracy": {group: {"accuracy", "n_correct", "n", "kind"}},
         "responses": {group: [...]}}          # only with return_responses

    ``generate`` replaces :func:`generate_responses` (same signature), e.g. in tests.
    """
    generate = generate or generate_responses
    report: dict = {}
    if generic_texts is not None and len(generic_texts):
        ppl = text_perplexity(
            model, tokenizer, adapter, list(generic_texts), plan=plan, batch_size=batch_size, max_length=max_length
        )
        report["perplexity"] = perplexity_summary(ppl)
    else:
        report["perplexity"] = perplexity_summary(np.empty(0))
    report["accuracy"] = {}
    responses_by_group = {}
    add_special = not uses_template(tokenizer, chat_template)
    groups = []  # (group, table, kind, rendered prompts) of the non-empty groups
    for group, df in task_prompts.items():
        df = _with_answers(df.reset_index(drop=True))
        if len(df) == 0:
            report["accuracy"][group] = {"accuracy": math.nan, "n_correct": 0, "n": 0, "kind": None}
            continue
        kind = (answer_kinds or {}).get(group) or answer_kind(group, list(df["answer"]))
        groups.append((group, df, kind, render_prompts(tokenizer, list(df["text"]), chat_template, system_prompt)))
    gen_kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, add_special_tokens=add_special,
                      max_length=max_length)
    if plan is None or len(plan.rows) == 1:
        # one generation over every group's prompts: fewer, fuller decoding batches
        everything = [text for *_, rendered in groups for text in rendered]
        responses_all = generate(model, tokenizer, adapter, everything, plan=plan, **gen_kwargs)
        bounds = np.cumsum([0] + [len(rendered) for *_, rendered in groups])
        per_group = [responses_all[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    else:  # one plan row per prompt of each group
        per_group = [generate(model, tokenizer, adapter, rendered, plan=plan, **gen_kwargs)
                     for *_, rendered in groups]
    for (group, df, kind, _), responses in zip(groups, per_group):
        correct = check_answers(responses, df, kind)
        report["accuracy"][group] = {
            "accuracy": float(correct.mean()),
            "n_correct": int(correct.sum()),
            "n": int(len(correct)),
            "kind": kind,
        }
        responses_by_group[group] = list(responses)
    if return_responses:
        report["responses"] = responses_by_group
    return report
