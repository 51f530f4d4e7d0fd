"""The processes of one run: is it distributed, which one is this, does a flag hold on any of them.

Read from the environment torchrun (or an MPI-style launcher) sets, so that it can be asked before
the process group exists; once it does, ``any_process`` agrees on a flag with one all-reduce.
"""

from __future__ import annotations

import os


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


def close_process_group() -> None:
    """Leave the process group before exiting.

    Leaving with it still open lets its communication threads be torn down at interpreter exit,
    which can abort the process (SIGABRT) after its work was saved, and torchrun would then report
    that instead of the run's own exit status.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
