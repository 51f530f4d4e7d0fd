"""Short documents three ways: real (non-pad) tokens per second and the share of padding.

The corpus is WikiText-2 train (bundled), each non-empty line a document: paragraphs and
headings, most far shorter than a block. Three ways to make training sequences of it:

- ``concat``: the default, every line joined into one stream cut into blocks; no padding, but a
  block holds the end of one document and the start of the next, each attending to the other;
- ``document``: --packing document, whole documents packed into blocks by best fit, none
  attending to another; the blocks' free slots are padding;
- ``line_by_line``: run_mlm.py --line_by_line, one document per row, padded per batch (and cut
  at the block size: the rest of a longer line is not trained on). run_clm.py has no such mode.

Each case is prepared by the suite's own code (prepare_datasets, the scripts' collators, the
model set up as the script sets it up); each round builds its model afresh from one seed and
trains it with AdamW for --steps steps after --warmup untimed ones, batches drawn at random
(the order goes on from round to round). The rounds alternate the cases, and the table gives the
median real tokens/s over the rounds. Real tokens are those of the samples before the
collator pads them; the padding share is the padded slots over all slots of the batches.

    python benchmarks/bench_packing.py                      # small models, block 256
    python benchmarks/bench_packing.py --size tiny --steps 2 --warmup 1 --rounds 1 --lines 400
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from common import print_table, show_progress

import utils  # noqa: F401,E402  (before torch, as in the scripts)
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

from utils.data.collators import CausalLMCollator, MaskedLMCollator  # noqa: E402
from utils.data.packing import DocumentPacker, PackedCausalLMCollator, PackedMaskedLMCollator  # noqa: E402
from utils.data.prepare import prepare_datasets  # noqa: E402
from utils.model.documents import prepared_for_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = ROOT / "data" / "wikitext-2-v1" / "wiki.train.tokens"
TOKENIZERS = ROOT / "data" / "tokenizers"
SIZES = {
    "small": {"gpt2": "n_layer=6,n_embd=384,n_head=6,n_positions=256",
              "roberta": "num_hidden_layers=6,hidden_size=384,num_attention_heads=6,intermediate_size=1536,"
                         "max_position_embeddings=258"},
    "tiny": {"gpt2": "n_layer=1,n_embd=32,n_head=2,n_positions=256",
             "roberta": "num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,"
                        "max_position_embeddings=258"},
}
OBJECTIVES = {"clm": ("gpt2", AutoModelForCausalLM), "mlm": ("roberta", AutoModelForMaskedLM)}
TOKENIZER_OF = {"gpt2": "gpt2", "roberta": "roberta-base"}
CASES = ["mlm concat", "mlm document", "mlm line_by_line", "clm concat", "clm document"]
COLUMNS = ["case", "samples", "real tokens/sample", "padding share", "real tokens/s (median)", "rounds"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=None, help="the first N lines of the corpus only")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    return args


class Case:
    """One way of making sequences: its samples, collator and model, and what its timed steps gave."""

    def __init__(self, name: str, args, rows: Dataset, cache: str):
        objective, self.packing = name.split()
        self.model_type, self.model_class = OBJECTIVES[objective]
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / TOKENIZER_OF[self.model_type])
        self.config = AutoConfig.for_model(self.model_type)
        self.config.update_from_string(SIZES[args.size][self.model_type])
        documents = None
        if self.packing == "document":
            first_position = prepared_for_documents(self.new_model())  # and refused here if not proven
            documents = DocumentPacker(tokenizer, args.block_size, first_position=first_position)
        data_args = SimpleNamespace(streaming=False, max_train_samples=None, max_eval_samples=None,
                                    text_column_name=None, preprocessing_num_workers=None, overwrite_cache=False)
        training_args = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1,
                                        main_process_first=lambda desc=None: contextlib.nullcontext())
        self.samples = prepare_datasets({"train": rows}, tokenizer, data_args, training_args, seq_len=args.block_size,
                                        line_by_line=self.packing == "line_by_line", documents=documents,
                                        cache_dir=cache)["train"]
        self.collator = _collator(objective, self.packing, tokenizer)
        self.order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(0)).tolist()
        self.next = 0
        self.name, self.speeds, self.real, self.slots = name, [], 0, 0

    def new_model(self):
        """The case's model as the script sets it up, from one seed (one model in memory at a time)."""
        torch.manual_seed(0)
        model = self.model_class.from_config(self.config)
        if self.packing == "document":
            prepared_for_documents(model)
        return model

    def batch(self, size: int) -> tuple[dict, int]:
        """The next batch of the random order (wrapping round), and its real tokens."""
        if self.next + size > len(self.order):
            self.next = 0
        examples = [self.samples[i] for i in self.order[self.next:self.next + size]]
        self.next += size
        return self.collator(examples), sum(len(e["input_ids"]) for e in examples)

    def round(self, args) -> None:
        model = self.new_model().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        real = 0
        for step in range(args.warmup + args.steps):
            batch, tokens = self.batch(args.batch_size)
            if step == args.warmup:
                start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                real += tokens
                self.real += tokens
                self.slots += batch["input_ids"].numel()
        self.speeds.append(real / (time.perf_counter() - start))
        show_progress([self.name, f"round {len(self.speeds)}", f"{self.speeds[-1]:,.0f} real tokens/s"])

    def row(self) -> list[str]:
        per_sample = sum(len(ids) for ids in self.samples["input_ids"]) / len(self.samples)
        return [self.name, f"{len(self.samples):,}", f"{per_sample:.1f}", f"{1 - self.real / self.slots:.1%}",
                f"{statistics.median(self.speeds):,.0f}", str(len(self.speeds))]


def _collator(objective: str, packing: str, tokenizer):
    if objective == "clm":
        return PackedCausalLMCollator(tokenizer) if packing == "document" else CausalLMCollator()
    if packing == "document":
        return PackedMaskedLMCollator(tokenizer=tokenizer, mlm_probability=0.15)
    # As run_mlm.py builds it.
    return MaskedLMCollator(tokenizer=tokenizer, mlm_probability=0.15,
                            pad_to_multiple_of=8 if packing == "line_by_line" else None)


def main(argv=None) -> None:
    args = parse_args(argv)
    lines = TRAIN_TEXT.read_text(encoding="utf-8").splitlines(keepends=True)[:args.lines]
    rows = Dataset.from_dict({"text": lines})
    documents = sum(1 for line in lines if line.strip())
    print(f"corpus: {TRAIN_TEXT.name}, {len(lines):,} lines, {documents:,} documents (non-empty lines); "
          f"block {args.block_size}, batch {args.batch_size}, {args.size} models; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_packing-") as cache:
        cases = [Case(name, args, rows, cache) for name in args.cases.split(",")]
        for _ in range(args.rounds):  # alternating, so that a busy spell of the machine hits every case
            for case in cases:
                case.round(args)
    rows_out = [case.row() for case in cases]
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(COLUMNS, rows_out)


if __name__ == "__main__":
    main()
