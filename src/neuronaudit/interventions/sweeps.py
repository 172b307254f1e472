"""Batched single-neuron dose sweeps: the engine of the control-window law (SCIENCE.md section 1).

A *row* is ``(layer, neuron, dose)``: add ``dose`` to neuron ``(layer, neuron)`` (so ``dose · v``
to the residual stream, ``v`` the neuron's write vector). A sweep evaluates every row on every
prompt. The control-window measurements need, per ``(prompt, row)``:

* the next-token distribution at the last prompt position (single-pass KL/entropy collapse,
  the predictor (b) of the collapse ceiling),
* the steered residual ``r'`` at the last prompt position after the dosed layer, and the readout
  (the final norm's output, what the unembedding reads), giving the alignment
  ``cosθ = <r', v> / (|r'| |v|)`` at the write layer and at the readout (their gap is what depth
  and the final normalisation do: a norm with unequal gains caps the readout alignment below 1
  however large the dose),
* greedy rollouts with the dose on every generated token (coherence, triggers).

The naive way runs one forward (or one ``generate``) per ``(prompt, row)``. Everything that does
not depend on the row is shared here instead, exactly:

``last_token_dose_sweep``  dose at the last prompt token only. The prefix (all but the last
    token) is clean for every row, so its KV cache is computed once per prompt; the last token
    then runs for a whole chunk of rows at once against that cache (the cache is broadcast to the
    rows by ``batch_repeat_interleave``, copying only the layers that run). Further, the hidden
    state *entering* layer ``l`` at the last token is clean for every row dosed at ``l`` or
    above, so blocks below the lowest dosed layer of a chunk are not run at all: they return the
    clean output recorded once per prompt (``_replay_blocks``). Rows are sorted by layer so each
    chunk starts as high as possible. This goes through the adapter's blocks only (no
    per-family code): the blocks of every supported family are applied in sequence, each taking
    the previous block's output, with masks, positions and rotary tables prepared before the
    loop, so skipping a prefix of blocks is exact; ``tests/unit/test_sweeps.py`` proves it
    against the naive loop for every family of :data:`neuronaudit.testing.TINY_FAMILIES`.
``generated_dose_sweep``  dose at every generated token (and, by default, the last prompt
    token). The clean prefix is prefilled once, its cache broadcast to the rows, then the rows
    are greedy-decoded together with a manual loop (argmax, no logits processors), ``pad`` after
    each row's EOS, exactly as ``model.generate(do_sample=False)`` per row.
``prompt_dose_sweep``  dose at every prompt token: no KV prefix can be shared, but the blocks
    below the lowest dosed layer still see clean input for every row, so their clean outputs
    over the whole prompt are recorded once and replayed; rows are batched into one forward.
``naive_dose_loop``  the reference: one forward/``generate`` per ``(prompt, row)`` under a
    broadcast :class:`~neuronaudit.interventions.InterventionPlan`. The tests compare every
    shortcut to it.
``single_pass_dose_response``  per-row ``KL(clean || dosed)`` and entropy of the next-token
    distribution over a generic prompt set, reduced chunk by chunk (no ``[prompts, rows, vocab]``
    tensor is kept).

Prompts are processed one at a time without padding (each row of ``input_ids`` is stripped to its
real tokens), so no position-id or padding convention enters the comparison; the rows of one
prompt are the batch. Memory is bounded by ``row_batch_size`` rows at a time; a chunk of rows that
runs out of memory runs as two halves (:func:`~neuronaudit.interventions.memory.split_on_oom`)
through the same blocks as the whole chunk, so its outputs are the whole chunk's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from neuronaudit.errors import NeuronAuditError, NonFiniteError
from neuronaudit.interventions.finite import finite_checks
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.interventions.scoring import blocks_return, entropy_from_logp, kl_from_logp
from neuronaudit.models.adapters import ArchitectureAdapter
from neuronaudit.models.kv_cache import broadcast_cache, cache_from_output, cache_kwarg

Row = tuple[int, int, float]  # (layer, neuron, dose)

__all__ = [
    "Row",
    "SweepResult",
    "DoseResponse",
    "alignment",
    "write_vectors",
    "last_token_dose_sweep",
    "generated_dose_sweep",
    "prompt_dose_sweep",
    "naive_dose_loop",
    "single_pass_dose_response",
]


# --------------------------------------------------------------------------------------------
# results and alignment
# --------------------------------------------------------------------------------------------


def alignment(resid: torch.Tensor, write: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``cosθ = <r, v> / (|r| |v|)`` over the last dimension.

    ``resid [..., d_model]`` and ``write [d_model]`` or ``[..., d_model]`` (broadcast against
    each other); returns ``[...]`` (float32).
    """
    r = resid.float()
    v = write.float().to(r.device)
    dot = (r * v).sum(-1)
    return dot / (r.norm(dim=-1) * v.norm(dim=-1)).clamp_min(eps)


def write_vectors(adapter: ArchitectureAdapter, rows: Sequence[Row]) -> torch.Tensor:
    """The write vector ``v`` of every row's neuron, ``[n_rows, d_model]`` (float32, CPU)."""
    if not rows:
        return torch.zeros(0, adapter.d_model)
    return torch.stack(
        [adapter.write_vector(int(l), int(i)).detach().float().cpu() for l, i, _ in rows]
    )


@dataclass
class SweepResult:
    """Outputs of a sweep, in the order of ``rows``. ``P`` prompts, ``R`` rows, ``V`` vocab,
    ``D`` d_model, ``L`` layers, ``K = len(read_layers)``, ``N`` generated tokens.

    Last-position sweeps (``last_token``, ``prompt``; naive with ``max_new_tokens=0``):
      ``logits``       ``[P, R, V]`` next-token logits at the last prompt position
      ``resid_write``  ``[P, R, D]`` residual after the row's dosed layer, last prompt position
      ``resid_final``  ``[P, R, D]`` the readout: the final norm's output (after the last block and
                       the final norm), same position
      ``resid_read``   ``[P, R, K, D]`` residual after each of ``read_layers``
      ``clean_logits`` ``[P, V]``, ``clean_resid`` ``[P, L, D]`` (after every layer),
      ``clean_final``  ``[P, D]`` (the final norm's output): the unsteered pass (shortcuts only;
                       ``None`` for the naive loop)
    Generation sweeps (``generated``; naive with ``max_new_tokens > 0``):
      ``tokens``        ``[P, R, N]`` greedy tokens, ``pad_token_id`` after a row's EOS
      ``lengths``       ``[P, R]`` generated tokens up to and including EOS
      ``token_logprob`` ``[P, R, N]`` log-prob of each chosen token (nan after EOS)
      ``entropy``       ``[P, R, N]`` entropy (nats) of each step's distribution (nan after EOS)
      ``logits``        ``[P, R, N, V]`` every step's logits when ``return_logits=True`` (nan after EOS)
      ``token_logits``  ``[P, R, N, K]`` every step's logits of the ``keep_token_ids`` only
      ``layer_inputs``  ``[P, R, N, D]`` the residual stream entering row ``r``'s layer at each
                        decode step, where ``keep_layer_inputs=True`` (zeros for a row at layer 0
                        and after a row's EOS): below its dose, what the unintervened model
                        computes (:class:`~neuronaudit.interventions.scoring.LowerLayers`)
    """

    rows: list[Row]
    method: str
    positions: tuple[str, ...]
    prompt_lengths: list[int]
    read_layers: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None
    resid_write: torch.Tensor | None = None
    resid_final: torch.Tensor | None = None
    resid_read: torch.Tensor | None = None
    clean_logits: torch.Tensor | None = None
    clean_resid: torch.Tensor | None = None
    clean_final: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    token_logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    token_logits: torch.Tensor | None = None
    layer_inputs: torch.Tensor | None = None

    def log_probs(self) -> torch.Tensor:
        """``log_softmax`` of ``logits`` over the vocabulary (same shape)."""
        if self.logits is None:
            raise NeuronAuditError("this sweep kept no logits (return_logits=False)")
        return F.log_softmax(self.logits.float(), dim=-1)

    def alignment_at_write(self, adapter: ArchitectureAdapter) -> torch.Tensor:
        """``[P, R]`` cosθ between the steered residual after the dosed layer and ``v``."""
        return alignment(self.resid_write, write_vectors(adapter, self.rows)[None])

    def alignment_at_readout(self, adapter: ArchitectureAdapter) -> torch.Tensor:
        """``[P, R]`` cosθ between the readout (the final norm's output) and ``v``."""
        return alignment(self.resid_final, write_vectors(adapter, self.rows)[None])

    def clean_alignment(self, adapter: ArchitectureAdapter, at: str = "write") -> torch.Tensor:
        """``[P, R]`` unsteered alignment ``c0`` of each row's neuron: ``at="write"`` uses the
        clean residual after the row's layer, ``at="readout"`` the clean final norm's output."""
        if self.clean_resid is None:
            raise NeuronAuditError("this sweep kept no clean pass (naive loops do not)")
        v = write_vectors(adapter, self.rows)
        if at == "readout":
            return alignment(self.clean_final[:, None, :], v[None])
        if at != "write":
            raise NeuronAuditError(f"clean_alignment at={at!r}: choose 'write' or 'readout'")
        layers = torch.tensor([l for l, _, _ in self.rows], dtype=torch.long)
        return alignment(self.clean_resid[:, layers, :], v[None])


@dataclass
class DoseResponse:
    """Single-pass dose response (``P`` prompts, ``R`` rows).

    ``kl`` ``[P, R]`` KL(clean || dosed) of the next-token distribution (nats); ``entropy``
    ``[P, R]`` entropy of the dosed distribution; ``clean_entropy`` ``[P]``; ``alignment_write``
    and ``alignment_readout`` ``[P, R]`` cosθ with the write of the steered residual after the
    dosed layer and of the readout (the final norm's output), at the same position.
    """

    rows: list[Row]
    positions: tuple[str, ...]
    kl: torch.Tensor
    entropy: torch.Tensor
    clean_entropy: torch.Tensor
    alignment_write: torch.Tensor
    alignment_readout: torch.Tensor


# --------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_rows(adapter: ArchitectureAdapter, rows: Sequence[Sequence]) -> list[Row]:
    out = []
    for row in rows:
        if len(row) != 3:
            raise NeuronAuditError(f"sweep row {row!r} must be (layer, neuron, dose)")
        layer = adapter.check_layers([row[0]])[0]
        neuron = adapter.check_neuron(row[1])
        dose = float(row[2])
        if not math.isfinite(dose):
            raise NeuronAuditError(f"sweep row {tuple(row)!r}: the dose must be a finite number")
        out.append((layer, neuron, dose))
    return out


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each prompt's real tokens (padding on either side removed), ``[T_p]`` each."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        return [ids for ids in input_ids]
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    out = []
    for p, (ids, mask) in enumerate(zip(input_ids, attention_mask.bool())):
        real = ids[mask]
        if real.numel() == 0:
            raise NeuronAuditError(f"prompt {p} of the sweep has no real tokens")
        out.append(real)
    return out


@contextmanager
def _named(p: int, rows: Sequence[Row] | None = None, chunk: Sequence[int] | None = None):
    """Name the prompt and the row's dose in a non-finite value found inside the block (``rows``
    ``None``: the unintervened pass)."""
    try:
        yield
    except NonFiniteError as err:
        if rows is None:
            context = "unintervened pass"
        elif err.row is not None and chunk is not None and err.row < len(chunk):
            layer, neuron, dose = rows[chunk[err.row]]
            context = f"sweep row: dose {dose:g} on neuron ({layer}, {neuron})"
        else:
            context = ""
        err.at(prompt=f"{p} of the sweep", context=context)
        raise


def _plan(rows: Sequence[Row], positions: Sequence[str]) -> InterventionPlan:
    return InterventionPlan.per_row([[NeuronEdit.dose(l, i, d, tuple(positions))] for l, i, d in rows])


def _head_kwargs(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: the LM head runs on the last position only."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _order_by_layer(rows: Sequence[Row], size: int, same_layer: bool = False) -> list[list[int]]:
    """Row indices sorted by layer (highest first) and cut into chunks of at most ``size``.

    ``same_layer`` keeps each chunk to one layer, so every chunk starts exactly at its rows'
    layer (worth it when each row is a whole prompt, already a large batch); otherwise chunks
    are filled across neighbouring layers (worth it when each row is a single token).
    """
    if size < 1:
        raise NeuronAuditError(f"row_batch_size {size!r} must be at least 1")
    order = sorted(range(len(rows)), key=lambda r: (-rows[r][0], r))
    if not same_layer:
        return [order[i : i + size] for i in range(0, len(order), size)]
    chunks: list[list[int]] = []
    for r in order:
        if chunks and len(chunks[-1]) < size and rows[chunks[-1][0]][0] == rows[r][0]:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def _expand_output(obj, batch: int, contiguous: bool):
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0 and obj.shape[0] == 1 and batch != 1:
            out = obj.expand(batch, *obj.shape[1:])
            return out.contiguous() if contiguous else out
        return obj
    if isinstance(obj, tuple):
        return type(obj)(_expand_output(o, batch, contiguous) for o in obj)
    if isinstance(obj, list):
        return [_expand_output(o, batch, contiguous) for o in obj]
    return obj


@contextmanager
def _replay_blocks(adapter: ArchitectureAdapter, recorded: Sequence, upto: int, batch: int):
    """Blocks ``[0, upto)`` return their recorded clean (batch-1) output broadcast to ``batch``
    rows instead of running. Forward hooks on those blocks still fire with the replayed output.
    Their KV cache layers are not updated: use only for a single forward."""
    with blocks_return(adapter, [_expand_output(recorded[layer], batch, contiguous=layer == upto - 1)
                                 for layer in range(upto)]):
        yield


@contextmanager
def _record_blocks(adapter: ArchitectureAdapter, store: list):
    """Record every block's output object (``store[l]``) and the readout, the final norm's output
    (``store[L]``)."""
    handles = []

    def block_hook(layer):
        def hook(module, args, output):
            store[layer] = output

        return hook

    def final_hook(module, args, output):
        store[adapter.n_layers] = _hidden(output)

    try:
        for layer, block in enumerate(adapter.blocks):
            handles.append(block.register_forward_hook(block_hook(layer)))
        handles.append(adapter.final_norm.register_forward_hook(final_hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _record_layer_inputs(adapter: ArchitectureAdapter, layers: Sequence[int]):
    """While decoding rows at ``layers``: per distinct layer ``l >= 1``, the residual entering
    block ``l`` at the last position of each step, for the rows at ``l``
    (``{(l, row indices): [step tensors [n_l, D]]}``); a row at layer 0 records nothing."""
    store: dict = {}
    handles = []

    def hook(key):
        def record(module, args, output):
            store[key].append(_hidden(output)[list(key[1]), -1].detach().clone())

        return record

    try:
        for layer in sorted({int(x) for x in layers} - {0}):
            key = (layer, tuple(k for k, x in enumerate(layers) if int(x) == layer))
            store[key] = []
            handles.append(adapter.blocks[layer - 1].register_forward_hook(hook(key)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _capture_final(adapter: ArchitectureAdapter, store: dict):
    """Keep the readout, the final norm's OUTPUT (``store["final"]``): the alignment at the readout
    is measured after normalisation, where unequal norm gains can cap it."""

    def hook(module, args, output):
        store["final"] = _hidden(output)

    handle = adapter.final_norm.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _resid_reader(rows_chunk: Sequence[Row], read_layers: Sequence[int], store: dict):
    """``on_resid`` callback storing, at the last position, each row's dosed-layer residual and
    every read layer's residual."""
    dosed = {}
    for r, (layer, _, _) in enumerate(rows_chunk):
        dosed.setdefault(layer, []).append(r)
    dosed = {layer: torch.tensor(idx, dtype=torch.long) for layer, idx in dosed.items()}
    read_set = set(read_layers)

    def on_resid(layer: int, hidden: torch.Tensor, ctx) -> None:
        last = hidden[:, -1].detach().float()
        if layer in dosed:
            idx = dosed[layer].to(last.device)
            store["write"][idx] = last[idx].cpu()
        if layer in read_set:
            store["read"][layer] = last.cpu()

    layers = sorted(set(dosed) | read_set)
    return on_resid, layers


@dataclass
class _Chunk:
    """What one chunk of rows produced for one prompt (``r`` rows)."""

    prompt: int
    rows: torch.Tensor  # [r] indices into the sweep's rows
    logits: torch.Tensor  # [r, V] last-position logits (float32)
    resid_write: torch.Tensor  # [r, D]
    resid_final: torch.Tensor  # [r, D]
    resid_read: torch.Tensor | None  # [r, K, D]


@dataclass
class _Clean:
    prompt: int
    logits: torch.Tensor  # [V]
    resid: torch.Tensor  # [L, D] last position
    final: torch.Tensor  # [D]


def _clean_from_record(p: int, record: list, logits: torch.Tensor) -> _Clean:
    L = len(record) - 1
    resid = torch.stack([_hidden(record[l])[0, -1].detach().float().cpu() for l in range(L)])
    return _Clean(p, logits[0, -1].detach().float().cpu(), resid, record[L][0, -1].detach().float().cpu())


def _run_rows(
    adapter,
    rows: Sequence[Row],
    chunk: list[int],
    positions: tuple[str, ...],
    read_layers: Sequence[int],
    forward,
    hooks_factory,
) -> tuple:
    """Run ``forward()`` for ``chunk`` rows under their per-row plan, reading residuals."""
    rows_chunk = [rows[r] for r in chunk]
    n, D = len(chunk), adapter.d_model
    store = {"write": torch.zeros(n, D), "read": {}, "final": None}
    on_resid, layers = _resid_reader(rows_chunk, read_layers, store)
    with ExitStack() as stack:
        stack.enter_context(
            hooks_factory(_plan(rows_chunk, positions), on_resid=on_resid, layers=layers)
        )
        stack.enter_context(_capture_final(adapter, store))
        out = forward()
    logits = out.logits[:, -1].detach().float().cpu()
    final = store["final"][:, -1].detach().float().cpu()
    read = (
        torch.stack([store["read"][layer] for layer in read_layers], dim=1) if read_layers else None
    )
    return logits, store["write"], final, read


def _row_outputs(logits, write, final, read) -> list[tuple]:
    """The outputs of :func:`_run_rows` row by row (what :func:`split_on_oom` joins)."""
    return [(logits[r], write[r], final[r], None if read is None else read[r]) for r in range(logits.shape[0])]


def _chunk(p: int, chunk: list[int], outputs: list[tuple]) -> _Chunk:
    """One chunk's :class:`_Chunk` from its rows' outputs, in the chunk's order."""
    logits, write, final, read = (list(x) for x in zip(*outputs))
    return _Chunk(p, torch.tensor(chunk), torch.stack(logits), torch.stack(write), torch.stack(final),
                  None if read[0] is None else torch.stack(read))


def _iter_last_token(
    model, adapter, prompts, rows, read_layers, row_batch_size, share_lower_layers
) -> Iterator[_Clean | _Chunk]:
    device = _device(model)
    head = _head_kwargs(model)
    ck = cache_kwarg(model)
    chunks = _order_by_layer(rows, row_batch_size)
    L = adapter.n_layers
    for p, ids in enumerate(prompts):
        ids = ids.to(device)
        T = int(ids.numel())
        prefix = None
        last = ids[None, -1:]
        record: list = [None] * (L + 1)
        with _named(p):
            if T > 1:
                prefix = cache_from_output(model(
                    input_ids=ids[None, :-1], attention_mask=torch.ones(1, T - 1, dtype=torch.long, device=device),
                    use_cache=True, **head,
                ))
            with _record_blocks(adapter, record):
                clean = model(
                    input_ids=last, attention_mask=torch.ones(1, T, dtype=torch.long, device=device),
                    use_cache=True, **{ck: broadcast_cache(prefix, 1)}, **head,
                )
        yield _clean_from_record(p, record, clean.logits)
        for chunk in chunks:
            # a half of a split chunk starts where the whole chunk starts: the same blocks run
            start = min(rows[r][0] for r in chunk) if share_lower_layers else 0

            def run(part_rows, part, p=p, prefix=prefix, start=start, record=record, last=last, T=T):
                n = len(part_rows)
                cache = broadcast_cache(prefix, n, from_layer=start)

                def forward():
                    with _replay_blocks(adapter, record, start, n):
                        return model(
                            input_ids=last.expand(n, 1),
                            attention_mask=torch.ones(n, T, dtype=torch.long, device=device),
                            use_cache=cache is not None, **{ck: cache}, **head,
                        )

                def hooks_factory(plan, **kw):
                    return NeuronHooks(adapter, plan, cached_prompt_length=T, **kw)

                with _named(p, rows, part_rows):
                    out = _run_rows(adapter, rows, part_rows, ("last_prompt",), read_layers, forward, hooks_factory)
                return _row_outputs(*out)

            yield _chunk(p, chunk, split_on_oom(run, chunk, "dose sweep"))


def _iter_prompt(
    model, adapter, prompts, rows, read_layers, row_batch_size, share_lower_layers
) -> Iterator[_Clean | _Chunk]:
    device = _device(model)
    head = _head_kwargs(model)
    chunks = _order_by_layer(rows, row_batch_size, same_layer=share_lower_layers)
    L = adapter.n_layers
    for p, ids in enumerate(prompts):
        ids = ids.to(device)
        T = int(ids.numel())
        record: list = [None] * (L + 1)
        with _named(p), _record_blocks(adapter, record):
            clean = model(
                input_ids=ids[None], attention_mask=torch.ones(1, T, dtype=torch.long, device=device),
                use_cache=False, **head,
            )
        yield _clean_from_record(p, record, clean.logits)
        for chunk in chunks:
            start = min(rows[r][0] for r in chunk) if share_lower_layers else 0

            def run(part_rows, part, p=p, start=start, record=record, ids=ids, T=T):
                n = len(part_rows)

                def forward():
                    with _replay_blocks(adapter, record, start, n):
                        return model(
                            input_ids=ids[None].expand(n, T),
                            attention_mask=torch.ones(n, T, dtype=torch.long, device=device),
                            use_cache=False, **head,
                        )

                def hooks_factory(plan, **kw):
                    return NeuronHooks(adapter, plan, **kw)

                with _named(p, rows, part_rows):
                    out = _run_rows(adapter, rows, part_rows, ("prompt",), read_layers, forward, hooks_factory)
                return _row_outputs(*out)

            yield _chunk(p, chunk, split_on_oom(run, chunk, "dose sweep"))


def _collect(
    items: Iterator[_Clean | _Chunk], rows, prompts, read_layers, adapter, method, positions, return_logits
) -> SweepResult:
    P, R, D, L = len(prompts), len(rows), adapter.d_model, adapter.n_layers
    res = SweepResult(
        rows=list(rows), method=method, positions=positions,
        prompt_lengths=[int(p.numel()) for p in prompts], read_layers=list(read_layers),
        resid_write=torch.zeros(P, R, D), resid_final=torch.zeros(P, R, D),
        resid_read=torch.zeros(P, R, len(read_layers), D) if read_layers else None,
        clean_resid=torch.zeros(P, L, D), clean_final=torch.zeros(P, D),
    )
    for item in items:
        if isinstance(item, _Clean):
            if res.clean_logits is None:
                res.clean_logits = torch.zeros(P, item.logits.shape[-1])
            res.clean_logits[item.prompt] = item.logits
            res.clean_resid[item.prompt] = item.resid
            res.clean_final[item.prompt] = item.final
            continue
        p, idx = item.prompt, item.rows
        if return_logits:
            if res.logits is None:
                res.logits = torch.zeros(P, R, item.logits.shape[-1])
            res.logits[p, idx] = item.logits
        res.resid_write[p, idx] = item.resid_write
        res.resid_final[p, idx] = item.resid_final
        if item.resid_read is not None:
            res.resid_read[p, idx] = item.resid_read
    if return_logits and res.logits is None and res.clean_logits is not None:
        res.logits = torch.zeros(P, 0, res.clean_logits.shape[-1])
    return res


# --------------------------------------------------------------------------------------------
# public sweeps
# --------------------------------------------------------------------------------------------


def last_token_dose_sweep(
    model,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: Sequence[Row],
    read_layers: Sequence[int] | None = None,
    return_logits: bool = True,
    row_batch_size: int = 32,
    share_lower_layers: bool = True,
) -> SweepResult:
    """Every row dosed at the last prompt token only, on every prompt.

    ``input_ids`` / ``attention_mask``: ``[P, T]`` (either padding side; each prompt is stripped
    to its real tokens). ``rows``: ``R`` tuples ``(layer, neuron, dose)``. ``read_layers``: extra
    layers whose residual is returned for every row (``resid_read [P, R, K, D]``).
    Returns a :class:`SweepResult` with ``logits [P, R, V]`` (if ``return_logits``),
    ``resid_write``/``resid_final [P, R, D]`` and the clean pass.

    Cost per prompt: one clean prefix forward, one clean last-token forward, and one last-token
    forward per chunk of ``row_batch_size`` rows running only the blocks from the chunk's lowest
    dosed layer up (``share_lower_layers=False`` runs every block).
    """
    rows = _check_rows(adapter, rows)
    read_layers = adapter.check_layers(read_layers or [])
    prompts = _prompts(input_ids, attention_mask)
    with torch.inference_mode(), finite_checks(adapter):
        items = _iter_last_token(model, adapter, prompts, rows, read_layers, row_batch_size, share_lower_layers)
        return _collect(items, rows, prompts, read_layers, adapter, "last_token", ("last_prompt",), return_logits)


def prompt_dose_sweep(
    model,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: Sequence[Row],
    read_layers: Sequence[int] | None = None,
    return_logits: bool = True,
    row_batch_size: int = 16,
    share_lower_layers: bool = True,
) -> SweepResult:
    """Every row dosed at every prompt token; outputs read at the last prompt position.

    Shapes as in :func:`last_token_dose_sweep`. One clean forward per prompt records every
    block's output; each chunk of rows then runs the prompt as one batched forward through the
    blocks from its lowest dosed layer up (the head on the last position only).
    """
    rows = _check_rows(adapter, rows)
    read_layers = adapter.check_layers(read_layers or [])
    prompts = _prompts(input_ids, attention_mask)
    with torch.inference_mode(), finite_checks(adapter):
        items = _iter_prompt(model, adapter, prompts, rows, read_layers, row_batch_size, share_lower_layers)
        return _collect(items, rows, prompts, read_layers, adapter, "prompt", ("prompt",), return_logits)


def _generation_ids(model, eos_token_id, pad_token_id):
    gc = getattr(model, "generation_config", None)
    if eos_token_id == "default":
        eos_token_id = getattr(gc, "eos_token_id", None)
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, int):
        eos = [eos_token_id]
    else:
        eos = [int(e) for e in eos_token_id]
    if pad_token_id is None:
        pad_token_id = getattr(gc, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


def _step_stats(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = entropy_from_logp(logp)
    return logp.gather(-1, chosen[:, None])[:, 0], entropy


class _DecodeStep:
    """Greedy decoding of ``n`` rows that share one prompt's cached prefix (the hooks in force
    dose each row); the per-step loop of :func:`generated_dose_sweep`."""

    def __init__(self, model, head: dict, cache_name: str, device, eos: list[int], pad: int, keep_logits: bool,
                 keep_ids: Sequence[int] = ()):
        self.model, self.head, self.cache_name, self.device = model, head, cache_name, device
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad, self.keep_logits = pad, keep_logits
        self.keep_ids = torch.tensor(list(keep_ids), dtype=torch.long, device=device) if len(keep_ids) else None

    def decode(self, ids: torch.Tensor, prefix, n: int, max_new_tokens: int):
        """``(tokens, token_logprob, entropy [n, N], lengths [n], logits per step, kept-token logits
        [n, N, K])`` on the CPU."""
        T = int(ids.numel())
        tokens = torch.full((n, max_new_tokens), self.pad, dtype=torch.long)
        logprob = torch.full((n, max_new_tokens), math.nan)
        entropy = torch.full((n, max_new_tokens), math.nan)
        cache = broadcast_cache(prefix, n)
        current = ids[None, -1:].expand(n, 1)
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        length = torch.zeros(n, dtype=torch.long)
        step_logits = []
        kept = torch.full((n, max_new_tokens, 0 if self.keep_ids is None else len(self.keep_ids)), math.nan)
        for step in range(max_new_tokens):
            out = self.model(
                input_ids=current,
                attention_mask=torch.ones(n, T + step, dtype=torch.long, device=self.device),
                use_cache=True, **{self.cache_name: cache}, **self.head,
            )
            cache = cache_from_output(out)
            logits = out.logits[:, -1].float()
            chosen = logits.argmax(-1)
            chosen = torch.where(finished, torch.full_like(chosen, self.pad), chosen)
            lp, ent = _step_stats(logits, chosen)
            live = ~finished
            tokens[:, step] = chosen.cpu()
            logprob[:, step] = torch.where(live, lp, torch.nan).cpu()
            entropy[:, step] = torch.where(live, ent, torch.nan).cpu()
            length += live.cpu().long()
            if self.keep_logits:
                step_logits.append(logits.cpu())
            if self.keep_ids is not None:
                kept[:, step] = torch.where(live[:, None], logits[:, self.keep_ids], torch.nan).cpu()
            if self.eos is not None:
                finished = finished | torch.isin(chosen, self.eos)
                if bool(finished.all()):
                    break
            current = chosen[:, None]
        return tokens, logprob, entropy, length, step_logits, kept


def generated_dose_sweep(
    model,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: Sequence[Row],
    max_new_tokens: int,
    include_last_prompt: bool = True,
    eos_token_id: int | Sequence[int] | None | str = "default",
    pad_token_id: int | None = None,
    return_logits: bool = False,
    row_batch_size: int = 32,
    keep_token_ids: Sequence[int] = (),
    keep_layer_inputs: bool = False,
) -> SweepResult:
    """Greedy rollouts with every row's dose on every generated token (and on the last prompt
    token when ``include_last_prompt``), ``max_new_tokens`` per row.

    ``input_ids`` / ``attention_mask`` ``[P, T]``; returns ``tokens [P, R, N]`` (``pad_token_id``
    after a row's EOS), ``lengths [P, R]``, ``token_logprob`` and ``entropy [P, R, N]``, and
    ``logits [P, R, N, V]`` if ``return_logits`` (nan after EOS), and ``token_logits [P, R, N, K]``, the logits of
    the ``K`` ``keep_token_ids`` at every step (nan after EOS; what a logit-pair oracle reads, at a
    fraction of the memory of full logits), and ``layer_inputs [P, R, N, D]`` if
    ``keep_layer_inputs`` (the residual entering each row's layer at each step, for scoring the
    rollouts without rerunning the blocks below it). ``eos_token_id="default"`` takes the model's
    generation config; ``None`` never stops. Equals one ``model.generate(do_sample=False)`` per
    row token for token (:func:`naive_dose_loop`): greedy argmax, no logits processors.
    """
    rows = _check_rows(adapter, rows)
    if max_new_tokens < 1:
        raise NeuronAuditError(f"max_new_tokens {max_new_tokens!r} must be at least 1")
    prompts = _prompts(input_ids, attention_mask)
    positions = ("last_prompt", "generated") if include_last_prompt else ("generated",)
    eos, pad = _generation_ids(model, eos_token_id, pad_token_id)
    device = _device(model)
    head = _head_kwargs(model)
    ck = cache_kwarg(model)
    P, R, N = len(prompts), len(rows), max_new_tokens
    res = SweepResult(
        rows=list(rows), method="generated", positions=positions,
        prompt_lengths=[int(p.numel()) for p in prompts],
        tokens=torch.full((P, R, N), pad, dtype=torch.long),
        lengths=torch.zeros(P, R, dtype=torch.long),
        token_logprob=torch.full((P, R, N), math.nan),
        entropy=torch.full((P, R, N), math.nan),
        token_logits=torch.full((P, R, N, len(keep_token_ids)), math.nan),
        layer_inputs=torch.zeros((P, R, N, adapter.d_model), dtype=next(model.parameters()).dtype)
        if keep_layer_inputs else None,
    )
    chunks = _order_by_layer(rows, row_batch_size)
    step = _DecodeStep(model, head, ck, device, eos, pad, return_logits, keep_token_ids)
    with torch.inference_mode(), finite_checks(adapter):
        for p, ids in enumerate(prompts):
            ids = ids.to(device)
            T = int(ids.numel())
            prefix = None
            if T > 1:
                with _named(p):
                    prefix = cache_from_output(model(
                        input_ids=ids[None, :-1],
                        attention_mask=torch.ones(1, T - 1, dtype=torch.long, device=device),
                        use_cache=True, **head,
                    ))
            for chunk in chunks:

                def run(part_rows, part, p=p, ids=ids, prefix=prefix, T=T):
                    hooks = NeuronHooks(adapter, _plan([rows[r] for r in part_rows], positions), cached_prompt_length=T)
                    recorded = _record_layer_inputs(adapter, [rows[r][0] for r in part_rows]) if keep_layer_inputs \
                        else nullcontext({})
                    with _named(p, rows, part_rows), hooks, recorded as inputs:
                        tokens, logprob, entropy, length, logits, kept = step.decode(ids, prefix, len(part_rows), N)
                    if keep_layer_inputs:
                        for (_layer, sel), steps_ in inputs.items():
                            res.layer_inputs[p, [part_rows[k] for k in sel], : len(steps_)] = torch.stack(
                                steps_, dim=1).to(res.layer_inputs.dtype).cpu()
                    steps = torch.stack(logits, dim=1) if logits else None  # [n, steps run, V]
                    # a row's logits up to and including its EOS (the rows after it are no part of it)
                    return [(tokens[r], logprob[r], entropy[r], length[r], kept[r],
                             None if steps is None else steps[r, : int(length[r])]) for r in range(len(part_rows))]

                out = split_on_oom(run, chunk, "generated dose sweep")
                idx = torch.tensor(chunk)
                tokens, logprob, entropy, length, kept, logits = (list(x) for x in zip(*out))
                res.tokens[p, idx], res.token_logprob[p, idx] = torch.stack(tokens), torch.stack(logprob)
                res.entropy[p, idx], res.token_logits[p, idx] = torch.stack(entropy), torch.stack(kept)
                res.lengths[p, idx] = torch.stack(length)
                if return_logits:
                    for r, row_logits in zip(chunk, logits):
                        if res.logits is None:
                            res.logits = torch.full((P, R, N, row_logits.shape[-1]), math.nan)
                        res.logits[p, r, : row_logits.shape[0]] = row_logits
    return res


def naive_dose_loop(
    model,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: Sequence[Row],
    positions: Sequence[str] = ("last_prompt",),
    max_new_tokens: int = 0,
    read_layers: Sequence[int] | None = None,
    return_logits: bool = True,
    eos_token_id: int | Sequence[int] | None | str = "default",
    pad_token_id: int | None = None,
) -> SweepResult:
    """Reference: one full forward (``max_new_tokens=0``) or one greedy ``model.generate`` per
    ``(prompt, row)`` under a broadcast plan dosing ``positions``.

    Forward mode fills ``logits [P, R, V]``, ``resid_write``/``resid_final [P, R, D]`` and
    ``resid_read``; generate mode fills ``tokens``, ``lengths``, ``token_logprob``, ``entropy``
    and (``return_logits``) ``logits [P, R, N, V]``, as the matching shortcut does.
    """

    rows = _check_rows(adapter, rows)
    read_layers = adapter.check_layers(read_layers or [])
    prompts = _prompts(input_ids, attention_mask)
    positions = tuple(positions)
    device = _device(model)
    P, R, D = len(prompts), len(rows), adapter.d_model
    res = SweepResult(
        rows=list(rows), method="naive", positions=positions,
        prompt_lengths=[int(p.numel()) for p in prompts], read_layers=list(read_layers),
    )
    generate = max_new_tokens > 0
    if generate:
        eos, pad = _generation_ids(model, eos_token_id, pad_token_id)
        N = max_new_tokens
        # Greedy and nothing else: the model's own generation config (repetition penalties,
        # suppressed tokens, ...) is swapped out for the call, as the shortcut applies none.
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=N, eos_token_id=eos if eos else None,
            pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
        )
        res.tokens = torch.full((P, R, N), pad, dtype=torch.long)
        res.lengths = torch.zeros(P, R, dtype=torch.long)
        res.token_logprob = torch.full((P, R, N), math.nan)
        res.entropy = torch.full((P, R, N), math.nan)
    else:
        res.resid_write, res.resid_final = torch.zeros(P, R, D), torch.zeros(P, R, D)
        res.resid_read = torch.zeros(P, R, len(read_layers), D) if read_layers else None
    with torch.inference_mode(), finite_checks(adapter):
        for p, ids in enumerate(prompts):
            ids = ids.to(device)[None]
            for r, row in enumerate(rows):
                plan = _plan([row], positions)
                with _named(p, rows, [r]):
                    if generate:
                        _naive_generate(model, adapter, plan, ids, config, res, p, r, return_logits)
                    else:
                        _naive_forward(model, adapter, plan, ids, row, read_layers, res, p, r, return_logits)
    return res


def _naive_generate(model, adapter, plan, ids, config, res: SweepResult, p: int, r: int, return_logits: bool):
    """One ``model.generate`` of prompt ``p`` under row ``r``'s plan, stored into ``res``."""
    T = ids.shape[1]
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        with NeuronHooks(adapter, plan):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.generation_config = saved
    new = out.sequences[0, T:].cpu()
    steps = torch.stack([s[0].float().cpu() for s in out.logits])  # [n, V]
    n = new.numel()
    res.tokens[p, r, :n] = new
    res.lengths[p, r] = n
    lp, ent = _step_stats(steps, new)
    res.token_logprob[p, r, :n] = lp
    res.entropy[p, r, :n] = ent
    if return_logits:
        if res.logits is None:
            P, R, N = res.tokens.shape
            res.logits = torch.full((P, R, N, steps.shape[-1]), math.nan)
        res.logits[p, r, :n] = steps


def _naive_forward(model, adapter, plan, ids, row, read_layers, res: SweepResult, p: int, r: int,
                   return_logits: bool):
    """One full forward of prompt ``p`` under row ``r``'s plan, logits and residuals into ``res``."""
    D = adapter.d_model
    store = {"write": torch.zeros(1, D), "read": {}, "final": None}
    on_resid, layers = _resid_reader([row], read_layers, store)
    with NeuronHooks(adapter, plan, on_resid=on_resid, layers=layers), _capture_final(adapter, store):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if return_logits:
        if res.logits is None:
            P, R = res.resid_write.shape[:2]
            res.logits = torch.zeros(P, R, out.logits.shape[-1])
        res.logits[p, r] = out.logits[0, -1].float().cpu()
    res.resid_write[p, r] = store["write"][0]
    res.resid_final[p, r] = store["final"][0, -1].float().cpu()
    if read_layers:
        res.resid_read[p, r] = torch.stack([store["read"][l][0] for l in read_layers])


def single_pass_dose_response(
    model,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: Sequence[Row],
    clean_logits: torch.Tensor | None = None,
    positions: str = "prompt",
    row_batch_size: int | None = None,
    share_lower_layers: bool = True,
) -> DoseResponse:
    """Per-row ``KL(clean || dosed)`` and entropy of the next-token distribution at the last
    prompt position of each generic prompt, one forward per dose (no rollout): predictor (b) of
    the collapse ceiling (SCIENCE.md section 1).

    ``input_ids`` / ``attention_mask`` ``[P, T]`` (the generic prompt set); ``rows`` ``R`` tuples
    ``(layer, neuron, dose)``; ``clean_logits`` ``[P, V]`` from the caller's unsteered pass, or
    ``None`` to use the sweep's own clean pass. ``positions="prompt"`` doses every prompt token
    (as a rollout dose sits on every position the model has seen); ``"last_prompt"`` doses the
    last token only (cheaper, a weaker perturbation). Returns a :class:`DoseResponse`; logits are
    reduced chunk by chunk, never stored as ``[P, R, V]``.
    """
    rows = _check_rows(adapter, rows)
    prompts = _prompts(input_ids, attention_mask)
    if positions == "prompt":
        it, size = _iter_prompt, row_batch_size or 16
    elif positions == "last_prompt":
        it, size = _iter_last_token, row_batch_size or 32
    else:
        raise NeuronAuditError(f"single_pass_dose_response positions {positions!r}: 'prompt' or 'last_prompt'")
    P, R = len(prompts), len(rows)
    if clean_logits is not None and clean_logits.shape[0] != P:
        raise NeuronAuditError(f"clean_logits has {clean_logits.shape[0]} rows for {P} prompts")
    out = DoseResponse(
        rows=list(rows), positions=(positions,),
        kl=torch.zeros(P, R), entropy=torch.zeros(P, R), clean_entropy=torch.zeros(P),
        alignment_write=torch.zeros(P, R), alignment_readout=torch.zeros(P, R),
    )
    v = write_vectors(adapter, rows)
    clean_logp = [None] * P
    with torch.inference_mode(), finite_checks(adapter):
        for item in it(model, adapter, prompts, rows, [], size, share_lower_layers):
            if isinstance(item, _Clean):
                ref = item.logits if clean_logits is None else clean_logits[item.prompt].float().cpu()
                lp = F.log_softmax(ref, dim=-1)
                clean_logp[item.prompt] = lp
                out.clean_entropy[item.prompt] = entropy_from_logp(lp)
                continue
            p, idx = item.prompt, item.rows
            ref = clean_logp[p]
            lq = F.log_softmax(item.logits, dim=-1)
            out.kl[p, idx] = kl_from_logp(ref, lq)
            out.entropy[p, idx] = entropy_from_logp(lq)
            out.alignment_write[p, idx] = alignment(item.resid_write, v[idx])
            out.alignment_readout[p, idx] = alignment(item.resid_final, v[idx])
    return out
