"""The estimate of an 8B model's wall time and requests per rule from a study's benchmark files:
jobs summed into their rules, the FLOP ratio, the device scaling, the decoding floor, the
requests, the errors and the CLI."""

import json
import re
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuronaudit import estimate as E
from neuronaudit.cli import main
from neuronaudit.cluster import RULE_COSTS, job_resources
from neuronaudit.errors import NeuronAuditError

ROOT = Path(__file__).resolve().parents[2]
HEAD = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
#: Llama-3-8B: 8.03 B parameters, of which the input embedding is 128256 × 4096 (untied LM head).
LLAMA3_8B = dict(params=8.03e9, n_layers=32, d_model=4096, d_mlp=14336, vocab=128256)
#: The measured model of the synthetic studies: 1 M parameters with a tied 1000 × 64 embedding.
SMALL = {"n_params": 1_000_000, "n_layers": 2, "d_model": 64, "n_neurons": 256, "source": "small"}


def bench(path: Path, *rows: tuple[float, float, float]) -> None:
    """A Snakemake benchmark TSV with rows of (wall s, max RSS MB, cpu s)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD + "".join(f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n" for s, rss, cpu in rows))


def model_folder(path: Path, manifest: dict, vocab=1000, d_model=64, tied=True) -> Path:
    weights = path / "weights"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text(json.dumps({"vocab_size": vocab, "hidden_size": d_model,
                                                     "tie_word_embeddings": tied}))
    (path / "manifest.json").write_text(json.dumps({**manifest, "path": str(weights)}))
    return path / "manifest.json"


@pytest.fixture
def study(tmp_path):
    """results/<study> with benchmark files of several rules and jobs, and its prepared model."""
    results = tmp_path / "results"
    model_folder(results / "models" / "small", SMALL)
    bench(results / "models" / "small" / "prepare_model.benchmark.tsv", (4.0, 300, 4))
    s = results / "study"
    b = s / "benchmarks"
    bench(b / "prompts" / "harmful.tsv", (1.0, 100, 1))
    bench(b / "prompts" / "harmless.tsv", (2.0, 110, 2))
    bench(b / "collect" / "harmful.tsv", (10.0, 900, 12))
    bench(b / "collect" / "harmless.0.tsv", (5.0, 950, 6))
    bench(b / "collect" / "harmless.1.tsv", (6.0, 800, 7), (8.0, 1200, 9))  # two repeats: mean s, max RSS
    bench(b / "collect" / "harmless.merge.tsv", (2.0, 400, 2))
    bench(b / "screen" / "refusal.tsv", (3.0, 500, 3))
    bench(b / "screen" / "format.tsv", (4.0, 520, 4))
    bench(b / "refusal" / "tune.tsv", (100.0, 3000, 150))
    bench(b / "reasoning" / "reasoning.tsv", (50.0, 2000, 90))
    return s


def test_jobs_are_summed_into_their_rules_in_workflow_order(study):
    manifest = study.parent / "models" / "small" / "manifest.json"
    rules = E.by_rule(E.study_jobs(study, E.prepare_benchmark_of(manifest, json.loads(manifest.read_text()))))
    got = {r.rule: r for r in rules}
    assert [r.rule for r in rules] == ["prepare_model", "prepare_prompts", "tune_refusal", "collect_activations",
                                       "merge_activations", "screen", "reasoning"]
    collect = got["collect_activations"]
    assert (collect.jobs, collect.seconds, collect.longest, collect.max_rss_mb) == (3, 22.0, 10.0, 1200.0)
    assert collect.cpu_seconds == 12 + 6 + 8
    assert (got["merge_activations"].jobs, got["merge_activations"].seconds) == (1, 2.0)
    assert (got["screen"].jobs, got["screen"].seconds, got["screen"].max_rss_mb) == (2, 7.0, 520.0)
    assert (got["prepare_prompts"].jobs, got["prepare_prompts"].seconds) == (2, 3.0)
    assert got["prepare_model"].seconds == 4.0


def _rule_benchmarks() -> list[tuple[str, str, str]]:
    """(rule, stage, name pattern) of every benchmark_file(...) in rules/*.smk."""
    out = []
    for path in sorted((ROOT / "rules").glob("*.smk")):
        text = path.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*rule (\w+):", text, re.M)]
        for k, (start, rule) in enumerate(starts):
            body = text[start: starts[k + 1][0] if k + 1 < len(starts) else len(text)]
            for stage, name in re.findall(r'benchmark_file\("(\w+)"(?:, "([^"]+)")?\)', body):
                out.append((rule, stage, name or "{prompt_set}"))
    return out


def test_every_benchmark_file_of_the_workflow_maps_to_the_rule_that_writes_it():
    found = _rule_benchmarks()
    assert len(found) >= 15 and {r for r, _, _ in found} >= {"collect_activations", "merge_activations",
                                                               "tune_refusal", "report"}
    for rule, stage, pattern in found:
        name = pattern.format(prompt_set="harmless", shard="3", behaviour="refusal", which="base")
        assert E.rule_of(stage, name) == rule, (stage, name)
    with pytest.raises(NeuronAuditError, match="newstage/x.tsv"):
        E.rule_of("newstage", "x")


def test_rules_sized_without_a_manifest_or_with_disk_are_the_workflows():
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    without = set(re.findall(r'job_resource\("(\w+)", "mem_mb", manifest=None', rules))
    assert without == set(E.SCALING)
    assert set(re.findall(r'job_resource\("(\w+)", "disk_mb"', rules)) == E.DISK_RULES
    assert set(E.SCALING) <= set(RULE_COSTS)


def test_flop_ratio_of_two_known_shapes(tmp_path):
    target = E.target_shape(**LLAMA3_8B)
    assert target.flop_params == 8.03e9 - 128256 * 4096 == 7_504_663_424
    assert E.target_shape(8.03e9, vocab=128256, d_model=4096, tied=True).flop_params == 8.03e9
    # SmolLM2-135M's shape: 30 layers of d 576 (9 heads, 3 KV heads of 64) and MLP 1536, tied 49152 × 576
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    smol = {"n_params": 30 * layer + 576 + 49152 * 576, "d_model": 576, "n_layers": 30, "n_neurons": 1536}
    measured = E.measured_shape(json.loads(model_folder(tmp_path / "smol", smol, vocab=49152, d_model=576).read_text()))
    assert measured.flop_params == 134_515_008 and measured.tied
    assert E.flop_ratio(target, measured) == pytest.approx(7_504_663_424 / 134_515_008)
    assert 55.7 < E.flop_ratio(target, measured) < 55.9
    # the same model untied: its LM head is a second matrix, and the input embedding is still a lookup
    untied = E.measured_shape(json.loads(model_folder(tmp_path / "untied", {**smol, "n_params": smol["n_params"]
                                                                            + 49152 * 576}, vocab=49152,
                                                      d_model=576, tied=False).read_text()))
    assert untied.flop_params == 134_515_008


def _safetensors_header(path: Path, shapes: dict) -> None:
    header = json.dumps({"__metadata__": {}, **{k: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]}
                                                for k, s in shapes.items()}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_parameters_are_counted_from_safetensors_headers_when_the_manifest_has_none(tmp_path):
    m = model_folder(tmp_path / "m", {"d_model": 8, "n_layers": 1, "n_neurons": 16}, vocab=100, d_model=8, tied=False)
    weights = tmp_path / "m" / "weights"
    (weights / "config.json").write_text(json.dumps({"vocab_size": 100, "hidden_size": 8}))  # tying unknown
    _safetensors_header(weights / "model-00001-of-00002.safetensors", {"embed": [100, 8], "mlp": [16, 8]})
    _safetensors_header(weights / "model-00002-of-00002.safetensors", {"head": [100, 8], "norm": [8]})
    shape = E.measured_shape(json.loads(m.read_text()))
    assert shape.params == 800 + 128 + 800 + 8
    assert not shape.tied  # two vocab × d matrices
    assert shape.flop_params == 128 + 800 + 8


def test_doubling_the_device_throughput_halves_the_estimate_of_model_rules(study):
    target = E.target_shape(**LLAMA3_8B)
    one = E.estimate(study, target, {"gflops": 40.0, "given": True}, device_tflops=100.0)
    two = E.estimate(study, target, {"gflops": 40.0, "given": True}, device_tflops=200.0)
    ratio = target.flop_params / SMALL["n_params"]  # the synthetic model is tied: all its parameters compute
    assert one["flop_ratio"] == pytest.approx(ratio)
    for a, b in zip(one["rows"], two["rows"]):
        if a["scaling"] == "flops":
            assert a["estimate_s"] == pytest.approx(a["measured_s"] * ratio * 40e9 / 100e12)
            assert b["expected_s"] == pytest.approx(a["expected_s"] / 2)
        else:  # on the CPU where snakemake runs: the device does not change it
            assert b["expected_s"] == a["expected_s"]
    screen = next(r for r in one["rows"] if r["rule"] == "screen")
    assert screen["factor"] == pytest.approx(32 * 14336 / (2 * 256))
    assert one["totals"]["expected_s"] == pytest.approx(sum(r["expected_s"] for r in one["rows"]))


def test_requests_are_the_workflows_for_a_manifest_of_the_target_size(study):
    target = E.target_shape(**LLAMA3_8B)
    rep = E.estimate(study, target, {"gflops": 40.0, "given": True})
    gpu = {"device": "cuda", "dtype": "bfloat16"}
    got = {r["rule"]: r for r in rep["rows"]}
    assert got["tune_refusal"]["requests"] == job_resources("tune_refusal", {"n_params": 8_030_000_000}, gpu)
    assert got["reasoning"]["requests"] == {k: v for k, v in job_resources(
        "reasoning", {"n_params": 8_030_000_000}, gpu).items() if k != "disk_mb"}
    # prepare_model is sized from its source on disk, without a manifest (there is none yet)
    assert got["prepare_model"]["requests"] == {k: v for k, v in job_resources("prepare_model", None, gpu).items()
                                                if k != "disk_mb"}
    assert got["prepare_model"]["requests"]["runtime"] == RULE_COSTS["prepare_model"].min_minutes
    assert got["reasoning"]["runs_on"] == "cuda" and got["screen"]["runs_on"] == "cpu"
    assert got["screen"]["requests"]["mem_mb"] == RULE_COSTS["screen"].overhead_mb
    assert "128 GB of GPU memory (16 B per parameter)" in got["tune_refusal"]["note"]
    assert "evaluate_refusal" in rep["missing_rules"] and "reasoning" not in rep["missing_rules"]


def test_decode_steps_floor_packs_the_longest_sequences_together():
    assert E.decode_steps_floor([48, 10, 48, 5], 2) == 48 + 10
    assert E.decode_steps_floor([48, 10, 48, 5], 1) == 111
    assert E.decode_steps_floor([7, 3, 9], 64) == 9
    with pytest.raises(NeuronAuditError):
        E.decode_steps_floor([1], 0)


def test_bandwidth_floor_counts_the_studys_generated_sequences(study):
    (study / "reasoning").mkdir()
    (study / "refusal").mkdir()
    pq.write_table(pa.table({"n_tokens": [48, 48, 20, 10, 5]}), study / "reasoning" / "solutions.parquet")
    # one rollout read at two horizons is one generated sequence
    pq.write_table(pa.table({"sample": ["greedy"] * 4, "prompt_set": ["h"] * 4, "prompt_id": ["a", "a", "b", "b"],
                             "intervention": ["none"] * 4, "horizon": [16, 32, 16, 32], "n_tokens": [16, 30, 12, 12]}),
                   study / "refusal" / "rollouts.parquet")
    config = {"reasoning": {"batch_size": 2}, "rollouts": {"batch_size": 1}}
    steps = E.study_decode_steps(study, config)
    assert steps["reasoning"]["steps"] == 48 + 20 + 5
    assert steps["refusal_rollouts"]["steps"] == 30 + 12
    assert steps["cna"]["steps"] is None and "no cna/rollouts.parquet" in steps["cna"]["detail"]
    assert E.study_decode_steps(study, None)["reasoning"]["steps"] is None  # no batch size, no floor

    target = E.target_shape(**LLAMA3_8B)
    fast = E.estimate(study, target, {"gflops": 40.0, "given": True}, config=config, bandwidth_gbs=1e6)
    slow = E.estimate(study, target, {"gflops": 40.0, "given": True}, config=config, bandwidth_gbs=1.0)
    for rep, dominant in ((fast, "estimate_s"), (slow, "floor_s")):
        row = next(r for r in rep["rows"] if r["rule"] == "reasoning")
        assert row["decode_steps"] == 73
        assert row["floor_s"] == pytest.approx(73 * target.flop_params * 2 / (rep["target"]["bandwidth_gbs"] * 1e9))
        assert row["expected_s"] == max(row["estimate_s"], row["floor_s"]) == row[dominant]
    assert all(r["floor_s"] is None for r in slow["rows"] if r["rule"] != "reasoning")


def test_a_study_without_benchmark_files_is_a_one_line_error_naming_the_folder(tmp_path):
    folder = tmp_path / "results" / "empty"
    (folder / "benchmarks").mkdir(parents=True)
    with pytest.raises(NeuronAuditError) as err:
        E.study_jobs(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "benchmark" in message
    with pytest.raises(NeuronAuditError, match="not found"):
        E.study_jobs(tmp_path / "nope")


def test_cli_estimate_prints_the_table_and_its_assumptions(study, capsys):
    args = [str(study), "--params", "8.03e9", "--layers", "32", "--d-model", "4096", "--d-mlp", "14336",
            "--vocab", "128256", "--cpu-gflops", "40"]
    assert main(["estimate", *args, "--format", "json", "--device-tflops", "150"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["estimate"] is True and rep["target"]["device_tflops"] == 150.0
    assert rep["target"]["flop_params"] == 7_504_663_424
    assert rep["cpu"] == {"gflops": 40.0, "given": True}
    assert rep["measured"]["manifest"] == str(study.parent / "models" / "small" / "manifest.json")
    assert any("FLOPs per token" in a for a in rep["assumptions"])
    assert main(["estimate", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**Estimate** (not a measurement)")
    assert "| `tune_refusal` | 1 | 1.7 min | 2.9 GB |" in out
    assert all(f"- {a}" in out for a in rep["assumptions"][1:3])
    assert "Assumptions (estimate):" in out


def test_cli_errors_are_one_line(study, tmp_path, capsys):
    empty = tmp_path / "results" / "empty"
    empty.mkdir(parents=True)
    assert main(["estimate", str(empty), "--params", "8e9", "--cpu-gflops", "40",
                 "--manifest", str(study.parent / "models" / "small" / "manifest.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neuronaudit: error: no Snakemake benchmark files") and str(empty) in err
    assert "\n" not in err
    assert main(["estimate", str(study), "--params", "8e9", "--cpu-gflops", "0"]) == 2
    assert "must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a throughput is required: given or measured
        main(["estimate", str(study), "--params", "8e9"])


def test_measured_throughput_counts_two_flops_per_parameter_per_token(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"path": str(tiny_model_dir)}))
    shape = E.measured_shape(json.loads(manifest.read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert shape.params == total
    assert shape.flop_params == (total if model.config.tie_word_embeddings else total - embedding)
    got = E.measure_cpu_gflops(manifest, shape, threads=1, batch=2, seq_len=8, repeats=1)
    assert got["gflops"] > 0 and got["threads"] == 1 and got["repeats"] == 1
    assert got["gflops_range"][0] <= got["gflops"] <= got["gflops_range"][1]
    assert got["gflops"] * 1e9 * got["seconds"] == pytest.approx(2 * shape.flop_params * 2 * 8)
