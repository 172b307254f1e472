"""Batched, left-padded, KV-cached generation under an optional per-row intervention plan:
end-of-sequence and padding ids, seeded sampling (per batch, or per row so that a row's sample
does not depend on the rows beside it), and neutral generation defaults. A
non-finite activation or logit stops the generation (greedy ``argmax`` over NaN logits would
quietly pick token 0), naming where it appeared (:mod:`neuronaudit.interventions.finite`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from neuronaudit.errors import NonFiniteError
from neuronaudit.interventions.finite import finite_checks
from neuronaudit.interventions.hooks import InterventionPlan, NeuronHooks
from neuronaudit.interventions.scoring import entropy_from_logp
from neuronaudit.prompts import render_prompts, uses_template

log = logging.getLogger("neuronaudit")


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end a rollout (model generation config and tokenizer EOS)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update([int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row padded on the left to the longest (or to
    ``width`` when that is longer)."""
    width = max([len(s) for s in sequences] + [int(width or 0)])
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        if len(s):
            ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[r, width - len(s) :] = 1
    return ids, mask


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over the real tokens of its row (0 at the first one; padding
    gets a position it never uses). Passed as ``position_ids`` to a forward without a KV cache, a
    left-padded row sees the positions it has alone: models with absolute position embeddings
    (GPT-2, OPT) would otherwise read the padding into them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _entropy_recorder():

    class EntropyRecorder(LogitsProcessor):
        """Records the entropy of the raw next-token distribution at every step; changes nothing.

        Custom processors run before the sampling warpers (temperature, top-p), so this sees the
        model's own distribution.
        """

        def __init__(self):
            self.steps: list[torch.Tensor] = []

        def __call__(self, input_ids, scores):
            # a token a processor masked to -inf is left out of the sum, not turned into NaN
            self.steps.append(entropy_from_logp(torch.log_softmax(scores.float(), dim=-1)).cpu())
            return scores

    return EntropyRecorder()


def row_seed(seed: int, *key: str) -> int:
    """The sampling seed of one row, from the pass's seed and what the row is (e.g. its prompt set,
    prompt id and intervention): stable across runs, batches and shards."""
    words = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "little") for k in key]
    return int(np.random.SeedSequence([int(seed), *words]).generate_state(2, dtype=np.uint64)[0] >> 1)


class RowSeededSampling(LogitsProcessor):
    """Sampling with one random stream per row, as a logits processor for a greedy ``generate``.

    The Gumbel-max trick: the argmax of ``scores + G`` with ``G`` standard Gumbel noise is a draw
    from ``softmax(scores)``, so greedy decoding after this processor samples from the warped
    distribution (temperature, top-k, top-p before it; tokens they mask stay at -inf). Row ``r``'s
    noise at step ``t`` comes from a generator seeded by ``(row_seeds[r], t)``, so a row samples
    the same tokens whatever batch, batch order, out-of-memory split or shard it runs in.
    """

    def __init__(self, row_seeds: Sequence[int], prompt_width: int):
        self.row_seeds = [int(s) for s in row_seeds]
        self.prompt_width = int(prompt_width)

    def __call__(self, input_ids, scores):
        if scores.shape[0] != len(self.row_seeds):
            raise ValueError(f"{scores.shape[0]} rows of scores for {len(self.row_seeds)} row seeds")
        step = int(input_ids.shape[1]) - self.prompt_width
        noise = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        for r, seed in enumerate(self.row_seeds):
            gen = torch.Generator(device=scores.device)
            gen.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
            noise[r].uniform_(generator=gen)
        gumbel = -torch.log(-torch.log(noise.clamp_(min=torch.finfo(torch.float32).tiny, max=1 - 2**-24)))
        return scores.float() + gumbel


def sampling_processors(temperature: float, top_p: float, top_k: int, row_seeds: Sequence[int],
                        prompt_width: int) -> list[LogitsProcessor]:
    """The warpers and :class:`RowSeededSampling` that make a greedy ``generate`` sample."""
    out: list[LogitsProcessor] = []
    if float(temperature) != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if int(top_k) > 0:
        out.append(TopKLogitsWarper(int(top_k)))
    if float(top_p) < 1.0:
        out.append(TopPLogitsWarper(float(top_p)))
    return [*out, RowSeededSampling(row_seeds, prompt_width)]


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of one batch of a sampled pass."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1)[0])


@contextlib.contextmanager
def neutral_generation_defaults(model):
    """Swap ``model.generation_config`` for a default one for the duration of a call.

    Transformers fills every field a passed ``GenerationConfig`` leaves at its default from the
    model's stored generation config (a ``repetition_penalty``, ``temperature`` or
    ``no_repeat_ngram_size`` some checkpoints ship), so stored settings would silently change
    what is measured. Inside this block only the settings passed explicitly apply.
    """

    stored = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = stored


def generate_tokens(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    adapter=None,
    plan: InterventionPlan | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    width: int | None = None,
    row_seeds: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[bool], list[np.ndarray]]:
    """One batched, left-padded, KV-cached ``generate`` under an optional per-row plan.

    Sampling (``do_sample``) draws from the batch's torch seed ``seed``, or, with ``row_seeds``
    (one per row, e.g. :func:`row_seed`), from one random stream per row
    (:class:`RowSeededSampling`), so that a row's sample does not depend on its batch.

    Returns per row the new token ids up to (not including) the first EOS, whether EOS was
    reached, and the per-step entropy of the raw next-token distribution for those tokens.
    ``width`` pads the prompts to at least that many tokens (a half of a batch split after running
    out of memory keeps the whole batch's shapes).
    """

    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_token_id, width)
    ids, mask = ids.to(device), mask.to(device)
    eos = list(eos_token_ids)
    per_row = bool(do_sample) and row_seeds is not None
    if per_row and len(row_seeds) != len(prompt_ids):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompt_ids)} rows")
    cfg = dict(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample) and not per_row, pad_token_id=pad_token_id,
        eos_token_id=eos or None, use_cache=True,
    )
    if do_sample and not per_row:
        cfg.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    gen_config = GenerationConfig(**cfg)
    recorder = _entropy_recorder()
    processors = LogitsProcessorList([recorder])
    if per_row:
        processors.extend(sampling_processors(temperature, top_p, top_k, row_seeds, ids.shape[1]))
    hooks = NeuronHooks(adapter, plan) if plan is not None and any(plan.rows) else None
    devices = [device] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices), neutral_generation_defaults(model), \
            finite_checks(adapter if adapter is not None else model):
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            if hooks is not None:
                with hooks:
                    out = model.generate(
                        input_ids=ids, attention_mask=mask, generation_config=gen_config,
                        logits_processor=processors,
                    )
            else:
                out = model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=gen_config,
                    logits_processor=processors,
                )
        except NonFiniteError as err:  # greedy argmax over NaN logits would return token 0 silently
            err.at(prompt=f"{err.row} of the batch" if err.row is not None else None)
            raise
    new = out[:, ids.shape[1] :].cpu()
    ent = torch.stack(recorder.steps, dim=1).numpy() if recorder.steps else np.zeros((len(prompt_ids), 0))
    eos_set = set(eos)
    tokens, stopped, entropies = [], [], []
    for r in range(new.shape[0]):
        row = new[r].tolist()
        end = next((k for k, t in enumerate(row) if t in eos_set), None)
        tokens.append(row if end is None else row[:end])
        stopped.append(end is not None)
        entropies.append(ent[r, : len(tokens[-1])].astype(np.float64))
    return tokens, stopped, entropies


def encode_prompts(tokenizer, texts: Sequence[str], chat_template: str = "auto",
                   system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of the prompts as the model sees them (chat template when it has one)."""

    rendered = render_prompts(tokenizer, list(texts), chat_template, system_prompt)
    add_special = not uses_template(tokenizer, chat_template)
    return [list(x) for x in tokenizer(rendered, add_special_tokens=add_special)["input_ids"]]

