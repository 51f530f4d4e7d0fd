"""What every script does around its recipe: starting the run, and turning user errors into one line."""

import logging
import os
import sys

import datasets
import transformers

from . import run_folder
from .auto_ddp import run_on_all_devices
from .cpu import keep_freed_memory, log_precision_hint
from .device import describe_device
from .errors import TrainingStopped, UsageError

logger = logging.getLogger(__name__)


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default log_level is "passive"; like the Hugging Face examples, show info then.
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logging.getLogger("utils").setLevel(level)
    logging.getLogger("__main__").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def start_run(training_args) -> None:
    """What happens between parsing and the recipe: logging, one process per device, seeds, CPU set-up.

    A plain ``python run_*.py`` that sees several GPUs or NPUs does not return from here: it is
    replaced by one process per device under torchrun (``utils/auto_ddp.py``), each of which
    parses its flags and comes here again.
    """
    setup_logging(training_args)
    device = training_args.device.type
    run_on_all_devices(device)
    transformers.set_seed(training_args.seed)  # Python, NumPy, torch and every device, before the model is built
    if training_args.process_index == 0:
        logger.info("Device: %s", describe_device(device))
    if device == "cpu":
        if keep_freed_memory():  # before the model and its buffers are allocated: see utils/cpu.py
            logger.info("Allocator: freed memory is kept for reuse (set LM_KEEP_FREED_MEMORY=0 to turn it off)")
        if training_args.process_index == 0:
            log_precision_hint(training_args)


def run_cli(main) -> None:
    """Run ``main()``; a UsageError becomes ``error: ...`` on stderr and exit status 2.

    Training that stopped early with its work saved (``TrainingStopped``: preempted, non-finite
    loss; see utils/reliability.py) prints its one line and exits with the status it carries.
    A run already done (utils/run_folder.py) prints one line and exits with 0; a run that
    completes is recorded as finished in its --output_dir.
    """
    try:
        main()
    except UsageError as err:
        run_folder.release_output_dir()  # a refused run leaves no folder of its own behind
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except run_folder.NothingToDo as done:
        if os.environ.get("RANK", "0") == "0":  # once, not once per process
            sys.stderr.write(f"{done}\n")
        sys.exit(0)
    except TrainingStopped as stop:
        sys.stderr.write(f"{stop}\n")
        _close_process_group()
        sys.exit(stop.exit_status)
    run_folder.mark(run_folder.FINISHED)
    _close_process_group()


def _close_process_group() -> None:
    # Leaving with the process group still open lets its communication threads be torn down
    # at interpreter exit, which can abort the process (SIGABRT) after its work was saved, and
    # torchrun would then report that instead of the run's own exit status.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
