"""Speed and memory ratios of neuronaudit's hot paths: ``python -m neuronaudit.bench``.

Prints, from one run, the median of repeated timings with the min–max spread, as ratios against
the plain baseline a user would otherwise run, beside each target, plus the machine it ran on.
It never asserts and is never a timed test: CPU timings on a shared machine drift, ratios of
interleaved repeats drift much less.

    python -m neuronaudit.bench                      # embedded SmolLM2-135M-Instruct
    python -m neuronaudit.bench --model tiny --quick # a tiny random model, seconds
    python -m neuronaudit.bench --only sweeps,rollouts --repeats 3

Sections (``--only``, comma-separated):

``collect``   streaming statistics (NeuronHooks + StreamingNeuronStats, decoder stack only,
              stopping after the last layer) and do-nothing capture hooks vs a plain forward
``peers``     the same capture through nnsight and TransformerLens when importable (in a
              subprocess: TransformerLens switches the model to eager attention)
``memory``    peak RSS of a fresh subprocess per measurement as the prompt count grows
``sweeps``    last-token, generated-token and every-prompt-token dose sweeps vs the naive loop
``rollouts``  generation under a per-row dose vs plain ``model.generate`` of the same batch
``search``    the window's adaptive dose search vs the full grid on the tiny model (always the tiny
              model, whatever ``--model``): ratios of rollouts and of wall time, and whether the
              ceilings, triggers and rows at the visited points agree
``dtype``     bfloat16 weights against float32: a forward and a greedy ``generate`` of the same batch
              (ratios of wall time, below 1 is faster), and how far bfloat16's last-position
              log-probabilities and greedy tokens are from float32's
``profile``   where the time of one window rollout call goes (the study's shapes: 3 neurons × the
              default x_grid in both signs, 12 prompts, horizons 8/16/32, rule judge): greedy dosed
              generation, the unsteered model's scoring of the rollouts, decoding, the judge and
              the oracle, as shares of the call (cProfile, cumulative)
``lower``     the window's unsteered scoring with the blocks below each row's dose stood in for
              by the layer inputs recorded while decoding, against running every block: one window
              rollout call each way (wall time ratio; typed rows and perplexities compared)
``scaling``   how cost grows: wall time and peak memory of a collection, one window sweep and one
              rollout batch at 1x, 4x and 16x the prompts on the model, and at 1x on random models
              of its larger siblings' shapes (SmolLM2-360M and -1.7B for the embedded model), each
              in a fresh process; the growth is fitted as a power law (exponent 1 = linear)
``rules``     wall time and peak memory per Snakemake rule from the workflow's benchmark files
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import reduce
from pathlib import Path

import torch
import transformers
import yaml
from transformers import GenerationConfig

from neuronaudit.errors import NeuronAuditError
from neuronaudit.interventions import sweeps
from neuronaudit.models.adapters import adapter_for
from neuronaudit.models.loading import load_model, load_prepared, prepare_model
from neuronaudit.testing import _CORPUS, default_config, save_tiny_model, tiny_model, tiny_tokenizer

EMBEDDED_SPEC = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_DIR = "results/models/gguf-SmolLM2-135M-Instruct.Q4_1"
SECTIONS = ("collect", "peers", "memory", "sweeps", "rollouts", "search", "dtype", "profile", "lower", "scaling",
            "rules")


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    return here if (here / "Snakefile").is_file() else Path.cwd()


def resolve_model(spec: str) -> str:
    """``embedded`` -> the prepared copy's weight directory (prepared once, then reused);
    ``tiny`` stays ``tiny``; a path stays a path (a model directory or a manifest.json)."""
    if spec == "embedded":

        manifest = prepare_model(EMBEDDED_SPEC, repo_root() / EMBEDDED_DIR)
        return manifest["path"]
    return spec


def load(spec: str):
    """``(model, tokenizer, adapter, label)`` for a resolved model spec."""

    if spec == "tiny":

        tokenizer = tiny_tokenizer()
        model = tiny_model("llama", vocab_size=len(tokenizer))
        model.requires_grad_(False)
        for cfg in (model.config, model.generation_config):
            cfg.pad_token_id = tokenizer.pad_token_id
            cfg.eos_token_id = tokenizer.eos_token_id
        return model, tokenizer, adapter_for(model), "tiny random llama"

    path = Path(spec)
    if path.name == "manifest.json":
        model, tokenizer, adapter, manifest = load_prepared(path)
        return model, tokenizer, adapter, manifest.get("source", str(path))
    model, tokenizer, adapter = load_model(path)
    return model, tokenizer, adapter, str(path)


def texts() -> list[str]:
    path = repo_root() / "config" / "prompts" / "generic.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out = [r["text"] for r in rows if r.get("text")]
        if out:
            return out

    return list(_CORPUS)


def make_batch(tokenizer, n: int, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts of exactly ``length`` tokens of generic text (no padding): ``[n, length]``."""
    pool = texts()
    rows = []
    for i in range(n):
        ids: list[int] = []
        j = i + offset
        while len(ids) < length:
            ids += tokenizer(pool[j % len(pool)] + " ", add_special_tokens=False)["input_ids"]
            j += 1
        rows.append(ids[:length])
    input_ids = torch.tensor(rows, dtype=torch.long)
    return input_ids, torch.ones_like(input_ids)


def sweep_rows(adapter, n_rows: int, seed: int = 0) -> list[tuple[int, int, float]]:
    """``n_rows`` rows: ``n_rows / 4`` neurons spread evenly over the layers, 4 doses each."""
    g = torch.Generator().manual_seed(seed)
    doses = (-8.0, -2.0, 2.0, 8.0)
    k = max(1, (n_rows + len(doses) - 1) // len(doses))
    layers = torch.linspace(0, adapter.n_layers - 1, k).round().long().tolist()
    neurons = torch.randint(0, adapter.n_neurons, (k,), generator=g).tolist()
    rows = [(l, i, d) for l, i in zip(layers, neurons) for d in doses]
    return rows[:n_rows]


# --------------------------------------------------------------------------------------------
# timing and printing
# --------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(fn: Callable, baseline: Callable, repeats: int, warmup: bool = True) -> dict:
    """Interleaved repeats of ``fn`` and ``baseline``; ``ratios[k] = t_fn[k] / t_base[k]``."""
    if warmup:
        fn()
        baseline()
    t_fn, t_base = [], []
    for k in range(repeats):
        if k % 2 == 0:
            t_base.append(_timed(baseline))
            t_fn.append(_timed(fn))
        else:
            t_fn.append(_timed(fn))
            t_base.append(_timed(baseline))
    return {"fn": t_fn, "base": t_base, "ratios": [a / b for a, b in zip(t_fn, t_base)]}


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def verdict(value: float, op: str, target: float) -> str:
    if op == "ref":
        return "[reference]"
    if op == "<=":
        return "[met]" if value <= target else f"[missed by {value - target:.2f}×]"
    return "[met]" if value >= target else f"[missed by {target - value:.2f}×]"


def report_line(
    name: str, ratios: list[float], op: str, target: float, target_text: str | None = None,
    extra: str = "",
) -> str:
    med = statistics.median(ratios)
    text = target_text or f"{'≤' if op == '<=' else '≥'} {target:g}×"
    line = (
        f"{name}: {med:.2f}× (median, {min(ratios):.2f}–{max(ratios):.2f} over {len(ratios)} "
        f"repeats) target {text}  {verdict(med, op, target)}"
    )
    return line + (f"  — {extra}" if extra else "")


def out(line: str = "") -> None:
    print(line, flush=True)


def machine_line() -> str:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()

    load = ""
    with contextlib.suppress(OSError, AttributeError):
        load = " load avg {:.2f}/{:.2f}/{:.2f};".format(*os.getloadavg())
    return (
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores "
        f"({affinity} usable);{load} torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; transformers {transformers.__version__}; python {platform.python_version()}"
    )


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


def streaming_collect(model, adapter, input_ids, attention_mask):
    """One batch of the collection: every layer's statistics and last-token rows, decoder stack
    only, stopping after the last collected layer (as neuronaudit.interventions.capture does)."""
    from neuronaudit.interventions.capture import StreamingNeuronStats
    from neuronaudit.interventions.hooks import NeuronHooks, StopForward

    layers = list(range(adapter.n_layers))
    stats = StreamingNeuronStats(layers, adapter.n_neurons)
    last_rows = {}

    def on_activation(layer, a, ctx):
        stats.update(layer, a, ctx.mask("prompt"))
        rows = torch.arange(a.shape[0], device=a.device)
        last_rows[layer] = a[rows, ctx.last_prompt].detach().float().cpu()

    with torch.inference_mode(), NeuronHooks(
        adapter, on_activation=on_activation, layers=layers, stop_after_layer=max(layers)
    ):
        try:
            adapter.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return stats, last_rows


def plain_forward(model, input_ids, attention_mask):
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def noop_capture(model, adapter, input_ids, attention_mask):
    from neuronaudit.interventions.hooks import NeuronHooks

    with torch.inference_mode(), NeuronHooks(adapter, on_activation=lambda layer, a, ctx: None):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def section_collect(model, adapter, ids, mask, repeats):
    shape = f"{ids.shape[0]}×{ids.shape[1]} tokens"
    res = compare(lambda: streaming_collect(model, adapter, ids, mask), lambda: plain_forward(model, ids, mask),
                  repeats)
    out(report_line(
        f"collect/streaming stats vs plain forward ({shape})", res["ratios"], "<=", 0.85,
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}",
    ))
    res = compare(lambda: noop_capture(model, adapter, ids, mask), lambda: plain_forward(model, ids, mask), repeats)
    out(report_line(
        f"collect/do-nothing hooks on every {adapter.declaration.mlp_out} input vs plain forward",
        res["ratios"], "<=", 1.02, target_text="≈1.00–1.02×",
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}",
    ))


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "neuronaudit.bench", *args, "--threads", str(torch.get_num_threads())]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo_root())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"child exited {proc.returncode}: {tail}"}


def child_peers(model_spec: str, batch: int, length: int, repeats: int) -> dict:
    """In a fresh process: nnsight and TransformerLens capture of every MLP output-projection
    input vs the plain forward measured in the same process (before TransformerLens loads)."""
    if model_spec == "tiny":  # TransformerBridge boots from a directory: save the tiny model
        import tempfile


        model_spec = str(save_tiny_model(Path(tempfile.mkdtemp(prefix="neuronaudit-bench-")) / "tiny"))
    model, tokenizer, adapter, _ = load(model_spec)
    ids, mask = make_batch(tokenizer, batch, length)
    result: dict = {}
    try:
        import warnings

        warnings.filterwarnings("ignore", message=".*deprecated.*")
        from nnsight import LanguageModel
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip
        result["nnsight"] = {"skip": f"not importable ({type(err).__name__}: {err})"}
    else:
        try:
            lm = LanguageModel(model, tokenizer=tokenizer)
            blocks = reduce(getattr, adapter.declaration.blocks.split("."), lm)
            mlp_out = adapter.declaration.mlp_out.split(".")

            def nnsight_capture():
                saved = []
                with torch.inference_mode():
                    with lm.trace(ids, attention_mask=mask, use_cache=False):
                        for layer in range(adapter.n_layers):
                            saved.append(reduce(getattr, mlp_out, blocks[layer]).input.save())
                if len(saved) != adapter.n_layers:
                    raise RuntimeError(f"captured {len(saved)} of {adapter.n_layers} layers")
                return saved

            res = compare(nnsight_capture, lambda: plain_forward(model, ids, mask), repeats)
            result["nnsight"] = res
        except Exception as err:  # noqa: BLE001
            result["nnsight"] = {"skip": f"failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})"}
    try:
        from transformer_lens import TransformerBridge
    except Exception as err:  # noqa: BLE001
        result["transformer_lens"] = {"skip": f"not importable ({type(err).__name__}: {err})"}
    else:
        try:
            plain_sdpa = [_timed(lambda: plain_forward(model, ids, mask)) for _ in range(repeats + 1)][1:]
            bridge = TransformerBridge.boot_transformers(
                str(Path(model_spec).parent if model_spec.endswith(".json") else model_spec),
                hf_model=model, tokenizer=tokenizer, device="cpu",
            )
            names = [n for n in bridge.hook_dict if n.endswith("mlp.out.hook_in")]
            if len(names) != adapter.n_layers:
                raise RuntimeError(f"found {len(names)} mlp.out.hook_in hooks for {adapter.n_layers} layers")
            wanted = set(names)

            def tl_capture():
                with torch.inference_mode():
                    return bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in wanted)

            res = compare(tl_capture, lambda: plain_forward(model, ids, mask), repeats)
            res["plain_sdpa"] = plain_sdpa
            res["attn"] = getattr(model.config, "_attn_implementation", "?")
            result["transformer_lens"] = res
        except Exception as err:  # noqa: BLE001
            result["transformer_lens"] = {"skip": f"failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})"}
    return result


def section_peers(model_spec, batch, length, repeats):
    result = _child(["--_child", "peers", "--model", model_spec, "--batch", str(batch),
                     "--tokens", str(length), "--repeats", str(repeats)])
    if "error" in result:
        out(f"peers: skipped ({result['error']})")
        return
    for name, label in (("nnsight", "nnsight .save() of every MLP output-projection input"),
                        ("transformer_lens", "TransformerLens run_with_cache(mlp.out.hook_in)")):
        res = result.get(name, {"skip": "no result"})
        if "skip" in res:
            out(f"peers/{label}: skipped — {res['skip']}")
            continue
        extra = f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}"
        if name == "transformer_lens":
            sdpa = statistics.median(res["plain_sdpa"])
            extra += (f"; the bridge forces {res['attn']} attention: vs the sdpa plain forward "
                      f"{statistics.median(res['fn']) / sdpa:.2f}×")
        out(report_line(f"peers/{label} vs plain forward", res["ratios"], "ref", 1.02,
                        target_text="none (compare collect/ above)", extra=extra))


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so the peak excludes loading."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(model_spec: str, mode: str, n_prompts: int, batch: int, length: int) -> dict:
    """In a fresh process: run ``n_prompts`` prompts in batches of ``batch`` through ``mode``
    (``plain`` forward, ``stream`` statistics, ``full`` capture keeping every activation) and
    report the peak RSS after loading."""
    import neuronaudit.interventions.capture  # noqa: F401 - every mode pays the same imports before the mark
    from neuronaudit.interventions.hooks import NeuronHooks

    model, tokenizer, adapter, _ = load(model_spec)
    ids, mask = make_batch(tokenizer, n_prompts, length)
    kept: list[torch.Tensor] = []
    base = _rss_mb()
    reset = _reset_peak()
    for start in range(0, n_prompts, batch):
        b_ids, b_mask = ids[start : start + batch], mask[start : start + batch]
        if mode == "plain":
            plain_forward(model, b_ids, b_mask)
        elif mode == "stream":
            streaming_collect(model, adapter, b_ids, b_mask)
        elif mode == "full":
            with torch.inference_mode(), NeuronHooks(
                adapter, on_activation=lambda layer, a, ctx: kept.append(a.detach())
            ):
                adapter.base(input_ids=b_ids, attention_mask=b_mask, use_cache=False)
        else:
            raise ValueError(mode)
    return {"peak_mb": _peak_mb(), "base_mb": base, "peak_reset": reset,
            "kept_mb": sum(t.numel() * t.element_size() for t in kept) / 2**20}


def section_memory(model_spec, batch, length, counts):
    out(f"memory: peak RSS of a fresh process per measurement (model loaded, then the peak mark "
        f"reset), {length}-token prompts in batches of {batch}")
    rows = []
    for n in counts:
        res = {m: _child(["--_child", "memory", "--model", model_spec, "--mode", m, "--prompts", str(n),
                          "--batch", str(batch), "--tokens", str(length)]) for m in ("plain", "stream", "full")}
        bad = [f"{m}: {r['error']}" for m, r in res.items() if "error" in r]
        if bad:
            out(f"memory/{n} prompts: skipped ({'; '.join(bad)})")
            continue
        p, s, f = (res[m]["peak_mb"] for m in ("plain", "stream", "full"))
        base = res["plain"]["base_mb"]
        if not res["plain"]["peak_reset"]:
            out("  (could not reset the peak mark: peaks include model loading)")
        ratio = s / p
        rows.append(ratio)
        out(f"memory/streaming vs plain forward, {n} prompts ({n // counts[0]}×): {ratio:.2f}× "
            f"(1 run) target ≤ 1.10×  {verdict(ratio, '<=', 1.10)}  — peak {s:.0f} MB vs {p:.0f} MB "
            f"(after load {base:.0f} MB); full capture {f:.0f} MB ({f / p:.2f}×, keeps "
            f"{res['full']['kept_mb']:.0f} MB of activations)")
    return rows


def section_sweeps(model, adapter, tokenizer, n_rows, n_prompts, length, new_tokens, repeats):

    ids, mask = make_batch(tokenizer, n_prompts, length, offset=7)
    rows = sweep_rows(adapter, n_rows)
    shape = f"{len(rows)} rows × {n_prompts} prompt{'s' if n_prompts > 1 else ''} × {length} tokens"
    holder: dict = {}
    plain_forward(model, ids, mask)  # warm up; the naive loops are too slow to run twice more

    def run(key, fn):
        def go():
            holder[key] = fn()
        return go

    # last prompt token
    res = compare(
        run("fast", lambda: sweeps.last_token_dose_sweep(model, adapter, ids, mask, rows)),
        run("naive", lambda: sweeps.naive_dose_loop(model, adapter, ids, mask, rows, positions=("last_prompt",))),
        repeats, warmup=False,
    )
    diff = (holder["fast"].logits - holder["naive"].logits).abs().max().item()
    out(report_line(
        f"sweeps/last-prompt-token doses vs naive loop ({shape})", [1 / r for r in res["ratios"]], ">=", 10,
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}; "
              f"max |Δlogit| {diff:.1e}",
    ))
    # generated tokens (and the last prompt token)
    res = compare(
        run("fast", lambda: sweeps.generated_dose_sweep(model, adapter, ids, mask, rows, new_tokens)),
        run("naive", lambda: sweeps.naive_dose_loop(
            model, adapter, ids, mask, rows, positions=("last_prompt", "generated"),
            max_new_tokens=new_tokens, return_logits=False)),
        repeats, warmup=False,
    )
    fast, naive = holder["fast"], holder["naive"]
    same = int((fast.tokens == naive.tokens).all(-1).sum())
    dlp = (fast.token_logprob - naive.token_logprob).nan_to_num().abs().max().item()
    out(report_line(
        f"sweeps/generated-token doses, greedy {new_tokens} tokens, vs naive generate loop ({shape})",
        [1 / r for r in res["ratios"]], ">=", 10,
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}; "
              f"identical token ids {same}/{fast.tokens.shape[0] * fast.tokens.shape[1]}, "
              f"max |Δ token log-prob| {dlp:.1e}",
    ))
    # every prompt token
    res = compare(
        run("fast", lambda: sweeps.prompt_dose_sweep(model, adapter, ids, mask, rows)),
        run("naive", lambda: sweeps.naive_dose_loop(model, adapter, ids, mask, rows, positions=("prompt",))),
        repeats, warmup=False,
    )
    diff = (holder["fast"].logits - holder["naive"].logits).abs().max().item()
    out(report_line(
        f"sweeps/every-prompt-token doses vs naive loop ({shape})", [1 / r for r in res["ratios"]], ">=", 2,
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}; "
              f"max |Δlogit| {diff:.1e}",
    ))


def section_rollouts(model, adapter, tokenizer, batch, length, new_tokens, repeats):

    from neuronaudit.interventions.hooks import (
        InterventionPlan,
        NeuronEdit,
        NeuronHooks,
    )

    ids, mask = make_batch(tokenizer, batch, length)
    rows = sweep_rows(adapter, batch, seed=1)
    plan = InterventionPlan.per_row(
        [[NeuronEdit.dose(l, i, d, ("prompt", "generated"))] for l, i, d in rows]
    )
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tokenizer.pad_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=pad)

    def plain():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    def dosed():
        with torch.inference_mode(), NeuronHooks(adapter, plan):
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    res = compare(dosed, plain, repeats)
    out(report_line(
        f"rollouts/generate under a per-row dose vs plain generate ({batch} rows × {length} tokens, "
        f"{new_tokens} new)", res["ratios"], "<=", 1.05,
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}",
    ))
    one, one_mask = ids[:1], mask[:1]
    same_prompt = one.expand(batch, -1)

    def plain_same():
        with torch.inference_mode():
            return model.generate(input_ids=same_prompt, attention_mask=torch.ones_like(same_prompt),
                                  generation_config=config)

    res = compare(
        lambda: sweeps.generated_dose_sweep(model, adapter, one, one_mask, rows, new_tokens, eos_token_id=None),
        plain_same, repeats,
    )
    out(report_line(
        f"rollouts/generated_dose_sweep (shared prefix, per-row doses) vs plain generate of the same "
        f"{batch} rows", res["ratios"], "<=", 1.05,
        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}",
    ))


def section_dtype(model, tokenizer, batch, length, new_tokens, repeats):
    """bfloat16 weights against float32 on the same batch: forward and greedy generate timings,
    and the agreement of their outputs (statistics of the study accumulate in float32 either way)."""

    ids, mask = make_batch(tokenizer, batch, length)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tokenizer.pad_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=pad)
    half = copy.deepcopy(model).to(torch.bfloat16)

    def forward(m):
        with torch.inference_mode():
            return m(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].float()

    def generate(m):
        with torch.inference_mode():
            return m.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    for label, fn in (("forward", forward), (f"greedy generate, {new_tokens} new tokens", generate)):
        res = compare(lambda fn=fn: fn(half), lambda fn=fn: fn(model), repeats)
        out(report_line(f"dtype/{label}, bfloat16 vs float32 weights ({batch} rows × {length} tokens)",
                        res["ratios"], "<=", 1.0,
                        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}"))
    lp32, lp16 = (torch.log_softmax(forward(m), -1) for m in (model, half))
    top32, top16 = lp32.argmax(-1), lp16.argmax(-1)
    g32, g16 = (generate(m)[:, ids.shape[1]:] for m in (model, half))
    same_rows = int((g32 == g16).all(-1).sum())
    gap = float((lp32.gather(1, top32[:, None]) - lp16.gather(1, top32[:, None])).abs().max())
    out(f"dtype/agreement: last-position top-1 token {int((top32 == top16).sum())}/{batch} rows; largest "
        f"|Δ log-prob| of the float32 top token {gap:.3f}; greedy continuations identical {same_rows}/{batch} rows")


def section_search(repeats: int) -> None:
    """Lever 1 of the performance issue: the window's adaptive dose search against the full grid,
    the same candidates, prompts, judge and grid (the study's default ``x_grid``), on the tiny
    model with a planted neuron (doses make it say one word, then repeat it). Prints the ratio of
    rollouts (deterministic) and of wall time (interleaved repeats), never asserted."""
    import re

    import numpy as np
    import pandas as pd

    from neuronaudit.evaluation.judge import RuleJudge, RuleThresholds
    from neuronaudit.methods import window as law

    model, tokenizer, adapter, _ = load("tiny")
    word = next(i for i in range(100, len(tokenizer))
                if tokenizer.decode([i]).strip().isalpha() and len(tokenizer.decode([i]).strip()) >= 4)
    with torch.no_grad():
        u = model.lm_head.weight[word] / model.model.norm.weight
        adapter.write_matrix(adapter.n_layers - 1)[:, 5] = u / u.norm() * adapter.write_matrix(0).norm(dim=0).mean()
    # the tiny model's windows sit near x = 0.03-0.5 (the study grid starts at 0.1, where every rollout
    # of it has collapsed already): a log grid across them, as many points as the study's and three more
    x_grid = [float(x) for x in np.round(np.geomspace(0.01, 8.0, 12), 4)]
    # the tiny random model loops on its own by 32 tokens: read it at 4 and 12
    horizons = [4, 12]
    pool = texts()
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(12)], "text": [pool[i % len(pool)] for i in range(12)],
                            "extra": "{}"})
    geometry = law.generic_geometry(model, tokenizer, adapter, list(prompts["text"]))
    layers = sorted({0, adapter.n_layers // 3, (2 * adapter.n_layers) // 3, adapter.n_layers - 1})
    neurons = pd.DataFrame({"behaviour": "b", "layer": layers, "neuron": [5] * len(layers), "kind": "screened"})
    judge = RuleJudge(RuleThresholds(max_repetition_ratio=0.5, max_perplexity=1e9, max_entropy=1e9,
                                     max_word_repetition=1.0, min_alpha_fraction=0.0))
    spec = {"oracle": "regex", "pattern": re.escape(tokenizer.decode([word]).strip()), "positive": "p", "negative": "n"}
    runs: dict = {}

    def run(search, at_once=True):
        def go():
            ro = law.BehaviourRollouts(model, tokenizer, adapter, judge, "b", spec, prompts, horizons, "none", None, 64)
            runs[(search, at_once)] = (*law.sweep_behaviour_search(ro, neurons, geometry, x_grid, horizons, search,
                                                                   gallop_at_once=at_once), ro)
        return go

    def readout(sweeps):
        t = law.ceilings_and_verdicts(sweeps)
        return t.set_index(["behaviour", "layer", "neuron", "sign"]).sort_index()[["ceiling_x", "trigger_x", "verdict"]]

    for at_once, label in ((True, "galloping in one round"), (False, "galloping step by step")):
        res = compare(run("adaptive", at_once), run("full"), repeats)
        (sparse, rec, ro_a), (full, _, ro_f) = runs[("adaptive", at_once)], runs[("full", True)]
        a, f = readout(sparse), readout(full)
        same = int(sum((a.loc[k].fillna(-1) == f.loc[k].fillna(-1)).all() for k in f.index))
        both = sparse.merge(full, on=["kind", "layer", "neuron", "sign", "grid_index", "prompt_id", "horizon"],
                            suffixes=("", "_f"))
        rows_same = int((both["response"] == both["response_f"]).sum())
        at = [x_grid.index(x) if np.isfinite(x) else "none" for x in f["ceiling_x"]]
        out(f"search/rollouts, adaptive ({label}) vs full grid: {ro_a.n_rollouts / ro_f.n_rollouts:.2f}× "
            f"({ro_a.n_rollouts} vs {ro_f.n_rollouts} rollouts; {len(neurons)} neurons × 2 signs × {len(x_grid)} "
            f"doses + x = 0, 12 prompts, horizons {horizons}; {len(rec['rounds'])} batched rounds vs 1)")
        out(report_line(f"search/wall time, adaptive ({label}) vs full grid", res["ratios"], "<=", 1.0,
                        extra=f"{_fmt_s(statistics.median(res['fn']))} vs {_fmt_s(statistics.median(res['base']))}; "
                              f"ceiling, trigger and verdict equal on {same}/{len(f)} neuron × sign; identical "
                              f"responses at {rows_same}/{len(both)} visited rows; full-grid ceilings at grid "
                              f"indices {at} of 0-{len(x_grid) - 1}"))


#: What one window rollout call spends its time on: (label, (file path ending, function name) pairs
#: whose cProfile cumulative time is that phase's).
PROFILE_PHASES = (
    ("greedy dosed generation (generated_dose_sweep)", (("interventions/sweeps.py", "generated_dose_sweep"),)),
    ("unsteered scoring of the rollouts (shared_prompt_scores)",
     (("interventions/scoring.py", "shared_prompt_scores"),)),
    ("decoding token ids to text", (("transformers/tokenization_utils_base.py", "decode"),)),
    ("judge (classify)", (("evaluation/judge.py", "classify"), ("evaluation/model_judge.py", "classify"))),
    ("oracle (flips)", (("methods/window.py", "flips"),)),
)
#: Every module forward, generation and scoring together (nested calls counted once).
MODEL_FORWARDS = (("torch/nn/modules/module.py", "_call_impl"),)


def profile_phases(stats, phases=PROFILE_PHASES) -> dict[str, float]:
    """Cumulative seconds per phase from a :class:`pstats.Stats`: the largest cumulative time among
    the phase's functions (several entries of one function, e.g. two paths to it, are not summed)."""
    out_: dict[str, float] = {}
    for label, names in phases:
        out_[label] = max([ct for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items()
                           if any(func == f and path.replace("\\", "/").endswith(end) for end, f in names)],
                          default=0.0)
    return out_


def study_window() -> dict:
    """The study's window settings at their defaults (x_grid, horizons, n_prompts, row_batch_size):
    the shapes the profile and scaling sections time."""
    return default_config()["window"]


def window_call(model, tokenizer, adapter, reuse_lower_layers: bool = True, n_neurons: int = 3):
    """One window rollout call at the study's shapes: ``n_neurons`` neurons spread over the depth
    (a quarter, half and three quarters down for three) × the default x_grid in both signs × the
    study's prompts and horizons, rule judge. Returns the rollouts object and its dose points."""
    import pandas as pd

    from neuronaudit.evaluation.judge import RuleJudge
    from neuronaudit.methods import window as law

    window = study_window()
    pool, n_prompts = texts(), window["n_prompts"]
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n_prompts)],
                            "text": [pool[i % len(pool)][:300] for i in range(n_prompts)], "extra": "{}"})
    geometry = law.generic_geometry(model, tokenizer, adapter, pool[:8])
    layers = [(k + 1) * adapter.n_layers // (n_neurons + 1) for k in range(n_neurons)]
    neurons = pd.DataFrame({"layer": layers, "neuron": [7] * n_neurons, "kind": "screened"})
    points = law.dose_points(neurons, geometry, window["x_grid"])
    spec = {"oracle": "regex", "pattern": r"\bthe\b", "positive": "p", "negative": "n"}
    template = "auto" if getattr(tokenizer, "chat_template", None) else "none"
    ro = law.BehaviourRollouts(model, tokenizer, adapter, RuleJudge(), "b", spec, prompts, window["horizons"],
                               template, None, window["row_batch_size"], reuse_lower_layers=reuse_lower_layers)
    return ro, points


def section_lower(model, tokenizer, adapter, quick: bool) -> None:
    """The window's unsteered scoring with the blocks below each dose stood in for by the layer
    inputs recorded while decoding, against running every block: wall time of one window rollout
    call each way (the study's shapes), and whether the typed rows agree."""
    import numpy as np

    n_neurons = 1 if quick else 3
    frames, walls = {}, {}
    for reuse in (False, True):
        ro, points = window_call(model, tokenizer, adapter, reuse, n_neurons)
        ro(points[:2])  # warm up kernels and caches outside the timing
        start = time.perf_counter()
        frames[reuse] = ro(points)
        walls[reuse] = time.perf_counter() - start
    a, b = frames[False], frames[True]
    same_types = float((a["rollout_type"].to_numpy() == b["rollout_type"].to_numpy()).mean())
    same_text = float((a["response"].to_numpy() == b["response"].to_numpy()).mean())
    rel = np.nanmax(np.abs(a["perplexity"].to_numpy() / b["perplexity"].to_numpy() - 1.0))
    out(f"lower: one window rollout call ({len(points)} dose rows × {len(ro.prompts)} prompts, neurons at layers "
        f"{sorted({p['layer'] for p in points})} of {adapter.n_layers}): every block {walls[False]:.1f} s, "
        f"blocks below the dose stood in for {walls[True]:.1f} s: {walls[True] / walls[False]:.2f}x")
    out(f"lower: responses equal on {same_text:.1%}, judge types on {same_types:.1%} of {len(a)} typed rows; "
        f"largest relative perplexity difference {rel:.1e}")


def section_profile(model, tokenizer, adapter) -> None:
    """One window rollout call at the study's shapes, profiled: the share of each phase."""
    import cProfile
    import pstats

    ro, points = window_call(model, tokenizer, adapter)
    prompts, window = ro.prompts, study_window()
    ro(points[:2])  # warm up kernels and caches outside the profile
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    frame = ro(points)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    phases = profile_phases(stats)
    forwards = profile_phases(stats, (("forwards", MODEL_FORWARDS),))["forwards"]
    n = len(points) * len(prompts)
    horizons = window["horizons"]
    out(f"profile: one window rollout call, {len(points)} dose rows × {len(prompts)} prompts = {n} rollouts of "
        f"{max(horizons)} tokens read at {'/'.join(map(str, horizons))} ({len(frame)} typed rows): {wall:.1f} s "
        f"under cProfile, {n / wall:.1f} rollouts/s")
    for label, seconds in phases.items():
        out(f"profile/{label}: {seconds:.1f} s ({seconds / wall:.0%})")
    rest = max(wall - sum(phases.values()), 0.0)
    out(f"profile/the rest (tables, Python between phases): {rest:.1f} s ({rest / wall:.0%})")
    out(f"profile/model forwards inside those phases (generation and scoring): {forwards:.1f} s "
        f"({forwards / wall:.0%})")


#: Larger siblings' shapes for the scaling section: config overrides of the embedded SmolLM2-135M
#: (the published SmolLM2-360M and SmolLM2-1.7B configs; random weights, timing only). For any
#: other model, widths and depth are scaled by these factors instead.
SIBLING_SHAPES = {
    "SmolLM2-360M shape": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                           "num_attention_heads": 15, "num_key_value_heads": 5},
    "SmolLM2-1.7B shape": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                           "num_attention_heads": 32, "num_key_value_heads": 32},
}
SCALED_SHAPES = {"2x width": {"hidden_size": 2.0, "intermediate_size": 2.0},
                 "4x width, 2x depth": {"hidden_size": 4.0, "intermediate_size": 4.0, "num_hidden_layers": 2.0}}
#: The study's shapes at 1x: collect.batch_size prompts of 64 tokens; one window sweep of one neuron
#: over window.n_prompts prompts and x_grid in both signs plus x = 0 (19 rows), longest horizon 32;
#: one rollout batch of rollouts.batch_size rows, longest horizon 64.
SCALING_UNIT = {"collect": {"prompts": 16, "tokens": 64, "batch": 16},
                "sweep": {"prompts": 12, "tokens": 48, "rows": 19, "new_tokens": 32, "row_batch": 64},
                "rollout": {"rows": 32, "tokens": 48, "new_tokens": 64}}


def shape_overrides(model_config, shape: str) -> dict:
    """Config overrides making ``model_config`` into ``shape`` (a sibling shape for SmolLM2-135M,
    else a scale factor per field); ``native`` keeps the model."""
    if shape == "native":
        return {}
    if shape in SIBLING_SHAPES:
        return dict(SIBLING_SHAPES[shape])
    if shape in SCALED_SHAPES:
        out_ = {k: int(round(getattr(model_config, k) * f)) for k, f in SCALED_SHAPES[shape].items()}
        heads = model_config.num_attention_heads
        if out_.get("hidden_size", 0) % heads:
            raise ValueError(f"shape {shape!r}: hidden size {out_['hidden_size']} not divisible by {heads} heads")
        return out_
    raise ValueError(f"unknown shape {shape!r}; choose native, {list(SIBLING_SHAPES)} or {list(SCALED_SHAPES)}")


def scaling_shapes(model_config) -> list[str]:
    """The shapes the scaling section times: the model itself, then two larger ones."""
    siblings = getattr(model_config, "hidden_size", None) == 576 and getattr(model_config, "vocab_size", None) == 49152
    return ["native", *(SIBLING_SHAPES if siblings else SCALED_SHAPES)]


def growth_exponent(sizes, values) -> tuple[float, float]:
    """``(b, r^2)`` of the least-squares fit ``value = a * size^b`` on log-log axes (b = 1: linear)."""
    import numpy as np
    from scipy.stats import linregress

    x, y = np.log(np.asarray(sizes, dtype=float)), np.log(np.asarray(values, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a growth fit needs at least two distinct sizes")
    fit = linregress(x, y)
    return float(fit.slope), float(fit.rvalue**2)


def child_scaling(model_spec: str, shape: str, mode: str, scale: int) -> dict:
    """In a fresh process: one ``mode`` job (``collect``, ``sweep``, ``rollout``) at ``scale`` times
    the study's shape on ``model_spec`` made into ``shape``; wall time and peak RSS after loading."""
    from transformers import AutoModelForCausalLM

    from neuronaudit.interventions.hooks import InterventionPlan, NeuronEdit, NeuronHooks

    model, tokenizer, adapter, _ = load(model_spec)
    overrides = shape_overrides(model.config, shape)
    if overrides:
        config = copy.deepcopy(model.config)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
        model.requires_grad_(False)
        adapter = adapter_for(model)
    params = sum(p.numel() for p in model.parameters())
    unit = SCALING_UNIT[mode]
    layer, neuron = adapter.n_layers // 2, 7
    if mode == "collect":
        ids, mask = make_batch(tokenizer, unit["prompts"] * scale, unit["tokens"])
        def job():
            for start in range(0, ids.shape[0], unit["batch"]):
                part = slice(start, start + unit["batch"])
                streaming_collect(model, adapter, ids[part], mask[part])
        work = f"{ids.shape[0]} prompts × {unit['tokens']} tokens in batches of {unit['batch']}"
    elif mode == "sweep":
        ids, mask = make_batch(tokenizer, unit["prompts"] * scale, unit["tokens"], offset=3)
        doses = [0.0] + [s * x for x in study_window()["x_grid"] for s in (1.0, -1.0)]
        rows = [(layer, neuron, d) for d in doses]
        def job():
            sweeps.generated_dose_sweep(model, adapter, ids, mask, rows, unit["new_tokens"], eos_token_id=None,
                                        row_batch_size=unit["row_batch"])
        work = f"{len(rows)} dose rows × {ids.shape[0]} prompts × {unit['new_tokens']} new tokens"
    elif mode == "rollout":
        n = unit["rows"] * scale
        ids, mask = make_batch(tokenizer, n, unit["tokens"], offset=5)
        plan = InterventionPlan.per_row([[NeuronEdit.dose(layer, neuron, float(d % 5) - 2.0, ("prompt", "generated"))]
                                         for d in range(n)])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=unit["new_tokens"],
                                  min_new_tokens=unit["new_tokens"], pad_token_id=pad)
        def job():
            with torch.inference_mode(), NeuronHooks(adapter, plan):
                model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        work = f"{n} rows × {unit['tokens']} prompt tokens + {unit['new_tokens']} new, one generate call"
    else:
        raise ValueError(mode)
    plain_forward(model, ids[:2], mask[:2])  # warm up kernels outside the timing
    base = _rss_mb()
    reset = _reset_peak()
    start = time.perf_counter()
    job()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_mb": _peak_mb(), "base_mb": base, "peak_reset": reset, "params": params,
            "work": work}


def section_scaling(model_spec: str, quick: bool, modes=("collect", "sweep", "rollout"), scales=None) -> None:
    """How cost grows with the prompts (1x, 4x, 16x the study's shapes) and the parameters (the
    model and two larger random models at 1x); every measurement one job in a fresh process."""
    import numpy as np

    config = transformers.AutoConfig.from_pretrained(model_spec) if model_spec != "tiny" else tiny_model("llama").config
    shapes = scaling_shapes(config)
    scales = tuple(scales) if scales else (1, 4) if quick else (1, 4, 16)
    out(f"scaling: one job per fresh process, wall time and peak RSS (model loaded, kernels warmed, "
        f"then the peak mark reset; extra = peak - RSS after loading); prompts at {list(scales)}× the "
        f"study's shapes {SCALING_UNIT}; parameters over {shapes} at 1×")
    for mode in modes:
        grid = [("native", k) for k in scales] + [(s, 1) for s in shapes[1:]]
        res = {}
        for shape, k in grid:
            r = _child(["--_child", "scaling", "--model", model_spec, "--shape", shape, "--mode", mode,
                        "--prompts", str(k)])
            if "error" in r:
                out(f"scaling/{mode}, {shape}, {k}×: skipped ({r['error']})")
                continue
            res[(shape, k)] = r
            label = "the model" if shape == "native" else shape
            out(f"scaling/{mode}: {label} ({r['params'] / 1e6:.0f}M params), {k}× ({r['work']}): "
                f"{r['wall_s']:.2f} s, peak RSS {r['peak_mb']:.0f} MB (extra {r['peak_mb'] - r['base_mb']:.0f} MB)")
        by_k = [(k, res[("native", k)]) for k in scales if ("native", k) in res]
        if len(by_k) >= 2:
            b, r2 = growth_exponent([k for k, _ in by_k], [r["wall_s"] for _, r in by_k])
            extra = [max(r["peak_mb"] - r["base_mb"], 1.0) for _, r in by_k]
            bm, _ = growth_exponent([k for k, _ in by_k], extra)
            per = np.median([r["wall_s"] / k for k, r in by_k])
            out(f"scaling/{mode} fit over prompts: wall ∝ prompts^{b:.2f} (r² {r2:.3f}), {per:.2f} s per 1× unit; "
                f"extra memory ∝ prompts^{bm:.2f}")
        by_p = [r for (s, k), r in res.items() if k == 1]
        if len(by_p) >= 2:
            b, r2 = growth_exponent([r["params"] for r in by_p], [r["wall_s"] for r in by_p])
            per = np.median([r["wall_s"] / (r["params"] / 1e9) for r in by_p])
            out(f"scaling/{mode} fit over parameters: wall ∝ params^{b:.2f} (r² {r2:.3f}), "
                f"{per:.1f} s per billion parameters at 1×")


#: Wall-time targets of whole studies on the 2-core reference machine, seconds.
STUDY_TARGETS_S = {"study": 30 * 60, "quick": 5 * 60}


def _quick_study_name(root: Path) -> str:
    """The study name config/quick.yaml sets (its results folder)."""

    try:
        return str(yaml.safe_load((root / "config" / "quick.yaml").read_text()).get("study", "quick"))
    except (OSError, AttributeError):
        return "quick"


def section_rules(root: Path) -> None:
    files = sorted(root.glob("results/*/benchmarks/**/*.tsv")) + sorted(root.glob("results/models/*/*.benchmark.tsv"))
    if not files:
        out("rules: no Snakemake benchmark files under results/ (skipped)")
        return
    out("rules: wall time and peak memory per Snakemake rule (benchmark files)")
    totals: dict[str, float] = {}
    peaks: dict[str, float] = {}
    out(f"  {'rule / wildcards':<58} {'wall s':>8} {'max RSS MB':>11} {'cpu s':>7}")
    for path in files:
        try:
            lines = path.read_text().splitlines()
            head = lines[0].split("\t")
            values = [dict(zip(head, line.split("\t"))) for line in lines[1:] if line.strip()]
        except (OSError, IndexError):
            continue
        if not values:
            continue
        rel = path.relative_to(root / "results")
        name = str(rel).replace("/benchmarks/", ": ").removesuffix(".tsv").removesuffix(".benchmark")
        wall = statistics.median(float(v.get("s", "nan")) for v in values)
        rss = max(float(v.get("max_rss", "nan") or "nan") for v in values)
        cpu = statistics.median(float(v.get("cpu_time", "nan") or "nan") for v in values)
        out(f"  {name:<58} {wall:>8.2f} {rss:>11.0f} {cpu:>7.2f}")
        study = rel.parts[0]
        totals[study] = totals.get(study, 0.0) + wall
        peaks[study] = max(peaks.get(study, 0.0), rss)
    quick = _quick_study_name(root)
    for study, total in totals.items():
        target = STUDY_TARGETS_S["quick"] if study == quick else STUDY_TARGETS_S["study"]
        if study == "models":
            continue
        met = "[met]" if total <= target else f"[missed by {(total - target) / 60:.1f} min, {total / target:.2f}×]"
        out(f"study {study!r}: {total / 60:.1f} min, the sum of its rules' wall times (one job at a time), "
            f"peak RSS {peaks[study]:.0f} MB; target ≤ {target / 60:.0f} min  {met}")
        try:
            out(rules_markdown(root / "results" / study))
        except NeuronAuditError as err:
            out(f"study {study!r}: no per-rule table ({err})")


def rules_markdown(study_dir: Path) -> str:
    """A study's benchmark files summed per rule (its jobs: prompt sets, shards, behaviours), the
    longest first, as a Markdown table with the total: what the README's per-rule table shows."""
    from neuronaudit.estimate import by_rule, study_jobs

    rules = sorted(by_rule(study_jobs(study_dir)), key=lambda r: -r.seconds)
    lines = ["| rule | jobs | wall time | peak RSS | CPU time |", "|---|---|---|---|---|"]
    for r in rules:
        rss = "—" if r.max_rss_mb is None else f"{r.max_rss_mb / 1024:.1f} GB"
        cpu = "—" if r.cpu_seconds is None else f"{r.cpu_seconds / 60:.1f} min"
        lines.append(f"| `{r.rule}` | {r.jobs} | {r.seconds / 60:.1f} min | {rss} | {cpu} |")
    total = sum(r.seconds for r in rules)
    lines.append(f"| **all** | {sum(r.jobs for r in rules)} | **{total / 60:.1f} min** | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m neuronaudit.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded | tiny | PATH (model directory or manifest.json)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5, quick 2)")
    p.add_argument("--sweep-repeats", type=int, default=None,
                   help="repeats of the sweep/naive pairs (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (smoke run)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--batch", type=int, default=None, help="prompts per batch (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per prompt (default 128)")
    p.add_argument("--rows", type=int, default=None, help="sweep rows (default 64)")
    p.add_argument("--sweep-prompts", type=int, default=1, help="prompts per sweep (default 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per rollout (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--scaling-modes", default="collect,sweep,rollout",
                   help="scaling section: which jobs to time (comma-separated: collect, sweep, rollout)")
    p.add_argument("--scaling-scales", default=None,
                   help="scaling section: multiples of the study's prompts (default 1,4,16; quick 1,4)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="native", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (2 if q else 5)
    args.sweep_repeats = args.sweep_repeats or (1 if q else 3)
    args.batch = args.batch or (2 if q else 8)
    args.tokens = args.tokens or (32 if q else 128)
    args.rows = args.rows or (8 if q else 64)
    args.new_tokens = args.new_tokens or (4 if q else 16)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown --only sections {bad}; choose from {list(SECTIONS)}")
    args.only = only
    args.scaling_modes = [m.strip() for m in args.scaling_modes.split(",") if m.strip()]
    bad = [m for m in args.scaling_modes if m not in SCALING_UNIT]
    if bad:
        p.error(f"unknown --scaling-modes {bad}; choose from {list(SCALING_UNIT)}")
    try:
        args.scaling_scales = ([int(k) for k in args.scaling_scales.split(",")] if args.scaling_scales else None)
    except ValueError:
        p.error(f"--scaling-scales {args.scaling_scales!r} must be comma-separated integers")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child == "peers":
        print(json.dumps(child_peers(args.model, args.batch, args.tokens, args.repeats)))
        return 0
    if args._child == "memory":
        print(json.dumps(child_memory(args.model, args.mode, args.prompts, args.batch, args.tokens)))
        return 0
    if args._child == "scaling":
        print(json.dumps(child_scaling(args.model, args.shape, args.mode, args.prompts)))
        return 0

    out(machine_line())
    out("note: ratios of interleaved repeats; other processes sharing the cores widen the spread")
    with contextlib.suppress(OSError, AttributeError):
        busy, usable = os.getloadavg()[0], len(os.sched_getaffinity(0))
        if busy >= usable and torch.get_num_threads() > 1:
            out(f"warning: the cores are busy (load {busy:.1f} on {usable}); with "
                f"{torch.get_num_threads()} torch threads OpenMP waits at barriers for descheduled "
                "threads and timings swing wildly; --threads 1 gives steadier ratios")
    spec = resolve_model(args.model)
    needs_model = any(s in args.only for s in ("collect", "sweeps", "rollouts", "dtype", "profile", "lower"))
    if needs_model:
        model, tokenizer, adapter, label = load(spec)
        out(f"model: {label} ({adapter.family}, {adapter.n_layers} layers, d_model {adapter.d_model}, "
            f"{adapter.n_neurons} neurons/layer, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"params, {next(model.parameters()).dtype}, "
            f"attention {getattr(model.config, '_attn_implementation', '?')})")
        ids, mask = make_batch(tokenizer, args.batch, args.tokens)
    else:
        out(f"model: {spec}")
    if "collect" in args.only:
        section_collect(model, adapter, ids, mask, args.repeats)
    if "peers" in args.only:
        section_peers(spec, args.batch, args.tokens, args.repeats)
    if "memory" in args.only:
        counts = [args.batch, 4 * args.batch] if args.quick else [args.batch, 4 * args.batch, 16 * args.batch]
        section_memory(spec, args.batch, args.tokens, counts)
    if "sweeps" in args.only:
        section_sweeps(model, adapter, tokenizer, args.rows, args.sweep_prompts, args.tokens,
                       args.new_tokens, args.sweep_repeats)
    if "rollouts" in args.only:
        section_rollouts(model, adapter, tokenizer, args.batch, args.tokens, args.new_tokens, args.repeats)
    if "search" in args.only:
        section_search(args.sweep_repeats)
    if "dtype" in args.only:
        section_dtype(model, tokenizer, args.batch, args.tokens, args.new_tokens, args.repeats)
    if "profile" in args.only:
        section_profile(model, tokenizer, adapter)
    if "lower" in args.only:
        section_lower(model, tokenizer, adapter, args.quick)
    if "scaling" in args.only:
        section_scaling(spec, args.quick, args.scaling_modes, args.scaling_scales)
    if "rules" in args.only:
        section_rules(repo_root())
    out(machine_line().replace("machine:", "machine at end:"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
