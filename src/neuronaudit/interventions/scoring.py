"""Scoring text under a model, optionally under an intervention: log-probs, perplexity, entropy.

Shared by coherence metrics (perplexity of a rollout under the unsteered model), capability
checks (perplexity on general text) and attribution metrics. Batched, right-padded, no KV cache;
the head runs on every scored position, so memory is ``batch × length × vocab`` per batch: keep
batches modest for large vocabularies. A batch that runs out of memory runs as two halves, each
padded to the whole batch's width (:func:`~neuronaudit.interventions.memory.split_on_oom`), so every
score is what the whole batch gives. A non-finite activation or logit stops the scoring, naming
the sequence (:mod:`neuronaudit.interventions.finite`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from neuronaudit.errors import NeuronAuditError, NonFiniteError
from neuronaudit.interventions.finite import finite_checks
from neuronaudit.interventions.hooks import InterventionPlan, NeuronHooks
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.models.kv_cache import broadcast_cache, cache_from_output, cache_kwarg


@dataclass
class TokenScores:
    """Per-sequence arrays over the scored tokens."""

    logprob: list[np.ndarray]  # log p(token | prefix) of each scored token
    entropy: list[np.ndarray]  # entropy (nats) of the predictive distribution at that position

    def mean_nll(self) -> np.ndarray:
        return np.array([-lp.mean() if lp.size else math.nan for lp in self.logprob])

    def perplexity(self) -> np.ndarray:
        return np.exp(self.mean_nll())

    def mean_entropy(self) -> np.ndarray:
        return np.array([e.mean() if e.size else math.nan for e in self.entropy])


def score_tokens(
    model,
    adapter,
    sequences: Sequence[Sequence[int]],
    scored_from: Sequence[int],
    plan: InterventionPlan | None = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> TokenScores:
    """Score ``sequences[k][scored_from[k]:]`` given their prefixes.

    ``sequences`` are token id lists (prompt + continuation); ``scored_from[k]`` is the index of
    the first scored token (``>= 1``). With a ``plan``, the hooks see row ``k``'s prompt as its
    first ``scored_from[k]`` tokens, so ``generated`` edits apply to the continuation; per-row
    plans must match the batch rows.
    """
    device = next(model.parameters()).device
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    logprobs: list[np.ndarray] = [np.empty(0)] * len(sequences)
    entropies: list[np.ndarray] = [np.empty(0)] * len(sequences)

    def run(idx: Sequence[int], part: tuple[int, ...], start: int, width: int, first: int) -> list[tuple]:
        """Score the rows ``idx`` of the batch at ``start``, padded to the batch's ``width`` with the
        head from its position ``first`` (a half of a split batch runs at the whole batch's shapes)."""
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask[r, : len(sequences[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        row_plan = plan if plan is None or len(plan.rows) == 1 else InterventionPlan(
            tuple(plan.rows[i - start] for i in idx))
        hooks = (
            NeuronHooks(adapter, row_plan, prompt_length=torch.tensor([scored_from[i] for i in idx]))
            if plan is not None
            else None
        )
        head = {"logits_to_keep": width - first} if keeps_logits else {}
        with torch.inference_mode(), finite_checks(adapter):
            try:
                if hooks is not None:
                    with hooks:
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **head).logits
                else:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **head).logits
            except NonFiniteError as err:
                err.at(prompt=f"{idx[err.row]} of the scored sequences" if err.row is not None else None)
                raise
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # positions first .. width - 2
            target = ids[:, first + 1 :]
            token_lp = logp.gather(-1, target[..., None])[..., 0]
            entropy = entropy_from_logp(logp)
        out = []
        for r, i in enumerate(idx):
            lo, hi = max(1, int(scored_from[i])), len(sequences[i])
            out.append((token_lp[r, lo - 1 - first : hi - 1 - first].cpu().numpy(),
                        entropy[r, lo - 1 - first : hi - 1 - first].cpu().numpy()))
        return out

    for start in range(0, len(sequences), batch_size):
        idx = list(range(start, min(start + batch_size, len(sequences))))
        width = max(len(sequences[i]) for i in idx)
        # the LM head (and the softmax over the vocabulary) runs only from the first position
        # whose next token is scored; the prefix before it needs hidden states, not logits
        first = min(max(1, int(scored_from[i])) for i in idx) - 1 if keeps_logits else 0
        scored = split_on_oom(functools.partial(run, start=start, width=width, first=first), idx, "token scoring")
        for i, (lp, ent) in zip(idx, scored):
            logprobs[i], entropies[i] = lp, ent
    return TokenScores(logprobs, entropies)


@dataclass
class LowerLayers:
    """What the unintervened model's blocks below each response's layer give, already known: the
    input of block ``layers[i]`` (the residual stream entering it) at every position of response
    ``i``, ``inputs[i] [len_i, D]`` (position 0: the last prompt token; position t: response token
    t - 1). An intervention at a row's layer leaves everything below it as the unintervened model
    computes it, so the rollouts of a dose sweep record it while they decode
    (:func:`~neuronaudit.interventions.sweeps.generated_dose_sweep` with ``keep_layer_inputs``)
    and their scoring need not run those blocks again."""

    adapter: object
    layers: Sequence[int]
    inputs: Sequence[torch.Tensor]


def _block_output_kind(model, adapter) -> str | None:
    """How this model's decoder blocks return their output (``"tensor"`` or ``"tuple"`` of one
    tensor), found once by a one-token forward; None when a block returns anything else (a cache
    or attention weights beside it), so its output cannot be stood in for."""
    if hasattr(adapter, "_block_output_kind"):
        return adapter._block_output_kind
    seen = []
    handle = adapter.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.inference_mode():
            one = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
            model(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False)
    finally:
        handle.remove()
    out = seen[0] if seen else None
    kind = ("tensor" if isinstance(out, torch.Tensor)
            else "tuple" if isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], torch.Tensor) else None)
    adapter._block_output_kind = kind
    return kind


@contextmanager
def blocks_return(adapter, outputs: Sequence):
    """Blocks ``[0, len(outputs))`` do not run: block ``l`` returns ``outputs[l]`` (forward hooks
    on them still fire with it). Their KV cache layers are not updated: for a single forward."""
    saved = []
    try:
        for layer, out in enumerate(outputs):
            block = adapter.blocks[layer]
            saved.append((block, block.__dict__.get("forward")))
            block.forward = lambda *args, _out=out, **kwargs: _out
        yield
    finally:
        for block, previous in saved:
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def shared_prompt_scores(
    model,
    prompt_ids: Sequence[int],
    response_ids: Sequence[Sequence[int]],
    batch_size: int = 32,
    pad_token_id: int = 0,
    lower: LowerLayers | None = None,
) -> TokenScores:
    """Score many ``response_ids`` that continue one prompt, under the unintervened model.

    Equals :func:`score_tokens` of ``prompt + response`` scored from ``len(prompt)`` for each
    response, but the prompt runs once: its KV cache (all but the last prompt token) is shared by
    every row, and each row runs only its last prompt token and its response. With ``lower``
    (:class:`LowerLayers`), responses are batched by their layer and the blocks below it do not run:
    block ``layer`` starts from the recorded inputs (equal up to float rounding; used where the
    model's blocks return a plain tensor, else every block runs).
    """

    prompt = list(prompt_ids)
    if not prompt:
        raise NeuronAuditError("a rollout to score has an empty prompt; it needs at least one token")
    device = next(model.parameters()).device
    name = cache_kwarg(model)
    # the prefix is run for its KV cache only: one position of logits where the model allows it
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logprobs: list[np.ndarray] = [np.empty(0)] * len(response_ids)
    entropies: list[np.ndarray] = [np.empty(0)] * len(response_ids)
    kind = None if lower is None else _block_output_kind(model, lower.adapter)
    layer_of = (lambda i: 0) if kind is None else (lambda i: int(lower.layers[i]))
    order = [i for i in sorted(range(len(response_ids)), key=lambda i: (-layer_of(i), -len(response_ids[i])))
             if len(response_ids[i])]
    with torch.inference_mode(), finite_checks(model):
        prefix = None
        if len(prompt) > 1:
            prefix = cache_from_output(
                model(input_ids=torch.tensor([prompt[:-1]], device=device), use_cache=True, **head)
            )

        def run(idx: Sequence[int], part: tuple[int, ...], width: int) -> list[tuple]:
            """Score the responses ``idx`` padded to their batch's ``width`` (a half of a split batch
            runs at the whole batch's width)."""
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), len(prompt) - 1 + width), dtype=torch.long)
            mask[:, : len(prompt) - 1] = 1
            targets = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            for r, i in enumerate(idx):
                response = list(response_ids[i])
                ids[r, : len(response)] = torch.tensor([prompt[-1]] + response[:-1])
                mask[r, len(prompt) - 1 : len(prompt) - 1 + len(response)] = 1
                targets[r, : len(response)] = torch.tensor(response)
            ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
            kwargs = {name: broadcast_cache(prefix, len(idx))} if prefix is not None else {}
            upto = layer_of(idx[0])
            stand_in = contextlib.nullcontext()
            if upto > 0:
                hidden = torch.zeros((len(idx), width, lower.inputs[idx[0]].shape[-1]),
                                     dtype=lower.inputs[idx[0]].dtype, device=device)
                for r, i in enumerate(idx):
                    hidden[r, : len(response_ids[i])] = lower.inputs[i][: len(response_ids[i])].to(device)
                # blocks [0, upto) return the recorded input of block upto, so that block receives it
                stand_in = blocks_return(lower.adapter, [hidden if kind == "tensor" else (hidden,)] * upto)
            try:
                with stand_in:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=prefix is not None, **kwargs).logits
            except NonFiniteError as err:
                err.at(context=f"response {idx[err.row]}" if err.row is not None else "")
                raise
            logp = F.log_softmax(logits.float(), dim=-1)
            token_lp = logp.gather(-1, targets[..., None])[..., 0]
            entropy = entropy_from_logp(logp)
            lengths = [len(response_ids[i]) for i in idx]
            return [(token_lp[r, :n].cpu().numpy(), entropy[r, :n].cpu().numpy()) for r, n in enumerate(lengths)]

        batches, current = [], []
        for i in order:  # at most batch_size responses, all of one layer where the blocks below are skipped
            if current and (len(current) == batch_size or layer_of(i) != layer_of(current[0])):
                batches.append(current)
                current = []
            current.append(i)
        batches += [current] if current else []
        for idx in batches:
            width = len(response_ids[idx[0]])
            scored = split_on_oom(functools.partial(run, width=width), idx, "response scoring")
            for i, (lp, ent) in zip(idx, scored):
                logprobs[i], entropies[i] = lp, ent
    return TokenScores(logprobs, entropies)


def text_perplexity(
    model, tokenizer, adapter, texts: Sequence[str], plan: InterventionPlan | None = None,
    batch_size: int = 8, max_length: int = 256,
) -> np.ndarray:
    """Perplexity of each text (all tokens after the first), optionally under ``plan``."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    scores = score_tokens(
        model, adapter, enc, [1] * len(enc), plan=plan, batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    return scores.perplexity()


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) ``-Σ p log p`` of log-probabilities ``logp [..., V]`` -> ``[...]``.

    A token of probability 0 (``log p = -inf``, a logit a processor masked out) is left out of
    the sum by selection: multiplying would give ``0 · -inf = NaN``.
    """
    return -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)


def kl_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = Σ p (log p - log q)`` over the last axis; tokens with ``p = 0`` left out."""
    return torch.where(logp > -math.inf, logp.exp() * (logp - logq), 0.0).sum(-1)


def entropy_from_logits(logits) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits)`` along the last axis (torch tensor or array)."""

    t = torch.as_tensor(logits).float()
    return entropy_from_logp(torch.log_softmax(t, dim=-1)).cpu().numpy()


def rollout_scores(
    model,
    adapter,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> TokenScores:
    """Per-token log-probs and entropies of each response under the *unsteered* model.

    Row ``k`` scores ``response_ids[k]`` given ``prompt_ids[k]`` (unpadded token lists; the
    prompt must be non-empty). No intervention plan is installed, whatever produced the rollout.
    Empty responses give empty arrays (their means are NaN).
    """
    if len(prompt_ids) != len(response_ids):
        raise NeuronAuditError(
            f"{len(prompt_ids)} prompts but {len(response_ids)} responses to score"
        )
    sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    scored_from = [len(p) for p in prompt_ids]
    if any(s < 1 for s in scored_from):
        raise NeuronAuditError("a rollout to score has an empty prompt; it needs at least one token")
    # Longest sequences first: batches of similar length waste less padding.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = score_tokens(
        model, adapter, [sequences[i] for i in order], [scored_from[i] for i in order],
        plan=None, batch_size=batch_size, pad_token_id=pad_token_id,
    )
    logprob: list[np.ndarray] = [np.empty(0)] * len(order)
    entropy: list[np.ndarray] = [np.empty(0)] * len(order)
    for j, i in enumerate(order):
        logprob[i], entropy[i] = scores.logprob[j], scores.entropy[j]
    return TokenScores(logprob, entropy)


def unsteered_perplexity(
    model, adapter, prompt_ids, response_ids, batch_size: int = 8, pad_token_id: int = 0
) -> np.ndarray:
    """Perplexity of each full response under the unsteered model."""
    s = rollout_scores(model, adapter, prompt_ids, response_ids, batch_size, pad_token_id)
    return s.perplexity()


def unsteered_mean_entropy(
    model, adapter, prompt_ids, response_ids, batch_size: int = 8, pad_token_id: int = 0
) -> np.ndarray:
    """Mean next-token entropy of the unsteered model over each response's positions."""
    s = rollout_scores(model, adapter, prompt_ids, response_ids, batch_size, pad_token_id)
    return s.mean_entropy()
