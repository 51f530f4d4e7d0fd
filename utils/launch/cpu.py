"""Training on the CPU: an allocator setting that spares page faults, and which precisions run fast here.

Every forward pass allocates the full-vocabulary logits (batch x block x vocabulary floats, some
200 MB for GPT-2 at batch 8, block 128) and their gradient. glibc serves blocks that large with
mmap and hands them back with munmap when freed, so the kernel zeroes and faults in every page
again at every step: about a third of a small model's CPU time went to the kernel. Keeping freed
memory in the heap (no mmap, no trimming) lets the next step reuse it. The arithmetic is not
touched. ``LM_KEEP_FREED_MEMORY=0`` turns it off.

Half precision pays on a CPU only where it has the matrix units for it: bf16 with avx512_bf16
or amx_bf16 (then bf16 matmuls run several times faster than fp32), fp16 with avx512_fp16 or
amx_fp16. Without them torch emulates the format and the run gets many times slower; the start of
a run says so, with the factor measured on this CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import time

logger = logging.getLogger(__name__)

KEEP_FREED_MEMORY_ENV = "LM_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's malloc.h
UNITS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and keep freed memory; True when it took."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success. No mmap: large blocks come from the heap; no trimming: they stay.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def fast_precisions(flags: set[str] | None = None) -> list[str]:
    """The half precisions this CPU has matrix units for (fp32 always runs at full speed)."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, units in UNITS.items() if flags & set(units)]


def matmul_slowdown(dtype_name: str, rows: int = 1024, inner: int = 256) -> float:
    """How many times longer a rows x inner by inner x rows matmul takes in ``dtype_name`` than in fp32.

    One timed matmul each: without fp16 units one takes most of a second, and the factor only
    has to tell "several times" from "dozens of times".
    """
    import torch

    # A private generator: drawing from the global one, seeded by --seed, would give a run with
    # this hint other initial weights and batches than the same run without it.
    generator = torch.Generator().manual_seed(0)

    def seconds(dtype) -> float:
        a = torch.randn(rows, inner, generator=generator).to(dtype)
        b = torch.randn(inner, rows, generator=generator).to(dtype)
        torch.mm(a[:16, :16], b[:16, :16])  # the first call of a dtype also loads its kernels
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start

    return seconds(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name])) / seconds(torch.float32)


def precision_hint(training_args, flags: set[str] | None = None) -> str | None:
    """One line on what the chosen precision costs on this CPU, or None when there is nothing to say."""
    flags = cpu_flags() if flags is None else flags
    fast = fast_precisions(flags)
    chosen = "fp16" if training_args.fp16 else "bf16" if training_args.bf16 else "fp32"
    units = ", ".join(sorted(flags & {unit for pair in UNITS.values() for unit in pair})) or "none"
    if chosen == "fp32" and "bf16" in fast:
        return (f"This CPU has bf16 matrix units ({units}): --bf16 --fp16_opt_level O1 (or O2) trains faster "
                "than fp32 here")
    if chosen != "fp32" and chosen not in fast:
        factor = matmul_slowdown(chosen)
        better = " (--bf16 runs fast on it)" if "bf16" in fast else ""
        return (f"This CPU has no {chosen} matrix units (half-precision units: {units}){better}: a {chosen} matmul "
                f"took {factor:.0f}x as long as in fp32 here, so --{chosen} will make training slower, not faster")
    return None


def log_precision_hint(training_args) -> None:
    hint = precision_hint(training_args)
    if hint is None:
        return
    if training_args.fp16 or training_args.bf16:
        logger.warning(hint)
    else:
        logger.info(hint)
