"""Trainer callbacks every run gets (registered by LMTrainer)."""

from transformers import TrainerCallback

from .reporting import ReportCallback


def default_callbacks(args) -> list[TrainerCallback]:
    """The callbacks LMTrainer adds to every run, given its training arguments."""
    return [ReportCallback()]  # setup block, run_info.json, tokens/s (utils/reporting.py)
