"""What every script does around its recipe: logging, and turning user errors into one line."""

import logging
import sys

import datasets
import transformers

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


def run_cli(main) -> None:
    """Run ``main()``; a UsageError becomes ``error: ...`` on stderr and exit status 2.

    Training that stopped early with its work saved (``TrainingStopped``: preempted, non-finite
    loss; see utils/reliability.py) prints its one line and exits with the status it carries.
    """
    try:
        main()
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except TrainingStopped as stop:
        sys.stderr.write(f"{stop}\n")
        sys.exit(stop.exit_status)
