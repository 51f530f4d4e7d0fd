"""How a run ends early on purpose: errors a user can fix, a stop with the work saved, nothing left to do.

``utils.cli.run_cli`` turns each into one line and an exit status; nothing here imports the rest.
"""


class UsageError(Exception):
    """Bad input or environment, described in one line that names the flag or file and what to do (exit 2)."""


class TrainingStopped(BaseException):
    """Training stopped before its end with its work saved (preempted, non-finite loss).

    The message is the one line the script prints; ``exit_status`` is its exit status. Like
    ``KeyboardInterrupt``, not an ``Exception``: a stop raised by a signal handler wherever the
    script happens to be must not be taken for the error of the code it interrupted.
    """

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class NothingToDo(Exception):
    """The run asked for is already done: the script prints this one line and exits with 0."""
