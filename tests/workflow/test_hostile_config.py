"""Config values reach shell commands quoted: a hostile system prompt or prompt file path runs
nothing, and ordinary non-ASCII, multi-line and brace-holding system prompts reach the stage verbatim and are
recorded."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuronaudit.io import read_provenance

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.mark.parametrize("system_prompt", [
    "$(touch {marker}) `touch {marker}` ; touch {marker} ' \" \\",
    "Sei höflich.\nAntworte kurz: ö, ß, 東京, 🙂",
    # braces: Snakemake formats params strings, so these once read as wildcards of the rule
    "Answer as {{name}}: {{value}}, matching \\d{{3}}",
])
def test_system_prompt_is_passed_verbatim_and_never_run(tmp_path, tiny_model_dir, system_prompt):
    marker = tmp_path / "MARKER"
    prompt = system_prompt.format(marker=marker)
    overrides = tmp_path / "hostile.yaml"
    overrides.write_text(yaml.safe_dump({
        "study": "hostile", "threads": 1, "model": {"source": str(tiny_model_dir), "system_prompt": prompt},
        "prompts": {"limit": 2}, "refusal": {"tune": False}, "collect": {"batch_size": 2, "max_length": 32},
    }, allow_unicode=True))
    target = "results/hostile/collect/harmful.stats.parquet"
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--cores", "1",
         "--configfile", str(ROOT / "config" / "config.yaml"), str(overrides), "--", target],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert not marker.exists()  # nothing in the prompt was executed by a shell
    assert read_provenance(tmp_path / target)["system_prompt"] == prompt  # and it arrived verbatim


def test_a_hostile_prompt_file_path_is_quoted_and_never_run(tmp_path, tiny_model_dir):
    marker = tmp_path / "MARKER"  # a shell job runs in the working directory, tmp_path
    folder = tmp_path / "$(touch MARKER) `touch MARKER` ; touch MARKER"
    folder.mkdir()
    source = folder / "harm ful's.jsonl"
    source.write_text((ROOT / "config" / "prompts" / "harmful.jsonl").read_text())
    overrides = tmp_path / "hostile.yaml"
    overrides.write_text(yaml.safe_dump({
        "study": "hostile", "threads": 1, "model": {"source": str(tiny_model_dir)},
        "prompts": {"limit": 2, "sets": {"harmful": str(source)}}, "refusal": {"tune": False},
    }))
    target = "results/hostile/prompts/harmful.parquet"
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--cores", "1",
         "--configfile", str(ROOT / "config" / "config.yaml"), str(overrides), "--", target],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert not marker.exists()
    prov = read_provenance(tmp_path / target)
    assert prov["source"] == str(source) and prov["n_total"] > 4  # read from the hostile path, verbatim
