"""A batch that runs out of memory is split and retried, with the same results in the same order."""

import dataclasses
import json
import logging
import weakref
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.capability import ablation_plan, capability_report
from neuronaudit.evaluation.judge import make_judge
from neuronaudit.evaluation.rollouts import generate_rollouts
from neuronaudit.interventions import sweeps
from neuronaudit.interventions.capture import collect_activations
from neuronaudit.interventions.generation import batch_seed
from neuronaudit.interventions.hooks import NeuronEdit
from neuronaudit.interventions.memory import (
    MAX_AUTO_ROWS,
    ModelShape,
    RowLoad,
    auto_batch_size,
    bytes_per_row,
    free_memory,
    is_out_of_memory,
    part_seed,
    split_on_oom,
)
from neuronaudit.interventions.prefix_generation import shared_prefix_generate
from neuronaudit.interventions.scoring import score_tokens, shared_prompt_scores
from neuronaudit.methods import reasoning as R
from neuronaudit.methods.attribution import gradient_scores
from neuronaudit.methods.cna import residual_means
from neuronaudit.methods.refusal_tuning import own_answer_examples
from neuronaudit.methods.sufficient import ClampedPredictor, Predicate, last_token_activations, last_token_matrix
from neuronaudit.methods.window import generic_geometry
from neuronaudit.models.adapters import adapter_for
from neuronaudit.options import CnaOptions, CollectOptions, PromptOptions, SufficientOptions
from neuronaudit.stages import collect as collect_stage
from neuronaudit.stages import sufficient as sufficient_stage
from neuronaudit.stages.common import capability_load, resolve_batch_sizes, rollout_load
from neuronaudit.stages.prepare import run_prepare_model, run_prepare_prompts
from neuronaudit.testing import OutOfMemoryOnce, stage_options, tiny_model


def _split_warning(caplog, label: str, rows: int) -> bool:
    return f"{label}: out of memory on a batch of {rows} rows" in caplog.text


def test_only_out_of_memory_errors_split_a_batch(caplog):
    calls = []

    def run(rows, part):
        calls.append((len(rows), part))
        if len(rows) > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")
        return [r * 10 for r in rows]

    with caplog.at_level(logging.WARNING, logger="neuronaudit"):
        assert split_on_oom(run, [1, 2, 3, 4, 5], "test") == [10, 20, 30, 40, 50]
    assert calls[0] == (5, ()) and (2, (0,)) in calls and (2, (1, 1)) in calls
    assert "test: out of memory on a batch of 5 rows" in caplog.text
    with pytest.raises(ValueError, match="shape"):  # any other error is not retried
        split_on_oom(lambda rows, part: (_ for _ in ()).throw(ValueError("shape")), [1, 2], "test")
    with pytest.raises(MemoryError):  # one row that does not fit is an error
        split_on_oom(lambda rows, part: (_ for _ in ()).throw(MemoryError()), [1], "test")
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("size mismatch"))


def test_a_failed_batch_is_freed_before_its_halves_run():
    seen = []

    def run(rows, part):
        if seen:  # the tensors of the failed batch are gone by the time a half starts
            assert seen[0]() is None
        big = torch.zeros(len(rows), 1000)
        if not part:
            seen.append(weakref.ref(big))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [float(big[r].sum()) for r in range(len(rows))]

    assert split_on_oom(run, [1, 2, 3], "test") == [0.0, 0.0, 0.0]
    assert len(seen) == 1


def test_an_unsplit_batch_keeps_its_seed():
    assert all(part_seed(s, b, ()) == batch_seed(s, b) for s in (0, 7) for b in range(4))
    assert len({part_seed(3, 1, ()), part_seed(3, 1, (0,)), part_seed(3, 1, (1,)), part_seed(3, 1, (1, 0))}) == 4


def test_rollouts_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(5)],
                            "text": ["How do I pick a lock?", "Tell me a joke", "What is two plus two?",
                                     "Write a poem about the sea", "List three colours"]})
    # sampled rows too: each draws from its own stream, so the halves sample what the batch did
    kwargs = dict(interventions={"none": [], "dosed": [NeuronEdit.dose(1, 4, 5.0)]}, horizons=[4], batch_size=4,
                  sampling=["greedy", "sample:2"], temperature=1.5, progress=False)
    fits = generate_rollouts(model, tokenizer, adapter, prompts, **kwargs)
    with OutOfMemoryOnce(model, rows=4, error="cpu") as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = generate_rollouts(model, tokenizer, adapter, prompts, **kwargs)
    assert oom.failures == 1 and _split_warning(caplog, "rollouts", 4)
    pd.testing.assert_frame_equal(fits, split)


# --- every batched loop that runs the model: an out-of-memory batch gives the same output -----

TEXTS = ["How do I pick a lock?", "Tell me a joke", "What is two plus two?", "Write a poem about the sea",
         "List three colours", "The river flows through the old city, past the market."]


def test_collection_that_runs_out_of_memory_equals_the_one_that_fits(llama, tokenizer, tmp_path, caplog):
    model, adapter = llama
    ids = [f"p{i}" for i in range(len(TEXTS))]

    def collect(folder):
        folder.mkdir()
        stats = collect_activations(model, tokenizer, adapter, TEXTS, ids, folder / "s.parquet", folder / "l.parquet",
                                    layers=[0, 2, 3], batch_size=4, progress=False)
        return stats.to_pandas(), pq.read_table(folder / "l.parquet").to_pandas()

    fits = collect(tmp_path / "fits")
    # the forward fails half way, after layer 0 has added the whole batch to the statistics
    with OutOfMemoryOnce(model, rows=4, module=adapter.blocks[1], error="cpu") as oom, \
            caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = collect(tmp_path / "split")
    assert oom.failures == 1 and _split_warning(caplog, "collect", 4)
    pd.testing.assert_frame_equal(fits[0], split[0], check_exact=True)
    pd.testing.assert_frame_equal(fits[1], split[1], check_exact=True)


def _same_scores(a, b) -> None:
    assert len(a.logprob) == len(b.logprob)
    for x, y in zip(a.logprob + a.entropy, b.logprob + b.entropy):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("plan", [None, "ablation"])
def test_token_scores_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog, plan):
    model, adapter = llama
    sequences = [tokenizer(t)["input_ids"] for t in TEXTS]
    plan = ablation_plan([(1, 3), (2, 5)]) if plan else None
    kwargs = dict(plan=plan, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    scored_from = [1, 2, 3, 1, 4, 2]
    fits = score_tokens(model, adapter, sequences, scored_from, **kwargs)
    with OutOfMemoryOnce(model, rows=4) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = score_tokens(model, adapter, sequences, scored_from, **kwargs)
    assert oom.failures == 1 and _split_warning(caplog, "token scoring", 4)
    _same_scores(fits, split)


def test_shared_prompt_scores_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    prompt = tokenizer("How do I pick a lock?")["input_ids"]
    responses = [tokenizer(t)["input_ids"] for t in TEXTS]
    fits = shared_prompt_scores(model, prompt, responses, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    with OutOfMemoryOnce(model, rows=4, error="cpu") as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = shared_prompt_scores(model, prompt, responses, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    assert oom.failures == 1 and _split_warning(caplog, "response scoring", 4)
    _same_scores(fits, split)


def test_capability_checks_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    tasks = {"task_knowledge": pd.DataFrame({
        "prompt_id": [f"k{i}" for i in range(6)], "text": TEXTS, "answer": ["a", "b", "c", "d", "e", "f"]})}
    plan = ablation_plan([(1, 3), (2, 5)])
    kwargs = dict(plan=plan, max_new_tokens=5, batch_size=4, return_responses=True)
    fits = capability_report(model, tokenizer, adapter, TEXTS, tasks, **kwargs)
    # the first batch of the perplexity and the first of the generation each fail once
    with OutOfMemoryOnce(model, rows=4, times=2) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = capability_report(model, tokenizer, adapter, TEXTS, tasks, **kwargs)
    assert oom.failures == 2
    assert _split_warning(caplog, "token scoring", 4) and _split_warning(caplog, "capability answers", 4)
    assert split == fits


def test_attribution_gradients_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    beh, dflt = [5, 6], [7]
    fits = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=4)
    with OutOfMemoryOnce(model, rows=4, module=adapter.blocks[2]) as oom, \
            caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = gradient_scores(model, tokenizer, adapter, TEXTS, beh, dflt, batch_size=4)
    assert oom.failures == 1 and _split_warning(caplog, "attribution gradients", 4)
    assert fits.keys() == split.keys()
    for name in fits:
        np.testing.assert_array_equal(fits[name], split[name])


SWEEP_ROWS = [(2, 0, 4.0), (2, 1, -3.0), (2, 2, 10.0), (2, 3, 2.0), (2, 4, -20.0), (1, 9, 3.0)]


def _same_fields(a, b) -> None:
    """Integer tensors (tokens, lengths) equal; float ones equal up to the rounding that the number
    of rows in a matrix product changes (a half runs 2 rows where the whole chunk ran 4)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            tol = {} if x.is_floating_point() else dict(rtol=0, atol=0)
            torch.testing.assert_close(x, y, equal_nan=True, **tol, msg=f.name)
        else:
            assert x == y, f.name


@pytest.mark.parametrize("sweep", ["last_token", "prompt", "generated", "single_pass"])
def test_dose_sweeps_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog, sweep):
    model, adapter = llama
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    args = (model, adapter, enc["input_ids"], enc["attention_mask"], SWEEP_ROWS)
    if sweep == "generated":
        probe = sweeps.generated_dose_sweep(*args, 6, eos_token_id=None, pad_token_id=0)
        kw = dict(eos_token_id=int(probe.tokens[0, 0, 2]), pad_token_id=0, return_logits=True)  # rows stop apart

        def call():
            return sweeps.generated_dose_sweep(*args, 6, row_batch_size=4, **kw)
    elif sweep == "single_pass":
        def call():
            return sweeps.single_pass_dose_response(*args, row_batch_size=4)
    else:
        def call():
            return getattr(sweeps, f"{sweep}_dose_sweep")(*args, read_layers=[1, 3], row_batch_size=4)
    fits = call()
    with OutOfMemoryOnce(model, rows=4) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = call()
    assert oom.failures == 1
    assert _split_warning(caplog, "generated dose sweep" if sweep == "generated" else "dose sweep", 4)
    _same_fields(fits, split)
    if sweep == "generated":  # a row's logits end at its EOS, whichever rows shared its batch
        after = torch.arange(6)[None, None, :] >= fits.lengths[..., None]
        assert bool(after.any()) and bool(fits.logits[after].isnan().all())
        assert not bool(fits.logits[~after].isnan().any())


def test_generic_geometry_that_runs_out_of_memory_equals_the_one_that_fits(llama, tokenizer, caplog):
    model, adapter = llama
    fits = generic_geometry(model, tokenizer, adapter, TEXTS, batch_size=4)
    with OutOfMemoryOnce(model, rows=4, module=adapter.blocks[2], error="cpu") as oom, \
            caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = generic_geometry(model, tokenizer, adapter, TEXTS, batch_size=4)
    assert oom.failures == 1 and _split_warning(caplog, "generic geometry", 4)
    pd.testing.assert_frame_equal(fits, split, check_exact=True)


def test_sufficient_set_batches_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    inputs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    sets = [(), (Predicate(0, 3, 4.0), Predicate(2, 7, -3.0, "le")), (Predicate(3, 100, 6.0),)]
    neurons = [(0, 3), (2, 7), (3, 100), (1, 5)]

    calls = [  # the predictor's prefixes run three inputs at a time (never four), its rows four at a time
        lambda: ClampedPredictor(model, adapter, inputs, 5, tokenizer.pad_token_id, batch_size=4,
                                 prefix_batch=3).outputs(sets),
        lambda: last_token_activations(model, adapter, inputs, neurons, batch_size=4),
        lambda: last_token_matrix(model, adapter, inputs, batch_size=4),
    ]
    fits = [call() for call in calls]
    split = []
    for call, label in zip(calls, ("clamped sets", "neuron activations", "last-token activations")):
        with OutOfMemoryOnce(model, rows=4) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
            split.append(call())
        assert oom.failures == 1 and _split_warning(caplog, label, 4)
    for a, b in zip(dataclasses.astuple(fits[0]), dataclasses.astuple(split[0])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(fits[0].top_token, split[0].top_token)
    np.testing.assert_array_equal(fits[1], split[1])
    np.testing.assert_array_equal(fits[2], split[2])


def test_sufficient_rollouts_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    inputs = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    named = {"none": (), "found": (Predicate(0, 3, 4.0),), "other": (Predicate(2, 7, -30.0, "le"),)}
    judge = make_judge(stage_options(SufficientOptions).judge.judge_config())
    task = SimpleNamespace(behaviour=None)

    def roll():
        return sufficient_stage._rollouts(model, tokenizer, adapter, inputs, named, judge, task, TEXTS[:3],
                                          [{}] * 3, 5, 4, 7)

    fits = roll()
    with OutOfMemoryOnce(model, rows=4) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = roll()
    assert oom.failures == 1 and _split_warning(caplog, "sufficient rollouts", 4)
    assert split == fits


@pytest.mark.parametrize("fail", ["rows", "prefix"])
def test_shared_prefix_rollouts_that_run_out_of_memory_equal_those_that_fit(caplog, fail):
    model = tiny_model("llama", seed=3)
    adapter = adapter_for(model)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(5, model.config.vocab_size, size=n))) for n in (1, 4, 9, 6, 3)]
    pos = ("last_prompt", "generated")
    conditions = [(), (NeuronEdit.dose(0, 3, 6.0, pos),), (NeuronEdit.ablate(1, 5, pos),)]
    rows = [(p, c) for p in range(len(prompts)) for c in conditions for _ in range(2)]
    kw = dict(eos_token_ids=[7, 11], pad_token_id=0, prefix_batch=3, row_batch=4,
              record=[k % 3 == 0 for k in range(len(rows))], record_layers=[0, 2])
    fits = shared_prefix_generate(model, adapter, prompts, rows, 7, **kw)
    # the rows of a prompt group decode four at a time; its prefixes run three prompts at once
    size, label = (4, "shared-prefix rows") if fail == "rows" else (3, "shared-prefix prompts")
    with OutOfMemoryOnce(model, rows=size) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = shared_prefix_generate(model, adapter, prompts, rows, 7, **kw)
    assert oom.failures == 1 and _split_warning(caplog, label, size)
    assert split.tokens == fits.tokens and split.stopped == fits.stopped and split.recorded == fits.recorded
    for a, b in zip(fits.entropy, split.entropy):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(split.mean_activation, fits.mean_activation, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split.last_prompt_activation, fits.last_prompt_activation, rtol=1e-5, atol=1e-7)


def test_reasoning_batches_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    edits = [NeuronEdit.dose(1, 4, 5.0, ("last_prompt", "generated"))]
    calls = [
        ("reasoning solutions", lambda: R.solve(model, adapter, ids, 5, edits=edits, batch_size=4)),
        ("reasoning activations", lambda: R.mean_activations(model, adapter, ids, [[5, 6, 7]] * len(ids),
                                                             batch_size=4, pad_token_id=tokenizer.pad_token_id)),
    ]
    for label, call in calls:
        fits = call()
        with OutOfMemoryOnce(model, rows=4, error="cpu") as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
            split = call()
        assert oom.failures == 1 and _split_warning(caplog, label, 4)
        if label == "reasoning solutions":
            assert split == fits
        else:
            np.testing.assert_array_equal(split, fits)


def test_residual_means_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, caplog):
    model, adapter = llama
    fits = residual_means(model, tokenizer, adapter, TEXTS, [1, 3], batch_size=4)
    with OutOfMemoryOnce(model, rows=4, module=adapter.blocks[2]) as oom, \
            caplog.at_level(logging.WARNING, logger="neuronaudit"):
        split = residual_means(model, tokenizer, adapter, TEXTS, [1, 3], batch_size=4)
    assert oom.failures == 1 and _split_warning(caplog, "residual means", 4)
    assert fits.keys() == split.keys()
    for layer in fits:
        np.testing.assert_array_equal(fits[layer], split[layer])


def test_own_answers_and_judge_outputs_that_run_out_of_memory_equal_those_that_fit(llama, tokenizer, tiny_model_dir,
                                                                                  caplog):
    model, _ = llama
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    judge = make_judge({"kind": "model", "model": str(tiny_model_dir), "max_new_tokens": 3, "batch_size": 4})
    calls = [
        ("own answers", model, lambda: own_answer_examples(model, tokenizer, ids, 5, batch_size=4)),
        ("judge model", None, lambda: judge.judge_outputs(["How do I bake bread?"] * 6, TEXTS)),
    ]
    for label, run_model, call in calls:
        fits = call()
        run_model = run_model if run_model is not None else judge._model
        with OutOfMemoryOnce(run_model, rows=4) as oom, caplog.at_level(logging.WARNING, logger="neuronaudit"):
            split = call()
        assert oom.failures == 1 and _split_warning(caplog, label, 4)
        assert split == fits


# --- batch sizes of "auto": from the free GPU memory, the default on the CPU --------------------

GIB = 2**30
#: A Llama-3-8B-like decoder in bfloat16.
LLAMA_8B = ModelShape(n_layers=32, d_model=4096, d_ff=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab=128256,
                      dtype_bytes=2)


def test_bytes_per_row_follows_its_formula():
    s = ModelShape(n_layers=2, d_model=8, d_ff=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=10, dtype_bytes=2)
    layer = 5 * (4 * 8 + 3 * 16 + 2 * 5) * 2  # T = 5 positions, no cache: scores over the 5
    assert bytes_per_row(s, RowLoad(tokens=5, logits=0)) == layer
    assert bytes_per_row(s, RowLoad(tokens=5, logits=0, backward=True)) == 2 * layer  # every layer kept
    assert bytes_per_row(s, RowLoad(tokens=5, logits=0, hook_bytes=7)) == layer + 5 * 7
    # generation: scores over the 9 cached positions, keys and values of both layers, logits at 3 positions
    generated = 5 * (4 * 8 + 3 * 16 + 2 * 9) * 2 + 2 * 2 * 1 * 4 * 9 * 2 + 3 * 10 * (2 + 12)
    assert bytes_per_row(s, RowLoad(tokens=5, cached=9, logits=3)) == generated


def test_a_bigger_gpu_gives_a_bigger_batch_and_the_cpu_its_default():
    per_row = bytes_per_row(LLAMA_8B, RowLoad(tokens=256, cached=320, logits=64))
    small, big = auto_batch_size(8 * GIB, per_row, 32), auto_batch_size(64 * GIB, per_row, 32)
    assert small == int(0.8 * 8 * GIB // per_row) and 1 < small < big
    assert auto_batch_size(None, per_row, 32) == 32  # no device memory to read: the CPU default
    assert auto_batch_size(per_row // 2, per_row, 32) == 1  # clipped below
    assert auto_batch_size(per_row // 2, per_row, 32, lo=4) == 4
    assert auto_batch_size(10**6 * per_row, per_row, 32) == MAX_AUTO_ROWS  # clipped above
    assert auto_batch_size(10**6 * per_row, per_row, 32, hi=100) == 100
    with pytest.raises(ValueError):
        auto_batch_size(GIB, 0, 32)


def test_the_shape_of_a_loaded_model(llama, tokenizer):
    model, adapter = llama
    assert ModelShape.of(model, adapter) == ModelShape(n_layers=4, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2,
                                                       head_dim=16, vocab=len(tokenizer), dtype_bytes=4)
    gpt2 = tiny_model("gpt2", vocab_size=len(tokenizer))
    shape = ModelShape.of(gpt2, adapter_for(gpt2))
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim) == (4, 4, 16)  # no KV groups: every head has its own


class _CudaParameter:
    device = torch.device("cuda", 0)

    def element_size(self) -> int:
        return 2


class _CudaModel:
    """What the sizing reads of a model loaded on a GPU: its parameters' device and bytes, its config."""

    config = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256)

    def parameters(self):
        return iter([_CudaParameter()])


def _fake_gpu(monkeypatch, free: int, cached: int = 0):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GIB + cached)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GIB)


def test_auto_on_a_cuda_device_is_sized_from_its_free_memory(monkeypatch, caplog):
    adapter = SimpleNamespace(n_layers=32, d_model=4096, n_neurons=14336)
    loads = {"collect.batch_size": RowLoad(tokens=256, logits=0, hook_bytes=32 * 14336),
             "rollouts.batch_size": rollout_load(64), "capability.batch_size": capability_load(32)}
    _fake_gpu(monkeypatch, free=20 * GIB, cached=GIB)
    assert free_memory("cuda:0") == 21 * GIB and free_memory("cpu") is None
    with caplog.at_level(logging.INFO, logger="neuronaudit"):
        collect = resolve_batch_sizes(_CudaModel(), adapter, stage_options(CollectOptions, batch_size="auto"), loads)
        both = stage_options(CnaOptions, batch_size="auto", capability={"batch_size": "auto"})
        cna = resolve_batch_sizes(_CudaModel(), adapter, both, loads)
    expected = {key: auto_batch_size(21 * GIB, bytes_per_row(LLAMA_8B, load), 8) for key, load in loads.items()}
    assert collect.batch_size == expected["collect.batch_size"] != 8
    assert (cna.batch_size, cna.capability.batch_size) == (expected["rollouts.batch_size"],
                                                            expected["capability.batch_size"])
    assert f"collect.batch_size: auto -> {collect.batch_size} rows per batch (21.0 GiB free on cuda:0" in caplog.text
    _fake_gpu(monkeypatch, free=70 * GIB)  # a bigger GPU: bigger batches
    bigger = resolve_batch_sizes(_CudaModel(), adapter, stage_options(CollectOptions, batch_size="auto"), loads)
    assert bigger.batch_size > collect.batch_size
    # a size given stays; an auto size without an estimate is an error of the stage's code
    given = stage_options(CollectOptions, batch_size=5)
    assert resolve_batch_sizes(_CudaModel(), adapter, given, loads) is given
    with pytest.raises(NeuronAuditError, match="no memory estimate for collect.batch_size"):
        resolve_batch_sizes(_CudaModel(), adapter, stage_options(CollectOptions, batch_size="auto"), {})


def test_the_collect_stage_runs_auto_on_the_cpu_at_the_default(tiny_model_dir, tmp_path, monkeypatch, caplog):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    run_prepare_prompts("p", str(prompts), tmp_path / "p.parquet", stage_options(PromptOptions))
    run_prepare_model(str(tiny_model_dir), tmp_path / "model")
    sizes = []

    def spy(*args, batch_size, **kw):
        sizes.append(batch_size)
        return collect_activations(*args, batch_size=batch_size, **kw)

    monkeypatch.setattr(collect_stage, "collect_activations", spy)
    options = stage_options(CollectOptions, batch_size="auto", split="all", model={"device": "cpu"})
    with caplog.at_level(logging.INFO, logger="neuronaudit"):
        collect_stage.run_collect(tmp_path / "model" / "manifest.json", tmp_path / "p.parquet",
                                  tmp_path / "s.parquet", tmp_path / "l.parquet", options)
    default = stage_options(CollectOptions).batch_size
    assert sizes == [default] == [8]
    assert "collect.batch_size: auto -> 8 rows per batch (the default on cpu)" in caplog.text
