"""Errors a user can fix: the scripts print them as one line and exit non-zero."""


class UsageError(Exception):
    """Bad input or environment, described in one line that names the flag or file and what to do."""
