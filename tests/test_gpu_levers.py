"""The GPU levers that can be checked on the CPU: torch.compile under the O-levels, and the attention kernel.

``--torch_compile`` must not change what the mixed-precision hooks compute: the compiled model's
losses equal eager's over the same steps. The attention kernel is SDPA unless the user picks
another, and the log says which one runs.
"""

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
