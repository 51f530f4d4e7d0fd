"""Hub tokens never reach a file a run writes, however the flag was spelled.

argparse takes any unambiguous abbreviation (``--hub_tok``, ``--hub_t=...``), and a single
``.json`` argument holds the flags in a file; every spelling is tried against the launcher's
train.log, run_info.json, the model card and the pickled training_args.bin.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import QUICK, ROOT, TINY, run_script

SPELLINGS = [
    ["--token", "hf_SECRET"], ["--token=hf_SECRET"],
    ["--hub_token", "hf_SECRET"], ["--hub_token=hf_SECRET"],
    ["--hub_tok", "hf_SECRET"], ["--hub_toke=hf_SECRET"], ["--hub_t", "hf_SECRET"],
]


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s[0].split("=")[0])
def test_every_spelling_is_masked_in_the_launchers_flags(spelling):
    from utils.flags.launch_flags import read_flags

    flags = ["--seed", "1", *spelling, "--output_dir", "out"]
    *_, output_dir, masked = read_flags("clm", flags)
    assert not any("hf_SECRET" in arg for arg in masked), masked
    assert masked[:2] == flags[:2] and masked[-2:] == ["--output_dir", "out"] and output_dir == "out"


def test_a_command_that_does_not_parse_is_masked_too():
    # "--tok" is ambiguous (--token, --tokenizer_name): the run refuses it, but a log line of it must not leak.
    from utils.flags.secrets import mask_command

    masked = mask_command(["python", "run_clm.py", "--tok", "hf_SECRET", "--hub_tok=hf_SECRET"], set())
    assert masked == ["python", "run_clm.py", "--tok", "***", "--hub_tok=***"]


def _files_holding(folder, secret: bytes) -> list:
    return [str(path) for path in sorted(folder.rglob("*")) if path.is_file() and secret in path.read_bytes()]


def _launch(out, flags, text_files, hf_home):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "NPROC_PER_NODE", "OUTPUT_DIR")}
    env.update(DEVICE="cpu", AMP_FLAGS="", HF_HOME=str(hf_home))
    command = ["bash", str(ROOT / "scripts" / "train_clm_1p.sh"), *TINY["clm"], *QUICK, "--max_steps", "2",
               "--save_steps", "1", "--train_file", str(text_files["train"]), "--validation_file",
               str(text_files["valid"]), "--max_eval_samples", "8", *flags, "--output_dir", str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


def test_no_token_reaches_the_files_of_two_launcher_runs_started_together(text_files, tmp_path):
    # Two runs on one machine at once, without MASTER_PORT: each launcher picks a free port.
    runs = {tmp_path / "a": ["--token=hf_SECRET_A", "--hub_tok", "hf_SECRET_B"],
            tmp_path / "b": ["--hub_t=hf_SECRET_C", "--token", "hf_SECRET_D"]}
    with ThreadPoolExecutor(2) as pool:
        processes = dict(zip(runs, pool.map(lambda item: _launch(*item, text_files, tmp_path / "hf"),
                                            runs.items())))
    for out, process in processes.items():
        assert process.returncode == 0, process.stderr[-3000:]
        assert (out / "checkpoint-1" / "training_args.bin").is_file()
        command_line = next(line for line in (out / "train.log").read_text().splitlines() if line.startswith("command:"))
        assert command_line.count("***") == 2, command_line
        assert _files_holding(out, b"hf_SECRET") == []
        assert "hf_SECRET" not in process.stdout + process.stderr


def test_no_token_reaches_the_files_of_a_run_given_a_json_file_of_flags(text_files, tmp_path):
    out = tmp_path / "out"
    flags = {"model_type": "gpt2", "tokenizer_name": TINY["clm"][3], "config_overrides": TINY["clm"][5],
             "block_size": 64, "per_device_train_batch_size": 4, "max_steps": 1, "report_to": "none",
             "do_train": True, "train_file": str(text_files["train"]), "output_dir": str(out),
             "token": "hf_SECRET_E", "hub_token": "hf_SECRET_F"}
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps(flags))
    run_script("clm", flags_file)
    assert (out / "training_args.bin").is_file() and (out / "run_info.json").is_file()
    assert _files_holding(out, b"hf_SECRET") == []
