"""Every reported loss is the true one: checked against the plain saved model's own loss, never the trainer's.

GPT-2's loss predicts T - 1 positions of a block of T; the reported eval loss, the training loss and
the gradient's scale must count exactly those, at any block size, under gradient accumulation and
with two processes.
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUICK, ROOT, TOKENIZERS, free_port, read_json, run_script, with_faults


def _tiny_gpt2(block: int) -> list[str]:
    # n_positions as long as the block, no dropout: the plain model's loss is then deterministic.
    layers = "n_layer=1,n_embd=32,n_head=2" if block > 128 else "n_layer=2,n_embd=64,n_head=2"
    return ["--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / "gpt2"), "--block_size", str(block),
            "--config_overrides", f"{layers},n_positions={block},resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"]


def _blocks(path, block: int) -> torch.Tensor:
    """The text file's lines (with their line breaks) tokenized one by one, as one stream cut into blocks
    (the last partial one dropped)."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    ids = [i for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
           for i in tokenizer(line, verbose=False)["input_ids"]]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def _own_loss(model_dir, blocks: torch.Tensor) -> float:
    """The saved model's mean loss over the blocks (each predicts block - 1 tokens, so blocks weigh the same)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss.double() for b in blocks]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("block", [32, 1024])
def test_eval_loss_is_the_saved_models_own_loss(text_files, tmp_path, block):
    out = tmp_path / "out"
    batch = "8" if block == 32 else "2"
    run_script("clm", *_tiny_gpt2(block), *QUICK, "--max_steps", "2", "--gradient_accumulation_steps", "2",
               "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", batch,
               "--train_file", text_files["train"], "--validation_file", text_files["valid"],
               "--do_train", "--do_eval", "--output_dir", out)
    blocks = _blocks(text_files["valid"], block)
    results = read_json(out / "eval_results.json")
    assert results["eval_samples"] == len(blocks)  # the same blocks the run evaluated
    assert results["eval_loss"] == pytest.approx(_own_loss(out, blocks), abs=1e-4)


def test_training_loss_and_its_scale_are_the_models_own(text_files, tmp_path):
    # Learning rate 0: the saved model is the one every step saw. One epoch over 16 blocks in 2 steps of
    # 2 x 4 blocks: the mean training loss is the model's mean loss over all 16, in whatever order.
    out = tmp_path / "out"
    run_script("clm", *_tiny_gpt2(32), *QUICK, "--max_steps", "2", "--learning_rate", "0",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
               "--max_train_samples", "16", "--logging_steps", "1", "--max_grad_norm", "0",
               "--train_file", text_files["train"], "--validation_file", text_files["valid"],  # all of train trains
               "--do_train", "--output_dir", out)
    blocks = _blocks(text_files["train"], 32)[:16]
    own = _own_loss(out, blocks)
    assert read_json(out / "train_results.json")["train_loss"] == pytest.approx(own, abs=1e-4)


def test_two_process_eval_loss_is_the_saved_models_own(text_files, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_clm.py", *_tiny_gpt2(32), *QUICK, "--max_steps", "2",
               "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2",
               "--per_device_eval_batch_size", "4", "--max_eval_samples", "432", "--train_file", str(text_files["train"]),
               "--validation_file", str(text_files["valid"]), "--do_train", "--do_eval", "--output_dir", str(out)]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    # Two processes evaluate the blocks in halves: 432 = 54 x 2 x 4, so no batch is padded with repeats.
    blocks = _blocks(text_files["valid"], 32)[:432]
    results = read_json(out / "eval_results.json")
    assert results["eval_samples"] == len(blocks) == 432
    assert results["eval_loss"] == pytest.approx(_own_loss(out, blocks), abs=1e-4)


def test_one_seed_gives_one_start_in_every_precision(text_files, tmp_path):
    # Learning rate 0: the saved weights are the initial ones (under fp16 O2 the masters start from the fp16
    # copies, so those are the initial weights rounded to fp16, bit for bit). The first step's loss
    # in fp16 O2 is fp32's up to fp16's rounding only if the weights and the first batch are the same.
    # The CPU is made to report no half-precision units, so the half runs time a matmul for their hint.
    results = {}
    for name, flags in {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--fp16_opt_level", "O2"]}.items():
        out = tmp_path / name
        process = run_script("clm", *_tiny_gpt2(32), *QUICK, "--max_steps", "1", "--learning_rate", "0",
                             "--logging_steps", "1", "--train_file", text_files["train"],
                             "--validation_file", text_files["valid"], "--do_train", *flags, "--output_dir", out,
                             env=with_faults("no_half_units", ROOT))
        assert ("matmul took" in process.stdout + process.stderr) == bool(flags)
        first = next(e for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e)
        results[name] = (load_file(out / "model.safetensors"), first["loss"])
    weights, loss = results["fp32"]
    for name in ("bf16", "fp16"):
        assert results[name][0].keys() == weights.keys()
        for key, tensor in weights.items():
            got = results[name][0][key].float()
            assert got.equal(tensor) or got.equal(tensor.half().float()), (name, key)
    assert results["fp16"][1] == pytest.approx(loss, abs=2e-4)
