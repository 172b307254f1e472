"""Many rollouts of the same prompts under different edits, sharing each prompt's clean prefix.

A *row* is ``(prompt, edits)``: one rollout of one prompt under a tuple of neuron edits (empty for
the unedited model). Experiments such as the reasoning stage's steering and ablation conditions
roll out every prompt under tens of conditions whose edits act only at the last prompt token and
the generated tokens. Everything before the last prompt token is then the same for every row of
a prompt, so :func:`shared_prefix_generate` computes it once:

1. the prefixes (all but the last token) of ``prefix_batch`` prompts run together, left-padded
   with explicit position ids and no hooks, and their KV cache is kept;
2. the rows of those prompts are decoded ``row_batch`` at a time: each row takes its prompt's
   cache rows (:func:`~neuronaudit.models.kv_cache.select_cache_rows`), feeds its last prompt
   token and then its own tokens under its own edits
   (:meth:`~neuronaudit.interventions.InterventionPlan.per_row`, the hooks told that the prompt
   sits in the cache), greedy or sampled;
3. a row leaves the batch as soon as it emits an end-of-sequence token: the cache, mask and
   plan are cut to the rows still running, so a batch costs the tokens its rows actually
   generate, not ``max_new_tokens`` for every row;
4. a chunk of rows that runs out of memory is decoded as two halves, and a group whose prefix
   forward does runs as two half groups (:func:`~neuronaudit.interventions.memory.split_on_oom`):
   greedy rows are unchanged (a row does not depend on its batch), sampled halves draw from
   their own seeds.

The cost of a row is therefore one position per generated token plus one, against the prompt's
length plus ``max_new_tokens`` for a left-padded ``generate`` of the whole batch. Rows are
independent (no padding enters a row's attention, every row has its own positions), so a row's
tokens do not depend on which other rows share its batch; greedy rows equal
:func:`~neuronaudit.interventions.generation.generate_tokens` of that row alone under the same
edits (``tests/unit/test_prefix_generation.py``).

Edits may act at ``last_prompt`` and ``generated`` positions only (an edit of every prompt token
would change the shared prefix; run such rows with
:func:`~neuronaudit.interventions.generation.generate_tokens`). With ``record``, a row's MLP
activations are read while it is generated: their mean over the positions that predict its
tokens (the last prompt token and every generated token fed back; one extra forward feeds the
last token of a row cut by ``max_new_tokens``) and their value at the last prompt token — what a
teacher-forced forward over prompt + rollout gives
(:func:`neuronaudit.methods.reasoning.mean_activations`), without a second pass.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions.hooks import InterventionPlan, NeuronHooks, ResidualEdit
from neuronaudit.interventions.memory import part_seed, split_on_oom
from neuronaudit.models.kv_cache import cache_from_output, cache_kwarg, select_cache_rows

log = logging.getLogger("neuronaudit")

#: Positions an edit of a shared-prefix row may act at.
ROW_POSITIONS: tuple[str, ...] = ("last_prompt", "generated")
#: A batch is cut to its running rows once this share of it has finished.
PRUNE_SHARE = 0.25


@dataclass
class PrefixRollouts:
    """What :func:`shared_prefix_generate` returns, per row in the order given.

    ``tokens[k]`` the generated ids (end-of-sequence excluded), ``stopped[k]`` whether the row
    ended with end-of-sequence, ``entropy[k]`` the entropy (nats) of the generating model's raw
    next-token distribution at each generated token. For recorded rows (``recorded``, row
    indices in order): ``mean_activation [n_recorded, n_layers_read, n_neurons]`` and
    ``last_prompt_activation`` of the same shape (float32; rows ``layers``). ``token_positions``
    counts the positions run (prefix and rows), ``seconds`` the wall time.
    """

    tokens: list[list[int]]
    stopped: list[bool]
    entropy: list[np.ndarray]
    recorded: list[int]
    layers: list[int]
    mean_activation: np.ndarray | None
    last_prompt_activation: np.ndarray | None
    token_positions: int
    seconds: float

    def activation_row(self, row: int) -> int:
        """Index of a recorded row in the activation arrays."""
        try:
            return self.recorded.index(int(row))
        except ValueError:
            raise NeuronAuditError(f"row {row} was not recorded") from None


def check_row_edits(edits: Sequence) -> None:
    """Every edit of a shared-prefix row acts at :data:`ROW_POSITIONS` only."""
    for e in edits:
        bad = [p for p in e.positions if p not in ROW_POSITIONS]
        if bad:
            where = f"the residual stream after layer {e.layer}" if isinstance(e, ResidualEdit) \
                else f"neuron ({e.layer}, {e.neuron})"
            raise NeuronAuditError(
                f"an edit of {where} acts at {bad[0]!r} positions: rows sharing a clean prompt prefix may edit "
                f"only {list(ROW_POSITIONS)}"
            )


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: argmax, or a draw from the temperature-scaled distribution
    cut to its top-p nucleus (the most probable token always kept)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _Recorder:
    """Sums of the MLP activations of recorded rows over the positions they are fed."""

    def __init__(self, n_rows: int, layers: list[int], n_neurons: int):
        self.column = {layer: c for c, layer in enumerate(layers)}
        self.total = np.zeros((n_rows, len(layers), n_neurons), dtype=np.float64)
        self.last = np.full((n_rows, len(layers), n_neurons), np.nan, dtype=np.float32)
        self.count = np.zeros(n_rows, dtype=np.int64)
        self.slots: np.ndarray = np.zeros(0, dtype=np.int64)  # batch row -> slot (-1: not recorded)
        self.first_step = False

    def __call__(self, layer, a, ctx) -> None:
        keep = self.slots >= 0
        if not keep.any():
            return
        values = a[torch.as_tensor(np.flatnonzero(keep)), -1].float().cpu().numpy()
        slots = self.slots[keep]
        self.total[slots, self.column[layer]] += values
        if self.first_step:
            self.last[slots, self.column[layer]] = values


def shared_prefix_generate(
    model,
    adapter,
    prompt_ids: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, Sequence]],
    max_new_tokens: int,
    *,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    prefix_batch: int = 16,
    row_batch: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    record: Sequence[bool] | None = None,
    record_layers: Sequence[int] | None = None,
) -> PrefixRollouts:
    """Roll out ``rows`` (``(prompt index, edits)``) sharing each prompt's clean prefix.

    ``prompt_ids`` are unpadded token lists (at least one token each). Sampling (``do_sample``)
    draws each batch from its own generator seeded by ``(seed, batch)``, so a call is
    reproducible (a half of a batch split after running out of memory by its own seed,
    :func:`~neuronaudit.interventions.memory.part_seed`). ``record[k]`` asks for row ``k``'s
    activations at ``record_layers`` (all by default); see the module docstring.
    """
    t0 = time.perf_counter()
    if max_new_tokens < 1:
        raise NeuronAuditError(f"max_new_tokens {max_new_tokens!r} must be at least 1")
    if prefix_batch < 1 or row_batch < 1:
        raise NeuronAuditError(f"prefix_batch {prefix_batch!r} and row_batch {row_batch!r} must be at least 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise NeuronAuditError(f"sampling needs temperature > 0 and 0 < top_p ≤ 1, got {temperature!r}, {top_p!r}")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if any(len(p) == 0 for p in prompts):
        raise NeuronAuditError("every prompt needs at least one token")
    rows = [(int(p), tuple(e)) for p, e in rows]
    for p, edits in rows:
        if not 0 <= p < len(prompts):
            raise NeuronAuditError(f"row of prompt {p} but there are {len(prompts)} prompts")
        check_row_edits(edits)
    record = [False] * len(rows) if record is None else [bool(r) for r in record]
    if len(record) != len(rows):
        raise NeuronAuditError(f"{len(record)} record flags for {len(rows)} rows")
    recorded = [k for k, r in enumerate(record) if r]
    layers = adapter.check_layers(range(adapter.n_layers) if record_layers is None else record_layers)
    recorder = _Recorder(len(recorded), layers, adapter.n_neurons) if recorded else None
    slot_of = np.full(len(rows), -1, dtype=np.int64)
    slot_of[recorded] = np.arange(len(recorded))

    eos = torch.tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long)
    device = next(model.parameters()).device
    cache_name = cache_kwarg(model)
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    by_prompt: dict[int, list[int]] = {}
    for k, (p, _) in enumerate(rows):
        by_prompt.setdefault(p, []).append(k)
    order = sorted(by_prompt, key=lambda p: (len(prompts[p]), p))
    groups = [order[start: start + prefix_batch] for start in range(0, len(order), prefix_batch)]
    # the first batch index (sampling seed) of each group's chunks, as the groups run unsplit
    first_batch = np.cumsum([0] + [-(-sum(len(by_prompt[p]) for p in g) // row_batch) for g in groups])
    decoding = dict(model=model, adapter=adapter, prompts=prompts, rows=rows, max_new_tokens=max_new_tokens,
                    eos=eos, device=device, cache_name=cache_name, head=head, do_sample=do_sample,
                    temperature=temperature, top_p=top_p, record=np.asarray(record, dtype=bool), layers=layers)

    def run_group(members, gpart, g):
        """Prefix forward of the prompts ``members`` and the decoding of their rows, ``row_batch``
        at a time: per member ``(prefix positions, {row: _RowOutput})``. A chunk of rows that runs
        out of memory runs as halves; a group whose prefix forward does, as half groups."""
        width = max(len(prompts[p]) for p in members)
        member_of = {p: m for m, p in enumerate(members)}
        mask = torch.zeros((len(members), width), dtype=torch.long)
        prefix_ids = torch.full((len(members), max(width - 1, 1)), int(pad_token_id), dtype=torch.long)
        for m, p in enumerate(members):
            mask[m, width - len(prompts[p]):] = 1
            if len(prompts[p]) > 1:
                prefix_ids[m, width - len(prompts[p]):] = torch.tensor(prompts[p][:-1])
        cache = None
        if width > 1:
            pmask = mask[:, :-1]
            out = model(input_ids=prefix_ids.to(device), attention_mask=pmask.to(device),
                        position_ids=(pmask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=True, **head)
            cache = cache_from_output(out)
        group_rows = [k for p in members for k in by_prompt[p]]
        done: dict[int, _RowOutput] = {}
        for c, start in enumerate(range(0, len(group_rows), row_batch)):

            def run(chunk, cpart, c=c):
                generator = None
                if do_sample:  # an unsplit chunk of an unsplit group keeps its seed
                    generator = torch.Generator().manual_seed(
                        part_seed(seed, int(first_batch[g]) + c, (*gpart, 2, *cpart) if gpart else cpart))
                return _decode_chunk(chunk, [member_of[rows[k][0]] for k in chunk], cache, mask, width,
                                     generator, **decoding)

            chunk = group_rows[start: start + row_batch]
            done.update(zip(chunk, split_on_oom(run, chunk, "shared-prefix rows")))
        return [(len(prompts[p]) - 1 if width > 1 else 0, {k: done[k] for k in by_prompt[p]}) for p in members]

    tokens: list[list[int]] = [[] for _ in rows]
    stopped = [False] * len(rows)
    entropy: list[list[float]] = [[] for _ in rows]
    positions_run = 0
    with torch.inference_mode():
        for g, members in enumerate(groups):
            for prefix_positions, outputs in split_on_oom(functools.partial(run_group, g=g), members,
                                                          "shared-prefix prompts"):
                positions_run += prefix_positions
                for k, row in outputs.items():
                    tokens[k], stopped[k], entropy[k] = row.tokens, row.stopped, row.entropy
                    positions_run += row.positions
                    if recorder is not None and slot_of[k] >= 0:
                        recorder.total[slot_of[k]], recorder.count[slot_of[k]] = row.total, row.count
                        recorder.last[slot_of[k]] = row.last
    mean = last = None
    if recorder is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (recorder.total / recorder.count[:, None, None]).astype(np.float32)
        last = recorder.last
    return PrefixRollouts(tokens, stopped, [np.asarray(e, dtype=np.float64) for e in entropy], recorded, list(layers),
                          mean, last, positions_run, time.perf_counter() - t0)


@dataclass
class _RowOutput:
    """One row's rollout: its tokens, whether it stopped, the entropy of each step, the positions it
    ran, and for a recorded row its activation sums, count and last-prompt activations."""

    tokens: list[int]
    stopped: bool
    entropy: list[float]
    positions: int
    total: np.ndarray | None = None
    count: int = 0
    last: np.ndarray | None = None


def _decode_chunk(chunk, member_rows, cache, mask, width, generator, *, model, adapter, prompts, rows,
                  max_new_tokens, eos, device, cache_name, head, do_sample, temperature, top_p, record,
                  layers) -> list[_RowOutput]:
    """Decode the rows ``chunk`` (global row indices) of one prefix group; one :class:`_RowOutput`
    per row, in the chunk's order. Nothing outside is changed, so a chunk that fails half way
    leaves no trace.

    A finished row stays in the batch (its tokens ignored) until :data:`PRUNE_SHARE` of the batch
    has finished: cutting the cache copies all of it, which costs more than carrying a few idle
    rows for some steps."""
    n = len(chunk)
    reading = record[np.asarray(chunk, dtype=np.int64)]
    slot_of = np.full(n, -1, dtype=np.int64)
    slot_of[reading] = np.arange(int(reading.sum()))
    recorder = _Recorder(int(reading.sum()), list(layers), adapter.n_neurons) if reading.any() else None
    tokens: list[list[int]] = [[] for _ in chunk]
    stopped = [False] * n
    entropy: list[list[float]] = [[] for _ in chunk]
    positions = np.zeros(n, dtype=np.int64)
    live = np.arange(n, dtype=np.int64)  # chunk position of each batch row
    done = np.zeros(live.size, dtype=bool)
    index = torch.tensor(member_rows, dtype=torch.long, device=device)
    cache = select_cache_rows(cache, index) if cache is not None else None
    attn = mask[index.cpu()].to(device)
    current = torch.tensor([[prompts[rows[k][0]][-1]] for k in chunk], dtype=torch.long, device=device)
    position = torch.tensor([[len(prompts[rows[k][0]]) - 1] for k in chunk], dtype=torch.long, device=device)

    def hooks_for(batch_rows: np.ndarray) -> NeuronHooks | None:
        edits = [rows[chunk[b]][1] for b in batch_rows]
        recording = recorder is not None and bool((slot_of[batch_rows] >= 0).any())
        if recorder is not None:
            recorder.slots = slot_of[batch_rows].copy()
        if not any(edits) and not recording:
            return None
        return NeuronHooks(adapter, InterventionPlan.per_row(edits) if any(edits) else None,
                           on_activation=recorder if recording else None, layers=layers if recording else None,
                           cached_prompt_length=width)

    def forward(hooks, ids, attention, pos, cache):
        kwargs = {cache_name: cache} if cache is not None else {}
        if hooks is None:
            return model(input_ids=ids, attention_mask=attention, position_ids=pos, use_cache=True, **kwargs, **head)
        with hooks:
            return model(input_ids=ids, attention_mask=attention, position_ids=pos, use_cache=True, **kwargs, **head)

    hooks = hooks_for(live)
    for step in range(max_new_tokens):
        if recorder is not None:
            recorder.first_step = step == 0
        out = forward(hooks, current, attn, position, cache)
        positions[live] += 1
        if recorder is not None:
            recorder.count[recorder.slots[recorder.slots >= 0]] += 1
        cache = cache_from_output(out)
        logits = out.logits[:, -1].float()
        chosen = _choose(logits, do_sample, temperature, top_p, generator)
        logp = torch.log_softmax(logits, dim=-1)
        ent = (-(logp.exp() * logp).nan_to_num().sum(-1)).cpu().numpy()
        chosen_cpu = chosen.cpu()
        finished = (torch.isin(chosen_cpu, eos) if eos.numel() else torch.zeros_like(chosen_cpu, dtype=torch.bool))
        finished = finished.numpy() & ~done
        for b in np.flatnonzero(~done):
            k = live[b]
            if finished[b]:
                stopped[k] = True
            else:
                tokens[k].append(int(chosen_cpu[b]))
                entropy[k].append(float(ent[b]))
        done |= finished
        if recorder is not None:
            recorder.slots[done] = -1  # a finished row is read no further
        if done.all() or step == max_new_tokens - 1:
            break
        if done.sum() >= max(1.0, PRUNE_SHARE * done.size):
            keep = np.flatnonzero(~done)
            idx = torch.as_tensor(keep, dtype=torch.long, device=device)
            live, done = live[keep], done[keep]
            cache = select_cache_rows(cache, idx)
            attn, position, chosen = attn[idx], position[idx], chosen[idx]
            hooks = hooks_for(live)
        attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype, device=device)], dim=1)
        position = position + 1
        current = chosen[:, None]
    # rows cut by max_new_tokens: their last token was never fed; feed it once for the recorded ones
    if recorder is not None:
        cut = np.flatnonzero(~done & (slot_of[live] >= 0))
        if cut.size:
            idx = torch.as_tensor(cut, dtype=torch.long, device=device)
            hooks = hooks_for(live[cut])
            recorder.first_step = False
            attn = torch.cat([attn[idx], torch.ones((cut.size, 1), dtype=attn.dtype, device=device)], dim=1)
            forward(hooks, chosen[idx][:, None], attn, position[idx] + 1, select_cache_rows(cache, idx))
            positions[live[cut]] += 1
            recorder.count[recorder.slots[recorder.slots >= 0]] += 1
    outputs = []
    for b in range(n):
        row = _RowOutput(tokens[b], stopped[b], entropy[b], int(positions[b]))
        if slot_of[b] >= 0:
            row.total, row.count, row.last = (recorder.total[slot_of[b]], int(recorder.count[slot_of[b]]),
                                              recorder.last[slot_of[b]])
        outputs.append(row)
    return outputs
