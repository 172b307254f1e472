"""Expected wall time and scheduler requests per rule for a larger model, estimated from a finished
study on this machine: ``neuronaudit estimate results/<study> --params 8.03e9 ...``.

Every rule writes a Snakemake benchmark file (``results/<study>/benchmarks/<stage>/<name>.tsv``;
prepare_model's beside the prepared model). A rule's wall time here is scaled to the target model
and device as::

    estimate = measured seconds × FLOP ratio × (this machine's effective FLOP/s ÷ the device's)

The FLOP ratio is the target's FLOPs per token over the measured model's: 2 × (non-embedding
parameters + LM head) for a forward, and the same ratio for the fine-tune's backward and
optimiser. The study's token counts are the same for both models (prompts, grids and horizons are
config), so time follows FLOPs per token. Where a rule's decoding steps can be counted from the
study's tables and config, a memory-bandwidth floor (every decoding step reads every weight once)
is given beside it, and the expected time is the larger of the two. Beside each rule: what the
``slurm`` / ``gpu`` profiles request for the target (:func:`neuronaudit.cluster.job_resources`
with a manifest of the target's size). Every figure is an estimate, and every assumption is
printed with it.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from neuronaudit.cluster import RULE_COSTS, job_resources, run_dtype_bytes
from neuronaudit.errors import NeuronAuditError

#: The default target device's effective throughput: 30% of an A100's 312 dense bf16 TFLOP/s.
DEFAULT_DEVICE_TFLOPS = 0.3 * 312
#: The default target device's memory bandwidth (an A100 80 GB SXM: 2039 GB/s).
DEFAULT_BANDWIDTH_GBS = 2000.0

#: The rule of each benchmark file ``<stage>/<name>.tsv`` (rules/*.smk, ``benchmark_file``): a
#: stage's rule, or per name for the stages that hold several rules.
STAGE_RULES: dict[str, str | dict[str, str]] = {
    "prompts": "prepare_prompts",
    "collect": "collect_activations",  # <set> or <set>.<shard>; <set>.merge is merge_activations
    "refusal": {"tune": "tune_refusal", "evaluate": "evaluate_refusal", "rollouts": "refusal_rollouts"},
    # refusal/rollouts.<shard> is refusal_rollouts, refusal/rollouts.merge merge_refusal_rollouts
    "preconditions": "preconditions",
    "screen": "screen",
    "cna": "cna",  # cna/part.<shard> is cna_part, cna/merge merge_cna
    "keystone": "keystone",  # keystone/part.<shard> is keystone_part, keystone/merge merge_keystone
    "window": "window",
    "attribution": "attribution",
    "sufficient": "sufficient",
    "reasoning": "reasoning",
    "report": "report",
}

#: How a rule's time follows the model when it is not by FLOPs on the device (every other rule
#: runs the model: forward passes, and for tune_refusal backward and optimiser steps).
#: ``neurons``: reads tables with a column per neuron, on the CPU where snakemake runs;
#: ``params``: reads, dequantises and hashes the weights, on a CPU; ``none``: no model.
#: These are also the rules whose jobs the workflow sizes without the prepared model's manifest.
SCALING = {"prepare_model": "params", "prepare_prompts": "none", "use_tuned_model": "none",
           "merge_activations": "neurons", "merge_refusal_rollouts": "none", "merge_refusal_evaluation": "none",
           "merge_cna": "none", "merge_keystone": "neurons", "screen": "neurons", "report": "neurons"}

#: The rules that ask the scheduler for disk (``disk_mb``) beside memory, time and GPUs.
DISK_RULES = frozenset({"tune_refusal"})

#: Tables whose rows are generated sequences, by rule: (the table under the study folder, the
#: config key of the rows decoded together, the columns naming one generated sequence when the
#: table repeats it at every horizon).
STEP_TABLES: dict[str, tuple[str, tuple[str, str], tuple[str, ...] | None]] = {
    "reasoning": ("reasoning/solutions.parquet", ("reasoning", "batch_size"), None),
    "refusal_rollouts": ("refusal/rollouts.parquet", ("rollouts", "batch_size"),
                         ("sample", "prompt_set", "prompt_id", "intervention")),
    "cna": ("cna/rollouts.parquet", ("rollouts", "batch_size"),
            ("sample", "prompt_set", "prompt_id", "intervention")),
}

#: Rules whose jobs decode the sequences of another rule's table in :data:`STEP_TABLES`: the
#: cna_part jobs of a sharded CNA run together decode what the one cna job does.
STEP_TABLE_OF = {"cna_part": "cna"}


# --- model shapes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A model's size for the estimate. ``flop_params``: the parameters a token's forward multiplies
    by (non-embedding parameters plus the LM head), 2 FLOPs each; ``counted``: how."""

    params: float
    flop_params: float
    n_layers: int | None = None
    d_model: int | None = None
    d_mlp: int | None = None
    vocab: int | None = None
    tied: bool | None = None
    counted: str = ""

    @property
    def neurons(self) -> int | None:
        return self.n_layers * self.d_mlp if self.n_layers and self.d_mlp else None

    def manifest(self) -> dict:
        """A manifest of this size, as :func:`neuronaudit.cluster.job_resources` reads one."""
        return {"n_params": int(self.params), "n_layers": self.n_layers, "d_model": self.d_model,
                "n_neurons": self.d_mlp}


def flop_params(params: float, vocab: int | None, d_model: int | None, tied: bool) -> float:
    """Non-embedding parameters plus the LM head of a model of ``params`` parameters (counted
    once): the input embedding (vocab × d_model) is a lookup, no FLOPs; a tied LM head is that same
    matrix, so it stays. Without vocab and d_model, all parameters (an overestimate)."""
    if not vocab or not d_model or tied:
        return float(params)
    return float(params) - float(vocab) * float(d_model)


def target_shape(params: float, n_layers: int | None = None, d_model: int | None = None, d_mlp: int | None = None,
                 vocab: int | None = None, tied: bool = False) -> ModelShape:
    """The model the estimate is for (``--params`` and its shape)."""
    if not params or params <= 0 or not math.isfinite(params):
        raise NeuronAuditError(f"--params {params!r} must be a positive parameter count")
    for flag, value in (("--layers", n_layers), ("--d-model", d_model), ("--d-mlp", d_mlp), ("--vocab", vocab)):
        if value is not None and value < 1:
            raise NeuronAuditError(f"{flag} {value!r} must be at least 1")
    fp = flop_params(params, vocab, d_model, tied)
    if fp <= 0:
        raise NeuronAuditError(f"--params {params:g} is not more than the embedding --vocab × --d-model "
                               f"({vocab} × {d_model})")
    how = ("--params" + (" minus the input embedding (--vocab × --d-model; an untied LM head is counted)"
                         if vocab and d_model and not tied else
                         " (tied embeddings: the LM head is the embedding matrix)" if vocab and d_model else
                         " (no --vocab and --d-model: the embedding is counted as if computed, an overestimate)"))
    return ModelShape(float(params), fp, n_layers, d_model, d_mlp, vocab, tied, how)


def safetensors_shapes(directory: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a model folder's safetensors files, from their headers
    alone (nothing is loaded); empty when there are none."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as err:
            raise NeuronAuditError(f"cannot read the safetensors header of {path}: {err}") from None
        header.pop("__metadata__", None)
        shapes.update({name: list(spec["shape"]) for name, spec in header.items()})
    return shapes


def measured_shape(manifest: Mapping) -> ModelShape:
    """The measured model's size from its manifest and the prepared folder it names
    (``config.json`` for vocabulary, width and tying; the safetensors headers for the parameter
    count when the manifest has no ``n_params``)."""
    folder = Path(str(manifest.get("path") or ""))
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    vocab = cfg.get("vocab_size")
    d_model = manifest.get("d_model") or cfg.get("hidden_size")
    shapes = safetensors_shapes(folder) if folder.is_dir() else {}
    if manifest.get("n_params"):
        params, how = float(manifest["n_params"]), "the manifest's n_params"
    elif shapes:
        params, how = float(sum(math.prod(s) for s in shapes.values())), f"the safetensors headers in {folder}"
    else:
        d, n, layers = (int(manifest.get(k) or 0) for k in ("d_model", "n_neurons", "n_layers"))
        params = float(layers * (4 * d * d + 3 * d * n) + (vocab or 0) * d)
        how = "the manifest's shape (attention 4·d², MLP 3·d·n per layer, + embedding)"
        if params <= 0:
            raise NeuronAuditError(f"the measured model's manifest has no n_params and no shape, and {folder} "
                                   "has no safetensors files to count")
    if "tie_word_embeddings" in cfg:
        tied = bool(cfg["tie_word_embeddings"])
    else:
        tied = sum(1 for s in shapes.values() if vocab and d_model and sorted(s) == sorted([vocab, d_model])) == 1
    fp = flop_params(params, vocab, d_model, tied)
    how += (" minus the input embedding" if vocab and d_model and not tied else
            " (tied embeddings: the LM head is the embedding matrix)" if vocab and d_model else
            " (vocabulary unknown: the embedding is counted as if computed)")
    return ModelShape(params, fp, manifest.get("n_layers"), d_model, manifest.get("n_neurons"), vocab, tied, how)


def flop_ratio(target: ModelShape, measured: ModelShape) -> float:
    """FLOPs per token of the target over the measured model (2·N each, N = non-embedding + LM head)."""
    return target.flop_params / measured.flop_params


# --- benchmark files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One benchmark file: the job's wall seconds (mean over repeats), peak RSS (MB, max over
    repeats; None when not measured) and CPU seconds."""

    rule: str
    path: str
    seconds: float
    max_rss_mb: float | None
    cpu_seconds: float | None


def rule_of(stage: str, name: str) -> str:
    """The rule that wrote ``benchmarks/<stage>/<name>.tsv``."""
    rule = STAGE_RULES.get(stage)
    if stage == "refusal" and name == "rollouts.merge":
        rule = "merge_refusal_rollouts"
    elif stage == "refusal" and name == "evaluate.merge":
        rule = "merge_refusal_evaluation"
    elif stage == "refusal" and re.fullmatch(r"evaluate\.(tuned|base)\.perplexity", name):
        rule = "evaluate_refusal_perplexity"
    elif stage == "refusal" and re.fullmatch(r"evaluate\.(tuned|base)\.\d+", name):
        rule = "evaluate_refusal_part"  # one model's rollouts of one shard of rollouts.shard_size prompts
    elif stage == "refusal" and re.fullmatch(r"rollouts\.\d+", name):
        rule = "refusal_rollouts"  # one shard of rollouts.shard_size prompts
    elif stage in ("cna", "keystone") and re.fullmatch(r"part\.\d+", name):
        rule = f"{stage}_part"  # one block of cna.shard_size interventions / keystone.shard_size conditions
    elif stage in ("cna", "keystone") and name == "merge":
        rule = f"merge_{stage}"
    elif isinstance(rule, dict):
        rule = rule.get(name)
    elif stage == "collect" and name.endswith(".merge"):
        rule = "merge_activations"
    elif stage == "window" and name.startswith("sweep."):
        rule = "window_sweep"
    if rule is None:
        raise NeuronAuditError(f"benchmark file {stage}/{name}.tsv belongs to no known rule")
    return rule


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_job(path: str | Path, rule: str) -> Job:
    """One Snakemake benchmark TSV (columns ``s``, ``max_rss``, ``cpu_time``, ...)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise NeuronAuditError(f"cannot read benchmark file {path}: {err}") from None
    seconds = [_number(r.get("s")) for r in rows]
    if not rows or any(s is None for s in seconds):
        raise NeuronAuditError(f"benchmark file {path} has no rows or a row without wall seconds (column s)")
    rss = [v for v in (_number(r.get("max_rss")) for r in rows) if v is not None]
    cpu = [v for v in (_number(r.get("cpu_time")) for r in rows) if v is not None]
    return Job(rule, str(path), statistics.fmean(seconds), max(rss) if rss else None,
               statistics.fmean(cpu) if cpu else None)


def study_jobs(study_dir: str | Path, prepare_benchmark: str | Path | None = None) -> list[Job]:
    """Every benchmark file of a study (and prepare_model's, when given and present)."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise NeuronAuditError(f"study folder {str(study_dir)!r} not found")
    bench = study_dir / "benchmarks"
    files = sorted(bench.glob("*/*.tsv")) if bench.is_dir() else []
    if not files:
        raise NeuronAuditError(f"no Snakemake benchmark files (benchmarks/<stage>/<name>.tsv) in the study folder "
                               f"{str(study_dir)!r}: run the study first")
    jobs = [read_job(f, rule_of(f.parent.name, f.stem)) for f in files]
    if prepare_benchmark is not None and Path(prepare_benchmark).is_file():
        jobs.insert(0, read_job(prepare_benchmark, "prepare_model"))
    return jobs


@dataclass(frozen=True)
class RuleTime:
    """A rule's jobs on this machine: their count, summed and longest wall seconds, peak RSS."""

    rule: str
    jobs: int
    seconds: float
    longest: float
    max_rss_mb: float | None
    cpu_seconds: float | None


def by_rule(jobs: Iterable[Job]) -> list[RuleTime]:
    """Jobs summed into their rules (shards, prompt sets, behaviours), in the workflow's order."""
    grouped: dict[str, list[Job]] = {}
    for job in jobs:
        grouped.setdefault(job.rule, []).append(job)
    order = list(RULE_COSTS)
    out = []
    for rule in sorted(grouped, key=lambda r: order.index(r) if r in order else len(order)):
        js = grouped[rule]
        rss = [j.max_rss_mb for j in js if j.max_rss_mb is not None]
        cpu = [j.cpu_seconds for j in js if j.cpu_seconds is not None]
        out.append(RuleTime(rule, len(js), sum(j.seconds for j in js), max(j.seconds for j in js),
                            max(rss) if rss else None, sum(cpu) if len(cpu) == len(js) else None))
    return out


# --- decoding steps --------------------------------------------------------------------------


def decode_steps_floor(n_tokens: Sequence[int], batch_size: int) -> int:
    """The fewest decoding forwards that generate sequences of these lengths, at most
    ``batch_size`` at a time: a batch runs as many forwards as its longest sequence has tokens, and
    the sum of batch maxima is smallest with the lengths sorted and cut into full batches."""
    if batch_size < 1:
        raise NeuronAuditError(f"batch size {batch_size!r} must be at least 1")
    lengths = sorted((int(n) for n in n_tokens), reverse=True)
    return sum(lengths[k] for k in range(0, len(lengths), batch_size))


def _config_value(config: Mapping | None, key: tuple[str, str]):
    try:
        return config[key[0]][key[1]] if config is not None else None
    except (KeyError, TypeError):
        return None


def study_decode_steps(study_dir: str | Path, config: Mapping | None) -> dict[str, dict]:
    """Per rule of :data:`STEP_TABLES`: ``steps`` (a floor on its decoding forwards, None when they
    cannot be counted) and ``detail`` (how they were counted, or why not)."""
    import pyarrow.parquet as pq

    out = {}
    for rule, (rel, key, sequence_cols) in STEP_TABLES.items():
        path = Path(study_dir) / rel
        batch = _config_value(config, key)
        if not path.is_file():
            out[rule] = {"steps": None, "detail": f"no {rel} in the study"}
            continue
        if not isinstance(batch, int) or batch < 1:
            out[rule] = {"steps": None, "detail": f"{'.'.join(key)} unknown (no study config: give --config)"}
            continue
        table = pq.read_table(path)
        cols = [c for c in (sequence_cols or ()) if c in table.column_names]
        if "n_tokens" not in table.column_names:
            out[rule] = {"steps": None, "detail": f"{rel} has no n_tokens column"}
            continue
        frame = table.select([*cols, "n_tokens"]).to_pandas()
        lengths = frame.groupby(cols, dropna=False)["n_tokens"].max() if cols else frame["n_tokens"]
        steps = decode_steps_floor(lengths.tolist(), batch)
        out[rule] = {"steps": steps, "detail": f"{len(lengths)} generated sequences in {rel} (n_tokens), "
                                               f"{'.'.join(key)} = {batch} at a time"}
    return out


# --- this machine's throughput ---------------------------------------------------------------


def measure_cpu_gflops(manifest_path: str | Path, shape: ModelShape, *, threads: int | None = None, batch: int = 4,
                       seq_len: int = 64, repeats: int = 5, dtype: str = "float32") -> dict:
    """This machine's effective GFLOP/s: timed forwards of the measured model on ``batch`` prompts
    of ``seq_len`` tokens (study-like shapes: collection batches of prompts), after one warm-up,
    the median of ``repeats`` (``gflops_range``: the slowest and fastest); FLOPs = 2 ×
    ``shape.flop_params`` per token (attention scores left out). Loads the model: use it on the
    machine that ran the study, and when nothing else runs there."""
    import torch

    from neuronaudit.models.loading import load_prepared

    if threads:
        torch.set_num_threads(int(threads))
    model, _, _, _ = load_prepared(manifest_path, dtype=dtype, device="cpu")
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(input_ids=ids)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    flops = 2.0 * shape.flop_params * batch * seq_len
    return {"gflops": flops / seconds / 1e9, "gflops_range": [flops / max(times) / 1e9, flops / min(times) / 1e9],
            "seconds": seconds, "batch": batch, "seq_len": seq_len, "repeats": len(times),
            "threads": torch.get_num_threads(), "dtype": dtype}


# --- the estimate ----------------------------------------------------------------------------


def find_manifest(study_dir: str | Path) -> Path:
    """The measured (audited) model's manifest: the study's refusal-tuned copy when there is one,
    else the one prepared model beside the study (``results/models/*/manifest.json``)."""
    study_dir = Path(study_dir)
    tuned = study_dir / "tune" / "manifest.json"
    if tuned.is_file():
        return tuned
    found = sorted((study_dir.parent / "models").glob("*/manifest.json"))
    if len(found) != 1:
        raise NeuronAuditError(f"{len(found)} prepared models under {study_dir.parent / 'models'} and no "
                               f"{tuned}: give the measured model's manifest with --manifest")
    return found[0]


def measured_model(study_dir: str | Path, manifest_path: str | Path | None = None) -> tuple[Path, dict, ModelShape]:
    """The measured model's manifest path (``manifest_path``, else :func:`find_manifest`), the
    manifest and its :class:`ModelShape`."""
    path = Path(manifest_path) if manifest_path else find_manifest(study_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise NeuronAuditError(f"cannot read the measured model's manifest {path}: {err}") from None
    return path, manifest, measured_shape(manifest)


def study_config(study_dir: str | Path, config_files: Sequence[str | Path] = ()) -> tuple[dict | None, str]:
    """The study's config (for the batch sizes of the decoding floors) and where it came from: the
    given config files (merged, validated, defaults filled), else the ``report/config.json`` the
    report rule writes, else ``(None, "")``."""
    if config_files:
        from neuronaudit.config import load_config

        return load_config(list(config_files)), " ".join(map(str, config_files))
    path = Path(study_dir) / "report" / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")), str(path)
        except ValueError as err:
            raise NeuronAuditError(f"cannot read the study's config {path}: {err}") from None
    return None, ""


def prepare_benchmark_of(manifest_path: str | Path, manifest: Mapping) -> Path:
    """prepare_model's benchmark file for the model a manifest describes (its base for a tuned copy)."""
    base = (manifest.get("tuned_from") or {}).get("manifest")
    folder = Path(base).parent if base else Path(manifest_path).parent
    return folder / "prepare_model.benchmark.tsv"


def estimate(study_dir: str | Path, target: ModelShape, cpu: Mapping, *, device: str = "cuda",
             dtype: str = "bfloat16", device_tflops: float = DEFAULT_DEVICE_TFLOPS,
             bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS, manifest_path: str | Path | None = None,
             config: Mapping | None = None, config_source: str = "", source_mb: float = 0.0) -> dict:
    """The estimate as a JSON-able dict: ``rows`` (one per rule), ``totals``, ``assumptions``.

    ``cpu``: this machine's effective throughput, ``{"gflops": ...}`` and how it was found
    (:func:`measure_cpu_gflops`, or ``{"gflops": x, "given": True}``). ``config``: the study's
    config (for the batch sizes the decoding floors need), None when unknown.
    """
    study_dir = Path(study_dir)
    for name, value in (("--device-tflops", device_tflops), ("--device-bandwidth-gbs", bandwidth_gbs),
                        ("this machine's GFLOP/s", cpu.get("gflops"))):
        if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise NeuronAuditError(f"{name} {value!r} must be a positive number")
    manifest_path, manifest, measured = measured_model(study_dir, manifest_path)
    rules = by_rule(study_jobs(study_dir, prepare_benchmark_of(manifest_path, manifest)))
    ratio = flop_ratio(target, measured)
    speed = cpu["gflops"] * 1e9 / (device_tflops * 1e12)
    neuron_ratio = target.neurons / measured.neurons if target.neurons and measured.neurons else None
    model = {"device": device, "dtype": dtype}
    weight_bytes = target.flop_params * run_dtype_bytes(model)
    step_seconds = weight_bytes / (bandwidth_gbs * 1e9)
    steps = study_decode_steps(study_dir, config)

    rows = []
    for r in rules:
        kind = SCALING.get(r.rule, "flops")
        note = ""
        if kind == "flops":
            factor = ratio * speed
        elif kind == "params":
            factor = target.params / measured.params
        elif kind == "neurons":
            factor = neuron_ratio if neuron_ratio else 1.0
            note = "" if neuron_ratio else "not scaled: give --layers and --d-mlp"
        else:
            factor = 1.0
        est = r.seconds * factor
        floor = steps.get(STEP_TABLE_OF.get(r.rule, r.rule), {}).get("steps")
        floor_s = floor * step_seconds if floor is not None else None
        expected = max(est, floor_s) if floor_s is not None else est
        longest = r.longest * factor if r.jobs > 1 else expected
        res = job_resources(r.rule, None if r.rule in SCALING else target.manifest(), model, source_mb=source_mb)
        if r.rule not in DISK_RULES:
            res.pop("disk_mb")
        if longest > 60 * res["runtime"]:
            note = "; ".join(filter(None, [note, "the longest job exceeds its time limit"]))
        if r.rule == "tune_refusal":
            per_param = RULE_COSTS[r.rule].weight_bytes_per_param
            note = "; ".join(filter(None, [note, f"needs {target.params * per_param / 1e9:.0f} GB of GPU memory "
                                                 f"({per_param:g} B per parameter)"]))
        rows.append({
            "rule": r.rule, "jobs": r.jobs, "measured_s": r.seconds, "longest_job_s": r.longest,
            "max_rss_mb": r.max_rss_mb, "cpu_s": r.cpu_seconds, "scaling": kind, "factor": factor,
            "estimate_s": est, "floor_s": floor_s, "decode_steps": floor, "expected_s": expected,
            "expected_longest_job_s": longest, "runs_on": device if res["gpu"] else "cpu",
            "requests": res, "note": note,
        })

    model_rows = [r for r in rules if SCALING.get(r.rule, "flops") == "flops"]
    cores = (sum(r.cpu_seconds for r in model_rows) / sum(r.seconds for r in model_rows)
             if model_rows and all(r.cpu_seconds is not None for r in model_rows) else None)
    missing = [rule for rule in RULE_COSTS if rule not in {r.rule for r in rules}]
    report = {
        "estimate": True,
        "study": study_dir.name,
        "target": {**asdict(target), "device": device, "dtype": dtype, "device_tflops": device_tflops,
                   "bandwidth_gbs": bandwidth_gbs},
        "measured": {**asdict(measured), "manifest": str(manifest_path), "source": manifest.get("source")},
        "cpu": dict(cpu),
        "flop_ratio": ratio,
        "speed_ratio": speed,
        "neuron_ratio": neuron_ratio,
        "bandwidth_step_s": step_seconds,
        "decode_steps": steps,
        "study_cpu_cores": cores,
        "rows": rows,
        "totals": {"measured_s": sum(r["measured_s"] for r in rows),
                   "expected_s": sum(r["expected_s"] for r in rows)},
        "missing_rules": missing,
        "source_mb": source_mb,
    }
    report["assumptions"] = _assumptions(report, config_source)
    return report


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.4g} M"


def _cpu_line(cpu: Mapping, cores: float | None) -> str:
    if cpu.get("given"):
        how = "given (--cpu-gflops)"
    else:
        how = (f"measured: median of {cpu['repeats']} timed forwards of the measured model on {cpu['batch']} × "
               f"{cpu['seq_len']} tokens in {cpu['dtype']} on {cpu['threads']} thread(s), "
               f"{cpu['seconds']:.2f} s each (repeats from {cpu['gflops_range'][0]:.1f} to "
               f"{cpu['gflops_range'][1]:.1f} GFLOP/s; other load on the machine lowers it)")
    used = (f"; the study's model jobs kept {cores:.2f} CPU cores busy on average (cpu_time ÷ wall), so a "
            "measurement on fewer threads than that understates this machine and the estimate with it"
            if cores is not None else "")
    return f"This machine's effective throughput: {cpu['gflops']:.1f} GFLOP/s, {how}{used}."


def _assumptions(rep: Mapping, config_source: str) -> list[str]:
    t, m = rep["target"], rep["measured"]
    tb = run_dtype_bytes({"device": t["device"], "dtype": t["dtype"]})
    lines = [
        "Every time is an estimate, scaled from one run on this machine; none was measured on the target.",
        f"FLOPs per token: 2 × (non-embedding parameters + LM head) for a forward. Target: "
        f"{_fmt_params(t['flop_params'])} ({t['counted']}); measured model "
        f"({m['source']}): {_fmt_params(m['flop_params'])} ({m['counted']}); ratio "
        f"{rep['flop_ratio']:.2f}. The study's token counts are the same for both models (prompts, grids and "
        "horizons are config), so time scales with FLOPs per token. Attention-score FLOPs (which grow with "
        "context length and d_model) are left out.",
        "tune_refusal: the backward pass and the AdamW step scale with the same parameter count, so the same ratio.",
        _cpu_line(rep["cpu"], rep["study_cpu_cores"]),
        f"Target device ({t['device']}, {t['dtype']}): {t['device_tflops']:g} TFLOP/s effective"
        + (" (default: 30% of an A100's 312 dense bf16 TFLOP/s)" if t["device_tflops"] == DEFAULT_DEVICE_TFLOPS
           else " (--device-tflops)")
        + f". Model rules: estimate = measured s × {rep['flop_ratio']:.2f} × ({rep['cpu']['gflops']:.1f} GFLOP/s ÷ "
        f"{t['device_tflops'] * 1e3:g} GFLOP/s) = measured s × {rep['flop_ratio'] * rep['speed_ratio']:.4g}.",
        f"Memory-bandwidth floor: each decoding step reads every weight once, {t['flop_params'] * tb / 1e9:.1f} GB "
        f"({tb} B per parameter) ÷ {t['bandwidth_gbs']:g} GB/s = {rep['bandwidth_step_s'] * 1e3:.1f} ms per step "
        "(KV-cache reads and prefill left out); expected = the larger of estimate and floor. "
        + " ".join(f"{rule}: {d['steps']} steps at least ({d['detail']})." if d["steps"] is not None
                   else f"{rule}: no floor ({d['detail']})." for rule, d in rep["decode_steps"].items())
        + " Other rules: no floor, their decoding steps are not in the study's tables."
        + (f" Batch sizes from {config_source}." if config_source else ""),
        "Process start, imports and model loading are in the measured seconds and scaled as if compute; on the "
        f"target each model job also loads {t['params'] * tb / 1e9:.1f} GB of weights (about "
        f"{t['params'] * tb / 2e9:.0f} s at 2 GB/s from disk), not included.",
        "Rules that do not load the model run on the CPU where snakemake runs, not on the device: screen, "
        "merge_activations and report read tables with a column per neuron, scaled by the neuron count "
        + (f"(layers × d_mlp, ×{rep['neuron_ratio']:.2f})" if rep["neuron_ratio"] else
           "(not scaled: --layers and --d-mlp not given)")
        + "; prepare_prompts unchanged; prepare_model (read, dequantise, hash the weights on a CPU) scaled by "
        f"the parameter count (×{t['params'] / m['params']:.2f}), a download not included.",
        f"Requests: neuronaudit.cluster.job_resources for a manifest of {_fmt_params(t['params'])} parameters, "
        f"model.device {t['device']}, model.dtype {t['dtype']}, first attempt (a retry asks attempt × memory and "
        "time); memory is host memory; the time limit is per job; prepare_model sized for a source of "
        f"{rep['source_mb']:g} MB on disk (--source-mb; 0: a hub id or a model folder, only hashed).",
        "Measured peak RSS is this machine's, for the measured model; jobs: benchmark files summed into their "
        "rule (prompt sets, shards, behaviours); totals: one job at a time.",
    ]
    if rep["missing_rules"]:
        lines.append("No benchmark file in this study (not run, or not in its DAG), so not estimated: "
                     + ", ".join(rep["missing_rules"]) + ".")
    return lines


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _gb(mb: float | None) -> str:
    return "—" if mb is None else f"{mb / 1024:.1f} GB"


def to_markdown(rep: Mapping) -> str:
    """The estimate as a Markdown table with its assumptions under it."""
    t = rep["target"]
    shape = ", ".join(f"{label} {t[k]}" for k, label in (("n_layers", "layers"), ("d_model", "d_model"),
                                                          ("d_mlp", "d_mlp"), ("vocab", "vocab")) if t[k])
    lines = [
        f"**Estimate** (not a measurement): expected wall time and requests per rule for a model of "
        f"{_fmt_params(t['params'])} parameters{f' ({shape})' if shape else ''} on {t['device']} in "
        f"{t['dtype']}, scaled by FLOPs from the study `{rep['study']}` measured on this machine.",
        "",
        "| rule | jobs | measured here | peak RSS here | × | estimate | bandwidth floor | expected | runs on "
        "| memory | time limit | GPUs | disk | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rep["rows"]:
        q = r["requests"]
        lines.append(
            f"| `{r['rule']}` | {r['jobs']} | {_dur(r['measured_s'])} | {_gb(r['max_rss_mb'])} | "
            f"{r['factor']:.3g} | {_dur(r['estimate_s'])} | {_dur(r['floor_s'])} | **{_dur(r['expected_s'])}** | "
            f"{r['runs_on']} | {_gb(q['mem_mb'])} | {q['runtime']} min | {q['gpu']} | {_gb(q.get('disk_mb'))} | "
            f"{r['note']} |")
    tot = rep["totals"]
    lines.append(f"| total (one job at a time) | {sum(r['jobs'] for r in rep['rows'])} | {_dur(tot['measured_s'])} "
                 f"| | | | | **{_dur(tot['expected_s'])}** | | | | | | |")
    lines += ["", "Assumptions (estimate):", ""] + [f"- {a}" for a in rep["assumptions"]]
    return "\n".join(lines)
