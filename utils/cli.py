"""A script's command line, read once, and how the script's end becomes its exit status.

``Command.of_process()`` is the one place that reads ``sys.argv``. The flag parser
(utils/flags/arguments.py, which also tells one command from another by its parsed settings), the
command line in run_info.json and the restart under torchrun (utils/launch/auto_ddp.py) all take
the ``Command`` it returns. As in the Hugging Face examples, a command line that is one ``.json``
argument names a file of flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

from utils.dist import exit_process, is_first_process
from utils.errors import NothingToDo, TrainingStopped, UsageError


@dataclass(frozen=True)
class Command:
    """The script as it was started, and its arguments."""

    script: str
    args: tuple[str, ...]

    @classmethod
    def of_process(cls) -> Command:
        return cls(sys.argv[0], tuple(sys.argv[1:]))

    @contextlib.contextmanager
    def as_process_command(self):
        """Within it, ``of_process()`` gives this command: for a launcher that runs a recipe's ``main()`` in a
        process it started for itself (a Ray Train worker, utils/raytrain/worker.py)."""
        started_as = sys.argv
        sys.argv = [self.script, *self.args]
        try:
            yield self
        finally:
            sys.argv = started_as

    @property
    def name(self) -> str:
        return os.path.basename(self.script)

    @property
    def flag_file(self) -> str | None:
        """The file of flags, when the whole command line is one ``.json`` argument."""
        return self.args[0] if len(self.args) == 1 and self.args[0].endswith(".json") else None

    def flag_file_values(self) -> dict:
        """``{flag: value}`` from the file of flags."""
        try:
            with open(self.flag_file, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{self.flag_file}: not a JSON file of flags ({err})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{self.flag_file}: a JSON file of flags holds one object, {{\"flag\": value, ...}}")
        return values

    def flags(self) -> list[str]:
        """The flags as a command line gives them (a file of flags written out as ``--flag value`` pairs)."""
        if self.flag_file is None:
            return list(self.args)
        flags = []
        for name, value in self.flag_file_values().items():
            flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
        return flags


@dataclass(frozen=True)
class Ending:
    """How a script's ``main()`` ended (``ending``)."""

    status: int = 0  # the exit status
    line: str | None = None  # the one line that says why, for stderr


def ending(main) -> Ending:
    """Run ``main()`` and say how it ended.

    ``UsageError``: ``error: ...``, 2. ``TrainingStopped`` (preempted, non-finite loss; see
    utils/train/stops.py): its one line and its own status. ``NothingToDo`` (the run asked for is
    already done, utils/runs/folder.py): its one line, and 0. A ``main()`` that returns an ``Ending``
    (a launcher passing on how its workers ended, utils/raytrain/driver.py) ended that way.
    ``run_cli`` turns it into the exit; a launcher that runs the recipe in a process of its own
    reports it (utils/raytrain/worker.py).
    """
    try:
        returned = main()
    except UsageError as err:
        return Ending(2, f"error: {err}")
    except NothingToDo as done:
        return Ending(0, str(done))
    except TrainingStopped as stop:
        return Ending(stop.exit_status, str(stop))
    return returned if isinstance(returned, Ending) else Ending()


def run_cli(main) -> NoReturn:
    """Run ``main()`` and exit with the status its end calls for (``ending``), its line on stderr.

    A line with status 0 (nothing to do) is printed once, not once per process. The exit is
    ``exit_process``'s, every time (a process in a process group leaves it first).
    """
    end = ending(main)
    if end.line is not None and (end.status != 0 or is_first_process()):
        _close_progress_bars()
        sys.stderr.write(f"{end.line}\n")
    exit_process(end.status)


def _close_progress_bars() -> None:
    """Close the progress bars a stopped or refused run left open, so that its line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
