"""What a run is, as its reports and its folder name it: its model, its data, its command and the fingerprint of
its settings, noted on the training arguments once the flags are parsed (``note_run``)."""

from __future__ import annotations

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


def settings_fingerprint(script: str, parser, values: dict) -> str:
    """What tells one command from another: the script and every setting as ``parser`` reads it into ``values``,
    its defaults filled in (see NOT_COMPARED).

    Read, not as typed: 5e-5 and 0.00005, the flags in another order, a path written another way
    or a file of flags holding the same settings all give the same fingerprint. Taken before the
    device is chosen and TrainingArguments are built (which fill in what each process differs in,
    its local rank), so every process of a run, and a launcher asking before it starts them
    (scripts/ray_train.py), gets the same one.
    """
    settings = {}
    for action in parser._actions:  # a --no_X flag shares X's name: the first, X's own, counts
        if action.dest not in settings and action.dest != "help" and action.dest not in NOT_COMPARED:
            value = _typed(action, values.get(action.dest, parser.get_default(action.dest)))
            settings[action.dest] = _resolved(action.dest, value)
    text = json.dumps([os.path.basename(script), settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _typed(action, value):
    """A value of a file of flags (JSON: 3 for 3.0, "5e-5" for a number) as the command line's parser types it."""
    if value is None or not callable(action.type):
        return value
    try:
        return [action.type(item) for item in value] if isinstance(value, list) else action.type(value)
    except (TypeError, ValueError):
        return value


def _resolved(name: str, value):
    if not isinstance(value, str) or not value:
        return value
    if name in PATH_SETTINGS or (name in NAME_OR_PATH_SETTINGS and os.path.exists(value)):
        return os.path.realpath(value)
    return value


def note_run(parsed, command: Command, fingerprint: str) -> None:
    """Note on the training arguments what the run is: its model, data, command (hub tokens masked) and the
    fingerprint of its settings (``settings_fingerprint``)."""
    model_args, data_args, training_args = parsed[0], parsed[1], parsed[-1]
    training_args.run_model = model_label(model_args)
    training_args.run_dataset = dataset_label(data_args)
    # Masked by the values the parser found, however they were spelled (utils/flags/secrets.py).
    secrets = secret_values(model_args, training_args)
    training_args.run_command = [command.name, *mask_command(command.flags(), secrets)]
    training_args.run_fingerprint = fingerprint
