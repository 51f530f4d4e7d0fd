"""Command lines people already have: transformers' example tests, the seed's dataset flags, 4.x flags.

The argument lists of ``examples/pytorch/test_pytorch_examples.py`` and
``test_accelerate_examples.py`` (transformers' repository) are run as they are, with the hub models
replaced by tiny local ones built here from the bundled tokenizers, and upstream's
``tests/fixtures/sample_text.txt`` by real WikiText-2 text. The checks are upstream's, adapted to
untrained tiny models: the result keys and files it reads, finite and consistent.
"""

import math
import subprocess
import sys
from unittest.mock import patch

import pytest
from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM)
from transformers.testing_utils import CaptureLogger

from conftest import ROOT, TOKENIZERS, WIKI_TEST_RAW, read_json, run_script

WIKI_V1 = ROOT / "data" / "wikitext-2-v1"


@pytest.fixture(scope="module")
def sample_text(tmp_path_factory):
    """About as much text as upstream's sample_text.txt holds, a few times over: real WikiText-2 lines."""
    path = tmp_path_factory.mktemp("fixtures") / "sample_text.txt"
    lines = [line for line in WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    path.write_text("".join(lines[:60]), encoding="utf-8")
    return path


def _save(model, tokenizer_name: str, folder):
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZERS / tokenizer_name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """Stands in for distilgpt2: a 2-layer GPT-2 with the bundled gpt2 tokenizer."""
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=50257)
    return _save(GPT2LMHeadModel(config), "gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """Stands in for distilroberta-base."""
    config = RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=130, vocab_size=50265)
    return _save(RobertaForMaskedLM(config), "roberta-base", tmp_path_factory.mktemp("tiny-roberta"))


def get_results(output_dir) -> dict:
    return read_json(output_dir / "all_results.json")


def assert_results(result: dict):
    """Upstream's bound (perplexity < 100) is for pretrained models; a tiny untrained one at upstream's
    learning rate stays near uniform guessing. What it reads must be there, finite and consistent."""
    assert math.isfinite(result["eval_loss"]) and math.isfinite(result["train_loss"])
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-6)


def run_in_process(module_name: str, testargs: list[str], logger_of=None):
    """``main()``'s result, as upstream's tests read it (``result = run_clm.main()``); with ``logger_of``,
    what that logger wrote instead."""
    module = __import__(module_name)
    with patch.object(sys, "argv", testargs):
        if logger_of is None:
            return module.main()
        with CaptureLogger(getattr(module, logger_of)) as captured:
            module.main()
        return captured.out


# ------------------------------------------------------------------ test_pytorch_examples.py


def test_run_clm(tiny_gpt2, sample_text, tmp_path):
    testargs = f"""
        run_clm.py --model_name_or_path {tiny_gpt2} --train_file {sample_text} --validation_file {sample_text}
        --do_train --do_eval --block_size 128 --per_device_train_batch_size 5 --per_device_eval_batch_size 5
        --num_train_epochs 2 --output_dir {tmp_path} --overwrite_output_dir --use_cpu
        """.split()
    result = run_in_process("run_clm", testargs)
    assert result == get_results(tmp_path)  # main() returns what all_results.json holds
    assert_results(result)
    assert result["epoch"] == pytest.approx(2.0)


def test_run_clm_config_overrides(sample_text, tmp_path):
    # Upstream's list: no --do_train, so the script builds the model and stops.
    testargs = f"""
        run_clm.py --model_type gpt2 --tokenizer_name {TOKENIZERS / "gpt2"} --train_file {sample_text}
        --output_dir {tmp_path} --config_overrides n_embd=10,n_head=2 --no_cuda
        """.split()
    out = run_in_process("run_clm", testargs, logger_of="logger")
    assert '"n_embd": 10' in out
    assert '"n_head": 2' in out


def test_run_clm_config_overrides_command_line(sample_text, tmp_path):
    process = run_script("clm", "--model_type", "gpt2", "--tokenizer_name", TOKENIZERS / "gpt2", "--train_file",
                         sample_text, "--output_dir", tmp_path, "--config_overrides", "n_embd=10,n_head=2",
                         "--no_cuda")
    log = process.stdout + process.stderr
    assert '"n_embd": 10' in log and '"n_head": 2' in log


def test_run_mlm(tiny_roberta, sample_text, tmp_path):
    testargs = f"""
        run_mlm.py --model_name_or_path {tiny_roberta} --train_file {sample_text} --validation_file {sample_text}
        --output_dir {tmp_path} --overwrite_output_dir --do_train --do_eval --prediction_loss_only
        --num_train_epochs=1 --no_cuda --low_cpu_mem_usage
        """.split()
    result = run_in_process("run_mlm", testargs)
    assert result == get_results(tmp_path)
    assert math.isfinite(result["eval_loss"]) and result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert "eval_accuracy" not in result  # --prediction_loss_only: the loss alone, as upstream


# ------------------------------------------------------------------ test_accelerate_examples.py, mapped


def test_run_clm_no_trainer_mapped(tiny_gpt2, sample_text, tmp_path):
    # run_clm_no_trainer.py's list; it always trains and evaluates, and --checkpointing_steps epoch is
    # --save_strategy epoch here (--with_tracking needs a tracker that is not installed: left out).
    process = run_script("clm", "--model_name_or_path", tiny_gpt2, "--train_file", sample_text, "--validation_file",
                         sample_text, "--block_size", "128", "--per_device_train_batch_size", "5",
                         "--per_device_eval_batch_size", "5", "--num_train_epochs", "2", "--output_dir", tmp_path,
                         "--save_strategy", "epoch", "--do_train", "--do_eval", "--report_to", "none")
    assert process.returncode == 0
    assert_results(get_results(tmp_path))
    state = read_json(tmp_path / "trainer_state.json")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == sorted(
        f"checkpoint-{state['global_step'] // 2 * n}" for n in (1, 2))  # one per epoch, as epoch_0, epoch_1
    assert GPT2LMHeadModel.from_pretrained(tmp_path) is not None


def test_run_clm_streaming(tiny_gpt2, sample_text, tmp_path):
    run_script("clm", "--model_name_or_path", tiny_gpt2, "--train_file", sample_text, "--validation_file",
               sample_text, "--streaming", "--max_steps", "4", "--block_size", "64", "--do_train", "--do_eval",
               "--per_device_train_batch_size", "2", "--output_dir", tmp_path, "--report_to", "none")
    result = get_results(tmp_path)
    assert math.isfinite(result["eval_loss"]) and "train_loss" in result
    assert read_json(tmp_path / "trainer_state.json")["global_step"] == 4


def test_run_plm_from_scratch_without_a_model_type(sample_text, tmp_path):
    process = run_script("plm", "--tokenizer_name", TOKENIZERS / "xlnet-base-cased", "--config_overrides",
                         "n_layer=2,d_model=64,n_head=2,d_head=32,d_inner=128", "--train_file", sample_text,
                         "--validation_file", sample_text, "--max_seq_length", "64", "--max_steps", "2",
                         "--do_train", "--do_eval", "--output_dir", tmp_path, "--report_to", "none")
    assert "training a new xlnet model from scratch" in process.stdout + process.stderr
    assert read_json(tmp_path / "config.json")["n_layer"] == 2
    assert math.isfinite(get_results(tmp_path)["eval_loss"])
    assert read_json(tmp_path / "run_info.json")["script"] == "run_plm.py"


def test_run_plm_main_returns_its_results(sample_text, tmp_path):
    testargs = ["run_plm.py", "--model_type", "xlnet", "--tokenizer_name", str(TOKENIZERS / "xlnet-base-cased"),
                "--config_overrides", "n_layer=1,d_model=32,n_head=2,d_head=16,d_inner=64", "--train_file",
                str(sample_text), "--validation_file", str(sample_text), "--max_seq_length", "64", "--max_steps", "2",
                "--do_train", "--do_eval", "--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu"]
    result = run_in_process("run_plm", testargs)
    assert result == get_results(tmp_path) and {"train_loss", "eval_loss", "perplexity"} <= result.keys()


# ------------------------------------------------------------------ the seed's commands, offline

SCRATCH = ["--model_type", "gpt2", "--tokenizer_name", TOKENIZERS / "gpt2", "--config_overrides",
           "n_layer=2,n_embd=32,n_head=2,n_positions=64", "--block_size", "64", "--max_steps", "2",
           "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
           "--report_to", "none"]


def test_seed_dataset_flags_train_offline_on_the_bundled_wikitext(tmp_path):
    process = run_script("clm", *SCRATCH, "--dataset_name", "wikitext", "--dataset_config_name", "wikitext-2-v1",
                         "--do_train", "--do_eval", "--output_dir", tmp_path)
    log = process.stdout + process.stderr
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        assert str(WIKI_V1 / name) in log  # which local files it used
    assert math.isfinite(get_results(tmp_path)["eval_loss"])
    assert read_json(tmp_path / "run_info.json")["dataset"] == "wikitext (wikitext-2-v1)"


def test_dataset_name_of_a_local_folder(tmp_path):
    run_script("clm", *SCRATCH, "--dataset_name", WIKI_V1, "--do_train", "--do_eval", "--output_dir", tmp_path)
    result = get_results(tmp_path)
    assert result["train_samples"] == 16 and result["eval_samples"] == 8


def test_raw_v1_error_names_the_bundled_alternative(tmp_path):
    process = run_script("clm", *SCRATCH, "--dataset_name", "wikitext", "--dataset_config_name", "wikitext-2-raw-v1",
                         "--do_train", "--output_dir", tmp_path, check=False)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1")
    assert "--dataset_config_name wikitext-2-v1" in lines[-1] and "Traceback" not in process.stderr


def test_offline_hub_model_error_names_the_from_scratch_way(tmp_path):
    process = run_script("clm", "--model_name_or_path", "gpt2", "--train_file", WIKI_V1 / "wiki.valid.tokens",
                         "--do_train", "--output_dir", tmp_path, check=False)
    assert process.returncode == 2
    assert "--model_type gpt2 --tokenizer_name data/tokenizers/gpt2" in process.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ 4.x flags


def test_4x_flags_train(tmp_path):
    process = run_script("clm", *SCRATCH, "--train_file", WIKI_V1 / "wiki.valid.tokens", "--validation_file",
                         WIKI_V1 / "wiki.test.tokens", "--do_train", "--do_eval", "--output_dir", tmp_path,
                         "--evaluation_strategy", "steps", "--eval_steps", "1", "--no_cuda", "--use_auth_token",
                         "false", "--warmup_ratio", "0.5", "--group_by_length", "--logging_dir", tmp_path / "tb")
    log = process.stderr
    for old, new in (("--evaluation_strategy steps", "--eval_strategy steps"), ("--no_cuda", "--use_cpu true"),
                     ("--warmup_ratio 0.5", "--warmup_steps 0.5"),
                     ("--group_by_length", "--train_sampling_strategy group_by_length")):
        assert f"{old} is a transformers 4.x flag; read as {new}" in log
    history = read_json(tmp_path / "trainer_state.json")["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry][:2] == [1, 2]  # evaluated every step
    args = read_json(tmp_path / "run_info.json")
    assert args["script"] == "run_clm.py"


@pytest.mark.parametrize("flags, says", [
    (["--sharded_ddp", "simple"], "--sharded_ddp (a transformers 4.x flag) has no counterpart today: use --fsdp"),
    (["--half_precision_backend", "tpu"], "--half_precision_backend tpu: give one of auto, apex"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio 1.5:"),
])
def test_4x_flags_that_cannot_map(flags, says, tmp_path):
    process = run_script("clm", *SCRATCH, "--train_file", WIKI_V1 / "wiki.valid.tokens", "--do_train",
                         "--output_dir", tmp_path, *flags, check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(f"error: {says}")
    assert not (tmp_path / "run_info.json").exists()


def launch_flags(*flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.flags.launch_flags", "clm", *map(str, flags)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_launchers_read_4x_flags_as_the_scripts_do():
    # The token given by --use_auth_token is a hub token: the launchers' log masks it.
    process = launch_flags("--no_cuda", "--use_auth_token", "hf_secret123", "--output_dir", "out")
    assert process.returncode == 0
    model, data, output_dir, masked = process.stdout.splitlines()
    assert output_dir == "out" and "hf_secret123" not in masked and "***" in masked
    refused = launch_flags("--sharded_ddp", "simple")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: --sharded_ddp")


def test_result_row_names_a_model_built_from_config_name():
    from utils.flags.arguments import ModelArguments
    from utils.flags.run_identity import model_label

    assert model_label(ModelArguments(config_name="configs/roberta-base/")) == "roberta-base"
    assert model_label(ModelArguments(model_type="gpt2")) == "gpt2"


def test_a_file_of_flags_with_4x_flags_keeps_their_types():
    from utils.flags.legacy import translate_values

    values, environ = translate_values({"evaluation_strategy": "steps", "no_cuda": False, "warmup_ratio": 0.25,
                                        "logging_dir": "tb", "seed": 3})
    assert values == {"eval_strategy": "steps", "use_cpu": False, "warmup_steps": 0.25, "seed": 3}
    assert environ == {"TENSORBOARD_LOGGING_DIR": "tb"}


def test_a_cached_hub_copy_of_wikitext_wins_over_the_bundled_files(monkeypatch):
    from datasets import Dataset, DatasetDict

    import utils.data.raw as raw
    from utils.flags.arguments import DataArguments, ModelArguments

    cached = DatasetDict(train=Dataset.from_dict({"text": ["from the cache"] * 4}),
                         validation=Dataset.from_dict({"text": ["from the cache"]}))
    calls = []
    monkeypatch.setattr(raw, "load_dataset", lambda name, *a, **k: calls.append(name) or cached)
    data = DataArguments(dataset_name="wikitext", dataset_config_name="wikitext-2-v1")
    assert raw.load_raw_datasets(ModelArguments(), data) is cached and calls == ["wikitext"]
