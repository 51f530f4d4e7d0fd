"""Hub tokens stay out of everything a run writes: logs, run_info.json, the model card.

A command line is masked by what the parser made of it, not by matching flag names: argparse
also accepts ``--hub_tok``, ``--hub_t=...`` and the like for ``--hub_token``, and a single
``.json`` argument holds the flags in a file. The values that landed in the secret fields are
then replaced by ``***`` wherever they stand in the command, as ``VALUE`` or ``--flag=VALUE``;
so is the value of any flag that argparse could take for a secret one (for a command that does
not parse, whose values are not known).
(training_args.bin drops the hub token itself: ``LMTrainingArguments.__getstate__``.)

``python -m utils.secrets COMMAND...`` prints COMMAND masked, for the launchers' log: the
flags after the ``run_*.py`` script are parsed with the scripts' shared parser (the tasks' own
flags never begin like ``--token`` or ``--hub_token``, so abbreviations resolve the same way).
"""

from __future__ import annotations

import argparse
import shlex
import sys

MASK = "***"
SECRET_FIELDS = ("token", "hub_token")  # ModelArguments.token, TrainingArguments.hub_token
_SECRET_FLAGS = tuple(f"--{name}" for name in SECRET_FIELDS)

def secret_values(*parsed) -> set[str]:
    """The secret values among parsed arguments (dataclasses or an argparse Namespace)."""
    values = set()
    for arguments in parsed:
        for name in SECRET_FIELDS:
            value = getattr(arguments, name, None)
            if isinstance(value, str) and value:
                values.add(value)
    return values


def mask_command(argv: list[str], secrets: set[str]) -> list[str]:
    """``argv`` with every secret value, given as ``VALUE`` or ``--flag=VALUE``, replaced by ***."""
    masked = []
    for arg in map(str, argv):
        flag, equals, value = arg.partition("=")
        if arg in secrets or (masked and _may_name_a_secret(masked[-1])):
            arg = MASK
        elif flag.startswith("--") and equals and (value in secrets or _may_name_a_secret(flag)):
            arg = f"{flag}={MASK}"
        masked.append(arg)
    return masked


def _may_name_a_secret(flag: str) -> bool:
    # For a command that did not parse (so no values are known): any flag argparse could take
    # for a secret one, an abbreviation included, even an ambiguous one.
    return len(flag) > 2 and any(secret.startswith(flag) for secret in _SECRET_FLAGS)


def parsed_secrets(flags: list[str]) -> set[str]:
    """The secret values in ``flags`` as the scripts' parser reads them (nothing if they do not parse)."""
    from transformers import HfArgumentParser

    from .arguments import DataArguments, LMTrainingArguments, ModelArguments, SequenceArguments

    class QuietParser(HfArgumentParser):
        def error(self, message):  # the run itself reports wrong flags, once
            raise ValueError(message)

    parser = QuietParser((ModelArguments, DataArguments, SequenceArguments, LMTrainingArguments))
    try:
        # argparse alone: no TrainingArguments are built, so nothing about the device is decided.
        namespace, _ = argparse.ArgumentParser.parse_known_args(parser, flags)
    except (ValueError, SystemExit):
        return set()
    return secret_values(namespace)


def masked_launch_command(command: list[str]) -> list[str]:
    """A launcher's whole command (torchrun, its options, the script, its flags), masked."""
    script = next((i for i, arg in enumerate(command) if arg.endswith(".py")), len(command) - 1)
    flags = command[script + 1:]
    if len(flags) == 1 and flags[0].endswith(".json"):  # a file of flags: its secrets are not on the line
        return command
    return mask_command(command, parsed_secrets(flags))


if __name__ == "__main__":
    print(shlex.join(masked_launch_command(sys.argv[1:])))
