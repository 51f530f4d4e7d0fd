"""What a run keeps in --output_dir besides its model: the names of its files, its record and its stages.

The record, ``OUTPUT_DIR/run_state.json`` (``RunState``), says which run holds the folder, which
command last ran it and how far it got; utils/runs/folder.py decides from it what a start does.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from utils.errors import UsageError
from utils.files import read_json
from utils.runs.checkpoints import CHECKPOINT, DAMAGED_PREFIX, LEFTOVER

logger = logging.getLogger(__name__)

# The files a run writes into --output_dir besides the model and its checkpoints.
RUN_STATE = "run_state.json"
RUN_INFO = "run_info.json"
ALL_RESULTS = "all_results.json"
MODEL_CARD = "README.md"
SHARDING = "sharding.json"
# Under scripts/ray_train.py --output_dir is also Ray Train's run folder, where Ray keeps these two
# (names of Ray 2.x): the mark that the workers can reach the folder, and its list of the checkpoints reported.
RAY_STORAGE_MARK = ".validate_storage_marker"
RAY_CHECKPOINT_LIST = "checkpoint_manager_snapshot.json"
# What a run leaves in --output_dir that is not a result to protect: the launchers' logs, the
# run_info.json written at every start, our own staging folders cut off by a kill, the run's
# record, TensorBoard's runs/ of a run killed before its first checkpoint, and Ray Train's record.
NOT_RESULTS = re.compile(rf"train(_node\d+)?\.log|{re.escape(RUN_INFO)}|{LEFTOVER.pattern}"
                         rf"|{re.escape(RUN_STATE)}(\.tmp)?|runs|{re.escape(RAY_STORAGE_MARK)}"
                         rf"|{re.escape(RAY_CHECKPOINT_LIST)}")

# The run's stages, in order (the module doc says what each means).
STAGES = CLAIMED, TRAINING, TRAINED, EVALUATED, FINISHED = (
    "claimed", "training", "trained", "evaluated", "finished")
UNFINISHED = (CLAIMED, TRAINING)  # training goes on (or starts) in a rerun


@dataclass
class RunState:
    run_id: str
    command: str
    stage: str = CLAIMED


def read_run_state(output_dir: str) -> RunState | None:
    try:
        data = read_json(os.path.join(output_dir, RUN_STATE))
        if data is None:
            return None
        state = RunState(str(data["run_id"]), str(data["command"]), str(data["stage"]))
        if state.stage not in STAGES:
            raise ValueError(state.stage)
        return state
    except (UsageError, OSError, KeyError, TypeError, ValueError):
        logger.warning("Ignoring %s: it cannot be read", os.path.join(output_dir, RUN_STATE))
        return None


def run_results(output_dir: str) -> list[str]:
    """What a run wrote into --output_dir once trained (its model, results, model card), by name."""
    return [name for name in os.listdir(output_dir)
            if not (NOT_RESULTS.fullmatch(name) or CHECKPOINT.fullmatch(name) or name.startswith(DAMAGED_PREFIX))]
