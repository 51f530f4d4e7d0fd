"""Preemption, kills at any moment, exact resume, non-finite losses (utils/train/stops.py, utils/runs/checkpoints.py).

The subprocess tests use the test-only fault plugin (tests/fault_plugin/sitecustomize.py, on
PYTHONPATH, driven by LM_FAULT_PLAN): signals and kills are real (os.kill on the script's own
process) but land at a chosen step, so the tests are deterministic on a slow shared machine.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from fault_plugin.sitecustomize import planned_faults
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from conftest import ROOT, TINY, free_port, read_json, run_script, with_faults
from utils.flags.arguments import LMTrainingArguments
from utils.runs.checkpoints import COMPLETE_MARKER, checkpoint_problem, publish, write_marker
from utils.runs.folder import RunFolder
from utils.train import stops
from utils.errors import UsageError
from utils.train.stops import PreemptionCallback

# 12 samples of 64 tokens, 4 per step: 3 steps per epoch, so resumes cross epoch boundaries.
RUN = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_steps", "8",
       "--save_steps", "2", "--logging_steps", "1", "--max_train_samples", "12", "--max_eval_samples", "8",
       "--report_to", "none", "--disable_tqdm", "true", "--seed", "7"]


def train(task, text_files, out, faults="", *extra, eval_too=True):
    evaluation = ["--do_eval", "--validation_file", text_files["valid"]] if eval_too else []
    return run_script(task, *TINY[task], *RUN, *extra, "--train_file", text_files["train"], "--do_train",
                      *evaluation, "--output_dir", out, check=False, env=with_faults(faults))


def losses_by_step(out) -> dict:
    history = read_json(out / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def last_line(process) -> str:
    return process.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted(text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    process = train("clm", text_files, out)
    assert process.returncode == 0, process.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------- whole runs


def test_sigterm_then_kills_then_resume_end_where_an_uninterrupted_run_ends(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"

    # SIGTERM at step 3 (not a save step, the end of epoch 1): checkpoint, no final outputs, 143.
    process = train("clm", text_files, out, "sigterm@3")
    assert process.returncode == 143, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    assert last_line(process).startswith("stopped: SIGTERM received; saved ") and "checkpoint-3" in last_line(process)
    assert (out / "checkpoint-3" / COMPLETE_MARKER).is_file()
    assert not (out / "model.safetensors").exists() and not (out / "eval_results.json").exists()

    # SIGKILL at the end of step 5: the run resumed from 3, saved 4, then died.
    assert train("clm", text_files, out, "kill@5").returncode == -signal.SIGKILL
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()

    # SIGKILL in the middle of writing checkpoint-6: only its staging folder is left.
    assert train("clm", text_files, out, "kill_in_save@6").returncode == -signal.SIGKILL
    assert (out / "tmp-checkpoint-6").is_dir() and not (out / "checkpoint-6").exists()

    # A half-written checkpoint from some other writer is skipped, with a word about it.
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "config.json").write_text("{")

    process = train("clm", text_files, out)
    assert process.returncode == 0, process.stderr[-3000:]
    log = process.stdout + process.stderr
    assert "Skipping" in log and "checkpoint-7" in log
    assert f"Resuming from {out / 'checkpoint-4'}" in log
    assert not (out / "tmp-checkpoint-6").exists()

    expected, resumed = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert tensor.equal(resumed[name]), name
    assert losses_by_step(out) == losses_by_step(uninterrupted)
    for key in ("eval_loss", "eval_accuracy", "perplexity"):
        assert read_json(out / "eval_results.json")[key] == read_json(uninterrupted / "eval_results.json")[key]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_files, tmp_path):
    out = tmp_path / "out"
    process = train("mlm", text_files, out, "nan_loss@4", eval_too=False)
    assert process.returncode == 3, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    line = last_line(process)
    assert line.startswith("error: non-finite loss") and "at step 4" in line and "checkpoint-2" in line
    # Step 4 is a save step: its (NaN) weights must not be saved, and there is no final model.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()


def test_train_loss_after_kill_and_resume_is_the_uninterrupted_runs(uninterrupted, text_files, tmp_path):
    # The running loss sum travels in the checkpoint: the mean covers steps 1-8, not only those after the resume.
    out = tmp_path / "out"
    assert train("clm", text_files, out, "kill@5").returncode == -signal.SIGKILL  # checkpoint-4 is the newest
    process = train("clm", text_files, out)
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-4'}" in process.stdout + process.stderr
    expected = read_json(uninterrupted / "train_results.json")["train_loss"]
    assert read_json(out / "train_results.json")["train_loss"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("chunk", [None, "64"])
def test_nan_embeddings_stop_the_run_with_or_without_the_chunked_loss(text_files, tmp_path, chunk):
    # The guard must watch the loss training computes: --loss_chunk_size computes it without the model's output loss.
    out = tmp_path / "out"
    extra = ["--loss_chunk_size", chunk] if chunk else []
    process = train("clm", text_files, out, "nan_embeddings@3", *extra, "--max_steps", "6", eval_too=False)
    assert process.returncode == 3, process.stderr[-3000:]
    line = last_line(process)
    assert line.startswith("error: non-finite loss") and "at step 3" in line and "checkpoint-2" in line
    assert not (out / "model.safetensors").exists()
    saved = list(out.rglob("*.safetensors"))
    assert saved  # checkpoint-2's weights
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_a_skipped_step_is_reported_as_skipped_and_left_out_of_the_mean(text_files, tmp_path):
    out = tmp_path / "out"
    process = train("clm", text_files, out, "nan_loss@2", "--on_nonfinite_loss", "skip", "--max_steps", "4",
                    eval_too=False)
    assert process.returncode == 0, process.stderr[-3000:]
    logs = {e["step"]: e for e in read_json(out / "trainer_state.json")["log_history"] if "learning_rate" in e}
    assert "loss" not in logs[2] and logs[2]["skipped_steps"] == 1  # not a loss of 0.0
    taken = [logs[step]["loss"] for step in (1, 3, 4)]
    assert all(loss > 5 for loss in taken)
    assert read_json(out / "train_results.json")["train_loss"] == pytest.approx(sum(taken) / 3, rel=1e-6)


def test_nan_loss_skip_drops_that_update_and_goes_on(text_files, tmp_path):
    out = tmp_path / "out"
    process = train("clm", text_files, out, "nan_loss@4", "--on_nonfinite_loss", "skip", eval_too=False)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Non-finite loss at step 4: its update was skipped" in process.stdout + process.stderr
    assert read_json(out / "trainer_state.json")["global_step"] == 8
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


def test_under_torchrun_all_processes_stop_after_the_same_step(text_files, tmp_path):
    # Only process 1 gets SIGTERM; both must save checkpoint-3 together and stop with 143.
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "run_clm.py"), *TINY["clm"], *RUN, "--per_device_train_batch_size", "2", "--use_cpu",
               "--train_file", str(text_files["train"]), "--do_train", "--output_dir", str(out)]
    env = {**os.environ, **with_faults("sigterm@3/1", ROOT), "ACCELERATE_USE_CPU": "true"}
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert process.returncode != 0
    log = process.stdout + process.stderr
    assert log.count("saving a checkpoint at step 3 of 8, then stopping") == 2, log[-4000:]
    assert log.count("(exit status 143)") == 2
    files = set(os.listdir(out / "checkpoint-3"))
    assert {"rng_state_0.pth", "rng_state_1.pth", COMPLETE_MARKER} <= files
    assert not (out / "checkpoint-4").exists()


# ---------------------------------------------------------------------------- choosing the checkpoint


def fake_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 100)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_marker(str(path), step)
    return path


def args_for(out, **kwargs):
    return LMTrainingArguments(output_dir=str(out), do_train=True, report_to="none", **kwargs)


def checkpoint_to_resume(args):
    """What a start with ``args`` resumes from, the folder's lock let go again."""
    with RunFolder.claim(args) as run:
        return run.checkpoint


def test_resume_takes_the_newest_complete_checkpoint_and_says_what_it_skipped(tmp_path, caplog):
    out = tmp_path / "out"
    fake_checkpoint(out, 2)
    good = fake_checkpoint(out, 4)
    fake_checkpoint(out, 6, complete=False)  # cut off (or not ours): no marker
    truncated = fake_checkpoint(out, 8)
    (truncated / "model.safetensors").write_bytes(b"x" * 10)  # damaged after it was written
    (out / "tmp-checkpoint-10" / "checkpoint-10").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="utils"):
        assert checkpoint_to_resume(args_for(out)) == str(good)
    assert "checkpoint-6: no checkpoint_complete.json" in caplog.text
    assert "checkpoint-8 is damaged (model.safetensors has 10 bytes, not the 100" in caplog.text
    assert (out / "damaged-checkpoint-8" / "model.safetensors").read_bytes() == b"x" * 10  # moved aside, kept


def test_leftovers_of_a_run_killed_before_its_first_checkpoint_do_not_block_it(tmp_path):
    out = tmp_path / "out"
    (out / "tmp-checkpoint-2" / "checkpoint-2").mkdir(parents=True)
    (out / "tmp-model").mkdir()
    (out / "run_info.json").write_text("{}")
    (out / "train.log").write_text("log")
    assert checkpoint_to_resume(args_for(out)) is None


def test_only_incomplete_checkpoints_is_an_error_that_names_them(tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 5, complete=False)
    with pytest.raises(UsageError, match=r"checkpoint-5 is incomplete: pass --resume_from_checkpoint"):
        checkpoint_to_resume(args_for(out))


def test_a_folder_whose_only_checkpoints_were_damaged_says_so_in_its_error(tmp_path, caplog):
    out = tmp_path / "out"
    for step in (2, 4):
        rotted = fake_checkpoint(out, step)
        (rotted / "model.safetensors").write_bytes(b"y" * 100)  # the same size, other bytes
    for attempt in ("moves them aside", "finds them aside"):
        with caplog.at_level(logging.WARNING, logger="utils"), pytest.raises(UsageError) as refused:
            checkpoint_to_resume(args_for(out))
        assert str(refused.value) == (
            f"--output_dir {out} is not empty and holds no checkpoint to resume from: its checkpoints were found "
            "damaged (their files no longer match their checksums) and are kept as damaged-checkpoint-2, "
            "damaged-checkpoint-4; choose another folder, or add --overwrite_output_dir to train over it"), attempt
    assert "checkpoint-4 is damaged (model.safetensors has changed since it was written" in caplog.text


def test_a_checkpoint_resumes_only_as_it_was_sharded(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from utils.runs.resume_check import check_resumable

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
    plain = tmp_path / "checkpoint-2"
    model.save_pretrained(plain)
    (plain / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    check_resumable(str(plain), model, given=True)
    with pytest.raises(UsageError, match=r"checkpoint-2 was written by a run without --fsdp: resume it without"):
        check_resumable(str(plain), model, given=True, fsdp=True)
    # The Trainer's --fsdp checkpoints hold the model state as pytorch_model_fsdp.bin (FULL_STATE_DICT).
    torch.save(model.state_dict(), plain / "pytorch_model_fsdp.bin")
    check_resumable(str(plain), model, given=True, fsdp=True)
    with pytest.raises(UsageError, match=r"checkpoint-2 \(the newest .*\) was written by an --fsdp run: resume it "
                                         r"with --fsdp, .*--overwrite_output_dir"):
        check_resumable(str(plain), model, given=False)


def test_explicit_checkpoint_is_checked(tmp_path):
    damaged = fake_checkpoint(tmp_path, 3)
    (damaged / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="is damaged: model.safetensors is missing"):
        checkpoint_to_resume(args_for(tmp_path / "out", resume_from_checkpoint=str(damaged)))
    unmarked = fake_checkpoint(tmp_path / "other", 3, complete=False)  # e.g. from plain transformers
    (unmarked / "optimizer.pt").write_bytes(b"state")
    assert checkpoint_to_resume(args_for(tmp_path / "out", resume_from_checkpoint=str(unmarked))) == str(unmarked)


def test_publishing_over_an_existing_checkpoint_replaces_it(tmp_path):
    old = fake_checkpoint(tmp_path, 4)
    new = fake_checkpoint(tmp_path / "tmp-checkpoint-4", 4)
    (new / "model.safetensors").write_bytes(b"new")
    publish(str(new), str(old))
    assert (old / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "tmp-checkpoint-4"]


# ---------------------------------------------------------------------------- the callbacks in-process


def test_signal_sets_a_flag_and_the_step_end_saves_and_stops():
    callback, args = PreemptionCallback(), TrainingArguments(output_dir="unused", report_to="none")
    state, control = TrainerState(global_step=5, max_steps=10), TrainerControl()
    before = signal.getsignal(signal.SIGTERM)
    callback.on_train_begin(args, state, control)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only a flag is set
        callback.on_step_end(args, state, control)
        callback.on_train_end(args, state, control)
        # The checkpoint is written: further signals (torchrun's shutdown) must not cut the exit short.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        callback._restore_handlers()
    assert control.should_save and control.should_training_stop and callback.stopped_at == 5
    assert callback.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_second_signal_is_not_caught():
    callback, args = PreemptionCallback(), TrainingArguments(output_dir="unused", report_to="none")
    state, control = TrainerState(global_step=1, max_steps=10), TrainerControl()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the test runner set
    try:
        callback.on_train_begin(args, state, control)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # at once: the same stop delivered twice (systemd, then torchrun)
        callback._received_at -= stops.SAME_STOP_SECONDS
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback._restore_handlers()
        signal.signal(signal.SIGINT, previous)


def test_a_repeated_sigterm_is_the_same_stop_however_late():
    """Slurm, systemd and Kubernetes signal every process, and each layer under them passes its own on."""
    callback, args = PreemptionCallback(), TrainingArguments(output_dir="unused", report_to="none")
    state, control = TrainerState(global_step=1, max_steps=10), TrainerControl()

    def killed(*_):  # what SIGTERM would do to the process if the callback let it through
        raise AssertionError("the repeated SIGTERM was let through: the save would be cut short")

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        callback.on_train_begin(args, state, control)
        os.kill(os.getpid(), signal.SIGTERM)
        callback._received_at -= 60 * stops.SAME_STOP_SECONDS  # a minute later, in the middle of the save
        os.kill(os.getpid(), signal.SIGTERM)  # caught again: the save goes on
        callback.on_step_end(args, state, control)
    finally:
        callback._restore_handlers()
        signal.signal(signal.SIGTERM, previous)
    assert control.should_save and callback.stopped_at == 1 and callback.exit_status == 143


def test_fault_plan_reads_steps_and_ranks(monkeypatch):
    monkeypatch.setenv("LM_FAULT_PLAN", "sigterm@3/1, kill@5,nan_loss@2/0")
    monkeypatch.setenv("RANK", "1")
    assert planned_faults() == {"sigterm": 3, "kill": 5}


# ---------------------------------------------------------------------------- reruns and the output folder


def file_digests(folder) -> dict:
    """Every file under ``folder`` with its content's hash and its mode."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def overwritten(text_files, tmp_path_factory):
    """A run stopped at step 5; another command over it with --overwrite_output_dir, stopped at 3, then rerun."""
    out = tmp_path_factory.mktemp("overwritten") / "out"
    first = train("clm", text_files, out, "sigterm@5", "--seed", "8")
    assert first.returncode == 143, first.stderr[-3000:]
    stopped = train("clm", text_files, out, "sigterm@3", "--overwrite_output_dir")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    after_stop = sorted(p.name for p in out.glob("checkpoint-*"))
    rerun = train("clm", text_files, out, "", "--overwrite_output_dir")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return {"out": out, "after_stop": after_stop, "rerun": rerun}


def test_starting_over_clears_the_earlier_runs_checkpoints(overwritten):
    # The first run's checkpoint-4 and checkpoint-5 would otherwise be taken by a resume.
    assert overwritten["after_stop"] == ["checkpoint-2", "checkpoint-3"]


def test_the_same_overwrite_command_resumes_its_own_checkpoint(overwritten, uninterrupted):
    out, rerun = overwritten["out"], overwritten["rerun"]
    assert f"Resuming from {out / 'checkpoint-3'}" in rerun.stdout + rerun.stderr
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert losses_by_step(out) == losses_by_step(uninterrupted)


def test_rerunning_a_finished_command_is_a_no_op_that_changes_no_file(overwritten, text_files):
    out = overwritten["out"]
    before = file_digests(out)
    process = train("clm", text_files, out, "", "--overwrite_output_dir")
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stderr.strip().splitlines() == [
        f"nothing to do: {out} holds the finished run of this same command, left as it is "
        "(delete the folder or choose another --output_dir to run it again)"]
    assert file_digests(out) == before


def test_the_final_model_is_as_readable_as_every_other_output(overwritten):
    # Shared results on a cluster: not safetensors' private 0600.
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: mode & 0o777 for name, (_, mode) in file_digests(overwritten["out"]).items()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask


def test_an_evaluation_only_run_into_a_finished_folder_is_refused(overwritten, text_files):
    out = overwritten["out"]
    before = file_digests(out)
    process = run_script("clm", *TINY["clm"], "--do_eval", "--validation_file", text_files["valid"],
                         "--max_eval_samples", "8", "--report_to", "none", "--output_dir", out, check=False)
    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    line = last_line(process)
    assert line.startswith(f"error: --output_dir {out} holds a finished run of another command")
    assert "--overwrite_output_dir" in line
    assert file_digests(out) == before


def test_a_sigterm_after_the_last_step_stops_before_evaluating_and_the_rerun_evaluates(uninterrupted, text_files,
                                                                                       tmp_path):
    out = tmp_path / "out"
    process = train("clm", text_files, out, "sigterm_after_last_step")
    assert process.returncode == 143, process.stderr[-3000:]
    assert last_line(process).startswith("stopped: SIGTERM received after the last training step; the final model")
    assert (out / "model.safetensors").is_file() and not (out / "eval_results.json").exists()
    trained = (out / "train_results.json").read_bytes()

    process = train("clm", text_files, out)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "loading its final model, evaluating only" in process.stdout + process.stderr
    assert (out / "train_results.json").read_bytes() == trained
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    for key in ("eval_loss", "eval_accuracy", "perplexity"):
        assert read_json(out / "eval_results.json")[key] == read_json(uninterrupted / "eval_results.json")[key]


def test_one_run_at_a_time_and_a_killed_run_leaves_no_stale_lock(text_files, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "run_clm.py"), *TINY["clm"], *RUN, "--report_to", "tensorboard",
               "--train_file", str(text_files["train"]), "--do_train", "--output_dir", str(out)]
    holder = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **with_faults("wait@1")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reached = out / "reached-1-0"
        for _ in range(3000):
            if reached.exists() or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert reached.exists(), f"the first run ended ({holder.returncode}) before its first step"
        reached.unlink()

        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"error: --output_dir {out} is in use by another run (it holds the folder's lock); wait for it to end, "
            "or choose another --output_dir"]
    finally:
        holder.kill()  # a crash before the first checkpoint: TensorBoard's runs/ is left behind
        holder.wait()
    assert (out / "runs").is_dir() and not list(out.glob("checkpoint-*"))

    # The kernel dropped the lock with the process, and runs/ does not make the folder "not empty".
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_json(out / "trainer_state.json")["global_step"] == 8


def test_fault_injection_is_not_in_the_shipped_code():
    # Neither the variable the scripts once honoured nor the plugin's: only the plugin injects faults.
    shipped = [*ROOT.glob("run_*.py"), *(ROOT / "utils").rglob("*.py"), *(ROOT / "scripts").glob("*")]
    pattern = re.compile("LM_TEST_FAULTS|LM_FAULT_PLAN|fault_point|FaultInjection")
    assert [p.name for p in shipped if pattern.search(p.read_text(encoding="utf-8"))] == []


def test_a_checkpoint_of_an_earlier_run_is_never_resumed_even_after_a_cut_off_clearing(tmp_path, monkeypatch,
                                                                                       caplog):
    from utils.runs import checkpoints

    def write_run_state(folder, run_id, command):
        (out / "run_state.json").write_text(json.dumps({"run_id": run_id, "command": command, "stage": "training"}))

    out = tmp_path / "out"
    for step in (2, 4):
        fake_checkpoint(out, step)
    marker = json.loads((out / "checkpoint-4" / COMPLETE_MARKER).read_text())
    (out / "checkpoint-4" / COMPLETE_MARKER).write_text(json.dumps({**marker, "run_id": "earlier"}))
    marker = json.loads((out / "checkpoint-2" / COMPLETE_MARKER).read_text())
    (out / "checkpoint-2" / COMPLETE_MARKER).write_text(json.dumps({**marker, "run_id": "this"}))
    write_run_state(out, "this", "another command")
    with caplog.at_level(logging.WARNING, logger="utils"):
        assert checkpoint_to_resume(args_for(out)) == str(out / "checkpoint-2")
    assert "checkpoint-4: it belongs to an earlier run in this folder" in caplog.text

    # Starting over, killed after moving the first checkpoint aside: the rest no longer counts.
    renames = []

    def rename_then_die(source, target):
        if renames:
            raise KeyboardInterrupt  # stands for the kill
        renames.append(source)
        os.rename(source, target)

    write_run_state(out, "this", "another command")  # so that --overwrite_output_dir starts over
    monkeypatch.setattr(checkpoints.os, "rename", rename_then_die)
    with RunFolder.claim(args_for(out, overwrite_output_dir=True)) as run:
        assert run.checkpoint is None
        with pytest.raises(KeyboardInterrupt):
            run.begin()  # what train_and_save does before the first step
    monkeypatch.undo()
    assert list(out.glob("checkpoint-*"))  # the clearing was cut off
    with pytest.raises(UsageError, match="holds no checkpoint to resume from"):
        checkpoint_to_resume(args_for(out))
    with RunFolder.claim(args_for(out, overwrite_output_dir=True)) as run:
        assert run.checkpoint is None
        run.begin()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("tmp-*"))


def test_a_small_file_changed_in_place_is_caught_by_its_checksum(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    state = path / "trainer_state.json"
    state.write_text(state.read_text().replace("3", "7"))  # same size, other content
    assert "trainer_state.json has changed" in (checkpoint_problem(str(path)) or "")


def test_work_folders_of_a_killed_tokenization_are_removed(text_files, tmp_path):
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoTokenizer

    from conftest import TOKENIZERS
    from utils.data.prepare import prepare_datasets
    from utils.data.cache import tokenized_cache_root

    root = tokenized_cache_root(str(tmp_path))
    host = __import__("socket").gethostname()
    dead, live = f".build-{2**30 + 7}@{host}-x1y2z3", f".build-{os.getpid()}@{host}-a1b2c3"
    for name in (dead, live):
        os.makedirs(os.path.join(root, name, "samples"))
    data_args = SimpleNamespace(max_train_samples=None, max_eval_samples=None, text_column_name=None,
                                preprocessing_num_workers=None, overwrite_cache=False, streaming=False)
    training_args = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1,
                                    main_process_first=lambda desc: __import__("contextlib").nullcontext())
    rows = Dataset.from_dict({"text": text_files["train"].read_text(encoding="utf-8").splitlines()[:200]})
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    prepare_datasets({"train": rows}, tokenizer, data_args, training_args, seq_len=64, cache_dir=str(tmp_path))
    assert sorted(n for n in os.listdir(root) if n.startswith(".build-")) == [live]


def test_a_cache_entry_published_meanwhile_by_another_node_is_kept_and_used(tmp_path):
    """Nodes sharing a cache folder each prepare the data with their first process, at the same time."""
    from datasets import Dataset

    from utils.data.cache import cached_samples

    class Recipe:  # SampleRecipe's two methods that the cache calls
        def __init__(self, value, other=None):
            self.value, self.other = value, other

        def key(self, source, max_samples):
            return "the-same-key"

        def build(self, rows, max_samples, workdir):
            if self.other is not None:  # the other node finishes first
                cached_samples(self.other, rows, "source", None, False, str(tmp_path))
            return Dataset.from_dict({"input_ids": [[self.value] * 4] * 3})

    rows = Dataset.from_dict({"text": ["a", "b", "c"]})
    samples = cached_samples(Recipe(1, other=Recipe(2)), rows, "source", None, False, str(tmp_path))
    assert samples["input_ids"] == [[2] * 4] * 3  # the entry published first, unharmed


@pytest.mark.parametrize("env, needle", [({"NODE_RANK": "1"}, "NODE_RANK=1"), ({"NODE_RANK": "x"}, "NODE_RANK=x"),
                                         ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two")])
def test_launcher_checks_node_rank_and_world_size(env, needle, tmp_path):
    environment = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / "out"), **env}
    process = subprocess.run(["bash", str(ROOT / "scripts" / "train_clm_1p.sh")], cwd=tmp_path, env=environment,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [process.stderr.strip()] and needle in process.stderr
    assert process.stderr.startswith("error: ") and list(tmp_path.iterdir()) == []
