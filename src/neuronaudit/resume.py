"""Run the workflow so that it resumes after any interruption, a SIGKILL included.

``neuronaudit run [snakemake arguments]`` (what ``make study`` and ``make quick`` call) runs
Snakemake with ``--rerun-incomplete`` after two clean-ups a killed run makes necessary:

* **The stale lock.** Snakemake locks its working directory (``.snakemake/locks/``) while it
  runs and removes the lock when it exits; a killed Snakemake cannot, and every later run then
  stops with ``LockException``. The lock files do not record who holds them, so the lock is
  removed (``snakemake --unlock`` with the same arguments) only when no Snakemake process is
  running in the same working directory: on Linux the processes are read from ``/proc`` (command
  line and working directory of each, this process and its parents left out; a Snakemake whose
  working directory cannot be read, another user's, counts as running here). Where ``/proc`` is
  absent the lock is left alone and the run says how to remove it by hand.
* **Temporaries of killed writes.** Every output is written under ``.<name>.tmp-<pid>`` and
  renamed when complete (:func:`neuronaudit.io.atomic_path`); a killed job leaves its temporary
  behind. Those whose process no longer runs are removed from ``results/``.

Outputs a killed job had begun are marked incomplete by Snakemake and are redone
(``--rerun-incomplete``); finished outputs are kept, so nothing finished is redone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from neuronaudit.io import remove_path, stale_temporaries

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def working_directory(args: list[str], cwd: Path | None = None) -> Path:
    """The working directory Snakemake will run in: ``-d``/``--directory`` or the current one."""
    cwd = Path(cwd or os.getcwd())
    for k, arg in enumerate(args):
        if arg in ("-d", "--directory") and k + 1 < len(args):
            return (cwd / args[k + 1]).resolve()
        if arg.startswith("--directory="):
            return (cwd / arg.split("=", 1)[1]).resolve()
    return cwd.resolve()


def is_snakemake(argv: list[str]) -> bool:
    """Whether a command line runs Snakemake (``snakemake ...`` or ``python -m snakemake ...``)."""
    for k, arg in enumerate(argv):
        if os.path.basename(arg) == "snakemake":
            return True
        if arg == "-m" and k + 1 < len(argv) and argv[k + 1] == "snakemake":
            return True
    return False


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state letter


def _lineage(pid: int) -> set[int]:
    out = set()
    while pid and pid not in out:
        out.add(pid)
        pid = _parent(pid)
    return out


def snakemake_processes(directory: Path) -> list[int] | None:
    """PIDs of the Snakemake processes running in ``directory`` (``None``: cannot tell here)."""
    proc = Path("/proc")
    if not (proc / "self" / "cmdline").exists():
        return None
    directory = Path(directory).resolve()
    mine = _lineage(os.getpid())
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:  # gone meanwhile
            continue
        if not is_snakemake(argv):
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except PermissionError:  # another user's Snakemake: it may run here, so it counts
            found.append(int(entry.name))
            continue
        except OSError:
            continue
        # Snakemake changes into its -d directory; before it has, -d names it
        if directory in (cwd.resolve(), working_directory(argv[1:], cwd)):
            found.append(int(entry.name))
    return sorted(found)


def stale_lock_files(directory: Path) -> list[Path]:
    return sorted((Path(directory) / ".snakemake" / "locks").glob("*.lock"))


def remove_stale_temporaries(results: Path) -> list[Path]:
    """Remove the temporaries of writes whose process is gone, anywhere under ``results``."""
    removed = []
    for folder, dirs, _ in os.walk(results):
        for stale in stale_temporaries(folder):
            remove_path(stale)
            removed.append(stale)
            if stale.name in dirs:
                dirs.remove(stale.name)
    return removed


def unlock_if_stale(directory: Path, args: list[str]) -> int:
    """Remove a lock left by a killed Snakemake (see the module docstring); 0 unless
    ``snakemake --unlock`` itself failed."""
    if not stale_lock_files(directory):
        return 0
    others = snakemake_processes(directory)
    if others is None:
        print(f"neuronaudit: {directory} is locked and this system cannot list its processes; if no other "
              "Snakemake runs there, remove the lock with `snakemake --unlock`", file=sys.stderr)
        return 0
    if others:
        print(f"neuronaudit: another Snakemake runs in {directory} (pid {', '.join(map(str, others))}); "
              "its lock stays", file=sys.stderr)
        return 0
    print(f"neuronaudit: removing the lock a killed run left in {directory}/.snakemake/locks", file=sys.stderr)
    return subprocess.run([*SNAKEMAKE, "--unlock", *args]).returncode


def run(args: list[str]) -> int:
    """Clean up after a killed run, then run Snakemake with ``args`` (replacing this process)."""
    directory = working_directory(args)
    code = unlock_if_stale(directory, args)
    if code:
        return code
    removed = remove_stale_temporaries(directory / "results")
    if removed:
        print(f"neuronaudit: removed {len(removed)} temporaries of killed writes under {directory}/results",
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*SNAKEMAKE, "--rerun-incomplete", *args])
    return 0  # not reached
