"""Trainer callbacks every run gets (registered by LMTrainer)."""

from transformers import TrainerCallback

from .reliability import reliability_callbacks
from .reporting import ReportCallback


def default_callbacks(args) -> list[TrainerCallback]:
    """The callbacks LMTrainer adds to every run, given its training arguments."""
    return [
        ReportCallback(),  # setup block, run_info.json, tokens/s (utils/reporting.py)
        # SIGTERM/SIGINT -> checkpoint and stop; NaN/inf loss -> stop or skip (utils/reliability.py)
        *reliability_callbacks(args),
    ]
