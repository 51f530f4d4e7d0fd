"""Mixed precision inside real Trainer runs: O-levels, combine_grad, loss scaling, resume, DDP, saving.

Most tests train LMTrainer in-process on a tiny GPT-2 (vocab 128, width 32, dropout off) over
fixed token blocks, which takes about a second per run; the script-level behaviour (the same
command resumes, torchrun on two CPU processes, one-line errors) runs run_clm.py as a user does.
fp16 and bf16 both run on the CPU. AdamW eps is 1e-3 for every level (fp16 O3 keeps Adam's
moments in fp16, where a tiny eps blows the update up: apex's caveat for O3).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import QUICK, ROOT, TINY, free_port, read_json, run_script
from utils.flags.arguments import LMTrainingArguments
from utils.data.collators import CausalLMCollator
from utils.errors import UsageError
from utils.model.metrics import TokenAccuracy
from utils.train.trainer import LMTrainer
from amp_cases import EVAL, TRAIN, losses, make_trainer, poison_grads_at, tiny_model, weights

# ---------------------------------------------------------------------- O-levels
@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("fp32"))
    trainer.train()
    return losses(trainer), trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("precision,level,combine", [
    ("fp16", "O0", False), ("fp16", "O1", False), ("fp16", "O2", True), ("fp16", "O3", False),
    ("bf16", "O1", False), ("bf16", "O2", True),
])
def test_each_level_trains_close_to_fp32(precision, level, combine, fp32_run, tmp_path):
    trainer = make_trainer(tmp_path, **{precision: True}, fp16_opt_level=level, use_combine_grad=combine)
    trainer.train()
    reference, reference_eval = fp32_run
    got = losses(trainer)
    assert len(got) == 6 and all(math.isfinite(loss) for loss in got)
    assert got[-1] < got[0]  # it learns
    # O0 is fp32 through our optimizer wrapper: the same as the Trainer's own fp32 run, up to summation
    # order; half levels within a tolerance that fits their 8 (bf16) or 11 (fp16) mantissa bits.
    tolerance = {"O0": 1e-5, "fp16": 2e-2, "bf16": 5e-2}["O0" if level == "O0" else precision]
    assert got == pytest.approx(reference, rel=tolerance)
    evaluation = trainer.evaluate()["eval_loss"]
    assert evaluation == pytest.approx(reference_eval, rel=tolerance)
    floats = {p.dtype for p in trainer.model.parameters()}
    half = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])
    assert floats == {"O0": {torch.float32}, "O1": {torch.float32}, "O2": {half, torch.float32},
                      "O3": {half}}[level]
    if precision == "fp16" and level != "O0":
        assert {"loss_scale", "skipped_steps"} <= trainer.state.log_history[0].keys()


@pytest.mark.parametrize("precision,level", [("fp16", "O2"), ("bf16", "O1")])
def test_combine_grad_gives_the_same_parameters(precision, level, tmp_path):
    flags = {precision: True, "fp16_opt_level": level, "gradient_accumulation_steps": 2, "max_grad_norm": 0.05,
             "weight_decay": 0.1, "max_steps": 4}
    runs = []
    for combine in (False, True):
        trainer = make_trainer(tmp_path / str(combine), use_combine_grad=combine, **flags)
        trainer.train()
        runs.append((weights(trainer), losses(trainer)))
    (per_tensor, losses_a), (combined, losses_b) = runs
    # Same elementwise arithmetic over the same values; only the grad-norm sum is ordered differently
    # (per-tensor norms vs one flat norm), which moves the clipping factor (always < 1 here) by an
    # ulp; through half weights that grows to ~1e-6 relative in the losses after 4 steps.
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for name, tensor in per_tensor.items():
        torch.testing.assert_close(combined[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_adamw_and_a_scheduler(tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", use_combine_grad=True,
                           optim="adamw_torch_fused", lr_scheduler_type="cosine", warmup_steps=2)
    trainer.train()
    assert all(math.isfinite(loss) for loss in losses(trainer))
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert rates[0] < rates[1] > rates[-1]  # warm-up, then cosine decay
    assert trainer.precision.optimizer.optimizer.defaults["fused"]


# ------------------------------------------------------------------ loss scaling
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_overflow_skips_the_step_and_halves_the_scale(value, tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", use_combine_grad=True, max_grad_norm=1.0,
                           save_strategy="steps", save_steps=6)
    poison_grads_at(trainer, {2, 3}, value)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["loss_scale"] for entry in logs] == [2.0**16] * 2 + [2.0**15, 2.0**14] + [2.0**14] * 2
    assert [entry["skipped_steps"] for entry in logs] == [0, 0, 1, 2, 2, 2]
    assert not math.isfinite(logs[2]["grad_norm"])
    # The LR schedule holds on skipped steps (linear decay from 3e-3 over 6 steps).
    assert logs[2]["learning_rate"] == pytest.approx(logs[1]["learning_rate"] - 5e-4)
    assert logs[3]["learning_rate"] == logs[2]["learning_rate"]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    saved = read_json(tmp_path / "checkpoint-6" / "trainer_state.json")["log_history"]
    assert [entry["skipped_steps"] for entry in saved if "loss" in entry][-1] == 2
    state = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert state["scaler"]["skipped_steps"] == 2 and state["scaler"]["scale"] == 2.0**14


def test_static_scale_never_changes(tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O1", loss_scale="128", loss_scale_window=2)
    poison_grads_at(trainer, {1}, math.inf)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {entry["loss_scale"] for entry in logs} == {128.0}
    assert [entry["skipped_steps"] for entry in logs] == [0, 1, 1, 1, 1, 1]


def test_dynamic_scale_grows_after_the_window(tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", loss_scale_window=2)
    trainer.train()
    scales = [entry["loss_scale"] for entry in trainer.state.log_history if "loss" in entry]
    assert scales == [2.0**16, 2.0**17, 2.0**17, 2.0**18, 2.0**18, 2.0**19]


# ------------------------------------------------------------------------ saving
def test_saved_model_loads_in_fp32_with_the_same_eval_loss(tmp_path):
    trainer = make_trainer(tmp_path / "run", fp16=True, fp16_opt_level="O2", use_combine_grad=True)
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    masters = weights(trainer)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "saved", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, masters[name]), name
    # The same weights evaluated in fp32 and in the run's O2 precision: equal up to fp16 rounding.
    fp32_eval = make_trainer(tmp_path / "eval", model=reloaded).evaluate()["eval_loss"]
    assert fp32_eval == pytest.approx(trainer.evaluate()["eval_loss"], rel=2e-3)


# ------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("flags,needle", [
    ({"fp16_opt_level": "O2"}, "--fp16_opt_level O2 needs --fp16 or --bf16"),
    ({"use_combine_grad": True}, "--use_combine_grad needs --fp16 or --bf16"),
    ({"fp16": True, "loss_scale": "-4"}, "--loss_scale: loss scale must be 'dynamic' or a positive number"),
    ({"fp16": True, "loss_scale": "big"}, "--loss_scale"),
    ({"fp16": True, "fp16_opt_level": "O4"}, "--fp16_opt_level O4: choose one of O0, O1, O2, O3"),
    ({"fp16": True, "bf16": True}, "--fp16 and --bf16 exclude each other"),
    ({"fp16": True, "loss_scale_window": 0}, "--loss_scale_window 0"),
])
def test_bad_amp_flags_are_usage_errors(flags, needle, tmp_path):
    with pytest.raises(UsageError) as caught:
        LMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **flags)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_bad_flag_on_the_command_line_is_one_error_line(tmp_path):
    process = run_script("clm", *TINY["clm"], "--train_file", "x.txt", "--do_train", "--output_dir", tmp_path,
                         "--loss_scale", "0", "--fp16", check=False)
    assert process.returncode == 2
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --loss_scale: loss scale must be 'dynamic' or a positive number, got '0'"]


# ---------------------------------------------------------------- script runs
SCRIPT_AMP = ["--fp16", "--fp16_opt_level", "O2", "--use_combine_grad", "--max_grad_norm", "0.5",
              "--logging_steps", "1", "--block_size", "32", "--per_device_train_batch_size", "2",
              "--train_sampling_strategy", "sequential"]


@pytest.mark.parametrize("combine", [True, False], ids=["flat-buffers", "per-tensor-grads-packed"])
def test_two_cpu_processes_match_one(combine, text_files, tmp_path):
    amp = SCRIPT_AMP if combine else [flag for flag in SCRIPT_AMP if flag != "--use_combine_grad"]
    common = [*TINY["clm"], *QUICK, *amp, "--max_steps", "3", "--train_file", text_files["train"],
              "--do_train", "--max_train_samples", "64", "--config_overrides",
              "n_layer=2,n_embd=64,n_head=2,n_positions=128,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"]
    env = {**os.environ, "LM_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_clm.py", *map(str, common), "--output_dir", str(tmp_path / "ddp")]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    # The same global batch of 4 in one process.
    run_script("clm", *common, "--per_device_train_batch_size", "4", "--output_dir", tmp_path / "single",
               env={"OMP_NUM_THREADS": "1"})
    logs = [[e for e in read_json(tmp_path / d / "trainer_state.json")["log_history"] if "loss" in e]
            for d in ("ddp", "single")]
    assert len(logs[0]) == 3
    info = read_json(tmp_path / "ddp" / "run_info.json")  # the layout the DDP run really used
    assert (info["combine_grad"], info["world_size"], info["opt_level"]) == (combine, 2, "O2")
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], rel=1e-3)
    assert [e["grad_norm"] for e in logs[0]] == pytest.approx([e["grad_norm"] for e in logs[1]], rel=1e-2)
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("ddp", "single")]
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-2, atol=1e-4, msg=name)


# ------------------------------------------------------------------ benchmark
def test_e2e_benchmark_tiny_prints_a_table(tmp_path):
    process = subprocess.run([sys.executable, "benchmarks/bench_amp_e2e.py", "--tiny", "--steps", "2",
                              "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert process.returncode == 0, process.stderr[-3000:]
    rows = [line for line in process.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 3  # header, rule, O0, O2, O2 + combine_grad
    assert "fp16 O2 + combine_grad" in rows[-1]
