"""Errors a user can fix: the scripts print them as one line and exit non-zero."""


class UsageError(Exception):
    """Bad input or environment, described in one line that names the flag or file and what to do."""


class TrainingStopped(Exception):
    """Training stopped before its end with its work saved (preempted, non-finite loss).

    The message is the one line the script prints; ``exit_status`` is its exit status.
    """

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status
