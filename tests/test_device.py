"""Device choice, NPU failure messages, the launchers' pre-flight checks and the summary row."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402,F401  (before torch, as in the scripts)
from conftest import free_port  # noqa: E402
import torch  # noqa: E402

from utils.launch import auto_ddp, device  # noqa: E402
from utils.report import results  # noqa: E402
from utils.errors import UsageError  # noqa: E402

CANN_MISSING = "libhccl.so: cannot open shared object file: No such file or directory"
ABI_MISMATCH = "/site-packages/torch_npu/lib/libtorch_npu.so: undefined symbol: _ZN3c1010TensorImpl7stridesEv"
# Variables the launcher and utils.launch.device read; tests set the ones they need.
DEVICE_ENV = ("LM_DEVICE", "DEVICE", "NPROC_PER_NODE", "ACCELERATE_USE_CPU", "LOCAL_RANK", "WORLD_SIZE",
              "AMP_FLAGS", "MODEL", "DATASET", "OUTPUT_DIR")


@pytest.fixture(autouse=True)
def clean_device_state(monkeypatch):
    for name in DEVICE_ENV:
        monkeypatch.delenv(name, raising=False)  # also restores what setup_device() sets
    device.npu_status.cache_clear()
    yield
    device.npu_status.cache_clear()


def fake_torch_npu(tmp_path: Path, error: str) -> Path:
    """A torch_npu package whose import fails like a real one without CANN or built for another torch."""
    package = tmp_path / "fake_site" / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({error!r})\n")
    return package.parent


def run(command, env=None, extra_path=None, timeout=300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in DEVICE_ENV}
    path = [str(extra_path)] if extra_path else []
    base["PYTHONPATH"] = os.pathsep.join([*path, str(ROOT)])
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**base, **(env or {})},
                          timeout=timeout)


def assert_one_error_line(process, *needles):
    assert process.returncode != 0
    assert "Traceback" not in process.stderr + process.stdout
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


# --------------------------------------------------------------------------- choosing a device


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_asked_for_without_torch_npu_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.setenv("LM_DEVICE", "npu")
    with pytest.raises(UsageError) as caught:
        device.setup_device()
    message = str(caught.value)
    assert "\n" not in message
    assert "torch_npu is not installed" in message
    assert torch.__version__ in message


def test_unknown_device_name_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("LM_DEVICE", "tpu")
    with pytest.raises(UsageError, match="LM_DEVICE=tpu"):
        device.resolve_device()


def test_use_cpu_wins_over_a_requested_accelerator(monkeypatch):
    monkeypatch.setenv("LM_DEVICE", "npu")
    assert device.setup_device(use_cpu=True) == "cpu"
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_accelerators_the_first_usable_device_is_cpu():
    assert device.resolve_device() == "cpu"
    assert device.describe_device().startswith("cpu: ")


def test_the_device_fills_in_its_training_defaults(monkeypatch, tmp_path):
    from utils.cli import Command
    from utils.flags.arguments import parse_args

    monkeypatch.setenv("LM_DEVICE", "cpu")
    assert device.training_defaults("cpu") == {"use_cpu": True}  # a single process must not name a backend
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device.training_defaults("cpu")["ddp_backend"] == "gloo"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    *_, args = parse_args(command=Command("run_clm.py", ("--output_dir", str(tmp_path), "--use_cpu", "false")))
    assert args.ddp_backend is None and args.use_cpu is True and args.device.type == "cpu"


def test_nproc_above_the_visible_devices_is_refused(monkeypatch):
    monkeypatch.setattr(device, "device_count", lambda kind: 2)
    device.check_nproc(2, "cuda")
    device.check_nproc(64, "cpu")  # CPU processes share the cores
    with pytest.raises(UsageError) as caught:
        device.check_nproc(8, "npu")
    assert "NPROC_PER_NODE=8" in str(caught.value) and "only 2 NPU" in str(caught.value)


def test_a_run_placed_elsewhere_than_asked_is_refused(monkeypatch):
    args = SimpleNamespace(device=torch.device("cpu"), seed=11, process_index=0)
    device.check_placement(args, "cpu")
    monkeypatch.setenv("LM_DEVICE", "cuda")
    with pytest.raises(UsageError, match="landed on cpu"):
        device.check_placement(args, "cuda")


# --------------------------------------------------------------------------- broken torch_npu


def test_npu_without_cann_gives_one_line_naming_set_env(tmp_path):
    site = fake_torch_npu(tmp_path, CANN_MISSING)
    # The way the scripts run: their CLI wrapper turns UsageError into "error: ..." and exit 2.
    code = "import utils.launch.device as d; from utils.cli import run_cli; run_cli(d.setup_device)"
    process = run([sys.executable, "-c", code], env={"LM_DEVICE": "npu"}, extra_path=site)
    assert_one_error_line(process, "CANN libraries not found (libhccl.so)", "set_env.sh")
    assert process.returncode == 2


def test_npu_built_for_another_torch_is_named_as_a_version_mismatch(tmp_path):
    site = fake_torch_npu(tmp_path, ABI_MISMATCH)
    process = run([sys.executable, "-m", "utils.launch.device"], env={"LM_DEVICE": "npu"}, extra_path=site)
    assert_one_error_line(process, "does not match torch", torch.__version__)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_broken_torch_npu_is_ignored_when_npu_is_not_asked_for(tmp_path):
    site = fake_torch_npu(tmp_path, CANN_MISSING)
    # transformers imports torch_npu unguarded while TrainingArguments picks its device.
    code = (
        "import utils.launch.device as d\n"
        "from transformers import TrainingArguments\n"
        "chosen = d.setup_device()\n"
        f"args = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, report_to='none')\n"
        "print(chosen, args.device.type)\n"
    )
    process = run([sys.executable, "-c", code], extra_path=site)
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["cpu", "cpu"]
    assert "Traceback" not in process.stderr


# --------------------------------------------------------------------------- launcher pre-flight


def test_launcher_refuses_more_processes_than_devices():
    nproc = torch.cuda.device_count() + 1
    process = run(["bash", "scripts/train_clm_8p.sh"], env={"DEVICE": "cuda", "NPROC_PER_NODE": str(nproc)})
    assert_one_error_line(process, "CUDA")
    assert process.returncode == 2


@pytest.mark.parametrize("env, needle", [
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0"),
    ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE=eight"),
    ({"DEVICE": "tpu"}, "DEVICE=tpu"),
])
def test_launcher_rejects_bad_settings_in_one_line(env, needle):
    process = run(["bash", "scripts/train_mlm_1p.sh"], env=env)
    assert_one_error_line(process, needle)
    assert process.returncode == 2


def test_the_launcher_reads_flags_as_the_scripts_do(tmp_path):
    """An abbreviated --output_dir (argparse takes it) puts the log where the run writes, and --model_type
    given as --model_t drops the default hub model: the launcher asks the scripts' own parser."""
    out = tmp_path / "my run"
    process = run(["bash", str(ROOT / "scripts/train_clm_1p.sh"), "--model_t", "gpt2", "--train_file",
                   str(tmp_path / "missing.txt"), "--output_d", str(out)],
                  env={"DEVICE": "cpu", "AMP_FLAGS": "", "HF_HUB_OFFLINE": "1"})
    assert process.returncode == 2
    log = (out / "train.log").read_text()
    assert "--train_file" in log and "missing.txt" in log  # the run's own error, in the run's folder
    command = next(line for line in log.splitlines() if line.startswith("command: "))
    assert "--model_name_or_path" not in command and "--dataset_name" not in command


def test_launcher_stops_before_torchrun_when_npu_cannot_start(tmp_path):
    site = fake_torch_npu(tmp_path, CANN_MISSING)
    process = run(["bash", "scripts/train_plm_1p.sh"], env={"DEVICE": "npu"}, extra_path=site)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    # env_npu.sh may add a note that CANN is not installed; the error is one line, last.
    assert process.stderr.strip().splitlines()[-1].startswith("error: CANN libraries not found")
    assert "torch.distributed" not in process.stdout + process.stderr


# --------------------------------------------------------------------------- summary row

def row_cells(row: str) -> dict:
    """The launcher's row, ``| model | devices | Acc: x | ... |``, as ``{"model": ..., "Acc": "x", ...}``."""
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    named = dict(cell.split(": ", 1) for cell in cells[2:])
    return {"model": cells[0], "devices": cells[1], **named}


def finished_run(folder: Path, flags: list[str], **metrics) -> Path:
    """A run's folder as training leaves it: run_info.json from the parsed flags, then its results."""
    from utils.amp.config import precision_report
    from utils.cli import Command
    from utils.flags.arguments import parse_args
    from utils.report.run_info import run_info, write_run_info

    *_, args = parse_args(command=Command("run_clm.py", (*flags, "--output_dir", str(folder))))
    write_run_info(str(folder), run_info(args, precision_report(args.amp_config)))  # what a native-backend run writes
    (folder / "all_results.json").write_text(json.dumps(metrics))
    return folder


def test_summary_row_of_a_reference_run(tmp_path):
    out = finished_run(tmp_path / "out", ["--model_name_or_path", "gpt2", "--dataset_name", "wikitext", "--do_train",
                                          "--fp16", "--fp16_opt_level", "O2", "--use_combine_grad"],
                       epoch=3.0, eval_accuracy=0.421349, eval_loss=3.2, train_samples_per_second=123.4449)
    process = run([sys.executable, "-m", "utils.report.summary", str(out)])
    assert process.returncode == 0, process.stderr
    assert process.stdout == "| gpt2 | 1p | Acc: 0.4213 | FPS: 123.4 | AMP_Type: O2 | Epochs: 3 |\n"


@pytest.mark.parametrize("flags, amp", [
    (["--fp16"], "O1"),  # the level the run used: O1 is the default
    (["--fp16", "--fp16_opt_level", "O3", "--fp16_opt_level", "O2"], "O2"),  # the last one given
    (["--bf16=true", "--fp16_opt_level", "O2"], "bf16 O2"),
    ([], "fp32"),
])
def test_the_row_the_table_and_the_card_name_the_precision_the_run_used(tmp_path, flags, amp):
    out = finished_run(tmp_path / "out", ["--model_type", "gpt2", *flags], epoch=1.0, fps=2.0)
    row = row_cells(results.summary_row(str(out)))
    cells = results.results_cells(str(out))
    card = results.model_card(json.loads((out / "run_info.json").read_text()), {})
    assert (row["AMP_Type"], cells["AMP_Type"], row["model"]) == (amp, amp, "gpt2")
    assert f"AMP_Type {amp})" in card


def test_summary_row_parses_back(tmp_path):
    out = finished_run(tmp_path / "out", ["--model_name_or_path", "/ckpt/roberta-base/"], epoch=0.5, fps=98.76,
                       eval_accuracy=0.61234)
    row = results.summary_row(str(out))
    assert row.startswith("| ")
    assert row == "| roberta-base | 1p | Acc: 0.6123 | FPS: 98.8 | AMP_Type: fp32 | Epochs: 0.50 |"
    (out / "all_results.json").write_text("{}")
    assert row_cells(results.summary_row(str(out)))["Acc"] == "n/a"


def test_model_column_of_a_run_without_run_info(tmp_path):
    (tmp_path / "all_results.json").write_text(json.dumps({"fps": 1.0}))
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "", "model_type": "gpt2"}))
    assert row_cells(results.summary_row(str(tmp_path)))["model"] == "gpt2"


def test_summary_without_results_is_one_line(tmp_path):
    process = run([sys.executable, "-m", "utils.report.summary", str(tmp_path)])
    assert_one_error_line(process, "all_results.json not found")


# --------------------------------------------------------------------------- end to end


def test_8p_launcher_trains_on_two_cpu_ranks(tmp_path):
    lines = (ROOT / "data" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "train.txt").write_text("".join(lines[:700]), encoding="utf-8")
    (tmp_path / "valid.txt").write_text("".join(lines[700:900]), encoding="utf-8")
    out = tmp_path / "out"
    env = {"NPROC_PER_NODE": "2", "DEVICE": "cpu", "AMP_FLAGS": "", "MASTER_PORT": str(free_port()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    tiny = ["--model_type", "gpt2", "--tokenizer_name", "data/tokenizers/gpt2", "--block_size", "64",
            "--config_overrides", "n_layer=2,n_embd=64,n_head=2,n_positions=128,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
            "--logging_steps", "1", "--fps_warmup_steps", "1", "--disable_tqdm", "true",
            "--train_sampling_strategy", "sequential"]
    process = run(["bash", "scripts/train_clm_8p.sh", *tiny,
                   "--train_file", tmp_path / "train.txt", "--validation_file", tmp_path / "valid.txt",
                   "--max_steps", "4", "--report_to", "none", "--output_dir", out], env=env, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    assert [p.parent for p in tmp_path.rglob("all_results.json")] == [out]
    metrics = json.loads((out / "all_results.json").read_text())
    # 4 steps of 8 samples on each of 2 ranks: only a real 2-process group gives 64 samples.
    samples = metrics["train_samples_per_second"] * metrics["train_runtime"]
    assert samples == pytest.approx(64, rel=0.02)

    assert metrics["fps"] > 0 and metrics["fps_warmup_steps"] == 1

    # The same global batch of 16 in one process (samples in order, so that both runs see the same
    # 16 per step): the same losses
    # up to float summation order (dropout is off so that no random state differs).
    single = tmp_path / "single"
    single_run = run([sys.executable, "run_clm.py", *tiny, "--per_device_train_batch_size", "16",
                   "--train_file", tmp_path / "train.txt", "--validation_file", tmp_path / "valid.txt",
                   "--max_steps", "4", "--report_to", "none",
                   "--do_train", "--output_dir", single], env=env)
    assert single_run.returncode == 0, single_run.stderr[-3000:]
    losses = [[e["loss"] for e in json.loads((d / "trainer_state.json").read_text())["log_history"] if "loss" in e]
              for d in (out, single)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-4)

    log = (out / "train.log").read_text()
    row = [line for line in log.splitlines() if line.startswith("| ")][-1]
    assert process.stdout.rstrip().splitlines()[-1] == row
    parsed = row_cells(row)
    assert parsed["model"] == "gpt2" and parsed["devices"] == "2p" and parsed["AMP_Type"] == "fp32"
    assert 0.0 <= float(parsed["Acc"]) <= 1.0 and float(parsed["FPS"]) > 0


# ------------------------------------------------- `python run_clm.py` with several devices


def test_one_process_on_several_devices_becomes_one_per_device(monkeypatch, tmp_path):
    """What `python run_clm.py ...` on a 2-GPU machine execs; the command is then run for real (on CPU)."""
    from utils.cli import Command

    monkeypatch.setattr(auto_ddp, "device_count", lambda name: 2)
    one_process = Command("run_clm.py", ("--do_train",))
    assert auto_ddp.all_devices_command("cpu", one_process) is None  # processes on one CPU are the launchers' choice
    monkeypatch.setenv("LM_AUTO_DDP", "0")
    assert auto_ddp.all_devices_command("cuda", one_process) is None
    monkeypatch.delenv("LM_AUTO_DDP")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert auto_ddp.all_devices_command("cuda", one_process) is None  # already under torchrun
    monkeypatch.delenv("LOCAL_RANK")

    execs = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: execs.append((command, env)))
    auto_ddp.run_on_all_devices("npu", one_process)
    [(command, env)] = execs
    assert command == [sys.executable, "-m", "utils.launch.torchrun", "--standalone", "--nproc_per_node=2",
                       str(Path("run_clm.py").resolve()), "--do_train"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)

    # The same command (script path and flags filled in), started from another folder, trains on
    # 2 processes: the DDP run the one-process command turns into.
    text = (ROOT / "data" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "train.txt").write_text("".join(text[:400]), encoding="utf-8")
    flags = ["--model_type", "gpt2", "--tokenizer_name", str(ROOT / "data/tokenizers/gpt2"), "--block_size", "64",
             "--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=64", "--train_file",
             str(tmp_path / "train.txt"), "--per_device_train_batch_size", "4", "--max_steps", "2", "--do_train",
             "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")]
    command = command[:5] + [str(ROOT / "run_clm.py"), *flags]
    process = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env={**{k: v for k, v in env.items() if k not in DEVICE_ENV}, "LM_DEVICE": "cpu",
                                  "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert metrics["train_samples_per_second"] * metrics["train_runtime"] == pytest.approx(16, rel=0.02)
