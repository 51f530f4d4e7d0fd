#!/usr/bin/env python
"""Train or fine-tune a masked language model (BERT, RoBERTa, DistilBERT, ALBERT, ...) on text.

Tokens are masked dynamically: each batch draws a new mask.

Example:
    python run_mlm.py --model_name_or_path roberta-base --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir outputs/mlm
"""

import utils  # noqa: F401  (must come before torch: see utils/__init__.py)

import logging
from dataclasses import dataclass, field

from transformers import AutoModelForMaskedLM

from utils.cli import run_cli
from utils.data.collators import MaskedLMCollator
from utils.data.packing import DocumentPacker, PackedMaskedLMCollator
from utils.data.prepare import prepare_datasets, tokens_per_sample
from utils.data.raw import load_raw_datasets
from utils.errors import UsageError
from utils.flags.arguments import SequenceArguments, parse_args
from utils.launch.start import start_run
from utils.model.documents import prepared_for_documents
from utils.model.loading import (load_config, load_model, load_tokenizer, require_mask_token,
                                 require_maskable_tokens, resolve_seq_len)
from utils.model.metrics import TokenAccuracy
from utils.runs.folder import RunFolder
from utils.train.steps import train_and_evaluate

logger = logging.getLogger(__name__)


@dataclass
class MaskedLMArguments(SequenceArguments):
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Share of tokens masked for the masked-LM loss."}
    )

    def __post_init__(self):
        if not 0 < self.mlm_probability < 1:
            raise UsageError(f"--mlm_probability {self.mlm_probability}: give a number between 0 and 1")


def main() -> dict:
    """Train and/or evaluate as the flags say; returns the metrics written (as all_results.json holds them)."""
    model_args, data_args, mlm_args, training_args = parse_args(MaskedLMArguments)
    start_run(training_args)  # logging, one process per device (torchrun), seeds
    with RunFolder.claim(training_args) as run:  # the lock on --output_dir, and what is left to do there
        raw_datasets = load_raw_datasets(model_args, data_args)
        config = load_config(model_args, AutoModelForMaskedLM)
        logger.info("Model config %s", config)  # as JSON, after any --config_overrides
        tokenizer = load_tokenizer(model_args)
        require_mask_token(tokenizer, "masked language modeling")
        model = load_model(model_args, config, tokenizer, AutoModelForMaskedLM)
        run.check_resumable(model)  # a checkpoint this model can load, before any writing

        seq_len = resolve_seq_len(mlm_args.max_seq_length, tokenizer, config, "--max_seq_length")
        require_maskable_tokens(tokenizer, seq_len, mlm_args.mlm_probability, training_args)
        documents = None
        if data_args.packing == "document":  # whole documents in blocks, none attending to another
            documents = DocumentPacker(tokenizer, seq_len, first_position=prepared_for_documents(model))
        samples = prepare_datasets(raw_datasets, tokenizer, data_args, training_args, seq_len=seq_len,
                                   line_by_line=mlm_args.line_by_line, pad_to_max_length=mlm_args.pad_to_max_length,
                                   documents=documents, cache_dir=model_args.cache_dir)
        if documents is not None:
            collator = PackedMaskedLMCollator(tokenizer=tokenizer, mlm_probability=mlm_args.mlm_probability)
        else:
            collator = MaskedLMCollator(
                tokenizer=tokenizer,
                mlm_probability=mlm_args.mlm_probability,
                # Multiples of 8 use tensor cores well, unless everything is padded to one length anyway.
                pad_to_multiple_of=8 if mlm_args.line_by_line and not mlm_args.pad_to_max_length else None,
            )

        varying = mlm_args.line_by_line or documents is not None  # samples of their own lengths
        return train_and_evaluate(model, tokenizer, training_args, samples, run, collator=collator,
                                  accuracy=TokenAccuracy(),
                                  tokens_per_sample=tokens_per_sample(samples.get("train"), seq_len, varying),
                                  packed_documents=documents is not None)


if __name__ == "__main__":
    run_cli(main)
