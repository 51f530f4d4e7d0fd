"""Command-line arguments shared by the three scripts.

The flags keep the names, meanings and defaults of the Hugging Face language-modeling
examples, so that a user's existing command lines work unchanged. Each script adds a small
dataclass of its own flags (``--block_size``, ``--mlm_probability``, ...).
"""

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from .amp import OPT_LEVELS as AMP_OPT_LEVELS
from .amp import check_amp_flags
from .cli import setup_logging
from .device import finish_device_setup, run_on_all_devices, setup_device
from .errors import UsageError
from .secrets import remember_secrets


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from."""

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
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the model weights in this dtype ('auto' takes the checkpoint's).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
            "aliases": ["--torch_dtype"],
        },
    )


@dataclass
class DataArguments:
    """Which text to train and evaluate on, and how to prepare it."""

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


@dataclass
class SequenceArguments:
    """How mlm and plm cut text into sequences."""

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
    """transformers' TrainingArguments plus the flags this suite adds."""

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
        metadata={"help": "Mixed-precision level with --fp16 or --bf16 (default O1), as apex's: O0 fp32; O1 fp32 "
                          "weights, forward under autocast; O2 half weights except norms, fp32 master weights in the "
                          "optimizer; O3 everything half.",
                  "choices": list(AMP_OPT_LEVELS)},
    )
    loss_scale: str = field(
        default="dynamic",
        metadata={"help": "fp16 loss scale: 'dynamic' (start at 2**16, halve and skip the step on inf/NaN gradients, "
                          "double after --loss_scale_window clean steps) or a fixed positive number. bf16 needs none."},
    )
    loss_scale_window: int = field(
        default=2000,
        metadata={"help": "With --loss_scale dynamic: clean steps after which the loss scale doubles."},
    )
    use_combine_grad: bool = field(
        default=False,
        metadata={"help": "Keep weights, gradients and master weights in flat buffers, so that unscaling, clipping, "
                          "the optimizer step and the DDP all-reduce each run over a few large tensors. Needs --fp16 "
                          "or --bf16."},
    )
    amp_backend: str = field(
        default="auto",
        metadata={"help": "Who does --fp16/--bf16: 'auto' takes apex's amp when an apex release that has it is "
                          "installed (fp16 only), else the suite's native one; 'native' or 'apex' force one.",
                  "choices": ["auto", "native", "apex"]},
    )

    def __post_init__(self):
        check_amp_flags(self)  # before TrainingArguments' own checks, whose messages name no flag
        check_counts(self)  # zero batches or accumulation steps would fail deep inside the Trainer
        super().__post_init__()
        if self.fp16 or self.bf16:
            self.fp16_opt_level = self.fp16_opt_level or "O1"
            # The suite's AMP (utils.amp, or apex) does the mixed precision: accelerate's own autocast
            # and GradScaler on top would autocast O2 weights and scale the loss a second time.
            self.mixed_precision = "no"

    def __getstate__(self):
        # training_args.bin (in every checkpoint and the final model) is a pickle of these
        # arguments; the hub token must not travel with it. The running process keeps it.
        state = dict(self.__dict__)
        state["hub_token"] = None
        return state


_SEED_RANGE = (0, 2**32 - 1)  # what NumPy's seeding accepts


def check_counts(args) -> None:
    """Batch sizes, accumulation steps and seeds that training can use, each refused by its flag."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}: give a whole number of at least 1")
    for flag in ("seed", "data_seed"):
        value = getattr(args, flag)
        if value is not None and not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]:
            raise ValueError(f"--{flag} {value}: give a number from 0 to {_SEED_RANGE[1]}")


class _Parser(HfArgumentParser):
    def error(self, message):
        # argparse's default prints the whole usage text; one line is easier to act on.
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def parse_args(*task_dataclasses):
    """Parse ModelArguments, DataArguments, the task's own dataclasses and LMTrainingArguments.

    A single ``.json`` argument is read as a file of flags, as in the Hugging Face examples.
    Also sets up logging, and the device: it must be chosen before TrainingArguments exist,
    because building them already starts the process group. Returns the instances in order.
    """
    types = (ModelArguments, DataArguments, *task_dataclasses, LMTrainingArguments)
    parser = _Parser(types)
    device = setup_device(parser)
    try:
        if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
            parsed = parser.parse_json_file(json_file=sys.argv[1])
        else:
            parsed = parser.parse_args_into_dataclasses()
    except (ValueError, json.JSONDecodeError, FileNotFoundError) as err:
        # TrainingArguments validates flag combinations in __post_init__ with ValueError.
        raise UsageError(" ".join(str(err).split())) from None
    remember_secrets(*parsed)  # so that no command line written later shows them (utils/secrets.py)
    training_args = parsed[-1]
    setup_logging(training_args)
    run_on_all_devices(device)  # `python run_clm.py` on 8 GPUs becomes 8 DDP processes
    finish_device_setup(training_args, device)  # also seeds every device
    return parsed
