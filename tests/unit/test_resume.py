"""Resuming after a kill: the stale Snakemake lock is removed only when no Snakemake runs in the
directory, temporaries of killed writes are removed, and every rule output is written atomically
(issue 20). The end-to-end kill and rerun is in tests/workflow/test_workflow.py."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronaudit import resume
from neuronaudit.io import atomic_path, stale_temporaries

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture()
def fake_snakemake(tmp_path):
    """A process whose command line names snakemake, running in ``tmp_path / 'busy'``."""
    busy = tmp_path / "busy"
    busy.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "snakemake", "--cores", "1"],
                            cwd=busy)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    for _ in range(200):  # until the child has exec'd (on a busy machine the fork shows the parent's line)
        if not cmdline.exists() or b"snakemake" in cmdline.read_bytes():
            break
        time.sleep(0.05)
    yield busy, proc.pid
    proc.kill()
    proc.wait()


def test_the_working_directory_is_read_from_the_arguments(tmp_path):
    assert resume.working_directory(["--cores", "2"], tmp_path) == tmp_path.resolve()
    assert resume.working_directory(["-d", "sub", "--cores", "2"], tmp_path) == (tmp_path / "sub").resolve()
    assert resume.working_directory(["--directory=/x/y"], tmp_path) == Path("/x/y")


def test_snakemake_command_lines_are_recognised():
    assert resume.is_snakemake(["/v/bin/snakemake", "--cores", "2"])
    assert resume.is_snakemake(["/v/bin/python", "-m", "snakemake", "-n"])
    assert not resume.is_snakemake(["/v/bin/python", "-m", "neuronaudit", "run", "-s", "/r/Snakefile"])


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_running_snakemake_is_found_in_its_own_directory_only(tmp_path, fake_snakemake):
    busy, pid = fake_snakemake
    assert pid in resume.snakemake_processes(busy)
    assert pid not in resume.snakemake_processes(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_snakemake_whose_directory_cannot_be_read_counts_as_running_here(tmp_path, fake_snakemake, monkeypatch):
    busy, pid = fake_snakemake
    readlink = resume.os.readlink

    def denied(path):
        if str(path) == f"/proc/{pid}/cwd":
            raise PermissionError(path)
        return readlink(path)

    monkeypatch.setattr(resume.os, "readlink", denied)
    assert pid in resume.snakemake_processes(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_lock_is_removed_only_when_no_snakemake_runs_there(tmp_path, fake_snakemake, monkeypatch):
    calls = []
    monkeypatch.setattr(resume.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 0))
    busy, pid = fake_snakemake
    for folder in (busy, tmp_path / "idle"):
        (folder / ".snakemake" / "locks").mkdir(parents=True)
        (folder / ".snakemake" / "locks" / "0.input.lock").write_text("results/x\n")
    assert resume.unlock_if_stale(busy, ["-d", str(busy)]) == 0
    assert calls == []  # another Snakemake holds it: left alone
    assert resume.unlock_if_stale(tmp_path / "idle", ["-d", str(tmp_path / "idle"), "--cores", "2"]) == 0
    assert calls == [[*resume.SNAKEMAKE, "--unlock", "-d", str(tmp_path / "idle"), "--cores", "2"]]
    calls.clear()
    assert resume.unlock_if_stale(tmp_path, []) == 0 and calls == []  # no lock, nothing to do


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, alive = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stage = tmp_path / "results" / "tiny" / "collect"
        stage.mkdir(parents=True)
        (stage / f".harmful.last_token.parquet.tmp-{dead}").write_bytes(b"half")
        (stage / f".harmful.last_token.parquet.tmp-{alive.pid}").write_bytes(b"in progress")
        figures = tmp_path / "results" / "tiny" / "report" / f".figures.tmp-{dead}"
        figures.mkdir(parents=True)
        (figures / "a.png").write_bytes(b"png")
        (stage / "harmful.stats.parquet").write_bytes(b"done")
        removed = resume.remove_stale_temporaries(tmp_path / "results")
        assert sorted(p.name for p in removed) == [f".figures.tmp-{dead}", f".harmful.last_token.parquet.tmp-{dead}"]
        assert sorted(p.name for p in stage.iterdir()) == [f".harmful.last_token.parquet.tmp-{alive.pid}",
                                                           "harmful.stats.parquet"]
        assert not figures.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_write_removes_the_temporaries_a_killed_write_of_the_same_output_left(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".a.json.tmp-{dead}").write_text("{half")
    (tmp_path / f".b.json.tmp-{dead}").write_text("{other output")
    assert [p.name for p in stale_temporaries(tmp_path, "a.json")] == [f".a.json.tmp-{dead}"]
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.json.tmp-{dead}", "a.json"]


def test_no_rule_writes_an_output_by_shell_redirection():
    """A plain ``>`` into an output leaves it half-written when the job is killed; every output is
    written by the package under a temporary name instead (logs may be redirected)."""
    for rules in sorted((ROOT / "rules").glob("*.smk")):
        text = rules.read_text()
        assert not re.search(r">>?\s*\{output", text), rules.name
        assert "echo " not in text and "tee " not in text, rules.name


def test_the_make_targets_run_through_the_resuming_entry_point():
    make = (ROOT / "Makefile").read_text()
    for target in ("study", "quick"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", make, re.M).group(1)
        assert "$(RUN)" in recipe and "snakemake" not in recipe, target
    assert re.search(r"^RUN = \$\(BIN\)/python -m neuronaudit run ", make, re.M)
