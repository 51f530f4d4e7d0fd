"""Every launcher with its reference precision: fp16 O2 with combined gradients (the default AMP_FLAGS), and bf16 O2.

Each run is the launcher as a user starts it, on the CPU, for two steps of a tiny model; the row it prints
and the model it saves are checked. The one-process runs are also compared with the same flags run as
``python run_TASK.py``: torchrun's world of one must train the same weights.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, free_port

BF16_O2 = "--bf16 --fp16_opt_level O2 --use_combine_grad"
MODEL_NAMES = {"clm": "gpt2", "mlm": "roberta", "plm": "xlnet"}
# (launcher, NPROC_PER_NODE or None for the launcher's own default)
LAUNCHES = [("1p", None), ("8p", "1"), ("8p", "2")]


def launcher_env(tmp_path, **extra) -> dict:
    """A fresh shell's environment on a CPU machine: no launcher settings inherited from the test run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_")) and k not in (
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "AMP_FLAGS",
               "OUTPUT_DIR", "MODEL", "DATASET")}
    return {**env, "DEVICE": "cpu", "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), **extra}


def flags(task, text_files, out) -> list[str]:
    return [*TINY[task], "--train_file", str(text_files["train"]), "--validation_file", str(text_files["valid"]),
            "--max_steps", "2", "--max_eval_samples", "16", "--report_to", "none", "--disable_tqdm", "true",
            "--seed", "7", "--output_dir", str(out)]


def assert_finite_trained_model(out, task):
    weights = load_file(out / "model.safetensors")
    assert weights, "model.safetensors holds no tensor"
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32, f"{name} saved as {tensor.dtype}: O2 saves the fp32 masters"
        assert torch.isfinite(tensor).all(), f"{name} has non-finite values"
    return weights


@pytest.mark.parametrize("amp", ["default", "bf16"])
@pytest.mark.parametrize("launcher, nproc", LAUNCHES, ids=["1p", "8p-nproc1", "8p-nproc2"])
@pytest.mark.parametrize("task", ["clm", "mlm", "plm"])
def test_launcher_with_reference_precision_trains_and_saves(task, launcher, nproc, amp, text_files, tmp_path):
    out = tmp_path / "out"
    extra = {} if nproc is None else {"NPROC_PER_NODE": nproc}
    if amp == "bf16":
        extra["AMP_FLAGS"] = BF16_O2
    process = subprocess.run(["bash", str(ROOT / "scripts" / f"train_{task}_{launcher}.sh"),
                              *flags(task, text_files, out)], cwd=tmp_path, env=launcher_env(tmp_path, **extra),
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    world = int(nproc or 1)
    rows = [line for line in process.stdout.splitlines() if line.startswith("| ")]
    assert rows, process.stdout[-2000:]
    row = rows[-1]
    amp_type = "bf16 O2" if amp == "bf16" else "O2"
    assert re.fullmatch(rf"\| {MODEL_NAMES[task]}\S* \| {world}p \| Acc: 0\.\d{{4}} \| FPS: [\d.]+ \| "
                        rf"AMP_Type: {amp_type} \| Epochs: [\d.]+ \|", row), row
    accuracy = float(re.search(r"Acc: ([\d.]+)", row).group(1))
    fps = float(re.search(r"FPS: ([\d.]+)", row).group(1))
    results = json.loads((out / "all_results.json").read_text())
    assert accuracy == pytest.approx(results["eval_accuracy"], abs=5e-5) and fps > 0, row
    command = next(line for line in process.stdout.splitlines() if line.startswith("command: "))
    assert ("--bf16" in command) == (amp == "bf16") and ("--fp16 " in command) == (amp == "default")
    assert "--use_combine_grad" in command and "O2" in command
    assert_finite_trained_model(out, task)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_one_process_launcher_trains_what_the_plain_script_trains(task, text_files, tmp_path):
    """torchrun's world of one (the 1p launchers) and ``python run_TASK.py``: the same weights, bit for bit."""
    launched, plain = tmp_path / "launched", tmp_path / "plain"
    process = subprocess.run(["bash", str(ROOT / "scripts" / f"train_{task}_1p.sh"), *flags(task, text_files, launched)],
                             cwd=tmp_path, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    # The launcher's defaults that these flags do not override, given to the script directly.
    reference = ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--do_train",
                 "--do_eval", "--fp16", "--fp16_opt_level", "O2", "--use_combine_grad", "--save_steps", "100000"]
    env = launcher_env(tmp_path, LM_DEVICE="cpu")
    process = subprocess.run([sys.executable, str(ROOT / f"run_{task}.py"), *reference,
                              *flags(task, text_files, plain)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]

    a, b = assert_finite_trained_model(launched, task), assert_finite_trained_model(plain, task)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
