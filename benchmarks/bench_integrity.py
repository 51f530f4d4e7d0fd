"""What checking content costs: checkpoint checksums at GPT-2 124M size, and the input-file digest.

- checkpoint: a from-scratch GPT2Config() model (124M) saved as a checkpoint would be (its
  model.safetensors and an Adam-sized optimizer.pt), then its completion marker written two ways:
  flushing every file only (no checksum of the big files), and flushing and checksumming every
  file in one pass (utils/runs/checkpoints.py write_marker). The overhead is the difference over
  the whole save (files + marker).
- input digest: utils/data/raw.py content_digest over WikiText-2's train text repeated N times;
  compare with the cold preprocessing of the same text (benchmarks/bench_data.py --repeats N).

    python benchmarks/bench_integrity.py                    # 124M, x10
    python benchmarks/bench_integrity.py --size tiny --repeats 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import print_table

from utils.data.raw import content_digest
from utils.files import fsync
from utils.runs.checkpoints import write_marker

TRAIN_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "wikitext-2-v1",
                          "wiki.train.tokens")
SIZES = {"124M": {}, "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="124M")
    parser.add_argument("--repeats", type=int, default=10, help="the text is WikiText-2's train file N times")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many timings")
    return parser.parse_args(argv)


def save_checkpoint_files(folder: str, size: str) -> float:
    """The weights and an optimizer state of their size twice over, as the Trainer writes them; seconds taken."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**SIZES[size]))
    state = {name: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for name, p in model.named_parameters()}
    start = time.perf_counter()
    model.save_pretrained(folder)
    torch.save(state, os.path.join(folder, "optimizer.pt"))
    return time.perf_counter() - start


def flush_only(folder: str) -> None:
    for name in os.listdir(folder):
        fsync(os.path.join(folder, name))


def best(rounds: int, work) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "checkpoint-1")
        save = save_checkpoint_files(folder, args.size)
        megabytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20
        flushed = best(args.rounds, lambda: flush_only(folder))
        hashed = best(args.rounds, lambda: write_marker(folder, 1))
        overhead = (hashed - flushed) / (save + flushed)
        rows.append([f"checkpoint save, GPT-2 {args.size}", f"{megabytes:.0f}", f"{save + flushed:.2f}",
                     f"{hashed - flushed:.3f}", f"{100 * overhead:.1f}%"])

        text = os.path.join(tmp, "train.txt")
        with open(TRAIN_TEXT, "rb") as source:
            data = source.read()
        with open(text, "wb") as out:
            for _ in range(args.repeats):
                out.write(data)
        digest = best(args.rounds, lambda: content_digest([text]))
        rows.append([f"input digest, WikiText-2 x{args.repeats}", f"{os.path.getsize(text) / 2**20:.0f}", "",
                     f"{digest:.3f}", "see bench_data.py"])
    print_table(["what", "MB", "without the check s", "check s", "overhead"], rows)


if __name__ == "__main__":
    main()
