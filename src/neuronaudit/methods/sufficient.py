"""Sufficient neuron sets (WASD, SCIENCE.md section 5; seed 000, arXiv 2603.18474) — recon.

A *predicate* is a condition on one neuron at the target position (the last prompt token, whose
forward predicts the next token): ``a_{l,i} ≥ θ`` for a neuron whose observed activation there is
non-negative, ``a_{l,i} ≤ θ`` for a negative one, with ``θ = fraction · a_observed`` on the
prompt being explained (:func:`predicates_from_activation`). The *target* is that prompt's
current greedy next token.

A set ``S`` of predicates is *sufficient* for the target when forcing every predicate of ``S``
to hold keeps the output on perturbed inputs. Forcing a predicate clamps its neuron to ``θ``
(the weakest value that satisfies it) at the chosen positions, and

    precision(S) = #{perturbed inputs whose greedy next token is the target with S clamped} / n.

The search (:func:`search_sufficient_set`, after the anchors of Ribeiro et al. 2018):

1. start from the empty set (its precision is the perturbations' own rate of keeping the target);
2. grow: every set of the beam is extended by every candidate predicate not in it; all extended
   sets are evaluated together and the ``beam_width`` with the highest precision kept (greedy is
   ``beam_width = 1``); stop when the best set's Wilson lower bound (two-sided interval at
   ``confidence``) reaches ``1 − δ``, or at ``max_size``;
3. prune: remove predicates one at a time while the bound still holds, each round trying every
   single removal together and keeping the removal with the highest precision, until no predicate
   can be removed (the set is then minimal: dropping any one predicate loses the guarantee).

The search itself is pure: it calls an ``evaluate(sets) -> hits [n_sets, n_inputs]`` function and
caches every set it has seen. :class:`ClampedPredictor` is the model-backed ``evaluate``: the
inputs' prefixes run once (batched) and are cached, and every (input, set) is one cached position:
the last token with that set's clamps (the clamps act there only), batched through the
intervention engine;
a :class:`ForwardCounter` counts the forward calls, rows and token positions: the search's cost.

Candidates come from rankings (gradient × activation and the contrastive screen), not from every
neuron (:func:`candidate_neurons`); the same rankings give the baseline sets of the same size
(:func:`top_neurons`). Stability is the Jaccard index of the sets' neurons (:func:`jaccard`,
:func:`pairwise_jaccard`); control clamps ``S`` onto inputs that lack the target, against random
same-layer sets of the same size (:func:`random_same_layer_sets`).

The checks (:func:`precision_table`, :func:`control_table`) give every figure with its Wilson
interval: precision on fresh perturbations the search never saw, *coverage* (the fraction of
inputs on which every predicate of the set already holds unclamped, read by
:func:`last_token_activations`) with the anchors-style precision on those covered inputs, ``|S|``,
and, for control, the rate at which clamping the set forces the target onto inputs that lack it
beside the same figure for random same-layer sets, with the next-token entropy under the clamp as
a first coherence reading.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.stats import wilson_interval
from neuronaudit.interventions.finite import check_finite, finite_checks
from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks, StopForward
from neuronaudit.interventions.memory import split_on_oom
from neuronaudit.interventions.scoring import entropy_from_logp
from neuronaudit.models.kv_cache import cache_from_output, cache_kwarg, select_cache_rows

Neuron = tuple[int, int]  # (layer, neuron)


# --------------------------------------------------------------------------------------------
# predicates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predicate:
    """``a_{layer,neuron} ≥ threshold`` (``direction = "ge"``) or ``≤ threshold`` (``"le"``)."""

    layer: int
    neuron: int
    threshold: float
    direction: str = "ge"

    def __post_init__(self):
        if self.direction not in ("ge", "le"):
            raise NeuronAuditError(f"predicate direction {self.direction!r} must be 'ge' or 'le'")
        if not np.isfinite(self.threshold):
            raise NeuronAuditError(
                f"predicate on neuron ({self.layer}, {self.neuron}) has a non-finite threshold {self.threshold!r}"
            )

    @property
    def key(self) -> Neuron:
        return (int(self.layer), int(self.neuron))

    def holds(self, activation: float) -> bool:
        return activation >= self.threshold if self.direction == "ge" else activation <= self.threshold

    def edit(self, positions: Sequence[str] = ("last_prompt",)) -> NeuronEdit:
        """The clamp that forces the predicate: ``a ← θ`` at ``positions``."""
        return NeuronEdit.clamp(self.layer, self.neuron, self.threshold, tuple(positions))

    def __str__(self) -> str:
        return f"a[{self.layer},{self.neuron}] {'≥' if self.direction == 'ge' else '≤'} {self.threshold:.4g}"


PredicateSet = tuple[Predicate, ...]


def predicates_from_activation(activation: np.ndarray, neurons: Iterable[Neuron], fraction: float) -> list[Predicate]:
    """One predicate per neuron from the observed activations ``activation [n_layers, n_neurons]``
    at the target position: ``θ = fraction · a``, ``≥`` for ``a ≥ 0`` and ``≤`` for ``a < 0``."""
    if not 0 < fraction <= 1:
        raise NeuronAuditError(f"predicate fraction {fraction!r} must be in (0, 1]")
    out = []
    for layer, neuron in neurons:
        a = float(activation[layer, neuron])
        out.append(Predicate(int(layer), int(neuron), fraction * a, "ge" if a >= 0 else "le"))
    return out


def set_key(predicates: Iterable[Predicate]) -> frozenset[Neuron]:
    return frozenset(p.key for p in predicates)


# --------------------------------------------------------------------------------------------
# candidates and baselines
# --------------------------------------------------------------------------------------------


def top_neurons(score: np.ndarray, k: int, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
    """The ``k`` neurons of ``score [n_layers, n_neurons]`` with the largest ``|score|``, best
    first (ties by layer, then neuron); non-finite scores rank last."""
    if k < 0:
        raise NeuronAuditError(f"k {k!r} must be non-negative")
    if k == 0:  # the baseline of an empty sufficient set is the empty set, not every neuron
        return []
    flat = np.abs(np.asarray(score, dtype=np.float64)).ravel()
    flat = np.where(np.isfinite(flat), flat, -np.inf)
    order = np.argsort(-flat, kind="stable")
    skip = set(exclude)
    width = score.shape[1]
    out: list[Neuron] = []
    for idx in order:
        neuron = (int(idx // width), int(idx % width))
        if neuron not in skip:
            out.append(neuron)
            if len(out) == k:
                break
    return out


def candidate_neurons(rankings: Sequence[np.ndarray], k_each: int | Sequence[int]) -> list[Neuron]:
    """The union of the top ``k_each`` neurons of every ranking (each ``[n_layers, n_neurons]``),
    interleaved rank by rank (the first of each ranking, then the second, ...), without repeats."""
    ks = [k_each] * len(rankings) if isinstance(k_each, int) else list(k_each)
    if len(ks) != len(rankings):
        raise NeuronAuditError(f"{len(ks)} candidate counts for {len(rankings)} rankings")
    tops = [top_neurons(score, k) for score, k in zip(rankings, ks)]
    out: list[Neuron] = []
    for rank in range(max(ks, default=0)):
        for top in tops:
            if rank < len(top) and top[rank] not in out:
                out.append(top[rank])
    return out


def random_same_layer_sets(
    found: Sequence[Predicate], activation: np.ndarray, fraction: float, n_sets: int, seed: int,
) -> list[PredicateSet]:
    """``n_sets`` random sets shaped like ``found``: for each of its predicates a different neuron
    of the same layer (none of ``found``'s), with its predicate made by the same rule from the same
    observed activations ``activation [n_layers, n_neurons]``."""
    rng = np.random.default_rng(seed)
    taken = {p.key for p in found}
    width = activation.shape[1]
    sets = []
    for _ in range(n_sets):
        chosen: list[Neuron] = []
        for p in found:
            free = [i for i in range(width) if (p.layer, i) not in taken and (p.layer, i) not in chosen]
            if not free:
                raise NeuronAuditError(f"layer {p.layer} has no neuron left for a random set of size {len(found)}")
            chosen.append((p.layer, int(rng.choice(free))))
        sets.append(tuple(predicates_from_activation(activation, chosen, fraction)))
    return sets


# --------------------------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------------------------


def jaccard(a: Iterable, b: Iterable) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two sets of neurons (predicates count by their neuron); two empty
    sets agree (1.0)."""
    a = {x.key if isinstance(x, Predicate) else tuple(x) for x in a}
    b = {x.key if isinstance(x, Predicate) else tuple(x) for x in b}
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def pairwise_jaccard(sets: Sequence[Iterable]) -> list[float]:
    """Jaccard index of every unordered pair of ``sets`` (``n (n − 1) / 2`` values)."""
    sets = [list(s) for s in sets]
    return [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]


# --------------------------------------------------------------------------------------------
# precision and its bound
# --------------------------------------------------------------------------------------------


def precision_bounds(hits: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson interval of a precision ``hits / n`` (two-sided at ``confidence``)."""
    return wilson_interval(int(hits), int(n), confidence)


def meets(hits: int, n: int, delta: float, confidence: float) -> bool:
    """Whether the Wilson lower bound of ``hits / n`` reaches ``1 − δ``."""
    return n > 0 and precision_bounds(hits, n, confidence)[0] >= 1.0 - delta


@dataclass
class ForwardCounter:
    """Cost of a search: forward calls, the rows (sequences) they carried and the token positions
    they computed (a cached prefix counts once, a clamped evaluation one position)."""

    forward_calls: int = 0
    sequences: int = 0
    tokens: int = 0

    def add(self, rows: int, tokens: int | None = None) -> None:
        self.forward_calls += 1
        self.sequences += int(rows)
        self.tokens += int(rows if tokens is None else tokens)


# --------------------------------------------------------------------------------------------
# the search (pure: it only calls ``evaluate``)
# --------------------------------------------------------------------------------------------

Evaluate = Callable[[Sequence[PredicateSet]], np.ndarray]  # sets -> hits [n_sets, n_inputs] bool


@dataclass(frozen=True)
class EvaluatedSet:
    """One set the search evaluated: where (``phase`` ``grow`` or ``prune`` and ``step``), its
    precision ``hits / n`` and Wilson interval."""

    predicates: PredicateSet
    phase: str
    step: int
    hits: int
    n: int
    low: float
    high: float

    @property
    def precision(self) -> float:
        return self.hits / self.n if self.n else float("nan")


@dataclass
class SearchResult:
    """The found set (minimal when ``reached``), its precision, the empty set's precision
    (``baseline``), every evaluated set in order (``trace``) and how many distinct sets were
    evaluated (``n_sets_evaluated``)."""

    predicates: PredicateSet
    hits: int
    n: int
    low: float
    high: float
    reached: bool
    baseline: EvaluatedSet
    grown: PredicateSet
    trace: list[EvaluatedSet] = field(default_factory=list)
    n_sets_evaluated: int = 0

    @property
    def precision(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def neurons(self) -> list[Neuron]:
        return [p.key for p in self.predicates]


class _CachedEvaluator:
    def __init__(self, evaluate: Evaluate, n_inputs: int):
        self.evaluate, self.n_inputs = evaluate, n_inputs
        self.cache: dict[frozenset, int] = {}

    def hits(self, sets: Sequence[PredicateSet]) -> list[int]:
        todo = []
        for s in sets:
            key = set_key(s)
            if key not in self.cache and all(set_key(t) != key for t in todo):
                todo.append(s)
        if todo:
            result = np.asarray(self.evaluate(todo), dtype=bool)
            if result.shape != (len(todo), self.n_inputs):
                raise NeuronAuditError(
                    f"evaluate returned shape {result.shape}; expected {(len(todo), self.n_inputs)}"
                )
            for s, row in zip(todo, result):
                self.cache[set_key(s)] = int(row.sum())
        return [self.cache[set_key(s)] for s in sets]


def search_sufficient_set(
    evaluate: Evaluate,
    candidates: Sequence[Predicate],
    n_inputs: int,
    delta: float = 0.1,
    confidence: float = 0.95,
    max_size: int = 8,
    beam_width: int = 1,
) -> SearchResult:
    """Greedy (``beam_width = 1``) or beam search for a minimal set of ``candidates`` whose
    precision's Wilson lower bound reaches ``1 − δ`` on the ``n_inputs`` perturbed inputs that
    ``evaluate`` scores; see the module docstring. Ties go to the candidate listed first."""
    if not 0 < delta < 1:
        raise NeuronAuditError(f"delta {delta!r} must be in (0, 1)")
    if beam_width < 1 or max_size < 0:
        raise NeuronAuditError(f"beam_width {beam_width!r} must be ≥ 1 and max_size {max_size!r} ≥ 0")
    if n_inputs < 1:
        raise NeuronAuditError("the search needs at least one perturbed input")
    keys = [c.key for c in candidates]
    if len(set(keys)) != len(keys):
        raise NeuronAuditError("two candidate predicates sit on the same neuron")
    rank = {c.key: r for r, c in enumerate(candidates)}
    ordered = lambda s: tuple(sorted(s, key=lambda p: rank.get(p.key, -1)))  # noqa: E731
    ev = _CachedEvaluator(evaluate, n_inputs)
    trace: list[EvaluatedSet] = []

    def record(sets, phase, step) -> list[EvaluatedSet]:
        rows = []
        for s, k in zip(sets, ev.hits(sets)):
            low, high = precision_bounds(k, n_inputs, confidence)
            rows.append(EvaluatedSet(s, phase, step, k, n_inputs, low, high))
        trace.extend(rows)
        return rows

    baseline = record([()], "grow", 0)[0]
    beam = [baseline]
    step = 0
    while not meets(beam[0].hits, n_inputs, delta, confidence) and step < max_size:
        step += 1
        grown: list[PredicateSet] = []
        seen: set[frozenset] = set()
        for entry in beam:
            inside = set_key(entry.predicates)
            for c in candidates:
                if c.key in inside:
                    continue
                s = ordered((*entry.predicates, c))
                if set_key(s) not in seen:
                    seen.add(set_key(s))
                    grown.append(s)
        if not grown:
            break
        rows = record(grown, "grow", step)
        beam = sorted(rows, key=lambda r: -r.hits)[:beam_width]  # stable: ties keep candidate order
    best = beam[0]
    reached = meets(best.hits, n_inputs, delta, confidence)
    grown_set = best.predicates
    if reached:
        step = 0
        while best.predicates:
            step += 1
            smaller = [best.predicates[:i] + best.predicates[i + 1:] for i in range(len(best.predicates))]
            rows = [r for r in record(smaller, "prune", step) if meets(r.hits, n_inputs, delta, confidence)]
            if not rows:
                break
            best = max(rows, key=lambda r: r.hits)
    return SearchResult(best.predicates, best.hits, n_inputs, best.low, best.high, reached, baseline, grown_set,
                        trace, len(ev.cache))


def trace_table(result: SearchResult) -> pd.DataFrame:
    """Every set the search evaluated, in order: ``phase``, ``step``, ``size``, ``neurons``,
    ``thresholds``, ``directions``, ``hits``, ``n``, ``precision`` and its Wilson interval, and
    ``chosen`` (the returned set) — the rows of the stored sets table."""
    chosen = set_key(result.predicates)
    return pd.DataFrame([
        {"phase": r.phase, "step": r.step, "size": len(r.predicates),
         "neurons": [list(p.key) for p in r.predicates], "thresholds": [p.threshold for p in r.predicates],
         "directions": [p.direction for p in r.predicates], "hits": r.hits, "n": r.n, "precision": r.precision,
         "precision_low": r.low, "precision_high": r.high,
         "chosen": set_key(r.predicates) == chosen and (r.phase == "prune" or r.predicates == result.grown)}
        for r in result.trace
    ])


# --------------------------------------------------------------------------------------------
# the model-backed evaluation: batched clamps through the intervention engine
# --------------------------------------------------------------------------------------------


@dataclass
class SetOutputs:
    """Outputs of every input under every set: ``top_token [n_sets, n_inputs]`` (greedy next
    token at the last real token), ``target_logprob`` and ``entropy`` (nats) of the next-token
    distribution there, same shape."""

    top_token: np.ndarray
    target_logprob: np.ndarray
    entropy: np.ndarray


class ClampedPredictor:
    """Greedy next token of tokenised inputs (``inputs``: token-id lists, no padding) with each
    predicate set clamped at the last prompt token, through the intervention engine.

    A clamp acts on the last position only, so every earlier position computes exactly as without
    it. The prefixes (all but the last token) of ``prefix_batch`` inputs run once together, left
    padded with explicit position ids, unhooked, and their KV cache is kept for the predictor's
    lifetime; a set is then evaluated by one cached forward of the last token. Rows
    ``(input, set)`` of those inputs run ``batch_size`` at a time, each with its own clamp edits
    (:meth:`~neuronaudit.interventions.InterventionPlan.per_row`) and its input's cache rows. So a
    search costs one prefix pass per input plus one position per (input, set): it grows with the
    inputs and the sets evaluated, not with the prompts' length. Every forward is counted in
    ``counter``. Calling the predictor with a list of sets returns the hits (greedy token =
    ``target_id``) ``[n_sets, n_inputs]``: the ``evaluate`` of the search.
    """

    def __init__(self, model, adapter, inputs: Sequence[Sequence[int]], target_id: int, pad_id: int,
                 batch_size: int = 32, counter: ForwardCounter | None = None, prefix_batch: int = 16):
        if not inputs or any(len(ids) == 0 for ids in inputs):
            raise NeuronAuditError("every input of a clamped evaluation needs at least one token")
        if batch_size < 1 or prefix_batch < 1:
            raise NeuronAuditError(f"batch_size {batch_size!r} and prefix_batch {prefix_batch!r} must be at least 1")
        self.model, self.adapter = model, adapter
        self.inputs = [list(map(int, ids)) for ids in inputs]
        self.target_id, self.pad_id = int(target_id), int(pad_id)
        self.batch_size, self.prefix_batch = batch_size, prefix_batch
        self.counter = counter if counter is not None else ForwardCounter()
        self._groups: dict[int, tuple] = {}
        self._cache_name = cache_kwarg(model)
        params = inspect.signature(model.forward).parameters
        self._head = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _group(self, g: int, device):
        """Inputs ``g·prefix_batch ...`` and their prefixes: ``(members, cache, mask, width)`` with
        the prefixes left-padded to ``width − 1`` tokens (``cache`` None when that is 0)."""
        if g not in self._groups:
            members = list(range(g * self.prefix_batch, min((g + 1) * self.prefix_batch, len(self.inputs))))
            width = max(len(self.inputs[j]) for j in members)
            mask = torch.zeros((len(members), width), dtype=torch.long)
            ids = torch.full((len(members), max(width - 1, 1)), self.pad_id, dtype=torch.long)
            for r, j in enumerate(members):
                prefix = self.inputs[j][:-1]
                mask[r, width - len(self.inputs[j]):] = 1
                if prefix:
                    ids[r, width - 1 - len(prefix):] = torch.tensor(prefix)
            cache = None
            if width > 1:
                pmask = mask[:, :-1]
                positions = (pmask.cumsum(-1) - 1).clamp_min(0)
                with torch.inference_mode():
                    out = self.model(input_ids=ids.to(device), attention_mask=pmask.to(device),
                                     position_ids=positions.to(device), use_cache=True, **self._head)
                cache = cache_from_output(out)
                self.counter.add(len(members), int(pmask.sum()))
            self._groups[g] = (members, cache, mask.to(device), width)
        return self._groups[g]

    def outputs(self, sets: Sequence[PredicateSet]) -> SetOutputs:
        n_sets, n_inputs = len(sets), len(self.inputs)
        shape = (n_sets, n_inputs)
        top = np.zeros(shape, dtype=np.int64)
        logprob = np.zeros(shape)
        entropy = np.zeros(shape)
        edits = [tuple(p.edit(("last_prompt",)) for p in s) for s in sets]
        device = next(self.model.parameters()).device
        for g in range(-(-n_inputs // self.prefix_batch)):
            members, cache, mask, width = self._group(g, device)
            rows = [(r, s) for r in range(len(members)) for s in range(n_sets)]

            def run(chunk, part, members=members, cache=cache, mask=mask, width=width):
                index = torch.tensor([r for r, _ in chunk], device=device)
                last = torch.tensor([[self.inputs[members[r]][-1]] for r, _ in chunk], device=device)
                positions = torch.tensor([[len(self.inputs[members[r]]) - 1] for r, _ in chunk], device=device)
                plan = InterventionPlan.per_row(edits[s] for _, s in chunk)
                kwargs = {self._cache_name: select_cache_rows(cache, index)} if cache is not None else {}
                with torch.inference_mode(), NeuronHooks(self.adapter, plan, cached_prompt_length=width):
                    logits = self.model(input_ids=last, attention_mask=mask[index], position_ids=positions,
                                        use_cache=cache is not None, **kwargs).logits[:, -1].float()
                self.counter.add(len(chunk))
                logp = torch.log_softmax(logits, dim=-1)
                values = (logits.argmax(-1).cpu().numpy(), logp[:, self.target_id].cpu().numpy(),
                          entropy_from_logp(logp).cpu().numpy())
                return list(zip(*values))

            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start: start + self.batch_size]
                out = split_on_oom(run, chunk, "clamped sets")
                js = [members[r] for r, _ in chunk]
                ss = [s for _, s in chunk]
                top[ss, js], logprob[ss, js], entropy[ss, js] = (np.array(v) for v in zip(*out))
        return SetOutputs(top, logprob, entropy)

    def __call__(self, sets: Sequence[PredicateSet]) -> np.ndarray:
        return self.outputs(sets).top_token == self.target_id


def target_attribution(model, adapter, input_ids: Sequence[int], target_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Activation and gradient × activation of every neuron at the last token of one prompt, for
    ``m = log p(target)`` there: ``(activation, attribution)``, each ``[n_layers, n_neurons]``
    (float64). One forward and one backward; only activation gradients are taken."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    captured: dict[int, torch.Tensor] = {}

    def on_activation(layer, a, ctx):
        captured[layer] = a

    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    try:
        with torch.enable_grad(), finite_checks(adapter), NeuronHooks(adapter, on_activation=on_activation):
            logits = model(input_ids=ids, use_cache=False).logits
            m = torch.log_softmax(logits[0, -1].float(), dim=-1)[int(target_id)]
            layers = sorted(captured)
            grads = torch.autograd.grad(m, [captured[layer] for layer in layers])
        for layer, g in zip(layers, grads):
            check_finite(g[:, -1], "gradient of log p(target)", layer=layer)
    finally:
        handle.remove()
    activation = np.zeros((adapter.n_layers, adapter.n_neurons))
    gradient = np.zeros_like(activation)
    for layer, g in zip(layers, grads):
        activation[layer] = captured[layer][0, -1].detach().double().cpu().numpy()
        gradient[layer] = g[0, -1].double().cpu().numpy()
    return activation, activation * gradient


def greedy_next_token(model, input_ids: Sequence[int]) -> int:
    """The model's current greedy next token after ``input_ids`` (the target of a prompt)."""
    device = next(model.parameters()).device
    with torch.inference_mode(), finite_checks(model):
        logits = model(input_ids=torch.tensor([list(input_ids)], device=device), use_cache=False).logits
    return int(logits[0, -1].argmax())


def last_token_activations(model, adapter, inputs: Sequence[Sequence[int]], neurons: Sequence[Neuron],
                           batch_size: int = 32, counter: ForwardCounter | None = None) -> np.ndarray:
    """Unclamped activations of ``neurons`` at the last token of every input,
    ``[n_inputs, n_neurons_asked]`` (float64); right padding, one forward per ``batch_size`` inputs,
    stopping after the highest layer asked."""
    out = np.zeros((len(inputs), len(neurons)))
    if not neurons:
        return out
    layers = sorted({int(layer) for layer, _ in neurons})
    columns = {layer: [(c, int(i)) for c, (lay, i) in enumerate(neurons) if lay == layer] for layer in layers}
    index = {layer: [i for _, i in columns[layer]] for layer in layers}

    def read(layer, a, lengths) -> np.ndarray:
        rows = torch.arange(a.shape[0], device=a.device)
        return a[rows, (lengths - 1).to(a.device)][:, index[layer]].double().cpu().numpy()

    for start in range(0, len(inputs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(inputs))))
        got = _last_token_rows(model, adapter, inputs, chunk, read, layers, counter, "neuron activations")
        for layer in layers:
            out[start: start + len(chunk), [c for c, _ in columns[layer]]] = np.stack([row[layer] for row in got])
    return out


def _last_token_rows(model, adapter, inputs, chunk: list[int], read, layers: Sequence[int], counter,
                     label: str, count_tokens: bool = False) -> list[dict]:
    """``read(layer, a, lengths)`` of the inputs ``chunk`` at ``layers`` (right padding, the
    forward stopped after the highest layer), per input; a chunk that runs out of memory runs as
    two halves at the whole chunk's width."""
    device = next(model.parameters()).device
    width = max(len(inputs[j]) for j in chunk)

    def run(part_rows, part):
        lengths = torch.tensor([len(inputs[j]) for j in part_rows])
        ids = torch.zeros((len(part_rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, j in enumerate(part_rows):
            ids[r, : len(inputs[j])], mask[r, : len(inputs[j])] = torch.tensor(list(map(int, inputs[j]))), 1
        got = {}

        def on_activation(layer, a, ctx):
            got[layer] = read(layer, a, lengths)

        try:
            with torch.inference_mode(), NeuronHooks(adapter, on_activation=on_activation, layers=list(layers),
                                                     stop_after_layer=max(layers)):
                adapter.base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        except StopForward:
            pass
        if counter is not None and count_tokens:
            counter.add(len(part_rows), int(lengths.sum()))
        elif counter is not None:
            counter.add(len(part_rows))
        return [{layer: got[layer][r] for layer in layers} for r in range(len(part_rows))]

    return split_on_oom(run, chunk, label)


def covered(predicates: Sequence[Predicate], activations: np.ndarray) -> np.ndarray:
    """``[n_inputs]`` bool: every predicate holds on the input's unclamped activations
    ``activations [n_inputs, len(predicates)]`` (columns in the predicates' order)."""
    held = np.ones(activations.shape[0], dtype=bool)
    for c, p in enumerate(predicates):
        held &= activations[:, c] >= p.threshold if p.direction == "ge" else activations[:, c] <= p.threshold
    return held


def precision_table(model, adapter, predictor: ClampedPredictor, named_sets: dict[str, PredicateSet],
                    confidence: float = 0.95) -> pd.DataFrame:
    """One row per named set on ``predictor``'s inputs: ``size``, ``neurons``, clamped precision
    ``hits / n`` with its Wilson interval (``precision_low``, ``precision_high``), ``coverage`` (the
    fraction of inputs on which the set holds unclamped, with its interval) and
    ``precision_covered`` (the unclamped output is the target on the covered inputs, the anchors
    reading; nan when none is covered). The unclamped pass is evaluated once, beside the sets."""
    names = list(named_sets)
    sets = [tuple(named_sets[name]) for name in names]
    hits = predictor([*sets, ()])
    unclamped = hits[-1]
    neurons = list(dict.fromkeys(p.key for s in sets for p in s))
    acts = last_token_activations(model, adapter, predictor.inputs, neurons, predictor.batch_size,
                                  predictor.counter)
    column = {neuron: c for c, neuron in enumerate(neurons)}
    n = len(predictor.inputs)
    rows = []
    for name, s, kept in zip(names, sets, hits[:-1]):
        cover = covered(s, acts[:, [column[p.key] for p in s]]) if s else np.ones(n, dtype=bool)
        k, c = int(kept.sum()), int(cover.sum())
        p_low, p_high = precision_bounds(k, n, confidence)
        c_low, c_high = precision_bounds(c, n, confidence)
        rows.append({
            "set": name, "size": len(s), "neurons": [list(p.key) for p in s],
            "thresholds": [p.threshold for p in s], "hits": k, "n": n, "precision": k / n,
            "precision_low": p_low, "precision_high": p_high, "covered": c, "coverage": c / n,
            "coverage_low": c_low, "coverage_high": c_high,
            "precision_covered": float(unclamped[cover].mean()) if c else float("nan"),
        })
    return pd.DataFrame(rows)


def control_table(lacking: ClampedPredictor, found: PredicateSet, random_sets: Sequence[PredicateSet],
                  confidence: float = 0.95, baselines: Mapping[str, PredicateSet] | None = None) -> pd.DataFrame:
    """Forcing the target onto inputs that lack it: rows for the unclamped inputs (``none``), the
    found set (``found``), each named baseline set (``baselines``: the top-|S| of a ranking) and
    each random same-layer set (``random``, ``replicate``), with the forcing rate, its Wilson
    interval, and the mean next-token entropy and target log-prob under the clamp (a first
    coherence reading). ``random_at_least`` on the found row is the fraction of random sets that
    force at least as often."""
    baselines = dict(baselines or {})
    named = [("none", ()), ("found", tuple(found)), *((n, tuple(s)) for n, s in baselines.items())]
    sets = [s for _, s in named] + [tuple(s) for s in random_sets]
    kinds = [n for n, _ in named] + ["random"] * len(random_sets)
    out = lacking.outputs(sets)
    forced = out.top_token == lacking.target_id
    n = forced.shape[1]
    rows = []
    for r, (kind, s) in enumerate(zip(kinds, sets)):
        k = int(forced[r].sum())
        low, high = precision_bounds(k, n, confidence)
        rows.append({"set": kind, "replicate": r - len(named) if kind == "random" else 0, "size": len(s),
                     "neurons": [list(p.key) for p in s], "forced": k, "n": n, "forcing_rate": k / n,
                     "forcing_low": low, "forcing_high": high, "entropy": float(out.entropy[r].mean()),
                     "target_logprob": float(out.target_logprob[r].mean())})
    table = pd.DataFrame(rows)
    random_rates = table.loc[table["set"] == "random", "forcing_rate"].to_numpy()
    table["random_at_least"] = np.nan
    if random_rates.size:
        table.loc[table["set"] == "found", "random_at_least"] = float(
            (random_rates >= table.loc[table["set"] == "found", "forcing_rate"].iloc[0]).mean())
    return table


def last_token_matrix(model, adapter, inputs: Sequence[Sequence[int]], batch_size: int = 32,
                      counter: ForwardCounter | None = None) -> np.ndarray:
    """Unclamped activations of every neuron at the last token of every input,
    ``[n_inputs, n_layers, n_neurons]`` (float32); right padding, one forward per ``batch_size``
    inputs. Memory grows with the inputs asked, never with a prompt set."""
    out = np.zeros((len(inputs), adapter.n_layers, adapter.n_neurons), dtype=np.float32)
    layers = list(range(adapter.n_layers))

    def read(layer, a, lengths) -> np.ndarray:
        rows = torch.arange(a.shape[0], device=a.device)
        return a[rows, (lengths - 1).to(a.device)].float().cpu().numpy()

    for start in range(0, len(inputs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(inputs))))
        got = _last_token_rows(model, adapter, inputs, chunk, read, layers, counter, "last-token activations",
                               count_tokens=True)
        for layer in layers:
            out[start: start + len(chunk), layer] = np.stack([row[layer] for row in got])
    return out


def contrast_score(with_target: np.ndarray, lacking: np.ndarray) -> np.ndarray:
    """The contrastive screen's δ on a task's own inputs: the mean last-token activation over
    inputs whose output is the target minus the mean over inputs that lack it,
    ``[n_layers, n_neurons]`` (float64), from ``[n_inputs, n_layers, n_neurons]`` arrays."""
    if len(with_target) == 0 or len(lacking) == 0:
        raise NeuronAuditError("the contrastive score needs inputs with the target and inputs without it")
    return with_target.astype(np.float64).mean(0) - lacking.astype(np.float64).mean(0)
