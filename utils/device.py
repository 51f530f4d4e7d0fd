"""Pick the accelerator (Ascend NPU, CUDA GPU or CPU) and prepare it for training.

A training script calls two functions, in this order:

    device = setup_device(parser)                  # BEFORE parsing the arguments
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    finish_device_setup(training_args, device)     # seeds every device, checks the pick

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

``python -m utils.device --nproc N`` prints the device a run would use, or ``error: ...`` and
exit code 2 when it cannot start or has fewer than N devices (the launcher's pre-flight check).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import re
import sys
from collections.abc import Sequence

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


def is_distributed() -> bool:
    # Same test as accelerate: torchrun sets LOCAL_RANK; MPI-style launchers set WORLD_SIZE.
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


# ----------------------------------------------------- one process, several devices

AUTO_DDP_ENV = "LM_AUTO_DDP"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_devices_command(device: str, argv: Sequence[str] | None = None) -> list[str] | None:
    """The torchrun command that runs this script on every visible device, or None.

    A plain ``python run_clm.py`` on a machine with several GPUs or NPUs would otherwise run one
    process, and the Trainer would split each batch over the devices with ``nn.DataParallel``:
    slower than DDP, and with ``--fp16_opt_level``'s flat buffers not synchronised at all. None
    when already distributed, on the CPU, with one device, or with ``LM_AUTO_DDP=0``.
    """
    if device == "cpu" or is_distributed():
        return None
    if os.environ.get(AUTO_DDP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    visible = device_count(device)
    if visible < 2:
        return None
    argv = sys.argv[1:] if argv is None else list(argv)
    script = os.path.abspath(sys.argv[0])
    return [sys.executable, "-m", "utils.torchrun", "--standalone", f"--nproc_per_node={visible}", script, *argv]


def run_on_all_devices(device: str) -> None:
    """Replace this process by one process per visible device (DDP) when that is what it needs."""
    command = all_devices_command(device)
    if command is None:
        if device != "cpu" and not is_distributed() and device_count(device) > 1:
            logger.warning("%d %s devices visible and %s=0: the Trainer splits batches over them with "
                           "DataParallel; torchrun (scripts/train_*_8p.sh) runs one process per device",
                           device_count(device), device.upper(), AUTO_DDP_ENV)
        return
    logger.warning("%d %s devices visible: running one process per device under torchrun (DDP), the global batch "
                   "is %d x --per_device_train_batch_size. %s=0 keeps one process.",
                   device_count(device), device.upper(), device_count(device), AUTO_DDP_ENV)
    # utils.torchrun is found from any working directory.
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**os.environ, "PYTHONPATH": path})


# --------------------------------------------------------------------------- setup


def setup_device(parser: argparse.ArgumentParser | None = None, argv: Sequence[str] | None = None) -> str:
    """Choose the device and prepare it; call before building TrainingArguments.

    ``argv`` (default ``sys.argv[1:]``) is only read for ``--use_cpu``. With ``parser`` (an
    HfArgumentParser), the device's ``ddp_backend`` becomes that flag's default in distributed
    runs and, on CPU, ``use_cpu`` defaults to true; flags given on the command line still win.
    Returns "npu", "cuda" or "cpu".
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    _hide_broken_torch_npu()
    device = resolve_device(use_cpu=_use_cpu_in(argv))

    if device == "cpu":
        # Without this, accelerate treats a torchrun CPU job as N unrelated single processes.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if device == "npu":
        _apply_npu_options()
    _set_local_device(device)

    if parser is not None:
        defaults = {"use_cpu": True} if device == "cpu" else {}
        if is_distributed():
            # Only when distributed: accelerate expects no backend for a single process.
            defaults["ddp_backend"] = ddp_backend_for(device)
        parser.set_defaults(**defaults)
    return device


def _use_cpu_in(argv: list[str]) -> bool:
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        with open(argv[0]) as f:
            try:
                flags = json.load(f)
            except json.JSONDecodeError as err:
                raise UsageError(f"{argv[0]}: not a JSON file of flags ({err})") from None
        return isinstance(flags, dict) and bool(flags.get("use_cpu", False))
    value = None
    for i, arg in enumerate(argv):
        if arg == "--use_cpu":
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            value = "true" if following.startswith("-") else following
        elif arg.startswith("--use_cpu="):
            value = arg.split("=", 1)[1]
    return value is not None and value.lower() in ("true", "1", "yes", "y", "t")


def _apply_npu_options() -> None:
    import torch

    jit = _env_flag("NPU_JIT_COMPILE")
    internal_format = _env_flag("NPU_INTERNAL_FORMAT")
    try:
        torch.npu.set_compile_mode(jit_compile=jit)
        torch.npu.config.allow_internal_format = internal_format
    except AttributeError as exc:  # older torch_npu releases lack one of these switches
        logger.warning("Could not apply an NPU option (%s); continuing with torch_npu defaults", exc)
    logger.info("NPU options: jit_compile=%s allow_internal_format=%s", jit, internal_format)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


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


def finish_device_setup(training_args, device: str) -> None:
    """After parsing: seed every device and check that transformers placed the run on ``device``."""
    actual = training_args.device.type
    if actual != device:
        message = f"the run landed on {actual} but {device} was chosen"
        if requested_device() not in (None, actual):
            raise UsageError(f"{message}: drop --use_cpu or change DEVICE/{DEVICE_ENV}")
        logger.warning("%s; continuing on %s", message, actual)
        device = actual
    seed_all(training_args.seed, device)
    if training_args.process_index == 0:
        logger.info("Device: %s", describe_device(device))
    if device == "cpu":
        from .cpu import keep_freed_memory, log_precision_hint

        if keep_freed_memory():  # before the model and its buffers are allocated: see utils/cpu.py
            logger.info("Allocator: freed memory is kept for reuse (set LM_KEEP_FREED_MEMORY=0 to turn it off)")
        if training_args.process_index == 0:
            log_precision_hint(training_args)


def seed_all(seed: int, device: str) -> None:
    """Seed Python, NumPy and torch on the host and on every device of ``device``'s kind."""
    import torch

    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    if device == "npu":
        torch.npu.manual_seed_all(seed)


# --------------------------------------------------------------------------- reporting


def device_name(device: str) -> str:
    """Marketing name of device 0 of this kind, e.g. "NVIDIA H100 80GB HBM3" or "Ascend910B2"."""
    import torch

    if device in ("npu", "cuda"):
        return getattr(torch, device).get_device_name(0)
    return "cpu"


def describe_device(device: str | None = None) -> str:
    """One line for the logs, e.g. "cuda: 8 x NVIDIA H100 80GB HBM3"."""
    import torch

    device = device or resolve_device()
    if device == "cpu":
        return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads per process"
    return f"{device}: {device_count(device)} x {device_name(device)}"


# Dense (no sparsity) 16-bit tensor throughput per device, FLOP/s; bf16 and fp16 peak the
# same on these parts. Names are matched as substrings of get_device_name(), first match wins.
_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5; NVIDIA's datasheet gives 1979 TFLOPS with sparsity
    ("H200", 989e12),  # same compute die as H100 SXM, more memory
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    # Ascend: Huawei publishes little; 910B figures circulating for the 910B1-B4 bins range
    # from ~280 to ~376 TFLOPS fp16. 313e12 is the commonly quoted one, treat MFU as approximate.
    ("910B", 313e12),
    ("Ascend910", 256e12),  # first-generation Ascend 910, Huawei's launch figure for fp16
)


def peak_flops(name: str | None = None) -> float | None:
    """Peak dense bf16/fp16 FLOP/s of one device named ``name`` (default: the current one).

    None for CPUs and unknown parts, so an MFU estimate can be left out instead of guessed.
    """
    if name is None:
        device = resolve_device()
        if device == "cpu":
            return None
        name = device_name(device)
    for pattern, flops in _PEAK_FLOPS:
        if pattern.lower() in name.lower():
            return flops
    return None


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m utils.device [--nproc N]``: print the device a run would use."""
    cli = argparse.ArgumentParser(prog="python -m utils.device", description=main.__doc__)
    cli.add_argument("--nproc", type=int, default=1, help="processes per node that each need a device")
    args = cli.parse_args(argv)
    try:
        device = setup_device(argv=[])
        check_nproc(args.nproc, device)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
