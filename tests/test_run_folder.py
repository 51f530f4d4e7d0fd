"""The run folder tells the truth: content-checked checkpoints and cache, rotation, reruns that do only what is left.

Real tiny GPT-2 runs on WikiText-2 text, through the scripts as a user runs them; kills and full
disks land at chosen points (tests/fault_plugin/, tests/full_disk.py).
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import xxhash

from conftest import ROOT, TINY, TOKENIZERS, WIKI_TEST_RAW, read_json, run_script, with_faults
from utils.files import file_digest
from utils.runs.checkpoints import checkpoint_dirs, checkpoint_problem, rotate, write_marker

RUN = ["--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
       "--max_train_samples", "12", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7"]


def train(train_file, out, *extra, faults="", env=None):
    return run_script("clm", *TINY["clm"], *RUN, *extra, "--train_file", train_file, "--do_train",
                      "--output_dir", out, check=False, env={**with_faults(faults), **(env or {})})


def log(process) -> str:
    return process.stdout + process.stderr


def spy_on_reads(monkeypatch, relative_to) -> list[str]:
    """The files the checkpoint marker reads back to checksum them, as paths relative to ``relative_to``."""
    import utils.runs.checkpoints as checkpoints

    read = []

    def reading(path, flush=False):
        read.append(os.path.relpath(path, relative_to))
        return file_digest(path, flush)

    monkeypatch.setattr(checkpoints, "file_digest", reading)
    return read


def assert_checksums_are_the_files_own(checkpoint) -> None:
    """Independently of the writer: each checksum in the marker is xxh3-128 of the file's bytes on disk."""
    for name, digest in read_json(checkpoint / "checkpoint_complete.json")["xxh3"].items():
        assert digest == xxhash.xxh3_128((checkpoint / name).read_bytes()).hexdigest(), name


def flip_4k(path) -> None:
    """4 KiB in the middle of the file inverted: same size, other bytes (bit rot, a bad copy)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def uninterrupted(text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    process = train(text_files["train"], out)
    assert process.returncode == 0, process.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------- reruns do only what is left


def test_overwrite_into_a_finished_folder_with_another_learning_rate_trains_again(uninterrupted, text_files,
                                                                                  tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = (out / "model.safetensors").read_bytes()
    process = train(text_files["train"], out, "--overwrite_output_dir", "--learning_rate", "1e-3")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "evaluating only" not in log(process)
    assert (out / "model.safetensors").read_bytes() != before
    assert read_json(out / "trainer_state.json")["global_step"] == 4
    assert read_json(out / "trainer_state.json")["log_history"][0]["learning_rate"] == pytest.approx(1e-3)


def test_a_kill_after_the_last_checkpoint_is_rerun_as_save_and_report(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    killed = train(text_files["train"], out, faults="kill_after_save@4")
    assert killed.returncode == -9 or killed.returncode == 137, killed.stderr[-3000:]
    assert not (out / "train_results.json").exists()
    rerun = train(text_files["train"], out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "training no further" in log(rerun)
    steps = [entry["step"] for entry in read_json(out / "trainer_state.json")["log_history"] if "loss" in entry]
    assert max(steps) == 4  # never a step 5
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert read_json(out / "train_results.json")["train_loss"] == pytest.approx(
        read_json(uninterrupted / "train_results.json")["train_loss"], abs=1e-6)
    assert read_json(out / "run_state.json")["stage"] == "finished"


def test_a_full_disk_on_the_results_is_one_line_and_the_rerun_only_saves(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    for blocked in ("train_results.json", "all_results.json", "README.md"):
        command = [sys.executable, str(ROOT / "tests" / "full_disk.py"), str(ROOT / "run_clm.py"), *TINY["clm"], *RUN,
                   "--train_file", str(text_files["train"]), "--do_train", "--output_dir", str(out)]
        full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "FULL_DISK_AT": blocked})
        assert full.returncode == 2, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("error: no space left on the disk of --output_dir") and "Traceback" not in full.stderr
        assert read_json(out / "run_state.json")["stage"] == "training"
    rerun = train(text_files["train"], out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    steps = [entry["step"] for entry in read_json(out / "trainer_state.json")["log_history"] if "loss" in entry]
    assert max(steps) == 4
    assert read_json(out / "train_results.json")["train_loss"] == pytest.approx(
        read_json(uninterrupted / "train_results.json")["train_loss"], abs=1e-6)


def test_a_kill_after_the_claim_leaves_a_claimed_record_and_the_rerun_trains(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = (out / "model.safetensors").read_bytes()
    changed = ("--overwrite_output_dir", "--learning_rate", "1e-3")
    killed = train(text_files["train"], out, *changed, faults="kill_after_claim")
    assert killed.returncode in (-9, 137), killed.stderr[-3000:]
    record = read_json(out / "run_state.json")
    assert record["stage"] == "claimed" and record["run_id"] != read_json(uninterrupted / "run_state.json")["run_id"]
    assert not checkpoint_dirs(str(out))  # the old run's checkpoints went after the new record
    rerun = train(text_files["train"], out, *changed)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "nothing to do" not in log(rerun) and "evaluating only" not in log(rerun)
    assert (out / "model.safetensors").read_bytes() != before
    assert read_json(out / "trainer_state.json")["log_history"][0]["learning_rate"] == pytest.approx(1e-3)
    assert read_json(out / "run_state.json")["stage"] == "finished"


def test_a_kill_after_the_evaluation_is_rerun_as_reports_only(text_files, tmp_path):
    out = tmp_path / "out"
    evaluate = ("--do_eval", "--validation_file", text_files["valid"], "--per_device_eval_batch_size", "8",
                "--max_eval_samples", "8")
    killed = train(text_files["train"], out, *evaluate, faults="kill_after_evaluated")
    assert killed.returncode in (-9, 137), killed.stderr[-3000:]
    assert read_json(out / "run_state.json")["stage"] == "evaluated"
    results = (out / "eval_results.json").read_bytes()
    rerun = train(text_files["train"], out, *evaluate)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "evaluating no further" in log(rerun) and "Running Evaluation" not in log(rerun)
    assert (out / "eval_results.json").read_bytes() == results
    perplexity = read_json(out / "eval_results.json")["perplexity"]
    assert f"| perplexity | {perplexity:.2f} |" in (out / "README.md").read_text(encoding="utf-8")
    assert read_json(out / "run_state.json")["stage"] == "finished"


def test_what_a_killed_rotation_leaves_is_cleared_when_the_run_finishes(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    killed = train(text_files["train"], out, "--save_total_limit", "1", faults="kill_in_rotation@4")
    assert killed.returncode in (-9, 137), killed.stderr[-3000:]
    assert (out / "tmp-checkpoint-2-old").is_dir() and (out / "checkpoint-4").is_dir()
    rerun = train(text_files["train"], out, "--save_total_limit", "1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "training no further" in log(rerun)  # no further save, which would have cleared it too
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-4"]
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert read_json(out / "run_state.json")["stage"] == "finished"


def test_the_same_settings_written_another_way_are_the_same_command(uninterrupted, text_files, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = contents(out)
    flags = [*TINY["clm"], *RUN]
    reordered = [arg for pair in reversed(list(zip(flags[::2], flags[1::2]))) for arg in pair]
    process = run_script("clm", "--output_dir", out, "--do_train", "--learning_rate", "0.00005", *reordered,
                         "--train_file", os.path.relpath(text_files["train"], ROOT), check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stderr.strip().splitlines() == [
        f"nothing to do: {out} holds the finished run of this same command, left as it is "
        "(delete the folder or choose another --output_dir to run it again)"]
    assert contents(out) == before


def test_two_commands_are_the_same_when_their_parsed_settings_are(tmp_path, monkeypatch):
    from utils.cli import Command
    from utils.flags.arguments import command_fingerprint, parse_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("text\n", encoding="utf-8")

    def fingerprint(*args) -> str:
        return parse_args(command=Command("run_clm.py", tuple(map(str, args))))[-1].run_fingerprint

    same = fingerprint("--do_train", "--train_file", tmp_path / "train.txt", "--learning_rate", "5e-5",
                       "--output_dir", tmp_path / "out")
    assert fingerprint("--output_dir", "out/", "--learning_rate", "0.00005", "--train_file", "./train.txt",
                       "--do_train", "true") == same
    flag_file = tmp_path / "flags.json"
    flag_file.write_text(json.dumps({"output_dir": "out", "learning_rate": 0.00005, "train_file": "train.txt",
                                     "do_train": True}), encoding="utf-8")
    assert fingerprint(flag_file) == same
    # What a launcher asks before it starts the processes (scripts/ray_train.py): the same, without a device.
    assert command_fingerprint(Command("run_clm.py", ("--train_file", "train.txt", "--do_train", "--output_dir", "o",
                                                      "--learning_rate", "5e-5"))) == same
    assert fingerprint("--do_train", "--train_file", "train.txt", "--learning_rate", "1e-3",
                       "--output_dir", "out") != same
    (tmp_path / "other").mkdir()
    assert fingerprint("--do_train", "--train_file", "other/../other/train.txt", "--output_dir", "out") != same


# ---------------------------------------------------------------------------- a folder that lost its record


def contents(folder) -> dict:
    """Every file of ``folder`` by its relative path: its checksum and mtime."""
    return {str(p.relative_to(folder)): (xxhash.xxh3_128(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_folder_that_lost_its_record_is_never_taken_by_another_command(uninterrupted, text_files,
                                                                                 tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "run_state.json").unlink()
    for record in (None, '{"run_id": "38a1'):  # removed, then cut off
        if record is not None:
            (out / "run_state.json").write_text(record, encoding="utf-8")
        before = contents(out)
        other = train(text_files["train"], out, "--learning_rate", "1e-3")
        assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
        assert other.stderr.strip().splitlines()[-1] == (
            f"error: --output_dir {out} holds a run's results, its record run_state.json is missing or unreadable, "
            "and its newest checkpoint, checkpoint-4, was written by another command: this run cannot take them for "
            "its own; choose another --output_dir, or add --overwrite_output_dir to replace them")
        assert contents(out) == before
    # The command that wrote it: the record is rebuilt from its checkpoint, and the run ends as it had.
    same = train(text_files["train"], out)
    assert same.returncode == 0, same.stderr[-3000:]
    assert f"rebuilt from {out / 'checkpoint-4'}, which this same command wrote" in log(same)
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert read_json(out / "run_state.json") == read_json(uninterrupted / "run_state.json")  # id, command, finished


def test_resume_from_a_finished_runs_folder_is_refused_with_one_line(uninterrupted, text_files, tmp_path):
    process = train(text_files["train"], tmp_path / "new", "--resume_from_checkpoint", uninterrupted)
    assert process.returncode == 2, process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint {uninterrupted} is not a checkpoint (it holds no optimizer state, so the "
        f"optimizer and schedule would start afresh): pass its {uninterrupted / 'checkpoint-4'} to resume that run, "
        f"or --model_name_or_path {uninterrupted} to start a new run from its model")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- checkpoints keyed by their content


def test_a_rotted_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_an_intact_one(text_files, tmp_path):
    out = tmp_path / "out"
    stopped = train(text_files["train"], out, "--max_steps", "6", faults="sigterm@4")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    weights = out / "checkpoint-4" / "model.safetensors"
    size = weights.stat().st_size
    flip_4k(weights)
    rotted = weights.read_bytes()
    rerun = train(text_files["train"], out, "--max_steps", "6")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    text = log(rerun)
    assert f"{out / 'checkpoint-4'} is damaged (model.safetensors has changed since it was written" in text
    assert f"Resuming from {out / 'checkpoint-2'}" in text
    kept = out / "damaged-checkpoint-4" / "model.safetensors"
    assert kept.stat().st_size == size and kept.read_bytes() == rotted  # moved aside, never deleted


def test_checkpoint_checksums_are_taken_as_the_files_are_saved_not_read_back(tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from utils.train.save_digests import digests_of_saves

    folder = tmp_path / "tmp-checkpoint-1" / "checkpoint-1"
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    with digests_of_saves(str(tmp_path / "tmp-checkpoint-1")) as written:
        model.save_pretrained(folder)
        model.to(torch.bfloat16).save_pretrained(folder / "bf16")  # other dtypes lie in the file the same way
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2").save_pretrained(folder)
        torch.save({"elsewhere": 1}, tmp_path / "elsewhere.pt")
    assert str(tmp_path / "elsewhere.pt") not in written
    assert torch.save.__module__ == "torch.serialization"  # the writers are themselves again after the block

    read = spy_on_reads(monkeypatch, folder)
    write_marker(str(folder), 1, written=written)
    assert not {"model.safetensors", "bf16/model.safetensors", "optimizer.pt"} & set(read)
    assert {"config.json", "tokenizer.json"} <= set(read)  # written another way: read back once
    # Independently: each checksum is that of the file's bytes on disk, and the files load.
    marker = read_json(folder / "checkpoint_complete.json")
    assert set(marker["xxh3"]) == {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {
        "checkpoint_complete.json"}
    assert_checksums_are_the_files_own(folder)
    assert checkpoint_problem(str(folder)) is None
    loaded = torch.load(folder / "optimizer.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(GPT2LMHeadModel.from_pretrained(folder / "bf16").transformer.wte.weight,
                       model.transformer.wte.weight)


def test_a_trainer_checkpoint_is_checksummed_as_written(uninterrupted):
    checkpoint = uninterrupted / "checkpoint-4"
    assert_checksums_are_the_files_own(checkpoint)
    # torch.save names the archive inside after the file, but "archive" when it writes into a file
    # object: the optimizer state went through the hashing writer.
    assert zipfile.ZipFile(checkpoint / "optimizer.pt").namelist()[0].startswith("archive/")


@pytest.mark.parametrize("precision", [{}, {"fp16": True, "fp16_opt_level": "O2"}], ids=["fp32", "fp16-O2"])
def test_a_trainer_checkpoint_reads_back_only_its_small_text_files(tmp_path, monkeypatch, precision):
    from amp_cases import make_trainer

    read = spy_on_reads(monkeypatch, tmp_path / "out")
    trainer = make_trainer(tmp_path / "out", max_steps=2, save_strategy="steps", save_steps=2, **precision)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    binary = {path.name for path in checkpoint.iterdir() if path.suffix not in (".json", ".txt")}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"} <= binary
    read = {os.path.basename(path) for path in read}
    assert read and not binary & read, read  # O2 saves fp32 weights from its masters: hashed as written too
    assert_checksums_are_the_files_own(checkpoint)


def test_a_corrupt_file_over_1_mib_is_caught(tmp_path):
    path = tmp_path / "checkpoint-3"
    path.mkdir()
    (path / "optimizer.pt").write_bytes(os.urandom(3 << 20))
    write_marker(str(path), 3)
    assert checkpoint_problem(str(path)) is None
    flip_4k(path / "optimizer.pt")
    assert "optimizer.pt has changed since it was written" in (checkpoint_problem(str(path)) or "")


def test_rotation_goes_by_step_not_by_mtime_and_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    now = time.time()
    for step in (2, 4, 6, 8):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"w" * 64)
        (path / "optimizer.pt").write_bytes(b"o" * 64)
        write_marker(str(path), step)
        os.utime(path, (now - step, now - step))  # the older the step, the newer its mtime (touched by a copy)
    rotate(str(tmp_path), 2, None)
    assert [step for step, _ in checkpoint_dirs(str(tmp_path))] == [8, 6]

    # A kill in the middle of deleting checkpoint-6: the files it lost are not in a checkpoint-N folder.
    import utils.runs.checkpoints as checkpoints

    def killed_after_one_file(path, ignore_errors=False):
        names = sorted(os.listdir(path)) if os.path.isdir(path) else []
        if names:
            os.remove(os.path.join(path, names[0]))
            raise KeyboardInterrupt  # stands for the SIGKILL
    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_after_one_file)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"n" * 64)
    write_marker(str(tmp_path / "checkpoint-10"), 10)
    with pytest.raises(KeyboardInterrupt):
        rotate(str(tmp_path), 2, None)
    left = checkpoint_dirs(str(tmp_path))
    assert [step for step, _ in left] == [10, 8]
    assert all(checkpoint_problem(path) is None for _, path in left)


# ---------------------------------------------------------------------------- the cache keyed by the input bytes


def same_size_edit(path) -> None:
    """Other text of the same size, with the old mtime (as cp -p, rsync -t or tar leave it)."""
    stat = path.stat()
    text = path.read_text(encoding="utf-8")
    edited = text.replace(" the ", " THE ")
    assert len(edited.encode()) == len(text.encode()) and edited != text
    path.write_text(edited, encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_same_size_same_mtime_edit_is_tokenized_again(tmp_path):
    train_file = tmp_path / "train.txt"
    lines = WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines(keepends=True)
    train_file.write_text("".join(lines[:700]), encoding="utf-8")
    home = {"HF_HOME": str(tmp_path / "hf")}
    first = train(train_file, tmp_path / "a", "--max_steps", "2", env=home)
    assert first.returncode == 0, first.stderr[-3000:]
    same_size_edit(train_file)
    edited = train(train_file, tmp_path / "b", "--max_steps", "2", env=home)
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert "Reusing tokenized data" not in log(edited)
    # Independent: the edited text in a cache of its own, never seen the old text.
    fresh = train(train_file, tmp_path / "c", "--max_steps", "2", env={"HF_HOME": str(tmp_path / "fresh")})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["b"] == weights["c"] != weights["a"]


@pytest.mark.parametrize("max_samples", [None, 5], ids=["packed-file-moved", "prefix-written"])
def test_a_cache_entry_checksum_is_taken_as_its_file_is_written(tmp_path, monkeypatch, max_samples):
    from datasets import Dataset
    from transformers import AutoTokenizer

    import utils.data.arrow_files as arrow_files
    from utils.data.cache import cached_samples, entry_problem
    from utils.data.prepare import SampleRecipe

    read_back = []
    monkeypatch.setattr(arrow_files, "file_digest", lambda path, flush=False: read_back.append(path))
    rows = Dataset.from_dict({"text": WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines()[:300]})
    recipe = SampleRecipe(AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2"), "text", 64, line_by_line=False,
                          pad_to_max_length=False, num_proc=None)
    samples = cached_samples(recipe, rows, "wiki.test.raw[:300]", max_samples, False, str(tmp_path))
    [entry] = (tmp_path / "tokenized").iterdir()
    assert len(samples) == (max_samples or len(samples)) > 0
    assert read_back == []  # taken from the bytes as they went out, not read back
    # Independently of the writer: the checksum is xxh3-128 of the file's bytes on disk.
    checksum = read_json(entry / "checksum.json")
    data = (entry / "samples.arrow").read_bytes()
    assert (checksum["size"], checksum["xxh3"]) == (len(data), xxhash.xxh3_128(data).hexdigest())
    monkeypatch.undo()
    assert entry_problem(str(entry)) is None


def test_a_cache_entry_with_one_byte_changed_is_rebuilt_with_a_warning(text_files, tmp_path):
    home = {"HF_HOME": str(tmp_path / "hf")}
    first = train(text_files["train"], tmp_path / "a", "--max_steps", "1", env=home)
    assert first.returncode == 0, first.stderr[-3000:]
    [entry] = (tmp_path / "hf").rglob("samples.arrow")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01  # one token id, one bit: still valid Arrow, other tokens
    entry.write_bytes(bytes(data))
    again = train(text_files["train"], tmp_path / "b", "--max_steps", "1", env=home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log(again).count(f"The tokenized-data cache entry {entry.parent} is damaged: samples.arrow has changed "
                            "since it was written (its checksum differs); tokenizing again") == 1
    assert "Reusing tokenized data" not in log(again)
    assert entry.read_bytes() != bytes(data)
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_a_sigterm_while_tokenizing_is_one_line_and_the_rerun_starts_cleanly(uninterrupted, text_files, tmp_path):
    home = {"HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "out"
    stopped = train(text_files["train"], out, faults="sigterm_while_tokenizing", env=home)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "stopped: SIGTERM received before training began (while preparing the data or the model) or while "
        "evaluating; nothing is left half-written: run the same command to start again (exit status 143)")
    assert list((tmp_path / "hf" / "datasets" / "tokenized").iterdir()) == []  # no entry, no work folder
    rerun = train(text_files["train"], out, env=home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


def test_a_truncated_cache_entry_is_rebuilt_by_itself(text_files, tmp_path):
    home = {"HF_HOME": str(tmp_path / "hf")}
    first = train(text_files["train"], tmp_path / "a", "--max_steps", "1", env=home)
    assert first.returncode == 0, first.stderr[-3000:]
    [entry] = (tmp_path / "hf").rglob("samples.arrow")
    size = entry.stat().st_size
    os.truncate(entry, size // 2)
    again = train(text_files["train"], tmp_path / "b", "--max_steps", "1", env=home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log(again).count("is damaged: samples.arrow has") == 1 and "tokenizing again" in log(again)
    assert entry.stat().st_size == size
    third = train(text_files["train"], tmp_path / "c", "--max_steps", "1", env=home)
    assert third.returncode == 0 and "Reusing tokenized data" in log(third)
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
