"""SIGTERM and SIGINT before training begins: the script stops at once with one ``stopped:`` line.

While the data is read and tokenized and the model built (and in an evaluation-only run), a
SIGTERM or SIGINT raises ``TrainingStopped``, which ``utils.cli.run_cli`` turns into its line and
128 + the signal number, instead of the process dying without a word. Every file written there
is whole or absent (the tokenized-data cache through a work folder, the run's record through a
temporary file), so there is nothing to save: the same command starts again cleanly. Training
takes the signals over (``training_begins``, called by utils/train/stops.py's
``PreemptionCallback``), to finish the step and save a checkpoint first.
"""

from __future__ import annotations

import os
import signal

from utils.errors import TrainingStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_BEFORE_TRAINING: dict = {}  # signal -> the handler it had, while stop_on_signal_while_preparing's is set


def stop_on_signal_while_preparing() -> None:
    """SIGTERM/SIGINT stop the script with one line until training begins (see the module doc)."""
    owner = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() != owner:  # a forked tokenizing worker: it ends as the signal would end it
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        status = 128 + signum
        raise TrainingStopped(
            f"stopped: {signal.Signals(signum).name} received before training began (while preparing the data or "
            f"the model) or while evaluating; nothing is left half-written: run the same command to start again "
            f"(exit status {status})", status)

    try:
        for sig in STOP_SIGNALS:
            _BEFORE_TRAINING.setdefault(sig, signal.signal(sig, on_signal))
    except ValueError:  # handlers can only be set in the main thread (e.g. not in a notebook worker)
        pass


def training_begins() -> None:
    """Give the signals back to the handlers they had: training has its own (``PreemptionCallback``)."""
    for sig, handler in _BEFORE_TRAINING.items():
        signal.signal(sig, handler)
    _BEFORE_TRAINING.clear()
