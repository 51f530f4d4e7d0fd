"""scripts/slurm.sh on a real one-node Slurm: a job trains, requeues itself on the time-limit signal, and a
plain scancel ends it for good.

The fixture installs Debian's Slurm and munge and starts the daemons (tests/slurm_cluster.py); without
root or apt-get these tests skip, and in CI (CI=true) they fail instead. Four jobs of 2 CPU processes
each run side by side: one uninterrupted, one signalled as the time limit signals it (``scancel
--signal=TERM --batch``), one with the other common time-limit signal, SIGUSR1, submitted with
``--no-requeue``, and one cancelled with a plain ``scancel``.
The test-only fault plugin holds a job's processes at a known step until the signal arrives.

Slurm waits about 120 s before it starts a requeued job (the BeginTime it gives it); the test moves
that to 5 s from now (``scontrol update StartTime=now+5``) and prints how long each part took (``pytest -s``).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import FAULT_PLUGIN, ROOT, TINY, clean_env, read_json
from slurm_cluster import SlurmCluster, unavailable
from utils.runs.checkpoints import COMPLETE_MARKER

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster: the module's tests share one worker

FLAGS = [*TINY["clm"], "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--max_steps", "6",
         "--logging_steps", "1", "--max_train_samples", "24", "--max_eval_samples", "8", "--report_to", "none",
         "--disable_tqdm", "true", "--seed", "7", "--dataloader_num_workers", "2"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the tests on a real Slurm, but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:  # what was started, also when the start failed half-way
        cluster.stop()


class Job:
    """One sbatch of scripts/slurm.sh clm with its own output folder and log."""

    def __init__(self, slurm: SlurmCluster, folder, name: str, faults: str, *extra, sbatch=()):
        self.slurm, self.out, self.log = slurm, folder / name, folder / f"slurm-{name}.out"
        # No MASTER_PORT: the job's own, from its id (below the ports that connections take for themselves).
        env = clean_env(**slurm.env, NPROC_PER_NODE="2", DEVICE="cpu", AMP_FLAGS="", MODEL="", DATASET="",
                        PYTHON=sys.executable, PYTHONPATH=str(FAULT_PLUGIN), LM_FAULT_PLAN=faults)
        command = ["sbatch", "--parsable", *sbatch, "--nodes", "1", "--gpus-per-node", "0", "--time", "30",
                   "--output", str(self.log), str(ROOT / "scripts" / "slurm.sh"), "clm", *FLAGS, *extra,
                   "--output_dir", str(self.out)]
        self.id = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                                 timeout=60).stdout.strip()

    def state(self) -> dict:
        return self.slurm.job(self.id)

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        """Until both processes hold at ``step`` (the fault plugin's wait@STEP)."""
        reached = [self.out / f"reached-{step}-{rank}" for rank in (0, 1)]
        self._until(lambda: all(path.exists() for path in reached), f"step {step}", timeout)
        for path in reached:
            path.unlink()

    def wait_until(self, states: tuple, timeout: float = 600) -> dict:
        self._until(lambda: self.state()["JobState"] in states, " or ".join(states), timeout, ended=states)
        return self.state()

    def _until(self, condition, what: str, timeout: float, ended: tuple = ()) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            state = self.state()
            failed = {"FAILED", "TIMEOUT", "NODE_FAIL"} - {*ended}
            assert time.monotonic() < deadline and state["JobState"] not in failed, \
                f"job {self.id} did not reach {what}: {state}\n{self.text()[-4000:]}{self.slurm.logs()}"
            time.sleep(0.2)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def scancel(slurm, *args):
    subprocess.run(["scancel", *args], env={**os.environ, **slurm.env}, check=True, timeout=60)


@pytest.fixture(scope="module")
def jobs(slurm, text_files, tmp_path_factory):
    """The jobs, submitted together, signalled, and run to their end; with their timeline."""
    folder = tmp_path_factory.mktemp("jobs")
    data = ["--train_file", str(text_files["train"]), "--validation_file", str(text_files["valid"]), "--do_train",
            "--do_eval"]
    start = time.monotonic()
    timeline = {}

    def mark(event):
        timeline[event] = f"{time.monotonic() - start:.1f} s ({time.strftime('%H:%M:%S')})"

    plain = Job(slurm, folder, "plain", "", "--fsdp", *data)
    requeued = Job(slurm, folder, "requeued", "wait@2", "--fsdp", *data)
    cancelled = Job(slurm, folder, "cancelled", "wait@2", *data)
    usr1 = Job(slurm, folder, "usr1", "wait@2", *data, sbatch=["--no-requeue"])
    mark("submitted")

    cancelled.wait_for_step(2)
    scancel(slurm, cancelled.id)  # the user's stop: every process of the job gets SIGTERM
    usr1.wait_for_step(2)
    scancel(slurm, "--signal=USR1", "--batch", usr1.id)  # as --signal=B:USR1@N does before the time limit

    requeued.wait_for_step(2)
    mark("requeued: at step 2, scancel --signal=TERM --batch")
    scancel(slurm, "--signal=TERM", "--batch", requeued.id)  # as --signal=B:TERM@N does before the time limit
    pending = requeued.wait_until(("PENDING",))
    mark(f"requeued: pending (Restarts={pending['Restarts']}, Reason={pending['Reason']}, "
         f"StartTime={pending['StartTime']})")
    # Instead of Slurm's requeue delay; a few seconds still: slurmd refuses a start within the second its
    # previous run's credential was revoked ("Job credential revoked").
    slurm.scontrol("update", f"jobid={requeued.id}", "StartTime=now+5")
    requeued.wait_until(("RUNNING",))
    mark("requeued: running again")

    everyone = (plain, requeued, cancelled, usr1)
    ended = {job.id: job.wait_until(("COMPLETED", "CANCELLED", "FAILED")) for job in everyone}
    mark("all jobs ended")
    for job in everyone:
        state = ended[job.id]
        timeline[f"{job.log.stem} ended"] = f"{state['JobState']} {state['ExitCode']}, Restarts={state['Restarts']}"
    print("Slurm job timeline:", json.dumps(timeline, indent=1))  # pytest -s shows it
    return {"plain": plain, "requeued": requeued, "cancelled": cancelled, "usr1": usr1, "ended": ended,
            "timeline": timeline}


def test_a_slurm_job_trains_on_two_processes_and_writes_its_results(jobs):
    plain = jobs["plain"]
    state = jobs["ended"][plain.id]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), state
    assert read_json(plain.out / "run_info.json")["world_size"] == 2
    assert read_json(plain.out / "trainer_state.json")["global_step"] == 6
    assert "eval_loss" in read_json(plain.out / "eval_results.json")
    assert "| gpt2 | 2p |" in (plain.out / "train.log").read_text()


def test_the_time_limit_signal_requeues_the_job_which_resumes_to_the_same_weights(jobs):
    plain, requeued = jobs["plain"], jobs["requeued"]
    state = jobs["ended"][requeued.id]
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), state
    log = requeued.text()
    # The stop, the requeue and the restart, in the one output file that Slurm appended to.
    assert "slurm: SIGTERM received (the time limit is near" in log, log[-4000:]
    assert f"requeueing job {requeued.id}" in log and "start 2 of this job (requeued)" in log
    train_log = (requeued.out / "train.log").read_text()
    assert f"Resuming from {requeued.out}/checkpoint-2" in train_log
    # Every process got Slurm's signal, DataLoader workers too: each rank saved once.
    assert train_log.count("saving a checkpoint at step 2") == 2, train_log[-4000:]
    assert "killed by signal" not in train_log and "Traceback" not in train_log
    assert (requeued.out / "model.safetensors").read_bytes() == (plain.out / "model.safetensors").read_bytes()
    assert read_json(requeued.out / "eval_results.json")["eval_loss"] == read_json(plain.out / "eval_results.json")[
        "eval_loss"]


def test_the_other_time_limit_signal_sigusr1_stops_too_and_no_requeue_opts_out(jobs):
    usr1 = jobs["usr1"]
    state = jobs["ended"][usr1.id]
    # Stopped with its work saved, and left for the user: Slurm sees the launcher's 143.
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "143:0", "0"), state
    log = usr1.text()
    assert "slurm: SIGUSR1 received (the time limit is near" in log, log[-4000:]
    assert "not requeued (--no-requeue): submit the same command again to resume" in log
    assert (usr1.out / "checkpoint-2" / COMPLETE_MARKER).is_file()


def test_a_plain_scancel_saves_and_is_not_requeued(jobs):
    cancelled = jobs["cancelled"]
    state = jobs["ended"][cancelled.id]
    assert (state["JobState"], state["Restarts"]) == ("CANCELLED", "0"), state
    assert (cancelled.out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    log = cancelled.text()
    assert "the job is not requeued" in log, log[-3000:]
    assert "requeueing" not in log and "Invalid job id" not in log
    assert "stopped: SIGTERM received; saved" in (cancelled.out / "train.log").read_text()
