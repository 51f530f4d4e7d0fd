"""The processes of one run: is it distributed, which one is this, does a flag hold on any of them.

Read from the environment torchrun (or an MPI-style launcher) sets, so that it can be asked before
the process group exists; once it does, ``any_process`` agrees on a flag with one all-reduce.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def is_distributed() -> bool:
    """Started by torchrun (LOCAL_RANK) or another launcher (WORLD_SIZE > 1): the same test as accelerate's."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_first_process() -> bool:
    """Global rank 0, the process that speaks for the run (before and after the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def any_process(flag: bool, device) -> bool:
    """True when ``flag`` is true on any process: a one-number all-reduce, only when distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=device)  # nccl/hccl need it on the device
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def exit_process(status: int) -> NoReturn:
    """End this process with ``status``, every time; one that is in a process group leaves it first.

    ``destroy_process_group`` does not stop the group's communication threads: gloo's keep running
    as long as anything still holds the group (the model's DDP wrapper until it is collected, FSDP's
    sharding caches for the life of the process). One of them
    may still be releasing the run's last collective when the script ends, and that takes the
    interpreter lock. If the interpreter is already tearing itself down, the thread is made to exit
    inside a C++ destructor, which aborts the process (SIGABRT, "terminate called without an active
    exception") after its work was saved, and torchrun reports that instead of the run's status.
    So a process that was in a group runs its exit handlers and flushes its output with the
    interpreter whole, then ends at once, as multiprocessing's child processes do.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(status)
    dist.destroy_process_group()
    atexit._run_exitfuncs()  # what the teardown would run first: logging's flush, temporary files, ...
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that is gone, a stream already closed: nothing to keep
            pass
    os._exit(status)
