"""The scripts' flag parser: ``--help`` that leads with the suite's own flags, and one-line errors.

``--help`` shows a short usage line, then the suite's flags in named groups, then the flags of
transformers' ``TrainingArguments``. A flag's group follows from where it is defined: each of the
suite's argument dataclasses names its group (``_argument_group_name``, transformers' own
convention), a field may name another one (``metadata={"group": ...}``), and a field that
transformers defines goes to the Trainer's group. A flag added to one of the suite's dataclasses
thus lands in a group with nothing else to change.

A mistyped flag gets one ``error:`` line with the closest flag (``did you mean --fp16_opt_level?``).
"""

import argparse
import dataclasses
import difflib
import sys
from typing import get_type_hints

from transformers import HfArgumentParser

from utils.errors import UsageError

# The groups --help shows, in this order, before the Trainer's.
PRECISION = "precision"
MODEL = "model"
DATA = "data"
RUN = "run folder and launchers"
GROUPS = (PRECISION, MODEL, DATA, RUN)
TRAINER = "transformers' Trainer (TrainingArguments)"

USAGE = """%(prog)s [--model_name_or_path NAME | --model_type TYPE] [--dataset_name NAME | --train_file FILE]
           [--do_train] [--do_eval] [--output_dir DIR] [FLAG VALUE ...]
       %(prog)s FLAGS.json"""
EPILOG = "Every flag is explained in docs/flags.md; a single FLAGS.json argument holds {\"flag\": value, ...}."


def group_of(dtype: type, field: dataclasses.Field) -> str:
    """The --help group of ``field`` of the dataclass ``dtype``: where the field is defined decides."""
    owner = next(cls for cls in dtype.__mro__ if field.name in vars(cls).get("__annotations__", {}))
    if owner.__module__.split(".")[0] == "transformers":
        return TRAINER
    return field.metadata.get("group") or getattr(owner, "_argument_group_name", None) or owner.__name__


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One name per flag (the ``--a-b`` spellings accepted but not listed), booleans as ``[true|false]``,
    and defaults shown as ``(default: X)`` except where there is none to show: a flag left unset (None)
    says in its help what happens then, and a help that names its default keeps its own words."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_X for a flag on by default
            return f"The same as --{action.dest} false."
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = [name for name in action.option_strings
                 if "-" not in name[2:] or "--" + name[2:].replace("-", "_") not in action.option_strings]
        if action.nargs == 0:
            return ", ".join(names)
        if action.nargs == "?" and action.const is True:
            return f"{', '.join(names)} [true|false]"
        return f"{', '.join(names)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class FlagParser(HfArgumentParser):
    """HfArgumentParser with the flags grouped by where they are defined, and one-line errors."""

    def __init__(self, dataclass_types, prog: str | None = None, **options):
        self._flag_groups = {}
        options = {"usage": USAGE, "epilog": EPILOG, **options}  # the recipes' (run_TASK.py) unless given
        super().__init__(dataclass_types, prog=prog, formatter_class=_HelpFormatter, **options)

    def _group(self, title: str):
        if not self._flag_groups:  # the named groups first, in their order, whatever dataclass comes first
            for name in (*GROUPS, TRAINER):
                self._flag_groups[name] = self.add_argument_group(name)
        if title not in self._flag_groups:  # a dataclass of the suite's that names no group: before the Trainer's
            self._flag_groups[title] = self.add_argument_group(title)
            self._action_groups.insert(self._action_groups.index(self._flag_groups[TRAINER]), self._action_groups.pop())
        return self._flag_groups[title]

    def _add_dataclass_arguments(self, dtype):
        # As HfArgumentParser's, with a group per field rather than per dataclass.
        hints = get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            group = self._group(group_of(dtype, field))
            # "group" is ours; the rest of the metadata goes to argparse's add_argument.
            shown = dataclasses.field(default=field.default, default_factory=field.default_factory,
                                      metadata={k: v for k, v in field.metadata.items() if k != "group"})
            shown.name, shown.type = field.name, hints[field.name]
            self._parse_dataclass_field(group, shown)

    def error(self, message):
        # argparse's default prints the whole usage text; one line is easier to act on.
        guess = ""
        if message.startswith("unrecognized arguments:"):
            flags = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
            guess = next((f"; did you mean {close}?" for close in map(self.closest_flag, flags) if close), "")
        sys.stderr.write(f"error: {message}{guess} (see {self.prog} --help)\n")
        sys.exit(2)

    def closest_flag(self, flag: str) -> str | None:
        """The flag a mistyped ``--flag`` most likely meant, if one is close enough."""
        flags = [option for option in self._option_string_actions if option.startswith("--") and "-" not in option[2:]]
        return next(iter(difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)), None)

    def parse_dict(self, args: dict, allow_extra_keys: bool = False, source: str | None = None):
        """As HfArgumentParser's; a key that is no flag (in ``source``, a file of flags) is named with the closest
        flag, as on a command line."""
        unknown = sorted(set(args) - {action.dest for action in self._actions})
        if unknown and not allow_extra_keys:
            close = self.closest_flag(f"--{unknown[0]}")
            raise UsageError(f"{source or 'flags'}: unknown flag {unknown[0]!r}"
                             + (f"; did you mean {close[2:]!r}?" if close else ""))
        return super().parse_dict(args, allow_extra_keys=allow_extra_keys)


def flag_parser(*types, prog: str | None = None, **options) -> FlagParser:
    """The parser of these argument dataclasses' flags; errors are one line and exit status 2.

    ``options``: argparse's own (``allow_abbrev=False`` for a launcher that passes unknown flags on).
    """
    return FlagParser(types, prog=prog, **options)
