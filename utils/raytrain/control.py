"""The line between ray_train.py's driver and its workers: one small Ray actor, which lives as long as the driver.

* **Stops.** The driver puts the stop signal it received there (SIGTERM from ``ray job stop``, a
  scheduler, or SIGINT from Ctrl+C); each worker polls it and passes it on to training.
* **Attempts.** Ray Train restarts the whole group after a failure; rank 0 counts the starts.
* **Endings.** Each worker records how its recipe ended (``utils.cli.Ending``): the driver takes its
  exit status and line from there, and a worker that ended with an error can tell whether the
  others ended too or are waiting for it (utils/raytrain/worker.py).
"""

from __future__ import annotations

from utils.cli import Ending


class RunControl:
    """State of one ``scripts/ray_train.py`` run, shared by its driver and workers (a Ray actor)."""

    def __init__(self):
        self._signal: int | None = None
        self._attempt = 0
        self._endings: dict[int, Ending] = {}

    def stop(self, signum: int) -> None:
        if self._signal is None:
            self._signal = signum

    def stop_signal(self) -> int | None:
        return self._signal

    def begin_attempt(self) -> int:
        """Called by rank 0 as a (re)started group begins: the attempt's number, from 1; the endings start afresh."""
        self._attempt += 1
        self._endings = {}
        return self._attempt

    def end(self, attempt: int, rank: int, ending: Ending) -> None:
        if attempt == self._attempt:  # not a worker of a group that Ray already replaced
            self._endings[rank] = ending

    def endings(self) -> dict[int, Ending]:
        """How each worker of the current attempt ended, by rank (those that have)."""
        return dict(self._endings)
