"""What every script does around its recipe: logging, and turning user errors into one line."""

import logging
import os
import sys

import datasets
import transformers

from . import run_folder
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
        sys.exit(stop.exit_status)
    run_folder.mark(run_folder.FINISHED)
