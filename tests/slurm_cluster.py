"""A real one-node Slurm for the tests: Debian's slurmctld, slurmd and munge, started and stopped here.

``SlurmCluster(folder).start()`` installs the packages with apt-get when they are missing, writes a
slurm.conf for this host into ``folder`` (state, spool, logs and pid files there too), starts
munged (unless one already runs), slurmctld and slurmd, and waits until the node takes jobs.
``env`` is what a client needs (``SLURM_CONF``); ``stop()`` cancels what is left and ends the
daemons it started. ``unavailable()`` says why it cannot run here (not root, no apt-get), or None.

What it takes on a machine without systemd or cgroups: munged needs /run/munge, owned by the munge
user; NodeName and SlurmctldHost are the host's own short name (``slurmd -C`` prints the node's
line); process tracking by /proc (proctrack/linuxproc) and no task plugin, since there are no
cgroups to use.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MUNGE_SOCKET_DIR = Path("/run/munge")


def unavailable() -> str | None:
    """Why a real Slurm cannot be started here, or None."""
    if os.geteuid() != 0:
        return "installing and starting Slurm's daemons needs root"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "apt-get is missing (Debian's slurmctld, slurmd, slurm-client and munge packages are used)"
    return None


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {process.stderr[-2000:]}")
    return process


class SlurmCluster:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []
        self._munged_pid: int | None = None

    # ------------------------------------------------------------------ start

    def start(self) -> SlurmCluster:
        self._install()
        self._start_munged()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):  # in the foreground (-D): this object owns them
            with open(self.folder / f"{daemon}.out", "w") as log:
                self._daemons.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True))
        self._wait_for_node()
        return self

    def _install(self) -> None:
        if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
            return
        noninteractive = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run("apt-get", "update", env=noninteractive)
        _run("apt-get", "install", "-y", "--no-install-recommends", *PACKAGES, env=noninteractive)

    def _start_munged(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # one already runs: use it, and leave it running
        MUNGE_SOCKET_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run("runuser", "-u", "munge", "--", "mungekey", "--create")
        _run("runuser", "-u", "munge", "--", "munged")  # it forks into the background
        self._munged_pid = int((MUNGE_SOCKET_DIR / "munged.pid").read_text())

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        # The node as slurmd sees it (CPUs, sockets, memory), its first line only.
        node = _run("slurmd", "-C").stdout.splitlines()[0]
        state = self.folder / "state"
        spool = self.folder / "spool"
        for path in (state, spool):
            path.mkdir(exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=lmtest",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}",
            f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay visible to scontrol show job
            node,
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ]))

    def _wait_for_node(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for daemon in self._daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[0]} exited with {daemon.returncode}: {self.logs()}")
            state = self.scontrol("show", "node", check=False)
            if re.search(r"State=IDLE\b", state):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not become idle in {timeout:.0f} s: {self.logs()}")

    # ------------------------------------------------------------------ use

    def scontrol(self, *args, check: bool = True) -> str:
        process = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, **self.env})
        if check and process.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {process.stderr.strip()}")
        return process.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...), the first value of each."""
        fields = {}
        for word in self.scontrol("show", "job", "-o", job_id).split():
            name, _, value = word.partition("=")
            fields.setdefault(name, value)
        return fields

    def logs(self) -> str:
        text = ""
        for name in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = self.folder / name
            if path.exists():
                text += f"\n--- {name}\n" + path.read_text(errors="replace")[-3000:]
        return text

    # ------------------------------------------------------------------ stop

    def _cancel_all(self, timeout: float = 90) -> None:
        """Cancel every job left and wait until they are gone: their processes end with slurmd's help."""
        env = {**os.environ, **self.env}
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = subprocess.run(["squeue", "--noheader", "--states", "RUNNING,COMPLETING,PENDING"], env=env,
                                  capture_output=True, text=True, timeout=60).stdout
            if not left.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        if self._daemons and self._daemons[0].poll() is None:
            self._cancel_all()
        for daemon in reversed(self._daemons):
            daemon.terminate()
        for daemon in self._daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if self._munged_pid is not None:
            try:
                os.kill(self._munged_pid, 15)
            except ProcessLookupError:
                pass
