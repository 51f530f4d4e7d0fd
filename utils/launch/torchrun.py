"""``python -m utils.launch.torchrun ARGS``: torchrun, with graceful stops and the worker's own exit status.

* **Exit status.** torchrun reports a failed worker with a table (rank, exit code) and then a
  traceback of its own, which hides the worker's one-line ``error:``. This keeps the table and
  exits with the worker's own status instead of 1: 2 for bad input, 3 for a non-finite loss, 130
  or 143 when it stopped on SIGINT / SIGTERM with its work saved (see utils/train/stops.py). A
  worker *killed* by a signal saved nothing on the way out: that gives 1 for SIGTERM and SIGINT
  (so that 130 and 143 always mean "saved") and 128 + N for any other signal N (137: SIGKILL).
* **Stopping.** On its first SIGTERM or SIGINT (sent to it, or to the launcher's whole process
  group) torchrun passes the signal on to each worker once and then waits for them, however long
  their checkpoint takes, instead of killing them after 30 seconds; with ``--max-restarts`` it
  does not restart them either: a stopped run resumes when its command is run again. A second
  signal makes torchrun end them its own way (SIGTERM, which a saving worker takes as the same
  stop, then SIGKILL 30 s later); a second Ctrl+C reaches the workers too and stops them at once.
* **Restarts.** With ``--max-restarts N`` a worker that crashes or is killed makes torchrun
  restart the whole group, which resumes from the newest complete checkpoint by itself.
"""

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing import api as processes
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

from utils.launch.signals import STOP_SIGNALS

_workers: list = []  # torchrun's process context of the current attempt (one element at most)
_stop: dict = {}  # "signal": the first stop signal received; "exitcodes": the workers' statuses after it
_torchrun_handler = processes._terminate_process_handler  # raises SignalException: torchrun closes the workers


def exit_status(code: int) -> int:
    """The status for a worker's exit code (``-N``: killed by signal N)."""
    if code >= 0:
        return code or 1
    return 1 if -code in STOP_SIGNALS else 128 - code


def _remember_workers(start):
    def start_and_remember(self):
        _workers[:] = [self]  # a restart's new attempt replaces the last one
        start(self)

    return start_and_remember


def _on_signal(signum, frame):
    if signum not in STOP_SIGNALS or "signal" in _stop or not _workers:
        _torchrun_handler(signum, frame)
    _stop["signal"] = signum
    running = [h.proc for h in getattr(_workers[-1], "subprocess_handlers", {}).values() if h.proc.poll() is None]
    print(f"torchrun: {signal.Signals(signum).name} received: the workers save a checkpoint and stop "
          "(Ctrl+C again stops them at once)", file=sys.stderr, flush=True)
    for proc in running:
        proc.send_signal(signum)
    _stop["exitcodes"] = [_wait_without_reaping(proc) for proc in running]
    raise SignalException(f"Process got signal: {signum}", sigval=signal.Signals(signum))


def _wait_without_reaping(proc) -> int:
    """The worker's exit code once it has ended (``-N``: killed by signal N), left for torchrun to reap.

    Not ``proc.wait()``: this runs in a signal handler, which may have interrupted torchrun inside
    ``proc.poll()``; the lock that Popen holds there would never be released, and torchrun would
    hang with its workers ended but unreaped.
    """
    try:
        ended = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped already, by the poll this handler interrupted
        return proc.returncode if proc.returncode is not None else -signal.SIGKILL  # unknown: not "saved"
    return ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status


def _stopped_status() -> int:
    """After a stop signal: its status if every worker stopped with its work saved, else the first failure's."""
    saved = 128 + _stop["signal"]
    codes = _stop.get("exitcodes") or [-_stop["signal"]]
    return saved if all(code == saved for code in codes) else exit_status(next(c for c in codes if c != saved))


def run() -> None:
    processes.PContext.start = _remember_workers(processes.PContext.start)
    processes._terminate_process_handler = _on_signal  # PContext.start installs it for each signal
    try:
        main()
    except ChildFailedError as failure:
        print(failure.format_msg(), file=sys.stderr)
        sys.exit(exit_status(failure.get_first_failure()[1].exitcode))
    except SignalException as stop:
        print(f"torchrun: {stop}", file=sys.stderr)
        sys.exit(_stopped_status() if "signal" in _stop else 128 + stop.sigval)


if __name__ == "__main__":
    run()
