"""Trainer callbacks every run gets (registered by LMTrainer)."""

from transformers import TrainerCallback


def default_callbacks(args) -> list[TrainerCallback]:
    """The callbacks LMTrainer adds to every run, given its training arguments."""
    return []
