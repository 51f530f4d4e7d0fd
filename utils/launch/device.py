"""Pick the accelerator (Ascend NPU, CUDA GPU or CPU) and prepare it for training.

``utils.flags.arguments.parse_args`` calls two functions, in this order:

    device = setup_device(use_cpu)                 # BEFORE TrainingArguments are built
    # the flags' values, with training_defaults(device) filled in, become TrainingArguments
    check_placement(training_args, device)

``setup_device`` must run before ``TrainingArguments`` exists: building it starts the
distributed process group (``__post_init__`` -> ``self.device`` -> accelerate's
``PartialState``), and transformers imports ``torch_npu`` there without a guard, so a
``torch_npu`` that cannot load would crash the run even on CPU.

Choosing the device
    ``LM_DEVICE=npu|cuda|cpu`` asks for one device (``scripts/launch.sh`` sets it from
    ``DEVICE``); asking for one that cannot start raises ``UsageError`` with a one-line
    fix. Unset, the first usable of NPU, CUDA, CPU is taken. ``--use_cpu`` forces CPU.

NPU settings (environment, read when the NPU is set up; ``scripts/env_npu.sh`` sets the same)
    NPU_JIT_COMPILE=1       compile operators online instead of using the prebuilt kernels
                            (default 0: prebuilt kernels avoid a recompile for every new shape).
    NPU_INTERNAL_FORMAT=1   let torch_npu keep tensors in private layouts such as FRACTAL_NZ
                            (default 0: those add layout casts around transformer matmuls and
                            are a common source of shape and accuracy surprises).
    TASK_QUEUE_ENABLE=1, HCCL_CONNECT_TIMEOUT=1200, HCCL_EXEC_TIMEOUT=1800 are set when unset;
    see scripts/env_npu.sh for why.

``python -m utils.launch.device --nproc N`` prints the device a run would use, or ``error: ...`` and
exit code 2 when it cannot start or has fewer than N devices (the launcher's pre-flight check).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Sequence

from utils.dist import is_distributed
from utils.errors import UsageError

logger = logging.getLogger(__name__)

DEVICES = ("npu", "cuda", "cpu")
DEVICE_ENV = "LM_DEVICE"

_DDP_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

# Environment torch_npu and HCCL read when they start, so they are set before the import.
_NPU_ENV_DEFAULTS = {
    "TASK_QUEUE_ENABLE": "1",
    "HCCL_CONNECT_TIMEOUT": "1200",
    "HCCL_EXEC_TIMEOUT": "1800",
}

_CANN_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (or scripts/env_npu.sh)"


# --------------------------------------------------------------------------- NPU probing


@functools.lru_cache(maxsize=None)
def npu_status() -> tuple[bool, str | None]:
    """Whether an Ascend NPU can be used, and if not, what to fix (None when torch_npu is absent).

    Imports torch_npu once; the answer is cached because a failed import would re-run the
    package's (failing) initialisation on every retry.
    """
    if importlib.util.find_spec("torch_npu") is None:
        return False, None
    for name, value in _NPU_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)

    import torch

    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ModuleNotFoundError as exc:
        if exc.name == "torch_npu":
            return False, None
        return False, f"torch_npu needs the Python module {exc.name}: pip install {exc.name}"
    except Exception as exc:  # a broken C extension can raise nearly anything
        return False, _explain_npu_import_error(exc)

    if not (hasattr(torch, "npu") and torch.npu.is_available() and torch.npu.device_count() > 0):
        return False, (
            f"torch_npu {_torch_npu_version()} sees no NPU: check `npu-smi info` "
            "and ASCEND_RT_VISIBLE_DEVICES"
        )
    return True, None


def _explain_npu_import_error(exc: BaseException) -> str:
    text = _one_line(str(exc))
    library = re.search(r"lib[\w.+-]*?\.so", text)
    missing_file = "cannot open shared object" in text or "No such file" in text
    if library and missing_file:
        return f"CANN libraries not found ({library.group(0)}): {_CANN_HINT}"
    if re.search(r"undefined symbol|version|mismatch|ABI", text, re.IGNORECASE):
        import torch

        return (
            f"torch_npu {_torch_npu_version()} does not match torch {torch.__version__}: "
            "install the torch_npu built for this torch"
        )
    if library:
        return f"CANN libraries not found ({library.group(0)}): {_CANN_HINT}"
    return f"torch_npu failed to import ({type(exc).__name__}: {text[:200]}): check the torch_npu and CANN installation"


def _torch_npu_version() -> str:
    try:
        return importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _hide_broken_torch_npu() -> None:
    # transformers' is_torch_npu_available() imports torch_npu whenever it is findable and
    # does not catch the error. A None entry in sys.modules makes find_spec() report the
    # package as absent, so transformers and accelerate fall back to CUDA/CPU quietly.
    available, problem = npu_status()
    if not available and problem is not None and "torch_npu" not in sys.modules:
        sys.modules["torch_npu"] = None
        logger.info("Ignoring torch_npu: %s", problem)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- choosing


def requested_device() -> str | None:
    """The device named by LM_DEVICE, or None to take the first usable one."""
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted in ("", "auto"):
        return None
    if wanted not in DEVICES:
        raise UsageError(f"{DEVICE_ENV}={wanted}: use npu, cuda or cpu, or leave it unset")
    return wanted


def resolve_device(use_cpu: bool = False) -> str:
    """Decide between "npu", "cuda" and "cpu"; raise UsageError if the asked-for one cannot start."""
    wanted = requested_device()
    if use_cpu:
        if wanted not in (None, "cpu"):
            logger.warning("--use_cpu overrides %s=%s: running on CPU", DEVICE_ENV, wanted)
        return "cpu"
    if wanted == "npu":
        available, problem = npu_status()
        if not available:
            raise UsageError(problem or _npu_not_installed())
        return "npu"
    if wanted == "cuda":
        if not _cuda_available():
            raise UsageError(
                "CUDA was asked for (DEVICE/LM_DEVICE=cuda) but torch sees no CUDA device: "
                "install a CUDA build of torch, check nvidia-smi and CUDA_VISIBLE_DEVICES"
            )
        return "cuda"
    if wanted == "cpu":
        return "cpu"
    if npu_status()[0]:
        return "npu"
    return "cuda" if _cuda_available() else "cpu"


def _npu_not_installed() -> str:
    import torch

    return (
        f"NPU was asked for (DEVICE/LM_DEVICE=npu) but torch_npu is not installed: "
        f"pip install the torch_npu built for torch {torch.__version__}, or use DEVICE=cuda or cpu"
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_count(device: str) -> int:
    """Devices of this kind visible to this process (CPU counts as one)."""
    import torch

    if device == "npu":
        return torch.npu.device_count()
    if device == "cuda":
        return torch.cuda.device_count()
    return 1


def check_nproc(nproc: int, device: str) -> None:
    """Raise UsageError when NPROC_PER_NODE processes cannot each get their own device."""
    if device == "cpu":
        return  # CPU processes share the cores; any count runs
    visible = device_count(device)
    if nproc > visible:
        raise UsageError(
            f"NPROC_PER_NODE={nproc} but only {visible} {device.upper()} device(s) are visible: "
            f"set NPROC_PER_NODE<={visible} or use the *_1p.sh launcher"
        )


def ddp_backend_for(device: str) -> str:
    """The torch.distributed backend for a device: hccl (NPU), nccl (CUDA), gloo (CPU)."""
    return _DDP_BACKENDS[device]


# --------------------------------------------------------------------------- setup


def setup_device(use_cpu: bool = False) -> str:
    """Choose the device and prepare it; call before building TrainingArguments (see the module doc).

    Returns "npu", "cuda" or "cpu".
    """
    _hide_broken_torch_npu()
    device = resolve_device(use_cpu=use_cpu)
    if device == "cpu":
        # Without this, accelerate treats a torchrun CPU job as N unrelated single processes.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if device == "npu":
        _apply_npu_options()
    _set_local_device(device)
    return device


def training_defaults(device: str) -> dict:
    """The TrainingArguments defaults this device needs (the command line still wins)."""
    defaults = {"use_cpu": True} if device == "cpu" else {}
    if is_distributed():
        # Only when distributed: accelerate expects no backend for a single process.
        defaults["ddp_backend"] = ddp_backend_for(device)
    return defaults


def _apply_npu_options() -> None:
    import torch

    jit = env_flag("NPU_JIT_COMPILE")
    internal_format = env_flag("NPU_INTERNAL_FORMAT")
    try:
        torch.npu.set_compile_mode(jit_compile=jit)
        torch.npu.config.allow_internal_format = internal_format
    except AttributeError as exc:  # older torch_npu releases lack one of these switches
        logger.warning("Could not apply an NPU option (%s); continuing with torch_npu defaults", exc)
    logger.info("NPU options: jit_compile=%s allow_internal_format=%s", jit, internal_format)


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off, any case."""
    value = os.environ.get(name, "").strip().lower()
    return default if value == "" else value in ("1", "true", "yes", "on", "y", "t")


def _set_local_device(device: str) -> None:
    # Each rank must own its device before the process group starts, or every rank's
    # communicator would be created on device 0.
    if device == "cpu" or "LOCAL_RANK" not in os.environ:
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    visible = device_count(device)
    if local_rank >= visible:
        raise UsageError(
            f"LOCAL_RANK={local_rank} but only {visible} {device.upper()} device(s) are visible: "
            "lower NPROC_PER_NODE"
        )
    import torch

    getattr(torch, device).set_device(local_rank)


def check_placement(training_args, device: str) -> None:
    """After TrainingArguments are built: check that transformers placed the run on ``device``."""
    actual = training_args.device.type
    if actual != device:
        message = f"the run landed on {actual} but {device} was chosen"
        if requested_device() not in (None, actual):
            raise UsageError(f"{message}: drop --use_cpu or change DEVICE/{DEVICE_ENV}")
        logger.warning("%s; continuing on %s", message, actual)


# --------------------------------------------------------------------------- reporting


def device_name(device: str) -> str:
    """Marketing name of device 0 of this kind, e.g. "NVIDIA H100 80GB HBM3" or "Ascend910B2"."""
    import torch

    if device in ("npu", "cuda"):
        return getattr(torch, device).get_device_name(0)
    return "cpu"


def tf32_matmul(device: str) -> bool:
    """Whether fp32 matmuls run in TF32: on CUDA when ``--tf32`` (torch's switch) turned it on; off by default.

    Off by default so that an fp32 (O0) run is the fp32 reference the O-levels are compared with.
    """
    import torch

    return device == "cuda" and torch.backends.cuda.matmul.allow_tf32


def describe_device(device: str | None = None) -> str:
    """One line for the logs, e.g. "cuda: 8 x NVIDIA H100 80GB HBM3"."""
    import torch

    device = device or resolve_device()
    if device == "cpu":
        return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads per process"
    return f"{device}: {device_count(device)} x {device_name(device)}"


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m utils.launch.device [--nproc N]``: print the device a run would use."""
    cli = argparse.ArgumentParser(prog="python -m utils.launch.device", description=main.__doc__)
    cli.add_argument("--nproc", type=int, default=1, help="processes per node that each need a device")
    args = cli.parse_args(argv)
    try:
        device = setup_device()
        check_nproc(args.nproc, device)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
