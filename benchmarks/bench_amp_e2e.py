"""Training throughput of run_clm.py for fp32 (O0), fp16 O2, and fp16 O2 with combine_grad.

``--half bf16`` takes bf16 for the O2 rows instead.

Each configuration is a real run_clm.py training run (from scratch, on the bundled WikiText-2
test text) in this one process, one after the other on the same machine; the table gives the
tokens/s measured after the warm-up steps (``fps_tokens_per_second`` in train_results.json).

    python benchmarks/bench_amp_e2e.py --steps 30          # GPT-2 with 4 layers, width 256
    python benchmarks/bench_amp_e2e.py --tiny --steps 3    # 2 layers, width 64: seconds

On a CPU without half-precision matrix units (no AVX512-BF16/AMX), fp16 and bf16 matmuls are
tens of times slower than fp32 and the default size takes very long there: use --tiny.

The device is the scripts' usual pick (NPU, CUDA, CPU; LM_DEVICE=cpu forces the CPU). On a
shared CPU the figures are noisy: compare rows of one table, not tables of different runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402,F401  (before torch: see utils/__init__.py)
from common import print_table  # noqa: E402


def configs(half: str) -> dict[str, list[str]]:
    """Row label: precision flags."""
    return {
        "O0 (fp32)": [],
        f"{half} O2": [f"--{half}", "--fp16_opt_level", "O2"],
        f"{half} O2 + combine_grad": [f"--{half}", "--fp16_opt_level", "O2", "--use_combine_grad"],
    }
MODELS = {
    "small": dict(overrides="n_layer=4,n_embd=256,n_head=4,n_positions=256", block=128, batch=8),
    "tiny": dict(overrides="n_layer=2,n_embd=64,n_head=2,n_positions=128", block=32, batch=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model: a quick smoke run")
    parser.add_argument("--half", choices=["fp16", "bf16"], default="fp16",
                        help="half dtype of the O2 rows (CPUs without fp16 matmul units run fp16 slowly)")
    parser.add_argument("--output_dir", default=None, help="where the runs write (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (one warm-up step, one timed)")
    return args


def run_flags(model: dict, steps: int, output_dir: Path) -> list[str]:
    return [
        "--model_type", "gpt2", "--tokenizer_name", str(ROOT / "data/tokenizers/gpt2"),
        "--config_overrides", model["overrides"], "--block_size", str(model["block"]),
        "--train_file", str(ROOT / "data/wikitext-2-raw-v1/wiki.test.raw"),
        "--per_device_train_batch_size", str(model["batch"]), "--max_steps", str(steps),
        "--max_train_samples", str(2 * steps * model["batch"]),  # tokenize only what the run reads
        "--fps_warmup_steps", str(max(1, min(5, steps // 4))), "--logging_steps", str(steps),
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--do_train", "--overwrite_output_dir", "--output_dir", str(output_dir),
    ]


def train_once(flags: list[str]) -> dict:
    """One run_clm.py run in this process; its train_results.json."""
    import run_clm

    with mock.patch.object(sys, "argv", ["run_clm.py", *flags]):
        run_clm.main()
    output_dir = Path(flags[flags.index("--output_dir") + 1])
    return json.loads((output_dir / "train_results.json").read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = MODELS["tiny" if args.tiny else "small"]
    logging.disable(logging.WARNING)  # the runs' own logs would bury the table
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.output_dir or scratch)
        rows = []
        for i, (label, precision) in enumerate(configs(args.half).items()):
            results = train_once(run_flags(model, args.steps, root / f"run{i}") + precision)
            rows.append((label, results["fps_tokens_per_second"]))
    import torch

    from utils.launch.device import describe_device, resolve_device

    print(f"\nrun_clm.py, GPT-2 {model['overrides']}, block {model['block']}, batch {model['batch']}, "
          f"{args.steps} steps; {describe_device(resolve_device())}; torch {torch.__version__}\n")
    base = rows[0][1]
    print_table(["precision", "tokens/s after warm-up", "vs O0"],
                [[label, f"{speed:.1f}", f"{speed / base:.2f}x"] for label, speed in rows])


if __name__ == "__main__":
    main()
