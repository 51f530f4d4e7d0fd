"""CPU start-up: the allocator setting spares the page faults; the precision hint says what runs fast here."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import QUICK, ROOT, TINY
from utils.launch import cpu

# Training steps of a GPT-2 with the full vocabulary (its logits: 4 x 64 x 50,257 floats, past glibc's
# largest mmap threshold of 32 MB); count page faults.
FAULTS = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from utils.launch.cpu import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "on" else False
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
batch = torch.randint(0, 50257, (4, 64))
def step():
    model(input_ids=batch, labels=batch).loss.backward()
for _ in range(3):  # the heap grows to what a step needs
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(json.dumps({{"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _faults(mode: str) -> dict:
    process = subprocess.run([sys.executable, "-c", FAULTS.format(root=str(ROOT)), mode], capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout)


def test_kept_freed_memory_is_not_faulted_in_again():
    off, on = _faults("off"), _faults("on")
    assert on["took"] is True
    logits_pages = 3 * 4 * 64 * 50257 * 4 // 4096
    assert off["faults"] > logits_pages  # the logits and their gradient faulted in page by page at every step
    assert on["faults"] < 0.1 * off["faults"]


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(cpu.KEEP_FREED_MEMORY_ENV, "0")
    assert cpu.keep_freed_memory() is False


def _args(**precision):
    return SimpleNamespace(fp16=precision.get("fp16", False), bf16=precision.get("bf16", False))


def test_hint_for_fp32_on_a_cpu_with_bf16_units():
    hint = cpu.precision_hint(_args(), flags={"avx2", "avx512_bf16"})
    assert "bf16 matrix units (avx512_bf16)" in hint and "--bf16" in hint
    assert cpu.precision_hint(_args(), flags={"avx2"}) is None  # nothing faster to suggest
    assert cpu.precision_hint(_args(bf16=True), flags={"amx_bf16"}) is None  # the fast choice


def test_warning_for_fp16_without_fp16_units_gives_the_measured_factor(monkeypatch):
    monkeypatch.setattr(cpu, "matmul_slowdown", lambda name: 41.6)
    hint = cpu.precision_hint(_args(fp16=True), flags={"avx512_bf16"})
    assert "no fp16 matrix units" in hint and "42x as long as in fp32" in hint and "--bf16 runs fast" in hint
    assert cpu.precision_hint(_args(fp16=True), flags={"avx512_fp16"}) is None


def test_the_measured_factor_is_a_real_timing():
    assert cpu.matmul_slowdown("bf16", rows=64, inner=32) > 0


@pytest.mark.skipif("avx512_bf16" not in cpu.cpu_flags() and "amx_bf16" not in cpu.cpu_flags(),
                    reason="this CPU has no bf16 units")
def test_a_run_says_it_at_start(text_files, tmp_path):
    from conftest import run_script

    process = run_script("clm", *TINY["clm"], "--train_file", text_files["train"], "--do_train", *QUICK,
                         "--max_steps", "1", "--output_dir", tmp_path / "out")
    log = process.stdout + process.stderr
    assert "This CPU has bf16 matrix units" in log
    assert "Allocator: freed memory is kept for reuse" in log


@pytest.mark.parametrize("precision", [{"fp16": True}, {"bf16": True}])
def test_the_hint_draws_nothing_from_the_seeded_generators(precision):
    # On a CPU without half-precision units the hint times a matmul; the seed's draws must not move.
    import random

    import numpy as np
    import torch
    from transformers import set_seed

    def draws():
        return torch.randn(8).tolist(), np.random.rand(3).tolist(), random.random()

    set_seed(7)
    expected = draws()
    set_seed(7)
    assert cpu.precision_hint(_args(**precision), flags=set()) is not None  # the timed matmul ran
    assert draws() == expected
