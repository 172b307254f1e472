"""Neuron interventions and captures through forward pre-hooks on the MLP output projection.

A neuron ``(l, i)`` is coordinate ``i`` of the input ``a_l`` of layer ``l``'s MLP output
projection (SCIENCE.md, "Common ground"). Every edit below rewrites that coordinate before the
projection runs, so adding a dose ``d`` adds exactly ``d · v_{l,i}`` to the MLP output.

Edits (:class:`NeuronEdit`):

``add``    ``a_i ← a_i + d``      (a dose; the control-window sweeps)
``scale``  ``a_i ← m · a_i``      (``m = 0`` ablates; CNA circuits)
``clamp``  ``a_i ← c``            (mean-ablation is a clamp to the neuron's mean; WASD)
``patch``  ``a_i ← s[t]``         (value from another run, per absolute position ``t``)
``blend``  ``a_i ← (1 − s)·a_i + s·g``  (toward a template value ``g = value`` with strength
           ``s = strength``; the reasoning-critical template steering of SCIENCE.md section 6)

One edit acts on the residual stream instead of a neuron (:class:`ResidualEdit`):

``resid_add``  ``h_l ← h_l + s·u``  (``h_l`` the output of block ``l``, i.e. the residual stream
               after layer ``l``; a forward hook on the block adds the vector at the chosen
               positions: the contrastive activation addition (CAA) baseline of Rimsky et al.)

Each edit applies at a chosen set of token positions:

``prompt``       every real (non-padding) prompt token
``last_prompt``  the last real prompt token of each row (it predicts the first answer token)
``generated``    every token produced by generation, i.e. every position ``t ≥ P`` where ``P`` is
                 the (padded) prompt length. The forward at ``t`` predicts token ``t + 1``, so
                 ``last_prompt`` + ``generated`` covers every prediction of the answer.

An :class:`InterventionPlan` holds one list of edits per batch row, so one batch can carry a
different neuron and dose on every row (a dose sweep in a single forward or ``generate`` call),
or a single row broadcast to the whole batch. Positions are tracked across ``generate`` calls
with the KV cache from the cache length seen by the decoder stack, so cached generation under
an intervention equals an uncached forward of the full sequence under the same positional rule
(``tests/unit/test_interventions.py`` proves it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.models.adapters import ArchitectureAdapter
from neuronaudit.models.kv_cache import cache_from_arguments, cache_length

POSITION_KINDS: tuple[str, ...] = ("prompt", "last_prompt", "generated")
OPS: tuple[str, ...] = ("add", "scale", "clamp", "patch", "blend")
_OP_CODE = {op: i for i, op in enumerate(OPS)}


@dataclass(frozen=True)
class NeuronEdit:
    """One edit of one neuron; see the module docstring for ``op`` and ``positions``."""

    layer: int
    neuron: int
    op: str
    value: float = 0.0
    positions: tuple[str, ...] = ("prompt", "generated")
    source: tuple[float, ...] | None = None  # patch values by absolute position
    strength: float | None = None  # blend strength s (blend only)

    def __post_init__(self):
        if self.op not in OPS:
            raise NeuronAuditError(f"unknown intervention op {self.op!r}; expected one of {OPS}")
        bad = [p for p in self.positions if p not in POSITION_KINDS]
        if bad or not self.positions:
            raise NeuronAuditError(
                f"unknown intervention positions {list(self.positions)!r}; "
                f"choose from {list(POSITION_KINDS)}"
            )
        if not math.isfinite(float(self.value)):
            raise NeuronAuditError(
                f"impossible {self.op} value {self.value!r} for neuron ({self.layer}, {self.neuron}):"
                " it must be a finite number"
            )
        if self.op == "patch" and not self.source:
            raise NeuronAuditError(
                f"patch of neuron ({self.layer}, {self.neuron}) needs source values"
            )
        if (self.op == "blend") != (self.strength is not None):
            raise NeuronAuditError(
                f"{self.op} of neuron ({self.layer}, {self.neuron}): a strength belongs to a blend, "
                "and a blend needs one"
            )
        if self.strength is not None and not math.isfinite(float(self.strength)):
            raise NeuronAuditError(
                f"impossible blend strength {self.strength!r} for neuron ({self.layer}, {self.neuron}):"
                " it must be a finite number"
            )

    # Named constructors: the vocabulary of the methods that use them.
    @classmethod
    def dose(cls, layer: int, neuron: int, dose: float, positions=("prompt", "generated")):
        return cls(layer, neuron, "add", float(dose), tuple(positions))

    @classmethod
    def scale(cls, layer: int, neuron: int, factor: float, positions=("prompt", "generated")):
        return cls(layer, neuron, "scale", float(factor), tuple(positions))

    @classmethod
    def ablate(cls, layer: int, neuron: int, positions=("prompt", "generated")):
        return cls(layer, neuron, "scale", 0.0, tuple(positions))

    @classmethod
    def clamp(cls, layer: int, neuron: int, value: float, positions=("prompt", "generated")):
        return cls(layer, neuron, "clamp", float(value), tuple(positions))

    @classmethod
    def mean_ablate(cls, layer: int, neuron: int, mean: float, positions=("prompt", "generated")):
        """Clamp to the neuron's mean activation (from a collected statistics table)."""
        return cls(layer, neuron, "clamp", float(mean), tuple(positions))

    @classmethod
    def patch(cls, layer: int, neuron: int, source: Sequence[float], positions=("prompt",)):
        return cls(layer, neuron, "patch", 0.0, tuple(positions), tuple(float(s) for s in source))

    @classmethod
    def blend(cls, layer: int, neuron: int, template: float, strength: float,
              positions=("last_prompt", "generated")):
        """``a ← (1 − strength)·a + strength·template`` (``strength = 1`` clamps to the template)."""
        return cls(layer, neuron, "blend", float(template), tuple(positions), None, float(strength))


@dataclass(frozen=True)
class ResidualEdit:
    """Add ``scale · vector`` (``vector [d_model]``) to the output of block ``layer`` at ``positions``.

    The block output is the residual stream after layer ``l`` (what the next block reads), so this
    is the edit CAA specifies: a mean-difference vector added to one residual layer. By default it
    applies after the instruction: the last prompt token and every generated token.
    """

    layer: int
    vector: tuple[float, ...]
    scale: float = 1.0
    positions: tuple[str, ...] = ("last_prompt", "generated")
    op: str = "resid_add"

    def __post_init__(self):
        if self.op != "resid_add":
            raise NeuronAuditError(f"a residual edit has op 'resid_add', got {self.op!r}")
        bad = [p for p in self.positions if p not in POSITION_KINDS]
        if bad or not self.positions:
            raise NeuronAuditError(
                f"unknown intervention positions {list(self.positions)!r}; choose from {list(POSITION_KINDS)}"
            )
        if not self.vector:
            raise NeuronAuditError(f"residual edit at layer {self.layer} has an empty vector")
        if not all(math.isfinite(float(v)) for v in (self.scale, *self.vector)):
            raise NeuronAuditError(f"residual edit at layer {self.layer} has a non-finite scale or vector entry")

    @classmethod
    def add(cls, layer: int, vector: Sequence[float], scale: float = 1.0,
            positions=("last_prompt", "generated")) -> ResidualEdit:
        return cls(int(layer), tuple(float(v) for v in vector), float(scale), tuple(positions))


Edit = NeuronEdit | ResidualEdit


@dataclass(frozen=True)
class InterventionPlan:
    """Edits per batch row. ``rows[r]`` applies to row ``r``; a single row broadcasts."""

    rows: tuple[tuple[Edit, ...], ...]

    def __post_init__(self):
        for r, edits in enumerate(self.rows):
            seen = set()
            for e in edits:
                if isinstance(e, ResidualEdit):
                    key, what = (e.layer, "resid"), f"the residual stream after layer {e.layer}"
                else:
                    key, what = (e.layer, e.neuron), f"neuron {(e.layer, e.neuron)}"
                if key in seen:
                    raise NeuronAuditError(f"row {r} edits {what} twice; combine the edits into one")
                seen.add(key)

    @classmethod
    def broadcast(cls, edits: Iterable[Edit]) -> InterventionPlan:
        return cls((tuple(edits),))

    @classmethod
    def per_row(cls, rows: Iterable[Iterable[Edit]]) -> InterventionPlan:
        return cls(tuple(tuple(r) for r in rows))

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for row in self.rows for e in row})


@dataclass
class ForwardContext:
    """Where the current forward chunk sits: shapes ``[batch, chunk]`` for the masks."""

    past_length: int
    prompt_length: torch.Tensor  # [batch] prompt length P of each row (padding included)
    positions: torch.Tensor  # [chunk] absolute positions
    valid: torch.Tensor  # [batch, chunk] real (non-padding) tokens
    last_prompt: torch.Tensor  # [batch] absolute position of each row's last real prompt token

    def mask(self, kind: str) -> torch.Tensor:
        """``[batch, chunk]`` bool mask of the positions of one kind."""
        pos = self.positions[None, :]
        if kind == "prompt":
            return self.valid & (pos < self.prompt_length[:, None])
        if kind == "last_prompt":
            return pos == self.last_prompt[:, None]
        if kind == "generated":
            return self.valid & (pos >= self.prompt_length[:, None])
        raise NeuronAuditError(f"unknown position kind {kind!r}; choose from {list(POSITION_KINDS)}")

    def masks(self) -> torch.Tensor:
        """``[batch, chunk, 3]`` masks in :data:`POSITION_KINDS` order."""
        return torch.stack([self.mask(k) for k in POSITION_KINDS], dim=-1)


class StopForward(Exception):
    """Raised by a hook to end a forward once the last needed layer has been read."""


@dataclass
class _CompiledEdits:
    rows: torch.Tensor  # [E]
    neurons: torch.Tensor  # [E]
    ops: torch.Tensor  # [E]
    values: torch.Tensor  # [E, 1]
    kinds: torch.Tensor  # [E, 3] bool
    source: torch.Tensor  # [E, S] (nan where absent)
    strength: torch.Tensor  # [E, 1] blend strength (0 for the other ops)
    cache: dict = field(default_factory=dict)

    def for_batch(self, batch: int, n_plan_rows: int, device, dtype) -> _CompiledEdits:
        key = (batch, str(device), dtype)
        if key not in self.cache:
            if n_plan_rows == 1 and batch > 1:
                e = self.rows.numel()
                rows = torch.arange(batch).repeat_interleave(e)
                idx = torch.arange(e).repeat(batch)
            elif n_plan_rows == batch:
                rows, idx = self.rows, torch.arange(self.rows.numel())
            else:
                raise NeuronAuditError(
                    f"intervention plan has {n_plan_rows} rows but the batch has {batch} rows"
                )
            self.cache[key] = _CompiledEdits(
                rows.to(device),
                self.neurons[idx].to(device),
                self.ops[idx].to(device),
                self.values[idx].to(device, dtype),
                self.kinds[idx].to(device),
                self.source[idx].to(device, dtype),
                self.strength[idx].to(device, dtype),
            )
        return self.cache[key]


@dataclass
class _CompiledResidual:
    rows: torch.Tensor  # [E]
    vectors: torch.Tensor  # [E, d_model], scale applied
    kinds: torch.Tensor  # [E, 3] bool
    cache: dict = field(default_factory=dict)

    def for_batch(self, batch: int, n_plan_rows: int, device, dtype) -> _CompiledResidual:
        key = (batch, str(device), dtype)
        if key not in self.cache:
            if n_plan_rows == 1 and batch > 1:
                e = self.rows.numel()
                rows, idx = torch.arange(batch).repeat_interleave(e), torch.arange(e).repeat(batch)
            elif n_plan_rows == batch:
                rows, idx = self.rows, torch.arange(self.rows.numel())
            else:
                raise NeuronAuditError(
                    f"intervention plan has {n_plan_rows} rows but the batch has {batch} rows"
                )
            self.cache[key] = _CompiledResidual(
                rows.to(device), self.vectors[idx].to(device, dtype), self.kinds[idx].to(device)
            )
        return self.cache[key]


def _compile_residual(plan: InterventionPlan, adapter: ArchitectureAdapter) -> dict[int, _CompiledResidual]:
    by_layer: dict[int, list[tuple[int, ResidualEdit]]] = {}
    for r, edits in enumerate(plan.rows):
        for e in edits:
            if isinstance(e, ResidualEdit):
                if len(e.vector) != adapter.d_model:
                    raise NeuronAuditError(
                        f"residual edit at layer {e.layer} has {len(e.vector)} entries; the model's "
                        f"residual stream has {adapter.d_model}"
                    )
                by_layer.setdefault(adapter.check_layers([e.layer])[0], []).append((r, e))
    return {
        layer: _CompiledResidual(
            rows=torch.tensor([r for r, _ in items], dtype=torch.long),
            vectors=torch.tensor([[e.scale * v for v in e.vector] for _, e in items], dtype=torch.float64),
            kinds=torch.tensor([[k in e.positions for k in POSITION_KINDS] for _, e in items], dtype=torch.bool),
        )
        for layer, items in by_layer.items()
    }


def apply_residual(hidden: torch.Tensor, edits: _CompiledResidual, ctx: ForwardContext) -> torch.Tensor:
    """Return a copy of ``hidden`` ``[batch, chunk, d_model]`` with each row's vector added where its
    positions apply."""
    where = (ctx.masks()[edits.rows] & edits.kinds[:, None, :]).any(-1)  # [E, chunk]
    # selected, not multiplied by the mask (0 · inf would be NaN)
    add = torch.where(where[..., None], edits.vectors[:, None, :], 0.0).to(hidden.dtype)  # [E, chunk, d_model]
    return hidden.index_add(0, edits.rows, add)


def _compile(plan: InterventionPlan, adapter: ArchitectureAdapter) -> dict[int, _CompiledEdits]:
    by_layer: dict[int, list[tuple[int, NeuronEdit]]] = {}
    for r, edits in enumerate(plan.rows):
        for e in edits:
            if isinstance(e, ResidualEdit):
                continue
            layer = adapter.check_layers([e.layer])[0]
            adapter.check_neuron(e.neuron)
            by_layer.setdefault(layer, []).append((r, e))
    compiled = {}
    for layer, items in by_layer.items():
        width = max((len(e.source) for _, e in items if e.source), default=1)
        source = torch.full((len(items), width), float("nan"))
        for j, (_, e) in enumerate(items):
            if e.source:
                source[j, : len(e.source)] = torch.tensor(e.source)
        compiled[layer] = _CompiledEdits(
            rows=torch.tensor([r for r, _ in items], dtype=torch.long),
            neurons=torch.tensor([e.neuron for _, e in items], dtype=torch.long),
            ops=torch.tensor([_OP_CODE[e.op] for _, e in items], dtype=torch.long),
            values=torch.tensor([[e.value] for _, e in items], dtype=torch.float32),
            kinds=torch.tensor(
                [[k in e.positions for k in POSITION_KINDS] for _, e in items], dtype=torch.bool
            ),
            source=source,
            strength=torch.tensor([[e.strength or 0.0] for _, e in items], dtype=torch.float32),
        )
    return compiled


def apply_edits(activation: torch.Tensor, edits: _CompiledEdits, ctx: ForwardContext) -> torch.Tensor:
    """Return a copy of ``activation`` ``[batch, chunk, n_neurons]`` with the edits applied."""
    rows, neurons = edits.rows, edits.neurons
    where = (ctx.masks()[rows] & edits.kinds[:, None, :]).any(-1)  # [E, chunk]
    current = activation[rows, :, neurons]  # [E, chunk]
    ops = edits.ops[:, None]
    new = torch.where(ops == _OP_CODE["add"], current + edits.values, current)
    new = torch.where(ops == _OP_CODE["scale"], current * edits.values, new)
    new = torch.where(ops == _OP_CODE["clamp"], edits.values.expand_as(current), new)
    blended = (1 - edits.strength) * current + edits.strength * edits.values
    new = torch.where(ops == _OP_CODE["blend"], blended, new)
    if bool((edits.ops == _OP_CODE["patch"]).any()):
        pos = ctx.positions.clamp(max=edits.source.shape[1] - 1)
        patched = edits.source[:, pos]
        in_range = (ctx.positions < edits.source.shape[1])[None, :] & ~torch.isnan(patched)
        is_patch = ops == _OP_CODE["patch"]
        new = torch.where(is_patch & in_range, patched, new)
        where = where & (~is_patch | in_range)
    out = activation.clone()
    out[rows, :, neurons] = torch.where(where, new, current)
    return out


ActivationCallback = Callable[[int, torch.Tensor, ForwardContext], None]


class NeuronHooks:
    """Context manager: install hooks that edit and/or read neurons and the residual stream.

    ``plan``           edits applied at the MLP activation site, and residual edits at the block
                       output (``None``: read only)
    ``on_activation``  called as ``f(layer, a [batch, chunk, n_neurons], ctx)`` after the edits
    ``on_resid``       called as ``f(layer, h [batch, chunk, d_model], ctx)`` on each block output
    ``layers``         layers read by the callbacks (default: all)
    ``stop_after_layer`` raise :class:`StopForward` once this layer's activation was read, so a
                       collection never runs the layers above it nor the unembedding
    ``prompt_length``  the prompt length ``P`` (an int, or one per row) of an uncached forward
                       over prompt + answer (scoring a rollout); by default the first uncached
                       chunk is the prompt
    ``cached_prompt_length``  the prompt (of this length) already sits in the KV cache, computed
                       outside the hooks (a clean prefix shared by many rows): the first hooked
                       forward continues it rather than starting a prompt
    """

    def __init__(
        self,
        adapter: ArchitectureAdapter,
        plan: InterventionPlan | None = None,
        on_activation: ActivationCallback | None = None,
        on_resid: ActivationCallback | None = None,
        layers: Iterable[int] | None = None,
        stop_after_layer: int | None = None,
        prompt_length: int | Sequence[int] | torch.Tensor | None = None,
        cached_prompt_length: int | None = None,
    ):
        self.adapter = adapter
        self.plan = plan
        self.on_activation = on_activation
        self.on_resid = on_resid
        self.read_layers = set(
            adapter.check_layers(layers) if layers is not None else range(adapter.n_layers)
        )
        self.stop_after_layer = (
            None if stop_after_layer is None else adapter.check_layers([stop_after_layer])[0]
        )
        self.compiled = _compile(plan, adapter) if plan is not None else {}
        self.compiled_residual = _compile_residual(plan, adapter) if plan is not None else {}
        self.ctx: ForwardContext | None = None
        self.fixed_prompt_length = prompt_length
        self.cached_prompt_length = None if cached_prompt_length is None else int(cached_prompt_length)
        self._prompt_length: int | None = None
        self._last_prompt: torch.Tensor | None = None
        self._handles: list = []
        self._base_signature = inspect.signature(adapter.base.forward)

    # --- position tracking -------------------------------------------------------------
    def _on_base_forward(self, module, args, kwargs):
        bound = self._base_signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        ids = bound.get("input_ids", extra.get("input_ids"))
        embeds = bound.get("inputs_embeds", extra.get("inputs_embeds"))
        ref = ids if ids is not None else embeds
        batch, chunk = int(ref.shape[0]), int(ref.shape[1])
        past_length = cache_length(cache_from_arguments(bound))
        mask = bound.get("attention_mask", extra.get("attention_mask"))
        device = ref.device
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= past_length + chunk:
            valid = mask[:, past_length : past_length + chunk].bool()
        else:
            valid = torch.ones(batch, chunk, dtype=torch.bool, device=device)
        positions = torch.arange(past_length, past_length + chunk, device=device)
        if past_length == 0:
            fixed = self.fixed_prompt_length
            if fixed is None:
                fixed = chunk
            prompt_length = torch.as_tensor(fixed, device=device).expand(batch).clone()
            self._prompt_length = prompt_length
            in_prompt = valid & (positions[None, :] < prompt_length[:, None])
            any_valid = in_prompt.any(dim=1)
            last = chunk - 1 - in_prompt.flip(1).int().argmax(dim=1)
            self._last_prompt = torch.where(any_valid, last, torch.full_like(last, -1))
        elif self._prompt_length is None and self.cached_prompt_length is not None:
            # the prompt ran before the hooks were entered and sits in the KV cache
            length = self.cached_prompt_length
            self._prompt_length = torch.full((batch,), length, dtype=torch.long, device=device)
            self._last_prompt = torch.full((batch,), length - 1, dtype=torch.long, device=device)
        elif self._prompt_length is None:
            raise NeuronAuditError(
                "a cached forward reached the hooks before its prompt did; enter the hooks "
                "before the first forward of a generation"
            )
        self.ctx = ForwardContext(
            past_length, self._prompt_length, positions, valid, self._last_prompt
        )

    # --- sites ---------------------------------------------------------------------------
    def _mlp_pre_hook(self, layer: int):
        def hook(module, args):
            activation = args[0]
            flat_shape = None
            if activation.dim() == 2:  # OPT flattens [batch * chunk, n] before fc2
                flat_shape = activation.shape
                activation = activation.view(*self.ctx.valid.shape, -1)
            edits = self.compiled.get(layer)
            if edits is not None:
                n_rows = len(self.plan.rows)
                activation = apply_edits(
                    activation,
                    edits.for_batch(activation.shape[0], n_rows, activation.device, activation.dtype),
                    self.ctx,
                )
            if self.on_activation is not None and layer in self.read_layers:
                self.on_activation(layer, activation, self.ctx)
            if layer == self.stop_after_layer:
                raise StopForward(layer)
            if flat_shape is not None:
                # the output projection is given back the [batch, chunk, n] view read above, so
                # that a gradient taken at what on_activation read reaches the output
                return (activation.reshape(flat_shape), *args[1:])
            if edits is not None:
                return (activation, *args[1:])
            return None

        return hook

    def _residual_edit_hook(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            edits = self.compiled_residual[layer].for_batch(
                hidden.shape[0], len(self.plan.rows), hidden.device, hidden.dtype
            )
            hidden = apply_residual(hidden, edits, self.ctx)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _block_hook(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.on_resid(layer, hidden, self.ctx)

        return hook

    def __enter__(self) -> NeuronHooks:
        a = self.adapter
        self._handles.append(
            a.base.register_forward_pre_hook(self._on_base_forward, with_kwargs=True)
        )
        wanted = set(self.compiled)
        if self.on_activation is not None:
            wanted |= self.read_layers
        if self.stop_after_layer is not None:
            wanted.add(self.stop_after_layer)
        for layer in sorted(wanted):
            self._handles.append(a.mlp_outs[layer].register_forward_pre_hook(self._mlp_pre_hook(layer)))
        for layer in sorted(self.compiled_residual):  # before the readers: they see the edited stream
            self._handles.append(a.blocks[layer].register_forward_hook(self._residual_edit_hook(layer)))
        if self.on_resid is not None:
            for layer in sorted(self.read_layers):
                self._handles.append(a.blocks[layer].register_forward_hook(self._block_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.ctx = None
        self._prompt_length = None
        self._last_prompt = None
