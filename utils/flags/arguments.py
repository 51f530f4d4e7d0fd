"""Command-line arguments shared by the three scripts.

The flags keep the names, meanings and defaults of the Hugging Face language-modeling
examples, so that a user's existing command lines work unchanged. Each script adds a small
dataclass of its own flags (``--block_size``, ``--mlm_probability``, ...).
"""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from utils.amp.config import DEFAULT_MIN_SCALE, DEFAULT_OPT_LEVEL, DEFAULT_SCALE_WINDOW, OPT_LEVELS
from utils.cli import Command
from utils.data.packing import PACKINGS
from utils.errors import UsageError
from utils.flags.checks import (AMP_BACKENDS, check_chunk_flags, check_counts, check_optimizer_numbers,
                                check_packing_flags, check_sample_counts, check_scaling_flags, precision_config)
from utils.flags.legacy import translate_flags, translate_values
from utils.flags.parser import DATA, MODEL, PRECISION, RUN, flag_parser
from utils.flags.run_identity import note_run, settings_fingerprint
from utils.launch.device import check_placement, setup_device, training_defaults


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from."""

    _argument_group_name = MODEL

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to fine-tune: a hub name (e.g. gpt2) or a local folder. Leave unset to train from scratch."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Architecture to build from scratch (e.g. gpt2, bert, roberta, xlnet) when no model is given."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "From scratch only: comma-separated config changes, e.g. n_embd=64,n_layer=2,resid_pdrop=0.2."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config name or path, if not the same as the model."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as the model."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to keep models and datasets downloaded from the hub, and our tokenized datasets."},
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use a fast (Rust) tokenizer where one exists."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision to use: a branch, tag or commit id."}
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models or datasets (default: the one from `hf auth login`)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers defined by code on the hub. Only for repositories you trust."},
    )
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={"help": "As in the Hugging Face examples: load the weights without a second copy in memory. "
                          "transformers 5 always does, so the flag is accepted and changes nothing."},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the model weights in this dtype ('auto' takes the checkpoint's).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
            "aliases": ["--torch_dtype"],
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel (default: transformers' pick, sdpa for every model that has it, else eager).",
            "choices": ["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"],
        },
    )
    pad_vocab_to_multiple_of: int = field(
        default=0,
        metadata={"help": "Pad the vocabulary matrices to a multiple of this many rows (e.g. 64: GPT-2's 50257 "
                          "becomes 50304) for faster GPU matrix products. The padded entries never count (their "
                          "scores are -inf), and saved models and checkpoints keep the true vocabulary, so stock "
                          "code loads them. 0 (default): off; on a CPU it only adds work."},
    )

    def __post_init__(self):
        if self.pad_vocab_to_multiple_of < 0:
            raise UsageError(f"--pad_vocab_to_multiple_of {self.pad_vocab_to_multiple_of}: give a positive number of "
                             "rows (e.g. 64), or 0 for no padding")


@dataclass
class DataArguments:
    """Which text to train and evaluate on, and how to prepare it."""

    _argument_group_name = DATA

    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset name on the hub (e.g. wikitext), or a local dataset folder."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The dataset's configuration (e.g. wikitext-2-raw-v1)."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Training text: a .txt, .csv, .json or .jsonl file."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation text, of the same type as --train_file."}
    )
    text_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the text in csv/json data (default: 'text' if present, else the first column)."},
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percent of the training data held out for evaluation when there is no validation split."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on at most this many samples (blocks); only the text they need is tokenized."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many samples (blocks)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again even when a matching cached dataset exists."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used for tokenization."}
    )
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Keep line breaks in .txt files."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Read the data as a stream instead of preparing it all first (needs --max_steps)."}
    )
    packing: str = field(
        default="concat",
        metadata={"help": "How text becomes training sequences: 'concat' (as the Hugging Face examples) joins all "
                          "rows into one stream cut into blocks, so a block may hold the end of one document and "
                          "the start of the next; 'document' keeps each document (a row) whole in one block, "
                          "several per block (best fit), positions restarting in each and no token attending "
                          "across documents; for the model families proven to keep them apart, others refused.",
                  "choices": list(PACKINGS)},
    )
    sample_by: str = field(
        default="line",
        metadata={"help": "What a row of a text file is: a 'line', a blank-line separated 'paragraph', or the "
                          "whole file ('document'); with --packing document each row is a document.",
                  "choices": ["line", "paragraph", "document"]},
    )

    def __post_init__(self):
        check_sample_counts(self)


@dataclass
class SequenceArguments:
    """How mlm and plm cut text into sequences."""

    _argument_group_name = DATA

    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Sequence length after tokenization (default: the model's maximum, at most 1024)."},
    )
    line_by_line: bool = field(
        default=False, metadata={"help": "Treat each non-empty line as one sequence instead of packing the text into blocks."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every sequence to --max_seq_length in preprocessing instead of per batch."},
    )


@dataclass
class LMTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the flags this suite adds (in --help: the run folder's group unless a
    field names another, utils/flags/parser.py)."""

    _argument_group_name = RUN

    output_dir: str | None = field(  # transformers' flag, with what happens when it is not given
        default=None,
        metadata={"help": "Where the run writes its checkpoints, final model and results (default: trainer_output, "
                          "in the current folder: transformers' default)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in a non-empty --output_dir instead of resuming from its last checkpoint."},
    )
    fps_warmup_steps: int = field(
        default=5,
        metadata={"help": "Optimizer steps left out of the FPS figure (fps in train_results.json), so that "
                          "start-up does not count."},
    )
    on_nonfinite_loss: str = field(
        default="stop",
        metadata={"help": "On a NaN/inf training loss: 'stop' (exit status 3, nothing of that step saved, the last "
                          "checkpoint kept) or 'skip' (drop that step's update and go on). fp16 with dynamic loss "
                          "scaling skips such steps itself.",
                  "choices": ["stop", "skip"]},
    )
    fp16_opt_level: str | None = field(
        default=None,
        metadata={"help": "Mixed-precision level with --fp16 or --bf16, as apex's: O0 fp32; O1 fp32 weights, "
                          "forward under autocast; O2 half weights except norms, fp32 master weights in the optimizer; "
                          "O3 everything half, optimizer state too (a speed baseline; fp16 O3 needs --adam_epsilon "
                          f"1e-4 or more). (default: {DEFAULT_OPT_LEVEL} with --fp16 or --bf16, else O0)",
                  "choices": list(OPT_LEVELS), "group": PRECISION},
    )
    loss_scale: str = field(
        default="dynamic",
        metadata={"help": "fp16 loss scale: 'dynamic' (start at 2**16, halve and skip the step on inf/NaN gradients, "
                          "double after --loss_scale_window clean steps) or a fixed positive number. bf16 needs none.",
                  "group": PRECISION},
    )
    loss_scale_window: int = field(
        default=DEFAULT_SCALE_WINDOW,
        metadata={"help": "With --loss_scale dynamic: clean steps after which the loss scale doubles.",
                  "group": PRECISION},
    )
    min_loss_scale: float = field(
        default=DEFAULT_MIN_SCALE,
        metadata={"help": "With --loss_scale dynamic: the scale never drops below this; when fp16 gradients keep "
                          "overflowing at it, training stops with exit status 3 instead of skipping every step.",
                  "group": PRECISION},
    )
    use_combine_grad: bool = field(
        default=False,
        metadata={"help": "Keep weights, gradients and master weights in flat buffers, so that unscaling, clipping, "
                          "the optimizer step and the DDP all-reduce each run over a few large tensors. Needs --fp16 "
                          "or --bf16.",
                  "group": PRECISION},
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Compute the output layer and the loss this many tokens at a time (e.g. 1024), so that "
                          "the [tokens, vocabulary] logits and their gradient are never held whole: much less memory "
                          "for large vocabularies, the same loss up to float rounding. 0: off. Default: 1024 for "
                          "causal LMs (run_clm.py) trained on the CPU, where it is faster, else off.",
                  "group": PRECISION},
    )
    head_at_every_position: bool = field(
        default=False,
        metadata={"help": "Compute the output head at every position, as transformers' models do, instead of only "
                          "at the positions that have a label: the masked ones of BERT, RoBERTa, DistilBERT and "
                          "ALBERT (run_mlm.py), XLNet's targets (run_plm.py). The same loss, slower.",
                  "group": PRECISION},
    )
    amp_backend: str = field(
        default="auto",
        metadata={"help": "Who does --fp16/--bf16: 'auto' takes apex's amp when an apex release that has it is "
                          "installed (fp16 only), else the suite's native one; 'native' or 'apex' force one.",
                  "choices": list(AMP_BACKENDS), "group": PRECISION},
    )

    # What the run is, noted at parsing (``note_run``) for run_info.json and the run folder; not flags.
    run_model: str = field(default="unknown", init=False)
    run_dataset: str = field(default="unknown", init=False)
    run_command: list = field(default_factory=list, init=False)  # script and flags, hub tokens masked
    run_fingerprint: str = field(default="", init=False)  # tells this command from another (settings_fingerprint)
    output_dir_given: bool = field(default=True, init=False)  # False: transformers' default folder, trainer_output

    def __post_init__(self):
        self.output_dir_given = self.output_dir is not None  # TrainingArguments puts its default in
        # Checked before TrainingArguments' own checks, whose messages name no flag (utils/flags/checks.py).
        self.amp_config = precision_config(self)  # the one AmpConfig of the run; None for fp32
        check_scaling_flags(self)
        check_counts(self)
        check_optimizer_numbers(self)
        check_chunk_flags(self)
        super().__post_init__()
        if self.amp_config is not None:
            # The suite's AMP (utils/amp/, or apex) does the mixed precision: accelerate's own autocast
            # and GradScaler on top would autocast O2 weights and scale the loss a second time.
            self.mixed_precision = "no"

    def __getstate__(self):
        # training_args.bin (in every checkpoint and the final model) is a pickle of these
        # arguments; the hub token must not travel with it. The running process keeps it.
        state = dict(self.__dict__)
        state["hub_token"] = None
        return state


def parse_args(*task_dataclasses, command: Command | None = None):
    """Parse ModelArguments, DataArguments, the task's own dataclasses and LMTrainingArguments, once.

    ``command``: this process's command line unless given. A single ``.json`` argument is read as a
    file of flags, as in the Hugging Face examples. The device is chosen here, between reading the
    flags and building TrainingArguments, because building them already starts the process group.
    Every dataclass checks its flags as it is built. Returns the instances in order.
    """
    command = command or Command.of_process()
    parser = _parser(command, task_dataclasses)
    values, environ = _read_values(parser, command)
    fingerprint = settings_fingerprint(command.name, parser, values)
    os.environ.update(environ)
    device = setup_device(use_cpu=bool(values.get("use_cpu")))
    for name, value in training_defaults(device).items():
        if values.get(name) is None or name == "use_cpu":
            values[name] = value
    try:
        parsed = parser.parse_dict(values, source=command.flag_file)
    except (ValueError, TypeError) as err:
        # TrainingArguments validates flag combinations in __post_init__ with ValueError.
        raise UsageError(" ".join(str(err).split())) from None
    check_placement(parsed[-1], device)
    check_packing_flags(parsed[1], parsed[-1])
    note_run(parsed, command, fingerprint)
    return parsed


def command_fingerprint(command: Command, *task_dataclasses) -> str:
    """The fingerprint ``parse_args`` notes for ``command``, read without choosing a device or building anything
    (for a launcher that asks before it starts the run's processes)."""
    parser = _parser(command, task_dataclasses)
    return settings_fingerprint(command.name, parser, _read_values(parser, command)[0])


def _parser(command: Command, task_dataclasses):
    return flag_parser(ModelArguments, DataArguments, *task_dataclasses, LMTrainingArguments, prog=command.name)


def _read_values(parser, command: Command) -> tuple[dict, dict]:
    """The flags' values as the parser reads them, and the environment variables 4.x flags stand for."""
    if command.flag_file:
        return translate_values(command.flag_file_values())
    flags, environ = translate_flags(list(command.args))  # 4.x flags as today's (utils/flags/legacy.py)
    return vars(parser.parse_args(flags)), environ
