#!/usr/bin/env python
"""Train or fine-tune a permutation language model (XLNet) on text.

Example:
    python run_plm.py --model_name_or_path xlnet-base-cased --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir outputs/plm
"""

import utils  # noqa: F401  (must come before torch: see utils/__init__.py)

import logging
from dataclasses import dataclass, field

from transformers import XLNetLMHeadModel

from utils.cli import run_cli
from utils.data.collators import PermutationLMCollator
from utils.data.prepare import prepare_datasets, tokens_per_sample
from utils.data.raw import load_raw_datasets
from utils.errors import UsageError
from utils.flags.arguments import SequenceArguments, parse_args
from utils.launch.start import start_run
from utils.model.documents import prepared_for_documents
from utils.model.loading import load_config, load_model, load_tokenizer, require_mask_token, resolve_seq_len
from utils.model.metrics import TokenAccuracy
from utils.runs.folder import RunFolder
from utils.train.steps import train_and_evaluate

logger = logging.getLogger(__name__)


@dataclass
class PermutationLMArguments(SequenceArguments):
    max_seq_length: int | None = field(
        default=512, metadata={"help": "Sequence length after tokenization; must be even."}
    )
    plm_probability: float = field(
        default=1 / 6,
        metadata={"help": "Ratio of the length of a span of masked tokens to the surrounding context."},
    )
    max_span_length: int = field(
        default=5, metadata={"help": "Longest span of masked tokens."}
    )

    def __post_init__(self):
        if self.max_seq_length is not None and self.max_seq_length % 2:
            raise UsageError(f"--max_seq_length {self.max_seq_length}: permutation LM needs an even length, "
                             f"e.g. {self.max_seq_length + 1}")
        if not 0 < self.plm_probability < 1 or self.max_span_length < 1:
            raise UsageError("--plm_probability must lie between 0 and 1, and --max_span_length be at least 1")


def main() -> dict:
    """Train and/or evaluate as the flags say; returns the metrics written (as all_results.json holds them)."""
    model_args, data_args, plm_args, training_args = parse_args(PermutationLMArguments)
    start_run(training_args)  # logging, one process per device (torchrun), seeds
    with RunFolder.claim(training_args) as run:  # the lock on --output_dir, and what is left to do there
        raw_datasets = load_raw_datasets(model_args, data_args)
        config = load_config(model_args, XLNetLMHeadModel)
        logger.info("Model config %s", config)  # as JSON, after any --config_overrides
        tokenizer = load_tokenizer(model_args)
        require_mask_token(tokenizer, "permutation language modeling")
        model = load_model(model_args, config, tokenizer, XLNetLMHeadModel)
        run.check_resumable(model)  # a checkpoint this model can load, before any writing
        if data_args.packing == "document":
            prepared_for_documents(model)  # refuses: XLNet's permutation attention has no per-document mask here

        seq_len = resolve_seq_len(plm_args.max_seq_length, tokenizer, config, "--max_seq_length")
        seq_len -= seq_len % 2  # a clamp to an odd model maximum must still give an even length
        samples = prepare_datasets(raw_datasets, tokenizer, data_args, training_args, seq_len=seq_len,
                                   line_by_line=plm_args.line_by_line, pad_to_max_length=plm_args.pad_to_max_length,
                                   cache_dir=model_args.cache_dir)
        collator = PermutationLMCollator(
            tokenizer=tokenizer, plm_probability=plm_args.plm_probability, max_span_length=plm_args.max_span_length
        )

        return train_and_evaluate(model, tokenizer, training_args, samples, run, collator=collator,
                                  accuracy=TokenAccuracy(), tokens_per_sample=tokens_per_sample(
                                      samples.get("train"), seq_len, plm_args.line_by_line))


if __name__ == "__main__":
    run_cli(main)
