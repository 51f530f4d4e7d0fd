"""What a run is, as its reports and its folder name it: its model, its data, its command and the fingerprint of
its settings, noted on the training arguments once the flags are parsed (``note_run``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from utils.cli import Command
from utils.flags.secrets import SECRET_FIELDS, mask_command, secret_values


def model_label(model_args) -> str:
    """The model as reports name it: the checkpoint's or the config's name (its last path part), else the model
    type trained from scratch."""
    checkpoint = (model_args.model_name_or_path or model_args.config_name or "").rstrip("/")
    return os.path.basename(checkpoint) or checkpoint or model_args.model_type or "unknown"


def dataset_label(data_args) -> str:
    """The hub dataset (with its configuration) or the local files the run reads."""
    if data_args.dataset_name:
        config = data_args.dataset_config_name
        return f"{data_args.dataset_name} ({config})" if config else data_args.dataset_name
    files = [data_args.train_file, data_args.validation_file]
    return ", ".join(f for f in files if f) or "unknown"


# Settings that name a file or folder: the same place however it is written (relative, absolute, ./x).
PATH_SETTINGS = ("logging_dir", "train_file", "validation_file", "cache_dir", "resume_from_checkpoint")
# A hub name or a local folder: the folder by where it is, when one of that name exists.
NAME_OR_PATH_SETTINGS = ("model_name_or_path", "config_name", "tokenizer_name", "dataset_name")
# Not part of what a command does: hub tokens, and --output_dir, the folder that holds the record it is
# compared with (a run's folder moved or copied elsewhere holds the same run).
NOT_COMPARED = (*SECRET_FIELDS, "output_dir")


def settings_fingerprint(script: str, parsed) -> str:
    """What tells one command from another: the script and every setting as parsed (see NOT_COMPARED).

    Parsed, not as typed: 5e-5 and 0.00005, the flags in another order, a path written another way
    or a file of flags holding the same settings all give the same fingerprint.
    """
    settings = {}
    for arguments in parsed:
        for item in dataclasses.fields(arguments):
            if item.init and item.name not in NOT_COMPARED:
                value = _resolved(item.name, getattr(arguments, item.name))
                settings[f"{type(arguments).__name__}.{item.name}"] = value
    text = json.dumps([os.path.basename(script), settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resolved(name: str, value):
    if not isinstance(value, str) or not value:
        return value
    if name in PATH_SETTINGS or (name in NAME_OR_PATH_SETTINGS and os.path.exists(value)):
        return os.path.realpath(value)
    return value


def note_run(parsed, command: Command) -> None:
    """Note on the training arguments what the run is: its model, data and command (hub tokens masked)."""
    model_args, data_args, training_args = parsed[0], parsed[1], parsed[-1]
    training_args.run_model = model_label(model_args)
    training_args.run_dataset = dataset_label(data_args)
    # Masked by the values the parser found, however they were spelled (utils/flags/secrets.py).
    secrets = secret_values(model_args, training_args)
    training_args.run_command = [command.name, *mask_command(command.flags(), secrets)]
    training_args.run_fingerprint = settings_fingerprint(command.name, parsed)
