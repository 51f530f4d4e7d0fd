"""Preprocessing cost: our pipeline (NumPy packing, int32 cache) against the Hugging Face example.

The text is WikiText-2's train split (data/wikitext-2-v1/wiki.train.tokens) repeated N times.
Every case runs in a fresh subprocess, so that its peak RSS is its own: first a run on an empty
cache, then the same run again, which finds its cache. Time is the preparation inside the
subprocess (loading the text file into Arrow + tokenizing + grouping), not the interpreter start.

- ours: utils.data.prepare.prepare_datasets (int32 ids only; reuse of the prepared split by key).
- hf:   the run_clm.py example: map(tokenizer) to input_ids + attention_mask, then group_texts
        concatenating Python lists and copying input_ids to labels; reuse by datasets' map cache.

"cache MB" is what the preparation adds on disk beyond the text's own Arrow copy (which both share).

    python benchmarks/bench_data.py --repeats 1,10
    python benchmarks/bench_data.py --repeats 1 --lines 300      # seconds: a slice of the file
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from common import print_table, show_progress

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = ROOT / "data" / "wikitext-2-v1" / "wiki.train.tokens"
TOKENIZER = ROOT / "data" / "tokenizers" / "gpt2"
COLUMNS = ["pipeline", "text", "run", "wall s", "tokens", "tokens/s", "peak RSS MB", "cache MB"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", default="1,10", help="comma list of N: the text is the train file N times")
    parser.add_argument("--lines", type=int, default=0, help="use only the first LINES lines of the file (0: all)")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--pipelines", default="ours,hf")
    parser.add_argument("--workdir", default=None, help="where to put text and caches (default: a temp folder)")
    parser.add_argument("--worker", nargs=3, metavar=("PIPELINE", "TEXT", "CACHE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ inside a subprocess


def prepare_ours(text: str, cache: str, block_size: int) -> int:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from utils.data.prepare import prepare_datasets

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    data_args = SimpleNamespace(streaming=False, max_train_samples=None, max_eval_samples=None,
                                text_column_name=None, preprocessing_num_workers=None, overwrite_cache=False)
    training_args = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1, main_process_first=lambda desc=None: contextlib.nullcontext())
    # Loaded as the hf case loads it (the scripts would also hold out a validation share).
    raw = load_dataset("text", data_files={"train": text}, cache_dir=cache, keep_linebreaks=True)
    samples = prepare_datasets(raw, tokenizer, data_args, training_args, seq_len=block_size, cache_dir=cache)
    return len(samples["train"]) * block_size


def prepare_hf(text: str, cache: str, block_size: int) -> int:
    """The Hugging Face run_clm.py example's preprocessing, as it is written there."""
    from itertools import chain

    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    raw = load_dataset("text", data_files={"train": text}, cache_dir=cache, keep_linebreaks=True)

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"], desc="Running tokenizer")
    grouped = tokenized.map(group_texts, batched=True, desc=f"Grouping texts in chunks of {block_size}")
    return len(grouped["train"]) * block_size


def worker(pipeline: str, text: str, cache: str, block_size: int) -> None:
    """Prepare once; print seconds, tokens and this process's peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    import utils  # noqa: F401  (sets the torch backend autoload switch before torch loads)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    import datasets, transformers  # noqa: E401,F401  (import time is not preparation time)
    import utils.data.prepare  # noqa: F401

    start = time.perf_counter()
    tokens = (prepare_ours if pipeline == "ours" else prepare_hf)(text, cache, block_size)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_mb}))


# ---------------------------------------------------------------------------- driver


def run_case(pipeline: str, text: Path, cache: Path, block_size: int) -> dict:
    """One fresh subprocess (tokenization runs in it, not in worker processes), so its peak RSS is the case's."""
    command = [sys.executable, __file__, "--block_size", str(block_size), "--worker", pipeline, str(text), str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode:
        raise SystemExit(f"{pipeline} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def cache_size_mb(cache: Path, text_arrow_mb: float) -> float:
    total = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and f.suffix == ".arrow")
    return total / 2**20 - text_arrow_mb


def text_arrow_mb(cache: Path) -> float:
    """The text's own Arrow copy made by load_dataset (the same for both pipelines)."""
    files = [f for f in (cache / "text").rglob("*.arrow") if "-train" in f.name] if (cache / "text").exists() else []
    return sum(f.stat().st_size for f in files) / 2**20


def make_text(folder: Path, repeats: int, lines: int) -> Path:
    source = TRAIN_TEXT.read_text(encoding="utf-8")
    if lines:
        source = "".join(source.splitlines(keepends=True)[:lines])
    path = folder / f"train-x{repeats}.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(repeats):
            handle.write(source)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(*args.worker, block_size=args.block_size)
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for repeats in [int(n) for n in args.repeats.split(",")]:
            text = make_text(folder, repeats, args.lines)
            label = f"{repeats}x ({text.stat().st_size / 2**20:.1f} MB)"
            for pipeline in args.pipelines.split(","):
                cache = folder / f"cache-{pipeline}-{repeats}"
                shutil.rmtree(cache, ignore_errors=True)
                for run in ("first", "cached"):
                    result = run_case(pipeline, text, cache, args.block_size)
                    size = cache_size_mb(cache, text_arrow_mb(cache))
                    rows.append([pipeline, label, run, f"{result['seconds']:.1f}", f"{result['tokens']:,}",
                                 f"{result['tokens'] / result['seconds']:,.0f}", f"{result['peak_rss_mb']:.0f}",
                                 f"{size:.1f}"])
                    show_progress(rows[-1])
                shutil.rmtree(cache, ignore_errors=True)
            text.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(COLUMNS, rows)


if __name__ == "__main__":
    main()
