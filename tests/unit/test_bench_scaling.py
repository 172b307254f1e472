"""The benchmark's scaling section: its growth fit, the larger shapes it times, one job per mode."""

import math

import pytest
from transformers import LlamaConfig

from neuronaudit import bench


def test_growth_exponent_recovers_the_power_of_exact_power_laws():
    sizes = [1, 4, 16]
    b, r2 = bench.growth_exponent(sizes, [3.0 * s for s in sizes])
    assert b == pytest.approx(1.0) and r2 == pytest.approx(1.0)
    b, _ = bench.growth_exponent(sizes, [0.5 * s**2 for s in sizes])
    assert b == pytest.approx(2.0)
    b, r2 = bench.growth_exponent(sizes, [2.0 + 0.0 * s for s in sizes])  # constant: no growth
    assert b == pytest.approx(0.0, abs=1e-12)


def test_growth_exponent_needs_two_distinct_sizes():
    with pytest.raises(ValueError, match="two distinct sizes"):
        bench.growth_exponent([4, 4], [1.0, 2.0])


def _smollm2_135m_config():
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_the_embedded_model_scales_to_its_published_siblings_shapes():
    config = _smollm2_135m_config()
    shapes = bench.scaling_shapes(config)
    assert shapes == ["native", "SmolLM2-360M shape", "SmolLM2-1.7B shape"]
    big = bench.shape_overrides(config, "SmolLM2-1.7B shape")
    assert (big["hidden_size"], big["intermediate_size"], big["num_hidden_layers"]) == (2048, 8192, 24)
    assert bench.shape_overrides(config, "native") == {}
    # the 1.7B shape has ~1.7B parameters (tied embeddings), the class the scaling table names
    d, f, n, v = 2048, 8192, 24, 49152
    params = v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    assert 1.6e9 < params < 1.8e9


def test_other_models_scale_by_factors_and_unknown_shapes_are_refused():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    assert bench.scaling_shapes(config) == ["native", *bench.SCALED_SHAPES]
    assert bench.shape_overrides(config, "4x width, 2x depth") == {
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8}
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        bench.shape_overrides(config, "huge")


@pytest.mark.parametrize("mode", ["collect", "sweep", "rollout"])
def test_one_scaling_job_per_mode_runs_and_reports_its_size(mode):
    native = bench.child_scaling("tiny", "native", mode, 1)
    wider = bench.child_scaling("tiny", "2x width", mode, 1)
    assert wider["params"] > 2 * native["params"] * 0.9  # wider MLPs and embeddings
    for res in (native, wider):
        assert res["wall_s"] > 0 and math.isfinite(res["peak_mb"]) and res["peak_mb"] >= res["base_mb"] * 0.5
    unit = bench.SCALING_UNIT[mode]
    first = {"collect": unit.get("prompts"), "sweep": unit.get("rows"), "rollout": unit.get("rows")}[mode]
    assert native["work"].startswith(str(first))
    four = bench.child_scaling("tiny", "native", mode, 4)
    assert four["work"] != native["work"]  # 4x the prompts (or rows) of the study's shape


def test_profile_phases_reads_each_phase_from_its_own_file_and_function():
    class Stats:  # the shape of pstats.Stats.stats: (file, line, function) -> (cc, nc, tt, ct, callers)
        stats = {
            ("/x/neuronaudit/interventions/sweeps.py", 721, "generated_dose_sweep"): (1, 1, 0.1, 6.0, {}),
            ("/x/neuronaudit/interventions/sweeps.py", 680, "decode"): (1, 1, 0.1, 5.5, {}),  # not tokenizer decoding
            ("/x/transformers/tokenization_utils_base.py", 2894, "decode"): (9, 9, 0.2, 0.4, {}),
            ("/x/neuronaudit/evaluation/judge.py", 102, "classify"): (3, 3, 0.3, 0.9, {}),
            ("/x/neuronaudit/evaluation/judge.py", 610, "classify"): (3, 3, 0.3, 0.2, {}),
        }

    phases = bench.profile_phases(Stats())
    assert phases["greedy dosed generation (generated_dose_sweep)"] == 6.0
    assert phases["decoding token ids to text"] == 0.4
    assert phases["judge (classify)"] == 0.9  # the larger entry, not the sum of two paths
    assert phases["oracle (flips)"] == 0.0 and phases["unsteered scoring of the rollouts (shared_prompt_scores)"] == 0.0


def test_profile_section_splits_one_window_call_on_a_tiny_model(capsys):
    model, tokenizer, adapter, _ = bench.load("tiny")
    bench.section_profile(model, tokenizer, adapter)
    text = capsys.readouterr().out
    assert "54 dose rows × 12 prompts = 648 rollouts" in text
    shares = [line for line in text.splitlines() if line.startswith("profile/")]
    assert len(shares) == len(bench.PROFILE_PHASES) + 2
    generation = next(line for line in shares if "generated_dose_sweep" in line)
    assert float(generation.split(": ")[1].split(" s")[0]) > 0  # the phase was found in the profile


def test_lower_section_times_the_window_call_both_ways_and_compares_the_typed_rows(capsys):
    model, tokenizer, adapter, _ = bench.load("tiny")
    bench.section_lower(model, tokenizer, adapter, quick=True)
    text = capsys.readouterr().out
    timing, agreement = [line for line in text.splitlines() if line.startswith("lower: ")]
    assert "18 dose rows × 12 prompts" in timing and "neurons at layers [2] of 4" in timing
    assert "responses equal on 100.0%, judge types on 100.0% of 648 typed rows" in agreement
    assert float(agreement.rsplit(" ", 1)[1]) < 1e-4  # the perplexities agree to float rounding


def test_the_per_rule_table_sums_each_rules_jobs_longest_first(tmp_path):
    study = tmp_path / "results" / "s"
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, (wall, rss, cpu) in {"collect/harmful.tsv": (10.0, 900, 8.0), "collect/harmless.tsv": (20.0, 1200, 15.0),
                                  "window/window.tsv": (600.0, 2048, 1100.0)}.items():
        path = study / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + f"{wall}\t0:00:00\t{rss}\t0\t0\t0\t0\t0\t0\t{cpu}\n")
    table = bench.rules_markdown(study).splitlines()
    assert table[2] == "| `window` | 1 | 10.0 min | 2.0 GB | 18.3 min |"
    assert table[3] == "| `collect_activations` | 2 | 0.5 min | 1.2 GB | 0.4 min |"
    assert table[-1] == "| **all** | 3 | **10.5 min** | | |"
