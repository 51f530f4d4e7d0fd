"""Hub tokens stay out of everything a run writes: logs, run_info.json, the model card.

A command line is masked by what the parser made of it, not by matching flag names: argparse
also accepts ``--hub_tok``, ``--hub_t=...`` and the like for ``--hub_token``, and a single
``.json`` argument holds the flags in a file. The values that landed in the secret fields are
then replaced by ``***`` wherever they stand in the command, as ``VALUE`` or ``--flag=VALUE``;
so is the value of any flag that argparse could take for a secret one (for a command that does
not parse, whose values are not known).
(training_args.bin drops the hub token itself: ``LMTrainingArguments.__getstate__``.)

The launchers' log masks the user's flags the same way, through ``utils.flags.launch_flags``.
"""

from __future__ import annotations

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
