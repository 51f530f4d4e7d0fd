"""--help leads with the suite's flags in named groups, with real defaults; a mistyped flag gets "did you mean"."""

import json
import re
import sys
from dataclasses import dataclass, field
from unittest.mock import patch

import pytest

import run_clm
from conftest import run_script
from utils.errors import UsageError
from utils.flags.arguments import DataArguments, LMTrainingArguments, ModelArguments

SUITE_GROUPS = ["precision", "model", "data", "run folder and launchers"]
TRAINER = "transformers' Trainer (TrainingArguments)"


def main_output(capsys, *args) -> tuple[int, str, str]:
    """run_clm.py's exit status, stdout and stderr for these arguments, in this process."""
    with patch.object(sys, "argv", ["run_clm.py", *args]), pytest.raises(SystemExit) as stop:
        run_clm.main()
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def groups(help_text: str) -> dict[str, list[str]]:
    """{group title: the flags it lists, in order} from a --help text."""
    found, title = {}, None
    for line in help_text.splitlines():
        if re.match(r"^\S.*:$", line) and not line.startswith("usage"):
            title = line[:-1]
            found[title] = []
        elif title and (match := re.match(r"^  (--\w+)", line)):
            found[title].append(match.group(1))
    return found


@pytest.fixture
def help_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # a terminal 80 wide, as when the output is not a terminal
    status, out, _ = main_output(capsys, "--help")
    assert status == 0
    return out


def test_help_leads_with_the_suites_flags_in_named_groups(help_text):
    lines = help_text.splitlines()
    usage = lines[:lines.index("")]
    assert usage[0].startswith("usage: run_clm.py") and len(usage) <= 3
    first = "\n".join(lines[:120])
    for flag in ("--fp16_opt_level", "--use_combine_grad", "--loss_scale"):
        assert f"  {flag} " in first
    shown = groups(help_text)
    assert [title for title in shown if title != "options"] == [*SUITE_GROUPS, TRAINER]
    assert "--fp16_opt_level" in shown["precision"] and "--use_combine_grad" in shown["precision"]
    assert "--block_size" in shown["data"] and "--train_file" in shown["data"]
    assert {"--output_dir", "--overwrite_output_dir"} <= set(shown["run folder and launchers"])
    assert "--fp16" in shown[TRAINER] and "--output_dir" not in shown[TRAINER]


def test_help_gives_real_defaults_and_choices(help_text):
    assert "(default: None)" not in help_text
    level = help_text[help_text.index("  --fp16_opt_level"):help_text.index("  --loss_scale ")]
    assert "--fp16_opt_level {O0,O1,O2,O3}" in level
    assert "(default: O1 with --fp16 or --bf16, else O0)" in " ".join(level.split())
    assert "--amp_backend {auto,native,apex}" in help_text
    assert "--fp16-opt-level" not in help_text  # the --a-b spellings are accepted, not listed twice


def test_a_mistyped_flag_gets_did_you_mean(capsys):
    status, _, err = main_output(capsys, "--fp16_opt_levle", "O2", "--output_dir", "unused")
    assert status == 2
    assert err.splitlines() == [
        "error: unrecognized arguments: --fp16_opt_levle O2; did you mean --fp16_opt_level? (see run_clm.py --help)"]


def test_a_mistyped_key_in_a_file_of_flags_gets_did_you_mean(tmp_path):
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"model_type": "gpt2", "fp16_opt_levle": "O2", "output_dir": str(tmp_path / "out")}))
    with patch.object(sys, "argv", ["run_clm.py", str(flags)]), pytest.raises(UsageError) as error:
        run_clm.main()
    assert str(error.value) == f"{flags}: unknown flag 'fp16_opt_levle'; did you mean 'fp16_opt_level'?"


def test_a_flag_far_from_any_gets_no_guess(capsys):
    status, _, err = main_output(capsys, "--zzzz_qqqq", "1")
    assert status == 2 and "did you mean" not in err and err.startswith("error: unrecognized arguments: --zzzz_qqqq")


def test_a_flag_added_to_a_suite_dataclass_lands_in_a_group():
    from utils.flags.parser import DATA, PRECISION, RUN, flag_parser

    # What another flag of the suite would look like: on LMTrainingArguments (with and without a group of its
    # own), on a data dataclass, and on a new dataclass that names no group.
    @dataclass
    class MoreTrainingArguments(LMTrainingArguments):
        new_precision_flag: int = field(default=1, metadata={"help": "h", "group": PRECISION})
        new_run_flag: int = field(default=2, metadata={"help": "h"})

    @dataclass
    class MoreDataArguments(DataArguments):
        new_data_flag: int = field(default=3, metadata={"help": "h"})

    @dataclass
    class ObjectiveArguments:
        new_objective_flag: int = field(default=4, metadata={"help": "h"})

    parser = flag_parser(ModelArguments, MoreDataArguments, ObjectiveArguments, MoreTrainingArguments, prog="x")
    shown = groups(parser.format_help())
    assert "--new_precision_flag" in shown[PRECISION]
    assert "--new_run_flag" in shown[RUN]
    assert "--new_data_flag" in shown[DATA]
    assert list(shown)[-2:] == ["ObjectiveArguments", TRAINER]
    assert shown["ObjectiveArguments"] == ["--new_objective_flag"]
    assert "--new_run_flag" not in shown[TRAINER] and "--learning_rate" in shown[TRAINER]


def test_the_script_prints_its_help_and_the_guess():
    help_run = run_script("clm", "--help", env={"COLUMNS": "80"})
    assert "  --fp16_opt_level {O0,O1,O2,O3}" in "\n".join(help_run.stdout.splitlines()[:120])
    typo = run_script("clm", "--fp16_opt_levle", "O2", check=False)
    assert typo.returncode == 2 and "did you mean --fp16_opt_level?" in typo.stderr
    assert "Traceback" not in typo.stderr
