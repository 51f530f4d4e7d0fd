"""find_unused_parameters follows what the model does: off when every parameter gets a gradient, on otherwise."""

import socket
import subprocess
import sys
from types import SimpleNamespace

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, CONFIG_MAPPING,
                          XLNetLMHeadModel)

from conftest import QUICK, ROOT, TINY, TOKENIZERS, WIKI_TEST_RAW
from utils.data.collators import CausalLMCollator, MaskedLMCollator, PermutationLMCollator
from utils.launch.ddp import set_find_unused_parameters, unused_parameters


def _blocks(tokenizer, length: int) -> Dataset:
    ids = tokenizer(WIKI_TEST_RAW.read_text(encoding="utf-8")[:20000], verbose=False)["input_ids"]
    return Dataset.from_dict({"input_ids": [ids[i:i + length] for i in range(0, 4 * length, length)]})


def _family(name: str):
    torch.manual_seed(0)
    if name == "gpt2":
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
        config = CONFIG_MAPPING["gpt2"](n_layer=2, n_embd=64, n_head=2, n_positions=64)
        return AutoModelForCausalLM.from_config(config), CausalLMCollator(), _blocks(tokenizer, 64)
    if name == "roberta":
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "roberta-base")
        config = CONFIG_MAPPING["roberta"](num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                           intermediate_size=128, max_position_embeddings=130)
        return AutoModelForMaskedLM.from_config(config), MaskedLMCollator(tokenizer), _blocks(tokenizer, 64)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "xlnet-base-cased")
    config = CONFIG_MAPPING["xlnet"](n_layer=2, d_model=64, n_head=2, d_head=32, d_inner=128)
    return XLNetLMHeadModel(config), PermutationLMCollator(tokenizer), _blocks(tokenizer, 64)


def test_each_family_gets_what_it_uses_and_the_probe_leaves_no_trace():
    # XLNet's segment parameters only see token_type_ids, which the permutation collator never gives.
    xlnet_unused = {f"transformer.layer.{i}.rel_attn.{name}" for i in (0, 1) for name in ("r_s_bias", "seg_embed")}
    for name, unused in (("gpt2", set()), ("roberta", set()), ("xlnet", xlnet_unused)):
        model, collator, dataset = _family(name)
        model.eval()
        state = torch.random.get_rng_state()
        assert set(unused_parameters(model, collator, dataset)) == unused, name
        assert torch.equal(torch.random.get_rng_state(), state)  # masking and dropout draw as before
        assert all(p.grad is None for p in model.parameters()) and not model.training
        args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None, activation_checkpointing=False)
        set_find_unused_parameters(args, model, collator, dataset)
        assert args.ddp_find_unused_parameters is bool(unused), name


def test_an_unused_parameter_turns_it_on_and_a_given_flag_wins():
    model, collator, dataset = _family("gpt2")
    model.transformer.unused_head = torch.nn.Linear(4, 4)  # never called in forward
    assert unused_parameters(model, collator, dataset) == ["transformer.unused_head.weight",
                                                           "transformer.unused_head.bias"]
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=None, activation_checkpointing=False)
    set_find_unused_parameters(args, model, collator, dataset)
    assert args.ddp_find_unused_parameters is True
    given = SimpleNamespace(world_size=2, ddp_find_unused_parameters=True, activation_checkpointing=False)
    model, collator, dataset = _family("gpt2")
    set_find_unused_parameters(given, model, collator, dataset)
    assert given.ddp_find_unused_parameters is True
    single = SimpleNamespace(world_size=1, ddp_find_unused_parameters=None, activation_checkpointing=False)
    set_find_unused_parameters(single, model, collator, dataset)
    assert single.ddp_find_unused_parameters is None  # no DDP: nothing to decide


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_fp32_run_has_no_unused_parameter_warning(text_files, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "run_clm.py", *TINY["clm"], "--train_file", text_files["train"], "--do_train",
               *QUICK, "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    log = process.stdout + process.stderr
    assert "find_unused_parameters off: every parameter gets a gradient" in log
    assert "did not find any unused parameters" not in log
