"""``python -m utils.flags.launch_flags TASK FLAGS...``: what the launchers need to know of a user's flags.

``scripts/launch.sh`` adds its defaults (a hub model, WikiText, an output folder) unless the
user's flags already choose them, and logs the command with hub tokens masked. It asks here
rather than reading the flags itself, so that they mean what they mean to the scripts: the same
parser, abbreviations (``--output_d``, ``--hub_tok``), the ``--flag=value`` form and the last
occurrence winning included. Prints four lines:

    1 if a model is chosen (--model_name_or_path or --model_type), else 0
    1 if data is chosen (--dataset_name or --train_file), else 0
    the --output_dir given, or an empty line
    the flags as a shell would read them back, hub tokens masked (utils/flags/secrets.py)

Flags of one script only (``--block_size``, ...) are left for the script to check; flags that do
not parse stop here with the parser's one ``error:`` line and exit status 2.
"""

import argparse
import logging
import shlex

from utils.cli import run_cli
from utils.flags.arguments import DataArguments, LMTrainingArguments, ModelArguments, SequenceArguments
from utils.flags.legacy import translate_flags
from utils.flags.parser import flag_parser
from utils.flags.secrets import mask_command, secret_values


def read_flags(task: str, flags: list[str]) -> tuple[bool, bool, str, list[str]]:
    """(model chosen, data chosen, output_dir or "", the flags masked) as run_TASK.py reads ``flags``."""
    parser = flag_parser(ModelArguments, DataArguments, SequenceArguments, LMTrainingArguments,
                         prog=f"run_{task}.py")
    # Read only: no TrainingArguments are built, so nothing about the device is decided.
    namespace, _ = parser.parse_known_args(translate_flags(flags)[0])  # 4.x flags as today's (utils/flags/legacy.py)
    model = namespace.model_name_or_path is not None or namespace.model_type is not None
    data = namespace.dataset_name is not None or namespace.train_file is not None
    return model, data, namespace.output_dir or "", mask_command(flags, secret_values(namespace))


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m utils.flags.launch_flags", description=__doc__.splitlines()[0])
    cli.add_argument("task", choices=["clm", "mlm", "plm"])
    cli.add_argument("flags", nargs=argparse.REMAINDER)
    args = cli.parse_args()
    # The script logs each 4.x flag it reads as today's; the launcher reading them first would say it twice.
    logging.getLogger("utils.flags.legacy").disabled = True
    model, data, output_dir, masked = read_flags(args.task, args.flags)
    print(int(model), int(data), output_dir, shlex.join(masked), sep="\n")


if __name__ == "__main__":
    run_cli(main)  # a 4.x flag that cannot be mapped: its one error: line, exit status 2
