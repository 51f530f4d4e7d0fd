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
- cache entry: a tokenized-data cache entry of WikiText-2's train text repeated N times (its real
  GPT-2 token ids, in blocks of 1024), published as utils/data/cache.py publishes one. Timed, best
  of --rounds: opening the entry as a run reused one before (``Dataset.from_file``), and checking its
  samples file against its checksum as every reuse now does first (a read of the whole file,
  from the page cache here: a first read from the disk adds the disk's time). Writing the samples
  with the checksum taken as they go out is timed against the same writes into a plain file.

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

import utils.data.arrow_files as arrow_files
from utils.data.arrow_files import write_batches
from utils.data.cache import SAMPLES_FILE, cached_samples, entry_problem
from utils.data.prepare import pack_blocks
from utils.data.raw import content_digest
from utils.files import DigestingWriter, file_digest, fsync
from utils.train.save_digests import digests_of_saves

TRAIN_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "wikitext-2-v1",
                          "wiki.train.tokens")
SIZES = {"124M": {}, "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}}
TOKENIZER = os.path.join(os.path.dirname(TRAIN_TEXT), os.pardir, "tokenizers", "gpt2")
BLOCK = 1024  # tokens per cached sample


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
        rows += cache_rows(os.path.join(tmp, "cache"), data.decode("utf-8"), args.repeats, args.rounds)
    print_table(["what", "MB", "without the check s", "check s", "overhead"], rows)


class TiledText:
    """A stand-in for the scripts' sample recipe (utils/data/prepare.py): the blocks of a text's ids repeated."""

    def __init__(self, ids, repeats: int):
        self.ids, self.repeats = ids, repeats

    def key(self, source: str, max_samples) -> str:
        return f"wikitext-2-train-x{self.repeats}"

    def blocks(self):
        import pyarrow as pa

        blocks = pack_blocks(self.ids, BLOCK)
        for _ in range(self.repeats):
            yield pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), BLOCK)],
                                  schema=self.schema())

    @staticmethod
    def schema():
        import pyarrow as pa

        return pa.schema({"input_ids": pa.list_(pa.int32(), BLOCK)})

    def build(self, rows, max_samples, workdir: str):
        from datasets import Dataset

        path = os.path.join(workdir, "blocks.arrow")
        write_batches(path, self.schema(), self.blocks())
        return Dataset.from_file(path)


def cache_rows(root: str, text: str, repeats: int, rounds: int) -> list[list[str]]:
    """The cache entry rows: writing with and without the checksum, and reusing with and without the check."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from transformers import AutoTokenizer

    lines = text.splitlines(keepends=True)
    ids = np.fromiter((i for line in AutoTokenizer.from_pretrained(TOKENIZER)(lines)["input_ids"] for i in line),
                      np.int32)
    recipe = TiledText(ids, repeats)
    cached_samples(recipe, lines, "", None, False, root)  # built and published as the scripts do
    entry = os.path.join(root, "tokenized", recipe.key("", None))
    samples = os.path.join(entry, SAMPLES_FILE)
    assert entry_problem(entry) is None

    class Unhashed(pa.OSFile):  # the file write_batches wrote into before it took checksums
        def result(self):
            return "", 0

    def plain_write(path: str) -> None:  # write_batches with that file in place of the hashing writer
        arrow_files.DigestingWriter = lambda name: Unhashed(name, "wb")
        try:
            write_batches(path, recipe.schema(), recipe.blocks())
        finally:
            arrow_files.DigestingWriter = DigestingWriter

    scratch = os.path.join(root, "scratch.arrow")
    times: dict[str, float] = {}
    for _ in range(rounds):
        for what, work in (("open", lambda: Dataset.from_file(samples)), ("check", lambda: entry_problem(entry)),
                           ("plain write", lambda: plain_write(scratch)),
                           ("hashed write", lambda: write_batches(scratch, recipe.schema(), recipe.blocks()))):
            times[what] = min(times.get(what, float("inf")), timed(work))
    megabytes = f"{os.path.getsize(samples) / 2**20:.0f}"
    written = times["hashed write"] - times["plain write"]
    return [
        [f"cache entry write, WikiText-2 x{repeats}, checksum taken as written", megabytes,
         f"{times['plain write']:.3f}", f"{written:.3f}", f"{100 * written / times['plain write']:.1f}%"],
        [f"cache entry reuse, WikiText-2 x{repeats}, checksum checked", megabytes, f"{times['open']:.3f}",
         f"{times['check']:.3f}", "see bench_data.py"],
    ]


if __name__ == "__main__":
    main()
