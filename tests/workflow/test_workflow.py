"""The whole Snakemake DAG on a tiny random model: runs, resumes after a SIGKILL through `make
study`, and refuses bad input early."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from tiny_study import TINY_STUDY

from neuronaudit.io import read_provenance
from neuronaudit.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
HOSTILE_TITLE = "$(touch MARKER) `touch MARKER` ; touch MARKER <script>window.__t = 1</script> {study}"
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def snakemake(workdir: Path, *args: str, overrides: Path | None = None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    cmd += ["--configfile", str(ROOT / "config" / "config.yaml")] + ([str(overrides)] if overrides else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("study")
    overrides = work / "tiny.yaml"
    overrides.write_text(yaml.safe_dump({
        **TINY_STUDY,
        "model": {"source": str(tiny_model_dir)},
        # a hostile report title (the study's free-text description): quoted, never run, escaped on the page
        "report": {"title": HOSTILE_TITLE},
    }))
    # an interrupted run: only one stage of one prompt set finished
    first = snakemake(work, "results/tiny/collect/harmful.stats.parquet", overrides=overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    first_mtime = (work / "results/tiny/collect/harmful.stats.parquet").stat().st_mtime_ns
    # then the whole study through `make study`, killed with SIGKILL in the middle of the window rule
    killed = make_study(work, overrides)
    window_log = work / "results/tiny/logs/window/window.log"
    while not window_log.exists() and killed.poll() is None:
        time.sleep(0.2)
    assert killed.poll() is None, killed.communicate()[1][-3000:]
    started = time.time_ns()
    time.sleep(5)  # the window job is loading the model or sweeping
    # outputs finished well before the window began (jobs of other stages may still be running)
    finished = {p: p.stat().st_mtime_ns for stage in ("prompts", "collect", "screen", "tune")
                for p in (work / "results/tiny" / stage).iterdir()
                if not p.name.startswith(".") and p.is_file() and p.stat().st_mtime_ns < started - 2_000_000_000}
    os.killpg(killed.pid, signal.SIGKILL)  # make, Snakemake and the running jobs
    killed.wait()
    assert list((work / ".snakemake/locks").glob("*.lock"))  # the lock the killed run could not remove
    plain = snakemake(work, "--rerun-incomplete", overrides=overrides)  # what `make study` used to run
    assert plain.returncode != 0 and "LockException" in plain.stdout + plain.stderr
    resumed = make_study(work, overrides)
    out, err = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0, err[-3000:]
    return work, overrides, first_mtime, (finished, out + err)


def make_study(work: Path, overrides: Path) -> subprocess.Popen:
    """``make study`` on the tiny study in ``work`` (this interpreter's environment, nothing installed),
    in its own process group."""
    return subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(ROOT), "study", "INSTALL=", f"BIN={Path(sys.executable).parent}",
         f"STUDY_CONFIG={ROOT / 'config' / 'config.yaml'} {overrides}",
         f"SNAKEMAKE_ARGS=-s {ROOT / 'Snakefile'} -d {work}", "CORES=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def test_a_hostile_report_title_runs_nothing_and_is_shown_escaped(tiny_study):
    work, _, _, _ = tiny_study
    assert not (work / "MARKER").exists()  # no shell ran the title
    page = (work / "results/tiny/report/index.html").read_text()
    assert "<script>window.__t = 1</script>" not in page
    assert "&lt;script&gt;window.__t = 1&lt;/script&gt;" in page


def test_whole_dag_writes_report_and_every_table(tiny_study):
    work, _, _, _ = tiny_study
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (base_dir,) = (work / "results/models").glob("local-model-*")  # keyed by the source's resolved path
    base = yaml.safe_load((base_dir / "manifest.json").read_text())
    manifest = yaml.safe_load((work / "results/tiny/tune/manifest.json").read_text())
    assert manifest["weight_sha256"] != base["weight_sha256"]  # the audited model is the tuned copy
    for name in config["prompts"]["sets"]:
        stats = work / f"results/tiny/collect/{name}.stats.parquet"
        prov = read_provenance(stats)
        assert prov["weight_sha256"] == manifest["weight_sha256"]
        assert prov["prompt_set"] == name and prov["n_prompts"] == 6  # limit 3 per split
        assert (work / f"results/tiny/collect/{name}.last_token.parquet").is_file()
        assert (work / f"results/tiny/benchmarks/collect/{name}.tsv").is_file()
    html = (work / "results/tiny/report/index.html").read_text()
    assert "harmful" in html and manifest["weight_sha256"] in html and "MISMATCH" not in html
    for section in ("Refusal: reference model", "Contrastive screening", "CNA circuit ablation", "Keystone neurons",
                    "Control window", "Gradient versus forward attribution"):
        assert section in html
    for table in ("refusal/evaluation.json", "refusal/fractions.parquet", "screen/refusal.circuit.parquet",
                  "screen/operator.scores.parquet", "cna/summary.parquet", "keystone/curve.parquet",
                  "window/window.parquet", "window/summary.json", "attribution/summary.json"):
        assert (work / "results/tiny" / table).is_file(), table
    assert not list(work.rglob(".*.tmp-*"))  # no half-written files anywhere


def test_marked_preconditions_reach_the_report_and_the_sufficient_stage_runs(tiny_study):
    work, _, _, _ = tiny_study
    doc = json.loads((work / "results/tiny/preconditions.json").read_text())
    names = {(p["name"], p["scope"]) for p in doc["preconditions"]}
    assert ("tokenizer_coverage", "set:harmful") in names and ("judge_accuracy", "judge") in names
    assert ("behaviour_on_positive", "behaviour:refusal") in names
    html = (work / "results/tiny/report/index.html").read_text()
    assert "Audit preconditions" in html
    if doc["failed"]:  # a random tiny model shows no behaviour: its figures are marked, not shown
        assert "not meaningful: precondition failed" in html
    summary = json.loads((work / "results/tiny/sufficient/summary.json").read_text())
    assert set(summary["tasks"]) == {"sentiment", "capitals", "format"}
    assert "Sufficient neuron sets" in html


def test_a_model_that_cannot_spell_the_prompts_stops_at_its_preconditions(tmp_path):
    model = save_tiny_model(tmp_path / "narrow", vocabulary="narrow")
    overrides = tmp_path / "narrow.yaml"
    overrides.write_text(yaml.safe_dump({
        "study": "narrow", "threads": 1, "model": {"source": str(model)}, "prompts": {"limit": 2},
        "refusal": {"tune": False}, "preconditions": {"n_prompts": 4},
    }))
    run = snakemake(tmp_path, "results/narrow/screen/refusal.scores.parquet", overrides=overrides)
    assert run.returncode != 0
    line = next(x for x in run.stderr.splitlines() if x.startswith("neuronaudit: error: screen not run: precondition"))
    assert "tokenizer_coverage [set:" in line and "% of the" in line and "'<unk>'" in line
    recorded = json.loads((tmp_path / "results/narrow/preconditions.json").read_text())
    assert recorded["on_fail"] == "stop" and any(f["name"] == "tokenizer_coverage" for f in recorded["failed"])
    assert not list((tmp_path / "results/narrow/screen").glob("*.parquet"))  # the stage that reads it never ran


def test_resumed_run_did_not_redo_finished_steps(tiny_study):
    work, overrides, first_mtime, (finished, log) = tiny_study
    assert (work / "results/tiny/collect/harmful.stats.parquet").stat().st_mtime_ns == first_mtime
    assert len(finished) > 20 and all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert "removing the lock a killed run left" in log
    rules = set(re.findall(r"^(?:local)?rule (\w+):", log, re.M))
    assert "report" in rules and not rules & {"screen", "tune_refusal"}  # both finished before the window began
    assert not list((work / ".snakemake/locks").glob("*.lock"))
    again = snakemake(work, "-n", overrides=overrides)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_studies_of_the_same_base_data_and_recipe_share_one_tuned_model(tiny_study):
    work, overrides, _, _ = tiny_study
    tuned = list((work / "results/models").glob("*/tuned-*/manifest.json"))
    assert len(tuned) == 1
    weights = Path(json.loads(tuned[0].read_text())["path"])
    assert weights.parent == tuned[0].parent.resolve() and (weights / "config.json").is_file()
    # the study audits that model: its tune/manifest.json is a copy of the shared one
    assert json.loads((work / "results/tiny/tune/manifest.json").read_text()) == json.loads(tuned[0].read_text())
    base = yaml.safe_load(overrides.read_text())

    def plan(**changes):
        other = work / "other.yaml"
        other.write_text(yaml.safe_dump({**base, "study": "tiny-other", **changes}))
        run = snakemake(work, "-n", overrides=other)
        assert run.returncode == 0, run.stderr[-3000:]
        return set(re.findall(r"^(?:local)?rule (\w+):", run.stdout + run.stderr, re.M))

    # another study that only reads the tuned model differently: no tuning, a copy of the manifest
    jobs = plan(window={**base["window"], "n_prompts": 3})
    assert "use_tuned_model" in jobs and "screen" in jobs and "tune_refusal" not in jobs
    # another recipe is another tuned model
    assert "tune_refusal" in plan(refusal={**base["refusal"], "steps": 3})


def test_a_rerun_in_another_folder_gives_the_same_tables(tiny_study, tmp_path):
    """Determinism: the tiny study run from scratch into a second folder (and without the kill the
    first went through) equals the first value for value: `neuronaudit diff-study` with zero
    tolerance, which leaves out run provenance, wall-clock fields, absolute paths, logs, benchmarks
    and the rendered report."""
    work, overrides, _, _ = tiny_study
    again = tmp_path / "again"
    again.mkdir()
    run = snakemake(again, overrides=overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    diff = subprocess.run([sys.executable, "-m", "neuronaudit", "diff-study", str(work / "results/tiny"),
                           str(again / "results/tiny"), "--rtol", "0", "--atol", "0"],
                          capture_output=True, text=True, timeout=600)
    assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr[-2000:]
    assert re.search(r"(\d+) files compared, 0 differ", diff.stdout), diff.stdout[-500:]
    assert int(re.search(r"(\d+) files compared", diff.stdout)[1]) > 40


def test_snakemake_report_shows_the_figures_under_one_category_per_stage(tiny_study, tmp_path):
    work, overrides, _, _ = tiny_study
    figures = work / "results/tiny/report/figures"
    entries = json.loads((figures / "manifest.json").read_text())["figures"]
    stages = {e["stage"] for e in entries}
    assert {"refusal", "screen", "cna", "keystone", "window", "attribution", "activations"} <= stages
    for e in entries:  # the figure files are the images embedded in the page
        png = (figures / e["file"]).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert e["caption"] and e["tables"]
        for table in e["tables"].values():
            assert (work / "results/tiny" / table).is_file(), table
    archive = tmp_path / "report.zip"
    run = snakemake(work, "--report", str(archive), overrides=overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        text = "\n".join(z.read(n).decode("utf-8", "replace") for n in names if n.endswith((".js", ".html", ".json")))
    for e in entries:
        assert any(n.endswith(f"/{e['file']}") for n in names), e["file"]
        assert f'"{e["stage_title"]}": {{' in text  # the figure's category: its stage
        assert f"stage={e['stage']}, figure={e['name']}" in text
        words = " ".join(e["caption"].split()[:3])
        assert words in text or json.dumps(words)[1:-1] in text  # its own caption
    assert any(n.endswith("/index.html") for n in names)  # the audit page, category "Audit page"
    # the html report embeds the same figures
    page = tmp_path / "report.html"
    run = snakemake(work, "--report", str(page), overrides=overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    html = page.read_text()
    for e in entries:
        assert e["stage_title"] in html and Path(e["file"]).name in html
    assert re.search(r"Audit page", html)


def test_dry_run_shows_the_whole_dag_and_lint_is_clean(tmp_path):
    dry = snakemake(tmp_path, "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    for rule in ("prepare_model", "prepare_prompts", "collect_activations", "report"):
        assert rule in dry.stdout
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, lint.stdout[-2000:]


@pytest.mark.parametrize(
    "config, message",
    [
        ("colect={batch_size: 2}",
         "neuronaudit: error: config key (top level): Additional properties are not allowed ('colect' was unexpected)"),
        ("collect={batch_size: many}",
         "neuronaudit: error: config key collect.batch_size: 'many' is not an integer ≥ 1 or 'auto'"),
        ("model={source: /no/such/model}", "neuronaudit: error: model.source '/no/such/model' not found"),
    ],
)
def test_bad_config_fails_before_any_job_with_one_line(tmp_path, config, message):
    run = snakemake(tmp_path, "--config", config)
    assert run.returncode != 0
    lines = [l for l in (run.stdout + run.stderr).splitlines() if l.startswith("neuronaudit: error:")]
    assert len(lines) == 1 and lines[0].startswith(message), run.stderr[-2000:]
    assert not (tmp_path / "results").exists()
