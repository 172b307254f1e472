"""Job resources for schedulers: every rule has them, they follow the model's size, device, dtype
and the attempt, and the profiles are valid Snakemake profiles."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuronaudit.cluster import RULE_COSTS, job_resources, n_params

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"n_params": 135_000_000}
LARGE = {"n_params": 8_000_000_000}
CPU = {"device": "cpu", "dtype": "float32"}
GPU = {"device": "cuda", "dtype": "bfloat16"}


def test_every_rule_of_the_workflow_declares_the_resources_of_its_cost_entry():
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    names = set(re.findall(r"^\s*rule (\w+):", rules, re.M))  # the rules inside an if / else too
    assert {"cna_part", "merge_cna", "keystone_part", "merge_keystone", "evaluate_refusal"} <= names
    # the second model is prepared as the first; the tuning's prompt tables as the study's
    sized_as = {"prepare_transfer_model": "prepare_model", "prepare_tuning_prompts": "prepare_prompts"}
    assert {sized_as.get(n, n) for n in names} <= set(RULE_COSTS), names - set(RULE_COSTS) - set(sized_as)
    for name in names:
        body = re.split(r"\n\s*rule \w+:", rules.split(f"rule {name}:")[1])[0]
        name = sized_as.get(name, name)
        for what in ("mem_mb", "runtime", "gpu"):
            assert f'{what}=job_resource("{name}", "{what}"' in body, (name, what)


def test_memory_follows_the_weights_the_dtype_and_the_fine_tune():
    small, large = job_resources("window", SMALL, CPU), job_resources("window", LARGE, CPU)
    assert large["mem_mb"] > 20 * small["mem_mb"] / 2  # grows with parameters (above the fixed part)
    bf16 = job_resources("window", LARGE, GPU)
    assert bf16["mem_mb"] < large["mem_mb"]  # two bytes per weight instead of four
    tune = job_resources("tune_refusal", LARGE, GPU)
    assert tune["mem_mb"] > 16 * 8e9 / 2**20  # weights, gradients, two AdamW moments in float32
    assert tune["disk_mb"] > 8e9 * 2 / 2**20  # the tuned copy is written
    assert job_resources("screen", LARGE, GPU)["mem_mb"] == RULE_COSTS["screen"].overhead_mb  # no model


def test_gpus_only_for_model_jobs_on_cuda_and_retries_ask_for_more():
    assert job_resources("window", SMALL, GPU)["gpu"] == 1 and job_resources("window", SMALL, CPU)["gpu"] == 0
    assert job_resources("report", SMALL, GPU)["gpu"] == 0
    first, second = job_resources("cna", LARGE, GPU, attempt=1), job_resources("cna", LARGE, GPU, attempt=2)
    assert second["mem_mb"] == pytest.approx(2 * first["mem_mb"], abs=1) and second["runtime"] == 2 * first["runtime"]
    assert job_resources("window", LARGE, CPU)["runtime"] > job_resources("window", LARGE, GPU)["runtime"]


def test_parameter_count_falls_back_to_the_shape():
    assert n_params({"n_params": 7}) == 7
    assert n_params({"n_layers": 2, "d_model": 4, "n_neurons": 8}) == 2 * (4 * 16 + 3 * 4 * 8)


@pytest.mark.parametrize("profile", ["default", "slurm", "gpu"])
def test_profiles_are_valid_and_the_gpu_profile_asks_for_cuda(profile):
    settings = yaml.safe_load((ROOT / "workflow" / "profiles" / profile / "config.yaml").read_text())
    assert settings["rerun-incomplete"] is True
    if profile == "slurm":  # run on a real (local) cluster by tests/workflow/test_slurm.py
        assert settings["executor"] == "slurm" and settings["slurm-status-command"] == "squeue"
        assert settings["restart-times"] >= 1
        return
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile",
                          str(ROOT / "workflow/profiles" / profile), "--configfile", str(ROOT / "config/config.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if profile == "gpu" and "CUDA is not available" in run.stderr:  # this machine: the config names cuda
        assert "neuronaudit: error: config key model.device: 'cuda'" in run.stderr
        return
    assert run.returncode == 0, run.stderr[-2000:]


def test_prepare_model_sizes_itself_from_the_source_on_disk(tmp_path):
    from neuronaudit.cluster import SOURCE_EXPANSION, source_mb

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.gguf").write_bytes(b"\0" * 2**20 * 3)
    assert source_mb(tmp_path / "model") == pytest.approx(3.0)
    assert source_mb(tmp_path / "model" / "weights.gguf") == pytest.approx(3.0) and source_mb(None) == 0.0
    sized = job_resources("prepare_model", None, GPU, source_mb=1000)
    bare = job_resources("prepare_model", None, GPU)
    assert sized["mem_mb"] - bare["mem_mb"] == SOURCE_EXPANSION * 1000 and sized["gpu"] == 0
