"""What checking content costs: checkpoint checksums at GPT-2 124M size, and the input-file digest.

- checkpoint: a from-scratch GPT2Config() model (124M) saved as a checkpoint would be (its
  model.safetensors and an Adam-sized optimizer.pt). Timed apart, best of --rounds each (after one
  save not counted): the save as the Trainer writes it without checksums; flushing its files to
  disk; reading the files back to checksum them (what the marker did before); and the save with
  the checksums taken as the files are saved (utils/train/save_digests.py, what checkpoints do
  now), set against the same writers without the hashing (torch.save into a file object rather
  than to a path). Each check's overhead is over the save plus its flush.
- input digest: utils/data/raw.py content_digest over WikiText-2's train text repeated N times;
  compare with the cold preprocessing of the same text (benchmarks/bench_data.py --repeats N).

    python benchmarks/bench_integrity.py                    # 124M, x10
    python benchmarks/bench_integrity.py --size tiny --repeats 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from common import print_table

from utils.data.raw import content_digest
from utils.files import file_digest, fsync
from utils.train.save_digests import digests_of_saves

TRAIN_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "wikitext-2-v1",
                          "wiki.train.tokens")
SIZES = {"124M": {}, "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="124M")
    parser.add_argument("--repeats", type=int, default=10, help="the text is WikiText-2's train file N times")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many timings")
    return parser.parse_args(argv)


def build(size: str):
    """The model and an optimizer state of its size twice over, as the Trainer saves them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**SIZES[size]))
    state = {name: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for name, p in model.named_parameters()}
    return model, state


def save(folder: str, model, state, into_file_object: bool = False) -> None:
    import torch

    model.save_pretrained(folder)
    path = os.path.join(folder, "optimizer.pt")
    if into_file_object:
        with open(path, "wb") as f:
            torch.save(state, f)
    else:
        torch.save(state, path)


def flush(folder: str) -> None:
    for name in os.listdir(folder):
        fsync(os.path.join(folder, name))


def read_back(folder: str) -> None:
    for name in os.listdir(folder):
        file_digest(os.path.join(folder, name))


def hashed_save(folder: str, model, state) -> None:
    with digests_of_saves(folder) as written:
        save(folder, model, state)
    assert len(written) == 2, written  # both files were hashed as they were written


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "checkpoint-1")
        model, state = build(args.size)
        saves = {
            "stock": lambda: save(folder, model, state),
            "file objects": lambda: save(folder, model, state, into_file_object=True),
            "hashed": lambda: hashed_save(folder, model, state),
        }
        saves["stock"]()  # a first save warms the allocator and the libraries up
        times: dict[str, float] = {}
        for _ in range(args.rounds):  # the ways in turn, so that a slow spell of the machine hits all
            for way, work in saves.items():
                shutil.rmtree(folder, ignore_errors=True)
                times[way] = min(times.get(way, float("inf")), timed(work))
                times["flush"] = min(times.get("flush", float("inf")), timed(lambda: flush(folder)))
                if way == "stock":
                    times["read back"] = min(times.get("read back", float("inf")), timed(lambda: read_back(folder)))
        megabytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20
        base = times["stock"] + times["flush"]
        for what, extra in (("read back after the save", times["read back"]),
                            ("taken as the files are saved", times["hashed"] - times["file objects"])):
            rows.append([f"checkpoint save, GPT-2 {args.size}, checksums {what}", f"{megabytes:.0f}",
                         f"{base:.2f}", f"{extra:.3f}", f"{100 * extra / base:.1f}%"])
        print(f"save {times['stock']:.3f} s (into file objects {times['file objects']:.3f} s), "
              f"flush {times['flush']:.3f} s")

        text = os.path.join(tmp, "train.txt")
        with open(TRAIN_TEXT, "rb") as source:
            data = source.read()
        with open(text, "wb") as out:
            for _ in range(args.repeats):
                out.write(data)
        digest = min(timed(lambda: content_digest([text])) for _ in range(args.rounds))
        rows.append([f"input digest, WikiText-2 x{args.repeats}", f"{os.path.getsize(text) / 2**20:.0f}", "",
                     f"{digest:.3f}", "see bench_data.py"])
    print_table(["what", "MB", "without the check s", "check s", "overhead"], rows)


if __name__ == "__main__":
    main()
