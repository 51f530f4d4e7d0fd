"""``python -m utils.torchrun ARGS``: torchrun, minus its Python traceback when a process fails.

torchrun reports a failed worker with a table (rank, exit code) and then a traceback of its
own, which hides the worker's one-line ``error:``. This keeps the table and exits with the
worker's own status instead of 1: 2 for bad input, 3 for a non-finite loss, 128 + N when it
was stopped by signal N (143: SIGTERM, checkpoint saved; see utils/reliability.py). A
SIGTERM/SIGINT to torchrun itself is passed on to the workers by torchrun (they get about 30
seconds to finish before SIGKILL) and then gives 128 + N here too.
"""

import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else (code or 1)  # -N: killed by signal N, shells say 128 + N


if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as failure:
        print(failure.format_msg(), file=sys.stderr)
        sys.exit(exit_status(failure.get_first_failure()[1].exitcode))
    except SignalException as stop:
        print(f"torchrun: {stop}", file=sys.stderr)
        sys.exit(128 + stop.sigval)
