"""Activation collection: streaming per-neuron statistics and last-token activations.

One pass over a prompt set reads the MLP activation ``a_l`` (input of the output projection) of
the chosen layers and keeps, per neuron, running float64 sums for ``count``, ``mean``, ``std``,
``mean |a|``, ``max |a|`` and the fraction of positive values over the chosen token positions,
plus each prompt's activation vector at its last real token (what contrastive screening reads).
Memory does not grow with the prompt set: statistics are sums, last-token rows are streamed to
Parquet batch by batch. The forward runs the decoder stack only (no unembedding) and stops after
the highest collected layer. Padding never enters a statistic: the positions the attention mask
marks real are selected (never multiplied by a 0/1 mask, which keeps a NaN). A non-finite
activation stops the pass at once, naming its layer, neuron, prompt and token
(:mod:`neuronaudit.interventions.finite`). A batch that runs out of memory runs as halves
(:func:`~neuronaudit.interventions.memory.split_on_oom`): the halves' selected positions are added
to the statistics in one piece, as the whole batch's would be, so the sums are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from neuronaudit.errors import NeuronAuditError, NonFiniteError
from neuronaudit.interventions.finite import finite_checks
from neuronaudit.interventions.generation import padded_position_ids
from neuronaudit.interventions.hooks import ForwardContext, NeuronHooks, StopForward
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.io import (
    NEURON_STATS_SCHEMA,
    atomic_path,
    last_token_schema,
    with_provenance,
)
from neuronaudit.io import provenance as make_provenance

STAT_POSITIONS = ("prompt", "last_prompt")


class StreamingNeuronStats:
    """Running per-neuron statistics for several layers (float64 accumulators)."""

    def __init__(self, layers: Sequence[int], n_neurons: int, device="cpu"):
        self.layers = list(layers)
        shape = (len(self.layers), n_neurons)
        z = lambda: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.count = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.sum, self.sumsq, self.sumabs, self.maxabs, self.positive = z(), z(), z(), z(), z()
        self._row = {layer: r for r, layer in enumerate(self.layers)}

    def update(self, layer: int, activation: torch.Tensor, mask: torch.Tensor) -> None:
        """Add ``activation [batch, chunk, n]`` at the positions where ``mask [batch, chunk]``.

        The positions are selected, not multiplied by the mask: a non-finite value at a padding
        position never reaches a statistic (``NaN × 0`` is ``NaN``).
        """
        self.add(layer, activation.detach()[mask.bool()])

    def add(self, layer: int, selected: torch.Tensor) -> None:
        """Add the activations ``selected [positions, n]`` (the selected positions of a batch,
        row after row)."""
        r = self._row[layer]
        a = selected.double()  # [selected, n]: summed in float64
        if a.shape[0] == 0:
            return
        self.count[r] += a.shape[0]
        self.sum[r] += a.sum(0)
        self.sumsq[r] += (a * a).sum(0)
        absolute = a.abs()
        self.sumabs[r] += absolute.sum(0)
        self.positive[r] += (a > 0).sum(0)
        self.maxabs[r] = torch.maximum(self.maxabs[r], absolute.amax(0))

    def state(self) -> tuple[torch.Tensor, ...]:
        """A copy of the accumulators (:meth:`restore` puts it back)."""
        return tuple(t.clone() for t in (self.count, self.sum, self.sumsq, self.sumabs, self.maxabs, self.positive))

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        for t, saved in zip((self.count, self.sum, self.sumsq, self.sumabs, self.maxabs, self.positive), state):
            t.copy_(saved)

    def table(self) -> pa.Table:
        n_layers, n = self.sum.shape
        count = self.count[:, None].expand(n_layers, n).clamp(min=1)
        mean = self.sum / count
        var = (self.sumsq / count - mean * mean).clamp(min=0)
        # unbiased std where count > 1
        var = var * count / (count - 1).clamp(min=1)
        cols = {
            "layer": np.repeat(np.array(self.layers, dtype=np.int32), n),
            "neuron": np.tile(np.arange(n, dtype=np.int32), n_layers),
            "count": self.count[:, None].expand(n_layers, n).reshape(-1).cpu().numpy().astype(np.int64),
            "mean": mean.reshape(-1).cpu().numpy(),
            "std": var.sqrt().reshape(-1).cpu().numpy(),
            "mean_abs": (self.sumabs / count).reshape(-1).cpu().numpy(),
            "max_abs": self.maxabs.reshape(-1).cpu().numpy(),
            "frac_positive": (self.positive / count).reshape(-1).cpu().numpy(),
        }
        for name in ("mean", "std", "mean_abs", "max_abs", "frac_positive"):
            bad = ~np.isfinite(cols[name])
            if bad.any():  # finite activations (checked as they were read) whose sums overflowed
                k = int(np.flatnonzero(bad)[0])
                raise NonFiniteError(float(cols[name][k]), f"statistic {name!r}", layer=int(cols["layer"][k]),
                                     neuron=int(cols["neuron"][k]), detail="every activation was finite; "
                                     "their float64 sums overflowed")
        return pa.Table.from_pydict(cols, schema=NEURON_STATS_SCHEMA)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collect_activations(
    model,
    tokenizer,
    adapter,
    texts: Sequence[str],
    prompt_ids: Sequence[str],
    stats_path: str | Path,
    last_token_path: str | Path,
    layers: Sequence[int] | None = None,
    positions: str = "prompt",
    batch_size: int = 8,
    max_length: int = 256,
    add_special_tokens: bool = True,
    provenance: dict | None = None,
    progress: bool = True,
    padding_side: str = "right",
) -> pa.Table:
    """Collect statistics and last-token activations of ``texts`` (already rendered prompts).

    Writes ``stats_path`` (:data:`NEURON_STATS_SCHEMA`) and ``last_token_path`` (one row per
    prompt and layer) atomically, both with ``provenance`` in their metadata; returns the stats.
    """
    if positions not in STAT_POSITIONS:
        raise NeuronAuditError(f"collect.positions {positions!r} must be one of {STAT_POSITIONS}")
    if len(texts) == 0:
        raise NeuronAuditError("no prompts to collect")
    if batch_size < 1:
        raise NeuronAuditError(f"batch_size {batch_size!r} must be at least 1")
    layers = adapter.check_layers(range(adapter.n_layers) if layers is None else layers)
    device = next(model.parameters()).device
    stats = StreamingNeuronStats(layers, adapter.n_neurons, device=device)
    prov = make_provenance(
        **{**(provenance or {}), "positions": positions, "layers": layers, "hook_site": adapter.hook_site}
    )

    tokenizer.padding_side = padding_side
    encoded = tokenizer(
        list(texts), add_special_tokens=add_special_tokens, truncation=True, max_length=max_length
    )["input_ids"]
    batches = length_sorted_batches([len(ids) for ids in encoded], batch_size)
    sink: dict = {}  # where the hook puts what it reads: set per forward by run()

    def on_activation(layer: int, a: torch.Tensor, ctx: ForwardContext) -> None:
        if sink["pending"] is None:
            stats.update(layer, a, ctx.mask(positions))
        else:  # a half of a split batch: its positions wait for the other half, on the host
            sink["pending"][layer] = a.detach()[ctx.mask(positions).bool()].cpu()
        rows = torch.arange(a.shape[0], device=a.device)
        sink["last"][layer] = a[rows, ctx.last_prompt].detach().float().cpu()

    halves: list[dict[int, torch.Tensor]] = []  # the statistics' positions of a split batch's halves

    def run(batch: Sequence[int], part: tuple[int, ...], width: int) -> list[list[np.ndarray]]:
        """Forward ``batch`` padded to ``width``; each row's last-token vector per layer. The whole
        batch adds to the statistics as it runs (undone if it fails); a half of a split batch runs
        at the whole batch's width (the same shapes, so the same values) and keeps its positions
        for :func:`add_halves`, so the sums see the batch's positions in one piece as unsplit."""
        sink.update(pending=None if not part else {}, last={})
        saved = stats.state() if not part else None
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding="max_length", max_length=width,
                            return_tensors="pt").to(device)
        try:
            adapter.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         position_ids=padded_position_ids(enc["attention_mask"]), use_cache=False)
        except StopForward:
            pass
        except NonFiniteError as err:  # name the prompt of the batch row
            if err.row is not None:
                err.at(prompt=repr(str(prompt_ids[batch[err.row]])))
            raise
        except BaseException:
            if saved is not None:
                stats.restore(saved)
            raise
        if part:
            halves.append(sink["pending"])
        vectors = [sink["last"][layer].numpy() for layer in layers]
        return [[v[r] for v in vectors] for r in range(len(batch))]

    def add_halves() -> None:
        for layer in layers:
            stats.add(layer, torch.cat([h[layer] for h in halves]).to(device))
        halves.clear()

    schema = with_provenance(last_token_schema(adapter.n_neurons), prov)
    with atomic_path(last_token_path) as tmp_last, pq.ParquetWriter(tmp_last, schema) as writer:
        with torch.inference_mode(), finite_checks(adapter), NeuronHooks(
            adapter, on_activation=on_activation, layers=layers, stop_after_layer=max(layers)
        ):
            for batch in tqdm(batches, desc="collect", unit="batch", disable=not progress):
                width = max(len(encoded[i]) for i in batch)
                per_row = split_on_oom(functools.partial(run, width=width), batch, "collect")
                if halves:
                    add_halves()
                ids = [str(prompt_ids[i]) for i in batch]
                for c, layer in enumerate(layers):
                    vectors = np.stack([row[c] for row in per_row])
                    writer.write_table(
                        pa.Table.from_pydict(
                            {
                                "prompt_id": ids,
                                "layer": np.full(len(ids), layer, dtype=np.int32),
                                "activation": pa.FixedSizeListArray.from_arrays(
                                    pa.array(vectors.reshape(-1), pa.float32()), adapter.n_neurons
                                ),
                            },
                            schema=schema,
                        )
                    )
    table = stats.table()
    table = table.replace_schema_metadata(with_provenance(table.schema, prov).metadata)
    with atomic_path(stats_path) as tmp:
        pq.write_table(table, tmp)
    return table


def read_last_token(path: str | Path, layer: int | None = None) -> tuple[list[str], np.ndarray]:
    """Last-token activations as ``(prompt_ids, array [n_prompts, n_neurons])`` for one layer,
    or ``[n_prompts, n_layers, n_neurons]`` for all layers (prompt order as stored)."""
    table = pq.read_table(path, filters=[("layer", "=", layer)] if layer is not None else None)
    n = table.schema.field("activation").type.list_size
    ids = table.column("prompt_id").to_pylist()
    values = table.column("activation").combine_chunks().flatten().to_numpy().reshape(-1, n)
    if layer is not None:
        return ids, values
    layers = table.column("layer").to_numpy()
    uniq = sorted(set(layers.tolist()))
    prompts = list(dict.fromkeys(ids))
    out = np.zeros((len(prompts), len(uniq), n), dtype=np.float32)
    p_index = {p: i for i, p in enumerate(prompts)}
    l_index = {l: j for j, l in enumerate(uniq)}
    for row, (pid, layer_) in enumerate(zip(ids, layers)):
        out[p_index[pid], l_index[int(layer_)]] = values[row]
    return prompts, out


def last_token_layers(path: str | Path) -> list[int]:
    """The layers stored in a last-token table, ascending."""
    col = pq.read_table(path, columns=["layer"]).column("layer")
    return sorted(int(x) for x in pc.unique(col).to_pylist())


def last_token_width(path: str | Path) -> int:
    return int(pq.read_schema(path).field("activation").type.list_size)


def read_layer(
    path: str | Path, layer: int, prompt_ids: Iterable[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """``(prompt_ids, a [n_prompts, n_neurons] float64)`` of one layer, rows sorted by prompt id.

    With ``prompt_ids``, only those prompts are kept; every one of them must be in the table.
    """
    ids, values = read_last_token(path, layer=layer)
    if len(ids) == 0:
        raise NeuronAuditError(f"last-token table {str(path)!r} has no rows for layer {layer}")
    index = {p: r for r, p in enumerate(ids)}
    if len(index) != len(ids):
        raise NeuronAuditError(f"last-token table {str(path)!r} repeats prompt ids in layer {layer}")
    wanted = sorted(index) if prompt_ids is None else sorted(set(map(str, prompt_ids)))
    missing = [p for p in wanted if p not in index]
    if missing:
        raise NeuronAuditError(
            f"last-token table {str(path)!r} lacks {len(missing)} requested prompts, e.g. {missing[:3]}"
        )
    return wanted, values[[index[p] for p in wanted]].astype(np.float64)


def last_token_abs(path: str | Path, prompt_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``(prompt_ids, |a| [n_prompts, n_layers * n_neurons])`` rows sorted by prompt id."""
    ids, values = read_last_token(path)  # [n_prompts, n_layers, n_neurons]
    index = {p: r for r, p in enumerate(ids)}
    wanted = sorted(index) if prompt_ids is None else sorted(set(map(str, prompt_ids)))
    missing = [p for p in wanted if p not in index]
    if missing:
        raise NeuronAuditError(f"last-token table {str(path)!r} lacks prompts {missing[:3]}")
    rows = np.abs(values[[index[p] for p in wanted]].astype(np.float64))
    return wanted, rows.reshape(len(wanted), -1)


class LastTokenTable:
    """A collected last-token table, read one layer at a time so memory stays one layer wide.

    The methods take this reader (anything with ``path``, ``layers``, ``width`` and ``layer()``)
    rather than a path, so they never open files themselves.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise NeuronAuditError(f"last-token table {str(self.path)!r} not found")
        self._layers: list[int] | None = None

    def __repr__(self) -> str:
        return f"LastTokenTable({str(self.path)!r})"

    @property
    def layers(self) -> list[int]:
        if self._layers is None:
            self._layers = last_token_layers(self.path)
        return self._layers

    @property
    def width(self) -> int:
        return last_token_width(self.path)

    def layer(self, layer: int, prompt_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
        """See :func:`read_layer`."""
        return read_layer(self.path, layer, prompt_ids)

    def abs_rows(self, prompt_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
        """See :func:`last_token_abs`."""
        return last_token_abs(self.path, prompt_ids)
