#!/usr/bin/env python
"""Train or fine-tune a causal language model (GPT, GPT-2, ...) on text.

Example:
    python run_clm.py --model_name_or_path gpt2 --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir outputs/clm
"""

import utils  # noqa: F401  (must come before torch: see utils/__init__.py)

import logging
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM

from utils.cli import run_cli
from utils.data.collators import CausalLMCollator
from utils.data.packing import DocumentPacker, PackedCausalLMCollator
from utils.data.prepare import prepare_datasets, tokens_per_sample
from utils.data.raw import load_raw_datasets
from utils.eval.causal import causal_evaluation
from utils.flags.arguments import parse_args
from utils.flags.parser import DATA
from utils.launch.start import start_run
from utils.model.documents import prepared_for_documents
from utils.model.loading import load_config, load_model, load_tokenizer, resolve_seq_len
from utils.model.metrics import TokenAccuracy
from utils.runs.folder import RunFolder
from utils.train.steps import train_and_evaluate

logger = logging.getLogger(__name__)


@dataclass
class CausalLMArguments:
    _argument_group_name = DATA  # where --help lists its flags

    block_size: int | None = field(
        default=None,
        metadata={"help": "Length of the training blocks the text is packed into (default: the model's maximum, at most 1024)."},
    )
    eval_stride: int | None = field(
        default=None,
        metadata={"help": "Evaluate with sliding windows of --block_size tokens that advance by this many tokens "
                          "(below --block_size), each scored only on the tokens the one before did not score, so "
                          "every token is predicted with at least block_size - stride tokens of context (the Hugging "
                          "Face perplexity guide's method). Default: disjoint blocks, as in training."},
    )


def main() -> dict:
    """Train and/or evaluate as the flags say; returns the metrics written (as all_results.json holds them)."""
    model_args, data_args, clm_args, training_args = parse_args(CausalLMArguments)
    start_run(training_args)  # logging, one process per device (torchrun), seeds
    with RunFolder.claim(training_args) as run:  # the lock on --output_dir, and what is left to do there
        raw_datasets = load_raw_datasets(model_args, data_args)
        config = load_config(model_args, AutoModelForCausalLM)
        logger.info("Model config %s", config)  # as JSON, after any --config_overrides
        tokenizer = load_tokenizer(model_args)
        model = load_model(model_args, config, tokenizer, AutoModelForCausalLM)
        run.check_resumable(model)  # a checkpoint this model can load, before any writing

        block_size = resolve_seq_len(clm_args.block_size, tokenizer, config, "--block_size", minimum=2,
                                     why="each token learns to predict the next one in its block")
        documents = None
        if data_args.packing == "document":  # whole documents in blocks, none attending to another
            documents = DocumentPacker(tokenizer, block_size, first_position=prepared_for_documents(model))
        # The token stream with the text each token covers (loss per byte and per word too), or packed documents.
        evaluation = causal_evaluation(block_size, clm_args.eval_stride, documents)
        samples = prepare_datasets(raw_datasets, tokenizer, data_args, training_args, seq_len=block_size,
                                   documents=documents, evaluation=evaluation, cache_dir=model_args.cache_dir)

        collator = CausalLMCollator() if documents is None else PackedCausalLMCollator(tokenizer)
        return train_and_evaluate(model, tokenizer, training_args, samples, run, collator=collator,
                                  accuracy=TokenAccuracy(shift=True),
                                  tokens_per_sample=tokens_per_sample(samples.get("train"), block_size,
                                                                      documents is not None),
                                  packed_documents=documents is not None)


if __name__ == "__main__":
    run_cli(main)
