"""``python -m utils.launch_flags TASK FLAGS...``: what the launchers need to know of a user's flags.

``scripts/launch.sh`` adds its defaults (a hub model, WikiText, an output folder) unless the
user's flags already choose them. It asks here rather than reading the flags itself, so that
they mean what they mean to the scripts: the same parser, abbreviations (``--output_d``), the
``--flag=value`` form and the last occurrence winning included. Prints three lines:

    1 if a model is chosen (--model_name_or_path or --model_type), else 0
    1 if data is chosen (--dataset_name or --train_file), else 0
    the --output_dir given, or an empty line

Flags of one script only (``--block_size``, ...) are left for the script to check.
"""

import sys

from .arguments import DataArguments, LMTrainingArguments, ModelArguments, flag_parser


def chosen(task: str, argv: list[str]) -> tuple[bool, bool, str]:
    """(model chosen, data chosen, output_dir or "") from the user's flags for run_TASK.py."""
    parser = flag_parser(ModelArguments, DataArguments, LMTrainingArguments, prog=f"run_{task}.py")
    namespace, _ = parser.parse_known_args(argv)
    model = namespace.model_name_or_path is not None or namespace.model_type is not None
    data = namespace.dataset_name is not None or namespace.train_file is not None
    return model, data, namespace.output_dir or ""


if __name__ == "__main__":
    model, data, output_dir = chosen(sys.argv[1], sys.argv[2:])
    print(int(model), int(data), output_dir, sep="\n")
