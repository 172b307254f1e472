"""What each job of the workflow asks a scheduler for: memory, run time, GPUs and disk, from the
prepared model's manifest (parameter count) and the configured device and dtype.

The figures are estimates with headroom, not measurements: a job that needs more memory is
retried (``restart-times`` in the profiles) with its memory and run time scaled by the attempt.
Memory counts the weights in the run dtype once for inference, 16 bytes per parameter for the
full fine-tune (float32 weights, gradients, two AdamW moments; its KL term's reference
distributions are in the fixed part), and a fixed part for Python, torch and the tables. Run
times are minutes per billion parameters on a GPU, times
:data:`CPU_SLOWDOWN` on a CPU, never below the rule's floor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: How much slower one CPU node runs a rule than one GPU (a planning figure, measured order of
#: magnitude for 0.1–1B models: SmolLM2-135M on 2 CPU threads vs a single data-centre GPU).
CPU_SLOWDOWN = 20.0


@dataclass(frozen=True)
class RuleCost:
    """One rule's demands: ``weight_bytes_per_param`` (None: the run dtype's size, once),
    ``overhead_mb`` (Python, torch, tables), ``gpu_minutes_per_billion`` and ``min_minutes``;
    ``model`` False for rules that never load the model (no GPU, fixed memory)."""

    weight_bytes_per_param: float | None
    overhead_mb: int
    gpu_minutes_per_billion: float
    min_minutes: int
    model: bool = True


#: Per rule. Inference rules hold the weights once plus activations and KV caches (×1.5);
#: tune_refusal holds float32 weights, gradients and AdamW moments on the device, and on the host
#: the KL term's reference log-probabilities (refusal.harmless_loss: kl_to_base; own answers ×
#: answer tokens × vocabulary × 4 B: ~1 GB for a 49k vocabulary, ~3 GB for 128k).
RULE_COSTS: dict[str, RuleCost] = {
    "prepare_model": RuleCost(8.0, 2000, 5, 10),  # GGUF dequantised in float32, then saved
    "prepare_prompts": RuleCost(None, 1000, 0, 5, model=False),
    "tune_refusal": RuleCost(16.0, 6000, 60, 30),
    "use_tuned_model": RuleCost(None, 500, 0, 5, model=False),  # copies the shared tuned model's manifest
    "evaluate_refusal": RuleCost(None, 2500, 20, 15),
    "evaluate_refusal_part": RuleCost(None, 2500, 10, 10),  # one model's rollouts of one shard
    "evaluate_refusal_perplexity": RuleCost(None, 2500, 2, 10),  # one model's generic-text NLLs
    "merge_refusal_evaluation": RuleCost(None, 2000, 0, 10, model=False),  # joins the parts
    "refusal_rollouts": RuleCost(None, 2500, 15, 15),  # or one shard of rollouts.shard_size prompts
    "merge_refusal_rollouts": RuleCost(None, 2000, 0, 10, model=False),
    "collect_activations": RuleCost(None, 2500, 5, 10),
    "merge_activations": RuleCost(None, 2000, 0, 10, model=False),
    "preconditions": RuleCost(None, 2500, 5, 10),
    "screen": RuleCost(None, 2000, 0, 10, model=False),
    "cna": RuleCost(None, 2500, 30, 20),
    "cna_part": RuleCost(None, 2500, 10, 10),  # one block of cna.shard_size interventions
    "merge_cna": RuleCost(None, 2000, 0, 10, model=False),  # joins the parts' rollouts and capability
    "keystone": RuleCost(None, 2500, 20, 15),
    "keystone_part": RuleCost(None, 2500, 8, 10),  # one block of keystone.shard_size ablation conditions
    "merge_keystone": RuleCost(None, 3000, 0, 10, model=False),  # scores and stability (every group's tables)
    "window": RuleCost(None, 3000, 60, 30),
    "window_sweep": RuleCost(None, 3000, 50, 20),  # one behaviour's block of candidates (window.shard_size)
    "attribution": RuleCost(None, 3000, 20, 15),
    "sufficient": RuleCost(None, 3000, 40, 20),
    "reasoning": RuleCost(None, 3000, 60, 30),
    "report": RuleCost(None, 3000, 0, 15, model=False),
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def n_params(manifest: Mapping) -> int:
    """Parameter count of a prepared model: the manifest's ``n_params``, else estimated from its
    shape (attention 4·d², MLP 3·d·n per layer; embeddings left out)."""
    if manifest.get("n_params"):
        return int(manifest["n_params"])
    d, n, layers = (int(manifest.get(k) or 0) for k in ("d_model", "n_neurons", "n_layers"))
    return layers * (4 * d * d + 3 * d * n)


def run_dtype_bytes(model: Mapping) -> int:
    """Bytes per weight as the jobs run it: ``model.dtype``, with ``auto`` as bfloat16 on a GPU and
    float32 on a CPU."""
    dtype = str(model.get("dtype") or "float32")
    if dtype == "auto":
        return 2 if is_gpu(model) else 4
    return DTYPE_BYTES.get(dtype, 4)


def is_gpu(model: Mapping) -> bool:
    return str(model.get("device") or "cpu").startswith("cuda")


#: prepare_model, before any manifest exists, sizes itself from the source's size on disk: a
#: 4-bit GGUF dequantised to float32 takes about this many times its file size, in memory and on disk.
SOURCE_EXPANSION = 8


def job_resources(rule: str, manifest: Mapping | None, model: Mapping, attempt: int = 1,
                  source_mb: float = 0.0) -> dict[str, int]:
    """``mem_mb``, ``runtime`` (minutes), ``gpu`` and ``disk_mb`` of one job of ``rule``;
    ``source_mb`` is the model source's size on disk (0 for a hub id), read by prepare_model."""
    cost = RULE_COSTS[rule]
    attempt = max(1, int(attempt))
    params = n_params(manifest) if manifest and cost.model else 0
    per_param = cost.weight_bytes_per_param if cost.weight_bytes_per_param is not None else 1.5 * run_dtype_bytes(model)
    mem_mb = cost.overhead_mb + params * per_param / 2**20
    minutes = cost.gpu_minutes_per_billion * params / 1e9 * (1.0 if is_gpu(model) else CPU_SLOWDOWN)
    weights_mb = params * run_dtype_bytes(model) / 2**20 if rule == "tune_refusal" else 0
    if rule == "prepare_model":
        mem_mb += SOURCE_EXPANSION * source_mb
        weights_mb = SOURCE_EXPANSION * source_mb / 2
    return {
        "mem_mb": int(round(mem_mb * attempt)),
        "runtime": int(round(max(cost.min_minutes, minutes) * attempt)),
        "gpu": int(cost.model and rule != "prepare_model" and is_gpu(model)),
        "disk_mb": int(round(1024 + 2 * weights_mb)),
    }


def source_mb(path: str | Path | None) -> float:
    """Size on disk of a model source (a file, or every file of a folder), in MB; 0 if absent."""
    if not path or not Path(path).exists():
        return 0.0
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def manifest_of(path: str | Path) -> dict:
    """The manifest a job's resources are computed from; a missing file raises
    FileNotFoundError naming it (Snakemake then evaluates the resource once the file exists)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
