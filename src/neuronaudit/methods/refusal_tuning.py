"""The recipe of the refusal-tuned reference model: its data, objective and optimiser.

The refusal studies (SCIENCE.md section 1 "Behaviours: refusal", sections 2–3) need a model
that refuses harmful requests. Stock SmolLM2-135M-Instruct mostly answers them, so the study
fine-tunes it into a reference refuser:

* **Data** (all from the DISCOVERY split, so held-out prompts stay unseen; a VALIDATION part of
  the discovery split, whole style-matched pairs chosen by :func:`validation_mask`, is kept out of
  training too, and the recipe is chosen on it, never on the held-out prompts):
  harmful prompts → a refusal, one of :data:`REFUSAL_TEMPLATES` chosen per prompt by a seeded
  RNG; harmless prompts (style-matched to the harmful ones, SCIENCE.md "Common ground") → the
  base model's *own* greedy answer (batched generation, ``refusal.answer_max_new_tokens`` tokens). Training on
  its own answers keeps benign behaviour where it was, so the contrast the audit sees is the
  refusal, not a change of style. Prompts go through the chat template as everywhere else.
* **Objective**: next-token cross-entropy on the response tokens only (prompt and padding
  positions carry label ``-100``); a response that ended with EOS keeps its EOS as a target.
* **Optimiser**: AdamW (``learning_rate`` 3e-5, no weight decay by default), batch 8, ``steps`` 100,
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

The stages that run the recipe and measure what it bought (refusal and over-refusal on held-out
prompts, perplexity against the base model) are :mod:`neuronaudit.stages.refusal`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neuronaudit.errors import NeuronAuditError, NonFiniteError
from neuronaudit.interventions.generation import eos_ids, generate_tokens, pad_id
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.prompts import VALIDATION_SALT, pair_keys, validation_mask  # noqa: F401 (re-exported)

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
#: Gradient-norm clipping, weight decay and own-answer generation batch of the recipe.
GRAD_CLIP = 1.0
WEIGHT_DECAY = 0.0
GEN_BATCH_SIZE = 16


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


#: What the harmless (own-answer) examples are trained towards: the answer's tokens
#: (``cross_entropy``) or the base model's whole next-token distribution along the answer
#: (``kl_to_base``: KL(base ‖ tuned) per response token, which keeps the base model's uncertainty
#: instead of sharpening it onto its own greedy tokens).
HARMLESS_LOSSES = ("cross_entropy", "kl_to_base")


def decision_token_weights(labels: torch.Tensor, decision_tokens: int, decision_weight: float) -> torch.Tensor:
    """Per next-token term of a batch (``labels[:, 1:]``'s shape): ``decision_weight`` for the
    first ``decision_tokens`` response tokens of each row (where an answer turns into a refusal or
    not), 1 for the rest and 0 off the response."""
    used = labels[:, 1:] != IGNORE_INDEX
    rank = torch.cumsum(used.long(), dim=1) - 1  # each term's position within its response
    first = used & (rank < int(decision_tokens))
    return torch.where(first, float(decision_weight), 1.0) * used


def response_loss(model, batch: Mapping[str, torch.Tensor], row_weights: torch.Tensor | None = None,
                  reference_log_probs: Sequence[torch.Tensor] | None = None,
                  kl_rows: torch.Tensor | None = None, decision_tokens: int = 0,
                  decision_weight: float = 1.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of a batch; with ``row_weights``
    (one per example) each token's term is weighted by its example's weight and the sum divided
    by the summed weights of the terms (weights all 1: the plain token mean). The first
    ``decision_tokens`` response tokens of every row weigh ``decision_weight`` times more
    (:func:`decision_token_weights`).

    With ``reference_log_probs`` (for each row of the boolean mask ``kl_rows``, in order, a
    reference model's next-token log-probabilities at that row's response positions: one row per
    response token, :func:`reference_log_probs`), the term of those rows' response tokens is
    KL(reference ‖ model) of the next-token distributions instead of the cross-entropy of the
    token."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    labels = batch["labels"].to(device)
    if reference_log_probs is not None:
        used = labels[:, 1:] != IGNORE_INDEX
        terms = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                reduction="none").clone()
        rows = [int(r) for r in torch.nonzero(kl_rows).flatten()]
        if len(rows) != len(reference_log_probs):
            raise ValueError(f"{len(reference_log_probs)} reference rows for {len(rows)} KL rows")
        for r, ref in zip(rows, reference_log_probs):
            at = torch.nonzero(used[r]).flatten()  # the positions that predict the response tokens
            if len(at) != len(ref):
                raise ValueError(f"row {r}: {len(ref)} reference positions for {len(at)} response tokens")
            ref = ref.to(device)
            logp = F.log_softmax(logits[r, at].float(), dim=-1)
            terms[r, at] = (ref.exp() * (ref - logp)).sum(-1)
        weights = (torch.ones(len(ids), device=device) if row_weights is None
                   else row_weights.to(device=device, dtype=terms.dtype))[:, None] * used
        if decision_tokens:
            weights = weights * decision_token_weights(labels, decision_tokens, decision_weight)
        return (torch.where(used, terms, 0.0) * weights).sum() / weights.sum()
    if row_weights is None and not decision_tokens:
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
    terms = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX,
                            reduction="none")
    weights = (torch.ones(len(ids), device=device) if row_weights is None
               else row_weights.to(device=device, dtype=terms.dtype))[:, None] * (labels[:, 1:] != IGNORE_INDEX)
    if decision_tokens:
        weights = weights * decision_token_weights(labels, decision_tokens, decision_weight)
    return (terms * weights).sum() / weights.sum()


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


    eos, pad = eos_ids(model, tokenizer), pad_id(tokenizer)
    eos_token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos[0]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    answers: dict[int, tuple[int, ...]] = {}
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    def run(rows, part, width):  # a half of a batch split after running out of memory keeps its width
        toks, stopped, _ = generate_tokens(
            model, [prompt_ids[i] for i in rows], max_new_tokens, eos_token_ids=eos, pad_token_id=pad, width=width,
        )
        return list(zip(toks, stopped))

    for batch in tqdm(batches, desc="own answers", unit="batch", disable=not progress):
        width = max(len(prompt_ids[i]) for i in batch)
        for i, (t, s) in zip(batch, split_on_oom(functools.partial(run, width=width), batch, "own answers")):
            answers[i] = tuple(t) + ((eos_token,) if s else ())
    return [
        Example(tuple(prompt_ids[i]), answers[i], "own_answer", ids[i] if ids is not None else "")
        for i in range(len(prompt_ids))
        if answers[i]
    ]


#: The reference model's acceptance targets, on prompts it never trained on: refusal of harmful
#: requests at least ``refusal_min``, over-refusal of (style-matched or dangerous-sounding) harmless
#: requests at most ``over_refusal_max``, general-text perplexity at most ``perplexity_ratio_max``
#: times the base model's.
REFUSAL_TARGETS = {"refusal_min": 0.90, "over_refusal_max": 0.05, "perplexity_ratio_max": 1.25}


def target_checks(refusal: float | None, over_refusal: float | None, perplexity_ratio: float | None,
                  targets: Mapping[str, float] = REFUSAL_TARGETS) -> dict:
    """Each target met or not (``None`` where the rate was not measured) and ``all`` of them."""
    def check(value, ok):
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(ok(value))

    out = {
        "refusal": check(refusal, lambda v: v >= targets["refusal_min"]),
        "over_refusal": check(over_refusal, lambda v: v <= targets["over_refusal_max"]),
        "perplexity_ratio": check(perplexity_ratio, lambda v: v <= targets["perplexity_ratio_max"]),
    }
    measured = [v for v in out.values() if v is not None]
    out["all"] = bool(measured) and all(measured) and len(measured) == 3
    return out


def worst_over_refusal(candidate: Mapping) -> float:
    """The larger of a candidate's over-refusal rates: the validation harmless prompts' and, where
    measured, the dangerous-sounding harmless prompts' (``over_refusal_sounding``)."""
    rates = [candidate["over_refusal"], candidate.get("over_refusal_sounding")]
    return max(r for r in rates if r is not None and not (isinstance(r, float) and math.isnan(r)))


def choose_recipe(candidates: Sequence[Mapping]) -> dict:
    """The recipe to adopt from candidates scored on the VALIDATION prompts.

    Each candidate has ``recipe`` (the settings tried), ``refusal``, ``over_refusal``,
    ``perplexity_ratio`` and ``cost`` (optimiser examples, steps × batch size), and may have
    ``over_refusal_sounding`` (over-refusal of harmless dangerous-sounding prompts) and
    ``preconditions_passed`` (False when the tuned model fails one of the audit's behaviour
    preconditions that the base model passes).
    A candidate's over-refusal is the worse of the rates it has. A candidate that fails the
    preconditions is never chosen; when every candidate fails them, none is (``index`` None).
    Rule, among the others: among the candidates that meet every
    :data:`REFUSAL_TARGETS`, the cheapest, ties broken by the larger margin ``refusal -
    over-refusal``; when none meets them, the largest margin among those within the perplexity
    target (else among all), reported as not meeting the targets. Returns ``{"index", "recipe",
    "meets_targets", "rule"}``.
    """
    if not candidates:
        raise NeuronAuditError("no refusal-tuning candidates to choose from")
    over = [worst_over_refusal(c) for c in candidates]
    checks = [target_checks(c["refusal"], o, c["perplexity_ratio"]) for c, o in zip(candidates, over)]
    margin = [c["refusal"] - o for c, o in zip(candidates, over)]
    keeping = [i for i, c in enumerate(candidates) if c.get("preconditions_passed") is not False]
    if not keeping:
        return {"index": None, "recipe": None, "meets_targets": False,
                "rule": "every candidate breaks one of the audit's behaviour preconditions: none can be chosen"}
    meeting = [i for i in keeping if checks[i]["all"]]
    if meeting:
        index = min(meeting, key=lambda i: (candidates[i]["cost"], -margin[i], i))
        rule = ("meets every target on validation; cheapest, then largest refusal - over-refusal (the worse "
                "over-refusal rate where two are measured)")
    else:
        pool = [i for i in keeping if checks[i]["perplexity_ratio"]] or keeping
        index = max(pool, key=lambda i: (margin[i], -candidates[i]["cost"], -i))
        rule = ("no candidate meets every target on validation: largest refusal - over-refusal (the worse "
                "over-refusal rate where two are measured) among those within the perplexity target (all "
                "candidates when none is)")
    if len(keeping) < len(candidates):
        rule += "; candidates that break one of the audit's behaviour preconditions excluded"
    return {"index": index, "recipe": dict(candidates[index]["recipe"]), "meets_targets": bool(checks[index]["all"]),
            "rule": rule}


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


def with_lora_adapters(model, rank: int):
    """``model`` wrapped with LoRA adapters (peft) of ``rank`` and alpha ``2 · rank`` on every linear
    layer but the output head, no dropout; only the adapters train. ``merge_and_unload()`` on the
    result gives back the plain model with the adapters folded into its weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(rank), lora_alpha=2 * int(rank), lora_dropout=0.0, target_modules="all-linear",
                        bias="none")
    return get_peft_model(model, config)


def _is_adapted(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def reference_log_probs(model, examples: Sequence[Example], pad_token_id: int,
                        batch_size: int = 8) -> list[torch.Tensor]:
    """The untuned model's next-token log-probabilities at each example's response positions
    (``len(response_ids)`` rows of the vocabulary each; float32, on the CPU), computed once before
    training: the KL reference of ``harmless_loss: kl_to_base``. A model with LoRA adapters is
    read with its adapters switched off. Each example runs in a right-padded batch, so its
    positions are the ones it has alone."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    adapters = model.disable_adapter() if _is_adapted(model) else contextlib.nullcontext()
    with torch.no_grad(), adapters:
        for k in range(0, len(examples), batch_size):
            chunk = list(examples[k: k + batch_size])
            batch = collate(chunk, pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            for r, e in enumerate(chunk):
                start = len(e.prompt_ids) - 1
                out.append(F.log_softmax(logits[r, start: start + len(e.response_ids)].float(), dim=-1).cpu())
    return out


def train_response_loss(
    model, examples: Sequence[Example], pad_token_id: int, steps: int, learning_rate: float, batch_size: int,
    seed: int, grad_clip: float = 1.0, weight_decay: float = 0.0, progress: bool = False,
    harmless_fraction: float | None = None, harmless_loss_weight: float = 1.0,
    harmless_loss: str = "cross_entropy", decision_tokens: int = 0, decision_weight: float = 1.0,
) -> list[dict]:
    """AdamW on the response loss; batches drawn epoch by epoch from a seeded permutation.

    ``harmless_fraction`` (``None``: examples drawn alike, whatever their kind) puts
    ``round(batch_size · harmless_fraction)`` own-answer examples in every batch and refusals in
    the rest, each kind drawn epoch by epoch from its own seeded permutation: a larger share of
    harmless answers holds benign behaviour against over-refusal. ``harmless_loss_weight`` weights
    the own-answer examples' tokens in the loss against the refusals' (1: the plain token mean).

    A model with LoRA adapters (:func:`with_lora_adapters`) trains its adapters only.
    ``harmless_loss`` (:data:`HARMLESS_LOSSES`) ``kl_to_base`` trains the own-answer examples towards
    the untuned model's next-token distributions (:func:`reference_log_probs`, computed once before
    the first step; with LoRA, the model with its adapters switched off) instead of their tokens.
    The first ``decision_tokens`` response tokens of every example weigh ``decision_weight`` times
    more (0: every token alike): whether an answer is a refusal is decided in its first tokens.

    Returns the per-step log (``step``, ``loss``, ``grad_norm``).
    """

    if isinstance(harmless_loss_weight, bool) or not harmless_loss_weight > 0:
        raise NeuronAuditError(f"refusal.harmless_loss_weight {harmless_loss_weight!r} must be a positive number")
    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise NeuronAuditError(
            f"steps {steps!r}, batch_size {batch_size!r} and learning_rate {learning_rate!r} must be positive"
        )
    if harmless_loss not in HARMLESS_LOSSES:
        raise NeuronAuditError(f"refusal.harmless_loss {harmless_loss!r} must be one of {list(HARMLESS_LOSSES)}")
    if not examples:
        raise NeuronAuditError("no training examples for the refusal tuning")
    pools = [list(range(len(examples)))]
    per_batch = [batch_size]
    if harmless_fraction is not None:
        per_batch = list(batch_composition(batch_size, harmless_fraction))
        pools = [[i for i, e in enumerate(examples) if e.kind == kind] for kind in ("own_answer", "refusal")]
        if not all(pools):
            raise NeuronAuditError("refusal tuning harmless_fraction needs both refusal and own-answer examples")
    reference: dict[int, torch.Tensor] = {}
    if harmless_loss == "kl_to_base":  # the untuned model's distributions, once, before any step
        model.eval()
        own = [i for i, e in enumerate(examples) if e.kind == "own_answer"]
        reference = dict(zip(own, reference_log_probs(model, [examples[i] for i in own], pad_token_id, batch_size)))
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    model.train()
    if not _is_adapted(model):  # a full fine-tune; LoRA adapters (with_lora_adapters) train alone
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
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
        chosen = [examples[i] for i in idx]
        weights = None if harmless_loss_weight == 1.0 else torch.tensor(
            [harmless_loss_weight if e.kind == "own_answer" else 1.0 for e in chosen])
        batch = collate(chosen, pad_token_id)
        kl_rows = torch.tensor([e.kind == "own_answer" for e in chosen])
        if harmless_loss == "kl_to_base" and kl_rows.any():
            refs = [reference[i] for i in idx if examples[i].kind == "own_answer"]
            loss = response_loss(model, batch, weights, refs, kl_rows, decision_tokens, decision_weight)
        else:
            loss = response_loss(model, batch, weights, decision_tokens=decision_tokens,
                                 decision_weight=decision_weight)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        for site, v in (("training loss", float(loss.detach())), ("gradient norm", grad_norm)):
            if not math.isfinite(v):  # stop before the optimiser writes non-finite weights
                raise NonFiniteError(v, site, detail=f"refusal tuning step {step + 1} of {steps} "
                                                     f"(learning rate {learning_rate:g})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        curve.append({"step": step + 1, "loss": value, "grad_norm": grad_norm})
        bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    model.requires_grad_(False)
    return curve


# --- evaluation ------------------------------------------------------------------------------


