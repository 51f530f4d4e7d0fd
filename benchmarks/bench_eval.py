"""Evaluation memory: peak RSS of `run_clm.py --do_eval` as the evaluation set grows.

- ours: the script as it is: accuracy counted batch by batch (batch_eval_metrics), nothing kept.
- hf:   the Hugging Face example's way: preprocess_logits_for_metrics (argmax) makes the Trainer
        collect every prediction and label of the evaluation, and an evaluate-style accuracy is
        computed on the concatenated arrays at the end.

The evaluation text is the first LINES lines of WikiText-2 validation repeated 1x, 4x, 16x. It is
tokenized in an untimed subprocess first, so that the measured runs (one fresh subprocess each,
peak RSS of that process) only evaluate. Model: a small GPT-2 built from scratch (the weights do
not matter for memory).

    python benchmarks/bench_eval.py --scales 1,4,16
    python benchmarks/bench_eval.py --scales 1,2 --lines 40      # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, show_progress

ROOT = Path(__file__).resolve().parents[1]
VALID_TEXT = ROOT / "data" / "wikitext-2-v1" / "wiki.valid.tokens"
MODEL = ["--model_type", "gpt2", "--tokenizer_name", str(ROOT / "data" / "tokenizers" / "gpt2"),
         "--config_overrides", "n_layer=2,n_embd=64,n_head=2,n_positions=256"]
COLUMNS = ["approach", "eval set", "samples", "tokens", "eval s", "peak RSS MB", "growth vs 1x MB", "accuracy"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,4,16", help="comma list: how many copies of the base text")
    parser.add_argument("--lines", type=int, default=1000, help="base text: first LINES lines of wiki.valid.tokens")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--approaches", default="ours,hf")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ inside a subprocess


def hf_accuracy(eval_prediction) -> dict:
    """evaluate's "accuracy" on all predictions at once, as the Hugging Face run_clm.py computes it."""
    predictions, labels = eval_prediction
    labels = labels[:, 1:].reshape(-1)
    predictions = predictions[:, :-1].reshape(-1)
    scored = labels != -100
    return {"accuracy": float((predictions[scored] == labels[scored]).mean())}


def worker(mode: str, script_args: list[str]) -> None:
    """Run run_clm.main() in this process (``hf``: with the collecting Trainer), then report peak RSS."""
    sys.path.insert(0, str(ROOT))
    sys.argv = ["run_clm.py", *script_args]
    import run_clm

    if mode == "prepare":
        from utils.flags.arguments import parse_args as parse_script_args
        from utils.data.prepare import prepare_datasets
        from utils.model.loading import load_tokenizer
        from utils.data.raw import load_raw_datasets
        from utils.eval.causal import CausalEvaluation

        model_args, data_args, clm_args, training_args = parse_script_args(run_clm.CausalLMArguments)
        raw = load_raw_datasets(model_args, data_args)
        prepare_datasets(raw, load_tokenizer(model_args), data_args, training_args, seq_len=clm_args.block_size,
                         cache_dir=model_args.cache_dir,
                         evaluation=CausalEvaluation(clm_args.block_size, clm_args.eval_stride))  # as run_clm.py
        return
    if mode == "hf":
        import utils.train.steps
        import utils.train.trainer

        class CollectingTrainer(utils.train.trainer.LMTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.args.batch_eval_metrics = False  # keep every batch's predictions and labels
                self.compute_metrics = hf_accuracy

        utils.train.steps.LMTrainer = CollectingTrainer  # what train_and_evaluate builds
    start = time.perf_counter()
    run_clm.main()
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ---------------------------------------------------------------------------- driver


def run_worker(mode: str, script_args: list[str]) -> dict | None:
    command = [sys.executable, __file__, "--worker", mode, *script_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode:
        raise SystemExit(f"{mode} failed:\n{process.stderr[-3000:]}")
    last = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # everything after the mode is for run_clm.py
        return worker(argv[1], argv[2:])
    args = parse_args(argv)
    base = "".join(VALID_TEXT.read_text(encoding="utf-8").splitlines(keepends=True)[: args.lines])
    rows, first_peak = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as scratch:
        folder = Path(scratch)
        for scale in [int(n) for n in args.scales.split(",")]:
            text = folder / f"valid-x{scale}.txt"
            text.write_text(base * scale, encoding="utf-8")
            flags = [*MODEL, "--block_size", str(args.block_size), "--validation_file", str(text), "--do_eval",
                     "--per_device_eval_batch_size", str(args.batch_size), "--cache_dir", str(folder / "cache"),
                     "--report_to", "none", "--disable_tqdm", "true", "--seed", "7", "--log_level", "warning"]
            run_worker("prepare", [*flags, "--output_dir", str(folder / "prepare")])
            for approach in args.approaches.split(","):
                out = folder / f"{approach}-{scale}"
                measured = run_worker(approach, [*flags, "--output_dir", str(out)])
                results = json.loads((out / "eval_results.json").read_text())
                peak = measured["peak_rss_mb"]
                first_peak.setdefault(approach, peak)
                samples = results["eval_samples"]
                rows.append([approach, f"{scale}x", f"{samples:,}", f"{samples * args.block_size:,}",
                             f"{results['eval_runtime']:.1f}", f"{peak:.0f}", f"{peak - first_peak[approach]:+.0f}",
                             f"{results['eval_accuracy']:.4f}"])
                show_progress(rows[-1])
                shutil.rmtree(out, ignore_errors=True)
    print_table(COLUMNS, rows)


if __name__ == "__main__":
    main()
