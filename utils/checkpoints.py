"""Where a training run starts: a given checkpoint, the last one in --output_dir, or nothing."""

import logging
import os
import re

from transformers.trainer_utils import get_last_checkpoint

from .errors import UsageError

logger = logging.getLogger(__name__)

LAUNCHER_LOG = re.compile(r"train(_node\d+)?\.log")


def checkpoint_to_resume(training_args) -> str | None:
    """The checkpoint to resume from; refuses to write into a non-empty --output_dir that has none."""
    if not training_args.do_train:
        return None
    if training_args.resume_from_checkpoint:
        if not os.path.isdir(training_args.resume_from_checkpoint):
            raise UsageError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no such folder")
        return training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if training_args.overwrite_output_dir or not os.path.isdir(output_dir):
        return None
    last = get_last_checkpoint(output_dir)
    if last is not None:
        logger.info("Resuming from %s (add --overwrite_output_dir to start over)", last)
        return last
    # The launchers' logs may already be there: they are not results to protect.
    if [name for name in os.listdir(output_dir) if not LAUNCHER_LOG.fullmatch(name)]:
        raise UsageError(
            f"--output_dir {output_dir} is not empty and holds no checkpoint to resume from; "
            "choose another folder, or add --overwrite_output_dir to train over it"
        )
    return None
