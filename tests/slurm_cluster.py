"""A one-node Slurm cluster on localhost for the slurm-profile test: munged, slurmctld and slurmd
with a config written into a temporary folder, started and stopped by :func:`local_cluster`.

Debian's ``slurm-wlm`` and ``munge`` are installed when they are missing and the test runs as
root (as CI does); :func:`start` raises :class:`ClusterUnavailable` with the reason when the
cluster cannot come up, and the test skips with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

NODE = "na-node"
PARTITION = "debug"
PACKAGES = ("slurm-wlm", "munge")


class ClusterUnavailable(RuntimeError):
    """The local cluster cannot run here; the message says why."""


def _run(cmd: list[str], timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def install() -> None:
    """Install slurm-wlm and munge with apt when a binary is missing (root only)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("slurm-wlm and munge are not installed and apt-get cannot run as root here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        run = _run(cmd, env=env)
        if run.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {run.stderr.strip()[-300:]}")


#: The executor plugin, installed beside the cluster (never into the environment: with the plugin
#: importable, snakemake stops at start-up on machines without squeue or sacct).
PLUGINS = ("snakemake-executor-plugin-slurm==2.8.0", "snakemake-executor-plugin-slurm-jobstep==0.6.1",
           "throttler==1.2.2")


def install_plugin(folder: Path) -> Path:
    """pip-install the Slurm executor plugin into ``folder`` (put it on PYTHONPATH to use it)."""
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    run = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder), *PLUGINS])
    if run.returncode != 0:
        raise ClusterUnavailable(f"the Slurm executor plugin cannot be installed: {run.stderr.strip()[-300:]}")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Where Slurm's commands look for their config when SLURM_CONF is not set (srun inside a batch
#: job does not always see it); the test cluster writes its config there only when the file is
#: absent or its own (first line :data:`MARK`).
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MARK = "# neuronaudit test cluster (tests/slurm_cluster.py); removed when the test ends"


def write_config(folder: Path, cpus: int, memory_mb: int) -> Path:
    """slurm.conf of a one-node cluster whose state, spool, logs and pid files live in ``folder``;
    no accounting, no cgroups, finished jobs listed by squeue for an hour (MinJobAge)."""
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""{MARK}
ClusterName=neuronaudit
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.8)
    return 4000


def _munge_running() -> bool:
    return _run(["munge", "-n"], timeout=30).returncode == 0 if shutil.which("munge") else False


@contextlib.contextmanager
def local_cluster(folder: Path) -> Iterator[dict[str, str]]:
    """Start munged (unless one runs), slurmctld and slurmd; yield the environment that points
    Slurm's clients at this cluster (SLURM_CONF); stop the daemons afterwards."""
    install()
    folder.mkdir(parents=True, exist_ok=True)
    if SYSTEM_CONF.exists() and not SYSTEM_CONF.read_text(errors="replace").startswith(MARK):
        raise ClusterUnavailable(f"{SYSTEM_CONF} belongs to a real cluster here; the test does not touch it")
    conf = write_config(folder, os.cpu_count() or 2, _memory_mb())
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(conf, SYSTEM_CONF)
    plugin = install_plugin(folder / "plugin")
    env = dict(os.environ, SLURM_CONF=str(SYSTEM_CONF),
               PYTHONPATH=os.pathsep.join(p for p in (str(plugin), os.environ.get("PYTHONPATH", "")) if p))
    started: list[subprocess.Popen] = []
    try:
        if not _munge_running():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            run = _run(["munged", "--force"], timeout=60)
            if run.returncode != 0 or not _munge_running():
                raise ClusterUnavailable(f"munged does not start: {run.stderr.strip()[-300:]}")
        for daemon in (["slurmctld", "-D", "-f", str(conf)], ["slurmd", "-D", "-N", NODE, "-f", str(conf)]):
            started.append(subprocess.Popen(daemon, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(2)
        deadline = time.time() + 60
        while time.time() < deadline:
            info = _run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=30, env=env)
            if info.returncode == 0 and info.stdout.split()[1:2] and info.stdout.split()[1] in ("idle", "mix", "alloc"):
                break
            if any(p.poll() is not None for p in started):
                break
            time.sleep(1)
        else:
            info = None
        if info is None or info.returncode != 0 or "idle" not in info.stdout:
            logs = " | ".join((folder / f).read_text()[-400:] for f in ("slurmctld.log", "slurmd.log")
                              if (folder / f).is_file())
            raise ClusterUnavailable(f"the one-node cluster did not come up ({info.stdout.strip() if info else ''}"
                                     f"{info.stderr.strip() if info else ''}): {logs}")
        yield env
    finally:
        for p in reversed(started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if SYSTEM_CONF.is_file() and SYSTEM_CONF.read_text(errors="replace").startswith(MARK):
            SYSTEM_CONF.unlink()


def submitted_jobs(folder: Path) -> list[str]:
    """The batch jobs slurmctld accepted, from its log (this cluster keeps no accounting)."""
    log = (folder / "slurmctld.log").read_text(errors="replace")
    return sorted(set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", log)), key=int)
