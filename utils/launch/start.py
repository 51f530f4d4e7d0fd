"""What every script does between parsing its flags and its recipe: logging, one process per device, seeds.

(How the script's end becomes its exit status is ``utils.cli.run_cli``.)
"""

import logging
import os
import sys

import datasets
import transformers

from utils.cli import Command
from utils.launch.auto_ddp import run_on_all_devices
from utils.launch.cpu import keep_freed_memory, log_precision_hint
from utils.launch.device import describe_device
from utils.launch.signals import stop_on_signal_while_preparing

logger = logging.getLogger(__name__)


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"  # the Hugging Face examples' format
LOG_DATE_FORMAT = "%m/%d/%Y %H:%M:%S"


def setup_logging(training_args) -> None:
    """One handler, on the root logger, for our lines, transformers' and datasets': one format, each line once.

    transformers and datasets each put a handler of their own on their library's logger. transformers'
    (its own format, on stderr) stops its records from reaching the root; datasets' (plain, on stderr)
    lets them through as well, so that every datasets line came out twice. Both are removed and their
    records go to the root handler.
    """
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets_logger = logging.getLogger("datasets")
    for handler in list(datasets_logger.handlers):
        datasets_logger.removeHandler(handler)
    datasets_logger.propagate = True
    if training_args.should_log:
        # The default log_level is "passive"; like the Hugging Face examples, show info then.
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logging.getLogger("utils").setLevel(level)
    logging.getLogger("__main__").setLevel(level)
    # The recipe's module-level logger when it is imported rather than run (run_clm.main() in a test).
    logging.getLogger(os.path.splitext(Command.of_process().name)[0]).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def start_run(training_args) -> None:
    """What happens between parsing and the recipe: logging, one process per device, signals, seeds, CPU set-up.

    A plain ``python run_*.py`` that sees several GPUs or NPUs does not return from here: it is
    replaced by one process per device under torchrun (``utils/launch/auto_ddp.py``), each of which
    parses its flags and comes here again.
    """
    setup_logging(training_args)
    device = training_args.device.type
    run_on_all_devices(device, Command.of_process())
    stop_on_signal_while_preparing()  # a SIGTERM while tokenizing: one line, not a kill
    transformers.set_seed(training_args.seed)  # Python, NumPy, torch and every device, before the model is built
    if training_args.process_index == 0:
        logger.info("Device: %s", describe_device(device))
    if device == "cpu":
        if keep_freed_memory():  # before the model and its buffers are allocated: see utils/launch/cpu.py
            logger.info("Allocator: freed memory is kept for reuse (set LM_KEEP_FREED_MEMORY=0 to turn it off)")
        if training_args.process_index == 0:
            log_precision_hint(training_args)
