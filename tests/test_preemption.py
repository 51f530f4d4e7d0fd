"""Stops and crashes under the launchers, sent the way terminals and schedulers send them.

Two CPU processes through scripts/train_clm_8p.sh (torchrun, gloo). A stop signal goes to the
launcher's whole process group (Ctrl+C, ``timeout``, Slurm); an elastic restart follows a worker
killed by SIGKILL. Every run, however often it was interrupted, must end with the same model and
evaluation as the uninterrupted one. The test-only fault plugin (tests/fault_plugin) holds the
processes at a known step until the signal arrives, so that the runs are deterministic.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

from conftest import ROOT, TINY, read_json
from conftest import FAULT_PLUGIN, free_port
from utils.runs.checkpoints import COMPLETE_MARKER

# 12 samples of 64 tokens, 2 per process and step: 3 steps per epoch, 6 steps in all.
FLAGS = [*TINY["clm"], "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--max_steps", "6",
         "--save_steps", "2", "--logging_steps", "1", "--max_train_samples", "12", "--max_eval_samples", "8",
         "--report_to", "none", "--disable_tqdm", "true", "--seed", "7"]


def start(out, text_files, faults="", *extra, **env):
    """The 2-process launcher, in a session (and process group) of its own, as a terminal starts it."""
    environment = {**os.environ, "NPROC_PER_NODE": "2", "DEVICE": "cpu", "AMP_FLAGS": "", "MODEL": "", "DATASET": "",
                   "MASTER_PORT": str(free_port()), "PYTHON": sys.executable, "LM_FAULT_PLAN": faults,
                   "PYTHONPATH": str(FAULT_PLUGIN), **env}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "OUTPUT_DIR", "NODE_RANK", "NNODES"):
        environment.pop(name, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["bash", str(ROOT / "scripts" / "train_clm_8p.sh"), *FLAGS, *extra, "--train_file",
               str(text_files["train"]), "--validation_file", str(text_files["valid"]), "--output_dir", str(out)]
    stderr = open(out.parent / f"{out.name}.stderr", "a")
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=stderr,
                            start_new_session=True)


def finish(process, timeout=600) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def wait_for(paths, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert process.poll() is None, f"the run ended with {process.returncode} before reaching its stop"
        assert time.monotonic() < deadline, "the run did not reach its stop in time"
        time.sleep(0.1)
    for path in paths:
        path.unlink()


def assert_same_results(out, expected):
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    for key in ("eval_loss", "eval_accuracy"):
        assert read_json(out / "eval_results.json")[key] == read_json(expected / "eval_results.json")[key]


@pytest.fixture(scope="module")
def uninterrupted(text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("launcher") / "out"
    assert finish(start(out, text_files)) == 0, (out.parent / "out.stderr").read_text()[-3000:]
    return out


def test_group_signals_checkpoint_every_rank_and_resume_to_the_same_result(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    stops = [(signal.SIGTERM, 2, ["--dataloader_num_workers", "1"]), (signal.SIGINT, 4, [])]
    for sig, step, loaders in stops:
        process = start(out, text_files, f"wait@{step}", *loaders)
        wait_for([out / f"reached-{step}-{rank}" for rank in (0, 1)], process)
        os.killpg(process.pid, sig)  # the launcher, its tee, torchrun: the whole group
        status = finish(process)
        log = (out / "train.log").read_text()
        assert status == 128 + sig, log[-3000:]
        assert "Traceback" not in log and "BrokenPipeError" not in log
        # Both ranks say so, in the log that tee wrote to the end.
        assert log.count(f"stopped: {sig.name} received; saved {out}/checkpoint-{step} at step {step}") == 2
        assert (out / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / f"checkpoint-{step}"))
        assert not (out / "model.safetensors").exists()
        stderr = (tmp_path / "out.stderr").read_text().strip().splitlines()
        assert stderr[-1].startswith(f"stopped: run_clm.py (exit {128 + sig}): {sig.name} received; saved ")

    assert finish(start(out, text_files)) == 0, (tmp_path / "out.stderr").read_text()[-3000:]
    assert f"Resuming from {out}/checkpoint-4" in (out / "train.log").read_text()
    assert_same_results(out, uninterrupted)


def test_a_killed_worker_restarts_the_group_which_resumes_by_itself(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    # SIGKILL to rank 1 at the end of step 3 (after checkpoint-2), in the first attempt only.
    status = finish(start(out, text_files, "kill@3/1", MAX_RESTARTS="1"))
    log = (out / "train.log").read_text()
    assert status == 0, log[-4000:]
    assert f"Resuming from {out}/checkpoint-2" in log
    assert_same_results(out, uninterrupted)


def test_a_worker_killed_by_a_stop_signal_never_reports_a_saved_checkpoint():
    from utils.launch import torchrun

    assert torchrun.exit_status(143) == 143 and torchrun.exit_status(2) == 2  # the worker's own status
    assert torchrun.exit_status(-signal.SIGTERM) == 1 and torchrun.exit_status(-signal.SIGINT) == 1
    assert torchrun.exit_status(-signal.SIGKILL) == 137


@pytest.mark.parametrize("whom, workers", [("group", 1), ("every process", 3)])
def test_a_plain_run_with_dataloader_workers_checkpoints_on_a_sigterm(whom, workers, text_files, tmp_path):
    """``python run_clm.py --dataloader_num_workers N`` stopped by SIGTERM: ``timeout`` signals its process
    group, systemd, Slurm and Kubernetes every process of it one by one, the loader workers too.

    The signal comes while training runs (after its first logged step), when the workers are busy
    loading batches: they must ignore it, since a worker's death would end the run with status 1.
    """
    out, log = tmp_path / "out", tmp_path / "run.log"
    command = [sys.executable, str(ROOT / "run_clm.py"), *FLAGS, "--max_steps", "2000", "--save_steps", "1000",
               "--dataloader_num_workers", str(workers), "--do_train", "--train_file", str(text_files["train"]),
               "--output_dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LM_FAULT_PLAN")}
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 300
    while "'loss'" not in log.read_text(errors="replace"):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps on, the workers loading the next batches
    if whom == "group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        deadline = time.monotonic() + 60  # between epochs the loader's workers are started anew
        while len(loaders := psutil.Process(process.pid).children(recursive=True)) < workers:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        for pid in [process.pid, *(child.pid for child in loaders)]:
            os.kill(pid, signal.SIGTERM)
    status = finish(process)
    text = log.read_text(errors="replace")
    assert status == 128 + signal.SIGTERM, text[-3000:]
    assert "killed by signal" not in text
    checkpoints = [path for path in out.glob("checkpoint-*") if (path / COMPLETE_MARKER).is_file()]
    assert len(checkpoints) == 1 and "stopped: SIGTERM received; saved" in text


def test_a_stop_signal_that_interrupts_torchruns_poll_still_waits_for_the_workers():
    """torchrun's handler waits for each worker's checkpoint; the signal may come while torchrun polls that worker.

    ``Popen.poll`` holds the Popen's lock then: waiting with ``Popen.wait`` in the handler would block
    forever, leaving torchrun hung and its ended workers unreaped.
    """
    from torch.distributed.elastic.multiprocessing import SignalException

    from utils.launch import torchrun

    worker = subprocess.Popen([sys.executable, "-c", "import signal, sys\n"
                               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\nprint('ready', flush=True)\n"
                               "signal.pause()"], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline() == "ready\n"
    torchrun._workers[:] = [SimpleNamespace(subprocess_handlers={0: SimpleNamespace(proc=worker)})]
    torchrun._stop.clear()
    raised = []

    def handle():
        try:
            torchrun._on_signal(signal.SIGTERM, None)
        except SignalException as stop:
            raised.append(stop)

    handler = threading.Thread(target=handle)
    try:
        with worker._waitpid_lock:  # as inside worker.poll(), where the signal came
            handler.start()
            handler.join(timeout=30)
            assert not handler.is_alive(), "the handler hangs on the lock that the interrupted poll holds"
        assert raised and torchrun._stop["exitcodes"] == [143]
        assert worker.wait(timeout=30) == 143  # left for torchrun to reap, and reaped here
    finally:
        worker.kill()
        handler.join()
        torchrun._workers.clear()
        torchrun._stop.clear()
