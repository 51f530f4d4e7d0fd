"""The checks flags get when they are parsed, each refusal one line naming its flag (``UsageError``).

``LMTrainingArguments.__post_init__`` runs them before TrainingArguments' own checks, whose
messages name no flag, and before any process is started: counts, lengths and seeds, the precision
flags (which build the run's ``AmpConfig``), ``--loss_chunk_size``, and ``--fsdp``/``--deepspeed``
(refused where they would not shard as asked; the accepted forms normalized). ``parse_args`` runs
``check_packing_flags`` once all the flags are parsed (it reads the data flags and the training ones).
"""

from __future__ import annotations

import json
import logging
import math
import os

from utils.amp.config import AmpConfig
from utils.cli import Command
from utils.dist import is_distributed
from utils.errors import UsageError
from utils.launch.auto_ddp import devices_to_fill
from utils.launch.device import resolve_device

logger = logging.getLogger(__name__)

_SEED_RANGE = (0, 2**32 - 1)  # what NumPy's seeding accepts
AMP_BACKENDS = ("auto", "native", "apex")
# fp16 O3 keeps Adam's second moments in fp16, where squares of gradients below ~2.4e-4 are 0: the update is
# then the first moment over eps, which a smaller eps than this blows up (with the default 1e-8 a tiny GPT-2's
# loss rises from step 3 while fp32's falls; with 1e-4 it stays within 0.3% of fp32's).
O3_FP16_MIN_ADAM_EPSILON = 1e-4


def check_counts(args) -> None:
    """Batch sizes, accumulation steps, seeds, the training's length, step intervals and loader workers that
    training can use, each refused by its flag."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: give a whole number of at least 1")
    for flag in ("seed", "data_seed"):
        value = getattr(args, flag)
        if value is not None and not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]:
            raise UsageError(f"--{flag} {value}: give a number from 0 to {_SEED_RANGE[1]}")
    if args.max_steps == 0 or args.max_steps < -1:
        # The Trainer reads 0 as "not set" in places and trains one step: a finished run of nothing.
        raise UsageError(f"--max_steps {args.max_steps}: give the number of optimizer steps (at least 1), or leave "
                         "it out (-1) to train for --num_train_epochs")
    if args.do_train and args.max_steps < 0 and not args.num_train_epochs > 0:
        # Zero steps: the untrained model would be saved as the final one, with a NaN training loss.
        raise UsageError(f"--num_train_epochs {args.num_train_epochs:g}: give a number of epochs above 0 (e.g. 3, "
                         "or 0.5), or the number of optimizer steps with --max_steps")
    if args.dataloader_num_workers < 0:
        raise UsageError(f"--dataloader_num_workers {args.dataloader_num_workers}: give 0 (load batches in the "
                         "training process) or a number of worker processes")
    for flag, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy"),
                           ("logging_steps", "logging_strategy")):
        value, every = getattr(args, flag), str(getattr(getattr(args, strategy), "value", getattr(args, strategy)))
        if value is not None and (value < 0 or (value == 0 and every == "steps")):
            raise UsageError(f"--{flag} {value:g}: give a number of steps (at least 1), or a fraction of the run "
                             "below 1 (e.g. 0.25)")


def check_optimizer_numbers(args) -> None:
    """A learning rate and a clipping norm that are numbers the optimizer can use."""
    if not math.isfinite(args.learning_rate) or args.learning_rate < 0:
        # torch's optimizers refuse a negative one with a traceback, and a NaN would make every weight NaN.
        raise UsageError(f"--learning_rate {args.learning_rate:g}: give a finite number of at least 0, e.g. 5e-5")
    if args.max_grad_norm is not None and (math.isnan(args.max_grad_norm) or args.max_grad_norm < 0):
        # A NaN norm compares false with every gradient norm, which turns clipping off without a word.
        raise UsageError(f"--max_grad_norm {args.max_grad_norm:g}: give a norm above 0 to clip the gradients at, "
                         "or 0 to not clip them")


def check_sample_counts(data_args) -> None:
    """--max_train_samples and --max_eval_samples: a number of samples to keep, when given."""
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value}: give a number of samples of at least 1, or leave it out to use "
                             "all the data")


def precision_config(args) -> AmpConfig | None:
    """The run's ``AmpConfig`` from its precision flags (None for fp32), checked."""
    config = AmpConfig.from_flags(fp16=args.fp16, bf16=args.bf16, opt_level=args.fp16_opt_level,
                                  loss_scale=args.loss_scale, combine_grad=args.use_combine_grad,
                                  growth_interval=args.loss_scale_window, min_loss_scale=args.min_loss_scale)
    if args.amp_backend not in AMP_BACKENDS:
        raise UsageError(f"--amp_backend {args.amp_backend}: choose {', '.join(AMP_BACKENDS[:-1])} or apex")
    adam = "adam" in str(getattr(args.optim, "value", args.optim)).lower()
    if config is not None and config.precision == "fp16" and config.opt_level == "O3" and adam \
            and args.adam_epsilon < O3_FP16_MIN_ADAM_EPSILON:
        raise UsageError(f"--fp16_opt_level O3 with --fp16 keeps Adam's state in fp16, where --adam_epsilon "
                         f"{args.adam_epsilon:g} makes the updates blow up: pass --adam_epsilon "
                         f"{O3_FP16_MIN_ADAM_EPSILON:g} or more, or train with O2 (or --bf16)")
    return config


def check_chunk_flags(args) -> None:
    """``--loss_chunk_size`` values and flag combinations it cannot serve (the model's side: utils/model/chunked_loss.py)."""
    if args.loss_chunk_size is None:  # the default: on only where it serves (utils/model/chunked_loss.py)
        return
    flag = f"--loss_chunk_size {args.loss_chunk_size}"
    if args.loss_chunk_size < 0:
        raise UsageError(f"{flag}: give a number of tokens (0 turns the chunked loss off)")
    if args.loss_chunk_size and args.label_smoothing_factor:
        raise UsageError(f"{flag} computes the plain cross-entropy: it cannot be combined with "
                         "--label_smoothing_factor")
    if args.loss_chunk_size and args.fsdp:
        raise UsageError(f"{flag} reads the output layer's whole weight, which --fsdp shards: use one of the two")


def check_packing_flags(data_args, training_args) -> None:
    """``--packing document`` with a flag it cannot serve."""
    if data_args.packing == "document" and training_args.loss_chunk_size and training_args.do_eval:
        raise UsageError(f"--loss_chunk_size {training_args.loss_chunk_size} with --packing document and an "
                         "evaluation: the eval loss per token needs the scores the chunked loss does not keep; "
                         "leave --loss_chunk_size at 0, or evaluate in a run of its own")


# ---------------------------------------------------------------------------- --fsdp, --deepspeed


# The legacy --fsdp words and the fsdp_config entries they stand for under FSDP2.
_LEGACY_FSDP_WORDS = {
    "full_shard": {"reshard_after_forward": True},
    "shard_grad_op": {"reshard_after_forward": False},
    "auto_wrap": {},  # FSDP2 wraps the model's transformer blocks by default
    "offload": {"cpu_offload": True},
}
_FSDP_OWN_PRECISIONS = ("no", "bf16")  # ACCELERATE_MIXED_PRECISION values tested with FSDP


def check_scaling_flags(args) -> None:
    """Refuse --fsdp/--deepspeed settings that would not shard as asked; normalize the accepted ones.

    Runs on the raw flags, before TrainingArguments' own checks (which would warn about the
    legacy --fsdp string, or import DeepSpeed).
    """
    if args.fsdp and args.deepspeed:
        raise UsageError("--fsdp and --deepspeed both shard the model: choose one")
    if args.fsdp_config and not args.fsdp:
        raise UsageError("--fsdp_config is only read with --fsdp: add --fsdp, or drop --fsdp_config")
    if args.fsdp:
        _check_fsdp(args)
    if args.deepspeed:
        _check_deepspeed(args)


def _precision_flags(args) -> str:
    flags = ["--fp16" if args.fp16 else "--bf16"]
    if args.fp16_opt_level:
        flags.append(f"--fp16_opt_level {args.fp16_opt_level}")
    if args.use_combine_grad:
        flags.append("--use_combine_grad")
    return " ".join(flags)


def _check_fsdp(args) -> None:
    words = args.fsdp.strip().lower() if isinstance(args.fsdp, str) else ""
    if words in ("false", "0", "no"):
        args.fsdp = None  # --fsdp false: off, as for the other boolean flags
        return
    config = _read_fsdp_config(args.fsdp_config)
    if words not in ("", "true", "1", "yes"):
        _translate_legacy_fsdp(args.fsdp, config)
    args.fsdp, args.fsdp_config = True, config
    if int(config.get("version", 2)) != 2:
        raise UsageError("--fsdp_config version 1: FSDP1 is deprecated in transformers and untested here; "
                         "use version 2 (the default: leave 'version' out)")
    if str(config.get("state_dict_type", "FULL_STATE_DICT")).upper() != "FULL_STATE_DICT":
        # The Trainer saves the final model under FULL_STATE_DICT only: with another it writes none.
        raise UsageError(f"--fsdp_config state_dict_type {config['state_dict_type']}: the Trainer then saves no "
                         "final model; leave it out (FULL_STATE_DICT, the default)")
    if args.fp16 or args.bf16:
        raise UsageError(
            f"--fsdp with {_precision_flags(args)}: the suite's mixed precision casts the model and all-reduces "
            "the gradients itself, which FSDP's sharded parameters cannot take; drop the precision flags "
            "(AMP_FLAGS=\"\" with the launchers) to shard in fp32, or for FSDP's own bf16 mixed precision drop them "
            "and set ACCELERATE_MIXED_PRECISION=bf16"
        )
    own = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if own not in _FSDP_OWN_PRECISIONS:
        raise UsageError(f"--fsdp with ACCELERATE_MIXED_PRECISION={own}: only bf16 (or no) is supported with FSDP "
                         "here; set ACCELERATE_MIXED_PRECISION=bf16 or unset it")
    if not is_distributed() and devices_to_fill("cpu" if args.use_cpu else resolve_device()) < 2:
        raise UsageError(f"--fsdp shards the model over several processes, and this run is one: start it with "
                         f"torchrun --nproc_per_node N {Command.of_process().name} ..., or NPROC_PER_NODE=N with "
                         "a launcher")


def _read_fsdp_config(value) -> dict:
    """--fsdp_config as a dict: given as a dict, a JSON object on the command line, or a JSON file."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        if value.lstrip().startswith(("{", "[")):
            config = json.loads(value)
        else:
            with open(value, encoding="utf-8") as f:
                config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--fsdp_config {value}: no such file; give a JSON file or a JSON object") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--fsdp_config {value}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--fsdp_config {value}: give a JSON object, e.g. '{{\"reshard_after_forward\": true}}'")
    # transformers accepts the keys with an "fsdp_" prefix too
    return {key.removeprefix("fsdp_"): item for key, item in config.items()}


def _translate_legacy_fsdp(words: str, config: dict) -> None:
    for word in words.split():
        if word not in _LEGACY_FSDP_WORDS:
            known = ", ".join(_LEGACY_FSDP_WORDS)
            raise UsageError(f"--fsdp {word!r}: not supported here (FSDP2 takes {known}); pass --fsdp alone, "
                             "with --fsdp_config '{\"reshard_after_forward\": true}' for full sharding")
        for key, item in _LEGACY_FSDP_WORDS[word].items():
            config.setdefault(key, item)
    # A warning: logging is not set up yet while the flags are read, and this is a form to move off.
    logger.warning("--fsdp %r is read as --fsdp --fsdp_config '%s', the form transformers keeps", words,
                   json.dumps(config))


def _check_deepspeed(args) -> None:
    if args.use_cpu:
        # accelerate turns DeepSpeed on for accelerators only: on the CPU it would silently train with DDP.
        raise UsageError("--deepspeed on the CPU: accelerate runs DeepSpeed on GPUs and NPUs only, and would "
                         "train unsharded here; use --fsdp to shard on the CPU")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UsageError("--deepspeed: DeepSpeed is not installed: pip install deepspeed, or use --fsdp") from None
    if args.fp16 or args.bf16:
        raise UsageError(f"--deepspeed with {_precision_flags(args)}: DeepSpeed does its own mixed precision; "
                         "drop the precision flags and set fp16 or bf16 in the DeepSpeed config instead")
