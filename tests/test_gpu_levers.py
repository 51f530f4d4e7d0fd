"""The GPU levers that can be checked on the CPU: torch.compile under the O-levels, the attention kernel, Liger.

``--torch_compile`` must not change what the mixed-precision hooks compute: the compiled model's
losses equal eager's over the same steps. The attention kernel is SDPA unless the user picks
another, and the log says which one runs. ``--use_liger_kernel`` is refused in one line without
liger-kernel, and turned off with one warning for a model Liger has no kernels for.
"""

import logging

import pytest

from amp_cases import gpt2, losses, make_trainer
from conftest import QUICK, TINY, run_script


def test_torch_compile_bf16_o2_combine_grad_gives_the_eager_losses(tmp_path):
    flags = dict(bf16=True, fp16_opt_level="O2", use_combine_grad=True, max_steps=4,
                 per_device_train_batch_size=2, optim="adamw_torch")
    # One layer: with a cold inductor cache this test took 84 s at two layers, 62 s at one (2 shared cores).
    eager = make_trainer(tmp_path / "eager", model=gpt2(n_layer=1), **flags)
    eager.train()
    compiled = make_trainer(tmp_path / "compiled", model=gpt2(n_layer=1), torch_compile=True, **flags)
    compiled.train()
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"  # it did run compiled
    assert len(losses(eager)) == 4
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-3)


@pytest.mark.parametrize("task,flags,expected", [
    ("clm", [], "Attention: sdpa (transformers' default"),
    ("clm", ["--attn_implementation", "eager"], "Attention: eager (--attn_implementation)"),
])
def test_the_log_names_the_attention_kernel(task, flags, expected, text_files, tmp_path):
    process = run_script(task, *TINY[task], "--train_file", text_files["train"], "--do_train", *QUICK,
                         "--max_steps", "1", "--max_train_samples", "8", "--output_dir", tmp_path / "out", *flags)
    assert expected in process.stdout + process.stderr


def test_an_attention_kernel_the_model_lacks_is_one_error_line(text_files, tmp_path):
    process = run_script("plm", *TINY["plm"], "--train_file", text_files["train"], "--do_train", *QUICK,
                         "--output_dir", tmp_path / "out", "--attn_implementation", "sdpa", check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith("error: --attn_implementation sdpa: XLNetLMHeadModel")
    assert "Traceback" not in process.stderr


def test_use_liger_kernel_without_liger_kernel_is_one_error_line(text_files, tmp_path):
    process = run_script("clm", *TINY["clm"], "--train_file", text_files["train"], "--do_train", *QUICK,
                         "--output_dir", tmp_path / "out", "--use_liger_kernel", check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(
        "error: --use_liger_kernel: liger-kernel cannot be imported")
    assert "Traceback" not in process.stderr


@pytest.fixture
def liger_table(monkeypatch):
    """Liger's table of model types as liger_kernel.transformers.monkey_patch holds it (the package needs Triton)."""
    import sys
    import types

    table = types.ModuleType("liger_kernel.transformers.monkey_patch")
    table.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": print, "qwen2": print}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", table)


def test_use_liger_kernel_for_a_model_liger_has_no_kernels_for_warns_once_and_is_turned_off(liger_table, caplog):
    from types import SimpleNamespace

    from utils.model.liger import check_liger

    for model_type, kept in (("gpt2", False), ("llama", True)):
        args = SimpleNamespace(use_liger_kernel=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="utils.model.liger"):
            check_liger(args, SimpleNamespace(config=SimpleNamespace(model_type=model_type)))
        assert args.use_liger_kernel is kept
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == ([] if kept else [
            "--use_liger_kernel does nothing for gpt2: Liger has kernels for llama, qwen2 only; turned off "
            "(--loss_chunk_size computes the output layer and the loss in chunks for any model)"])
