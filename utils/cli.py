"""A script's command line, read once, and how the script's end becomes its exit status.

``Command.of_process()`` is the one place that reads ``sys.argv``. The flag parser
(utils/flags/arguments.py, which also tells one command from another by its parsed settings), the
command line in run_info.json and the restart under torchrun (utils/launch/auto_ddp.py) all take
the ``Command`` it returns. As in the Hugging Face examples, a command line that is one ``.json``
argument names a file of flags.
"""

from __future__ import annotations

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


def run_cli(main) -> NoReturn:
    """Run ``main()`` and exit with the status its end calls for (``exit_process``: every time).

    ``UsageError``: ``error: ...`` on stderr, exit 2. ``TrainingStopped`` (preempted, non-finite
    loss; see utils/train/stops.py): its one line and its own status. ``NothingToDo`` (the run
    asked for is already done, utils/runs/folder.py): its one line, once, and 0.
    """
    exit_process(_status_of(main))


def _status_of(main) -> int:
    try:
        main()
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except NothingToDo as done:
        if is_first_process():  # once, not once per process
            sys.stderr.write(f"{done}\n")
    except TrainingStopped as stop:
        sys.stderr.write(f"{stop}\n")
        return stop.exit_status
    return 0
