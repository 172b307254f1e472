"""The tiny study through the slurm profile on a real one-node Slurm cluster (tests/slurm_cluster.py):
every job that loads the model goes through sbatch, the localrules run in place, and the tables
equal those of a local run of the same config. Skips, saying why, where Slurm cannot start."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_cluster import PARTITION, ClusterUnavailable, local_cluster, submitted_jobs
from tiny_study import TINY_STUDY

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.workflow, pytest.mark.slow, pytest.mark.slurm]
LOCALRULES = {"all", "prepare_prompts", "prepare_tuning_prompts", "use_tuned_model", "screen", "report"}


def _snakemake(work: Path, overrides: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), *args,
           "--configfile", str(ROOT / "config" / "config.yaml"), str(overrides)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3000, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("slurm")
    overrides = base / "tiny.yaml"
    overrides.write_text(yaml.safe_dump({**TINY_STUDY, "model": {"source": str(tiny_model_dir)}}))
    try:
        with local_cluster(base / "cluster") as env:
            cluster = _snakemake(base / "on-slurm", overrides, "--profile", str(ROOT / "workflow/profiles/slurm"),
                                 "--slurm-no-account", "--default-resources", f"slurm_partition={PARTITION}",
                                 "--slurm-init-seconds-before-status-checks", "2",
                                 "--seconds-between-status-checks", "3", "--jobs", "2", env=env)
    except ClusterUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")
    assert cluster.returncode == 0, cluster.stderr[-4000:]
    local = _snakemake(base / "local", overrides, "--profile", str(ROOT / "workflow/profiles/default"), "--cores", "2")
    assert local.returncode == 0, local.stderr[-3000:]
    return base, cluster, local


def test_every_model_job_went_through_sbatch_and_the_cheap_rules_ran_in_place(runs):
    base, cluster, _ = runs
    logs = sorted((base / "on-slurm" / ".snakemake" / "slurm_logs").rglob("*.log"))
    by_rule = {p.relative_to(base / "on-slurm" / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
               for p in logs}
    assert {"prepare_model", "tune_refusal", "collect_activations", "window", "sufficient", "preconditions"} <= by_rule
    assert not by_rule & LOCALRULES
    jobs = submitted_jobs(base / "cluster")
    assert len(jobs) == len(logs) >= 10  # one sbatch per job, no job outside Slurm
    ran_here = set(re.findall(r"^localrule (\w+):", cluster.stdout + cluster.stderr, re.M))
    assert ran_here and ran_here <= LOCALRULES


def test_the_tables_equal_those_of_a_local_run(runs):
    base, _, _ = runs
    diff = subprocess.run([sys.executable, "-m", "neuronaudit", "diff-study", str(base / "on-slurm/results/tiny"),
                           str(base / "local/results/tiny")], capture_output=True, text=True, timeout=600)
    assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr[-2000:]
    assert len(list((base / "on-slurm/results/tiny").rglob("*.parquet"))) >= 15
