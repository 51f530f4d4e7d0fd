"""The Trainer's own saving, made complete-or-absent: checkpoints through a staging folder, the final model file by file.

``save_checkpoint`` runs the Trainer's ``_save_checkpoint`` with ``LMTrainer._get_output_dir``
pointed at ``OUTPUT_DIR/tmp-checkpoint-N`` (``trainer.checkpoint_staging``), so the Trainer writes
``<staging>/checkpoint-N`` with all its usual files on every process; the marker and the rename
into place are utils/runs/checkpoints.py's, the checksums are taken as the files are saved
(utils/train/save_digests.py). ``save_model_atomically`` replaces the final model's
files one by one, each whole.
"""

from __future__ import annotations

import os
import shutil

from utils.files import fsync, output_mode
from utils.runs.checkpoints import (MODEL_STAGING, checkpoint_name, publish, remove_leftovers, rotate,
                                    staging_folder, write_marker)
from utils.train.save_digests import digests_of_saves


def save_checkpoint(trainer, save, run_dir: str) -> None:
    """``save()`` (the Trainer's ``_save_checkpoint``) into a staging folder, then published complete."""
    step = trainer.state.global_step
    name = checkpoint_name(step)
    staging = staging_folder(run_dir, step)
    if trainer.args.should_save:
        remove_leftovers(run_dir)  # folders of a save that was killed; saves never overlap
    trainer.accelerator.wait_for_everyone()
    trainer.checkpoint_staging = staging
    try:
        with digests_of_saves(staging) as written:
            save()
    finally:
        trainer.checkpoint_staging = None
    trainer.accelerator.wait_for_everyone()  # every process has written its RNG state
    staged = os.path.join(staging, name)
    _point_best_checkpoint_at(trainer, staging, run_dir, staged)
    if trainer.args.should_save:
        run = trainer.run
        write_marker(staged, step, run.run_id if run is not None else None, written,
                     command=run.command if run is not None else None)
        publish(staged, os.path.join(run_dir, name))
        os.rmdir(staging)
        # Only now that the new checkpoint is complete may older ones go.
        rotate(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
    trainer.accelerator.wait_for_everyone()


def _point_best_checkpoint_at(trainer, staging: str, run_dir: str, staged: str) -> None:
    # The Trainer recorded the best checkpoint under the staging path when it is this one;
    # every process fixes it (each loads the best model at the end), the saving one also on disk.
    best = trainer.state.best_model_checkpoint
    if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
        trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if trainer.args.should_save:
            trainer.state.save_to_json(os.path.join(staged, "trainer_state.json"))


def save_model_atomically(trainer) -> None:
    """``trainer.save_model()`` into --output_dir, each file replaced whole (never half-written).

    The model is saved into ``OUTPUT_DIR/tmp-model`` and its files are then renamed over the
    old ones, so a kill leaves every file either old or new.
    """
    output_dir = trainer.args.output_dir
    staging = os.path.join(output_dir, MODEL_STAGING)
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if not trainer.args.should_save:
        return
    for name in os.listdir(staging):
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(source):  # save_pretrained writes files; a folder is replaced as a whole
            shutil.rmtree(target, ignore_errors=True)
        else:
            fsync(source)
            # safetensors writes through a private temporary file (mode 0600): give the model the
            # permissions every other output has, so that others in the group can read it.
            os.chmod(source, output_mode())
        os.replace(source, target)
    os.rmdir(staging)
