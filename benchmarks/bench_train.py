"""Training throughput of run_clm.py and run_mlm.py on a small from-scratch model on this machine.

Each case is one run of the script (a fresh process) on WikiText-2 train for STEPS optimizer steps;
the figures are the script's own warm-up-excluded `fps` (samples/s) and `fps_tokens_per_second`
from train_results.json (the first --fps_warmup_steps steps are not timed). The text is tokenized
once into a shared cache before the timed runs, and only the samples the run needs are prepared.

Cases: the defaults (fused AdamW and SDPA attention, as transformers 5.23 picks them), and the
same run with one change: --optim adamw_torch (foreach AdamW), --torch_compile,
--dataloader_num_workers 2.

    python benchmarks/bench_train.py --steps 20
    python benchmarks/bench_train.py --size tiny --steps 3 --cases clm,mlm     # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import print_table, show_progress

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = ROOT / "data" / "wikitext-2-v1" / "wiki.train.tokens"
TOKENIZERS = ROOT / "data" / "tokenizers"
SIZES = {
    # 6 layers, 384 wide, 256-token blocks
    "small": {
        "clm": ["--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / "gpt2"), "--config_overrides",
                "n_layer=6,n_embd=384,n_head=6,n_positions=256", "--block_size", "256"],
        "mlm": ["--model_type", "roberta", "--tokenizer_name", str(TOKENIZERS / "roberta-base"), "--config_overrides",
                "num_hidden_layers=6,hidden_size=384,num_attention_heads=6,intermediate_size=1536,"
                "max_position_embeddings=258", "--max_seq_length", "256"],
    },
    "tiny": {
        "clm": ["--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / "gpt2"), "--config_overrides",
                "n_layer=1,n_embd=32,n_head=2,n_positions=64", "--block_size", "64"],
        "mlm": ["--model_type", "roberta", "--tokenizer_name", str(TOKENIZERS / "roberta-base"), "--config_overrides",
                "num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,"
                "max_position_embeddings=66", "--max_seq_length", "64"],
    },
}
CASES = {
    "clm": ("clm", []),
    "clm-foreach-adamw": ("clm", ["--optim", "adamw_torch"]),
    "clm-compile": ("clm", ["--torch_compile"]),
    "clm-2-workers": ("clm", ["--dataloader_num_workers", "2"]),
    "mlm": ("mlm", []),
}
COLUMNS = ["case", "script", "steps (timed)", "batch", "samples/s", "tokens/s", "train s"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="--fps_warmup_steps (untimed)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    args.warmup = min(args.warmup, args.steps - 1)
    return args


def run(script: str, flags: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.run([sys.executable, str(ROOT / f"run_{script}.py"), *flags], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    if process.returncode:
        raise SystemExit(f"run_{script}.py {' '.join(flags)} failed:\n{process.stderr[-3000:]}")


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as scratch:
        folder = Path(scratch)
        for name in args.cases.split(","):
            script, extra = CASES[name]
            out = folder / name
            flags = [*SIZES[args.size][script], "--train_file", str(TRAIN_TEXT), "--do_train",
                     "--max_steps", str(args.steps), "--fps_warmup_steps", str(args.warmup),
                     "--max_train_samples", str(args.steps * args.batch_size),
                     "--per_device_train_batch_size", str(args.batch_size), "--cache_dir", str(folder / "cache"),
                     "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                     "--log_level", "warning", "--seed", "7", "--output_dir", str(out), *extra]
            run(script, flags)
            results = json.loads((out / "train_results.json").read_text())
            rows.append([name, f"run_{script}.py", f"{args.steps} ({args.steps - args.warmup})", str(args.batch_size),
                         f"{results.get('fps', float('nan')):.2f}",
                         f"{results.get('fps_tokens_per_second', float('nan')):,.0f}",
                         f"{results['train_runtime']:.1f}"])
            show_progress(rows[-1])
            shutil.rmtree(out, ignore_errors=True)
    print_table(COLUMNS, rows)


if __name__ == "__main__":
    main()
