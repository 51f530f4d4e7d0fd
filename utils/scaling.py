"""Sharded training (``--fsdp``, ``--deepspeed``): which settings it takes, and proof that it shards.

The suite's mixed precision (``--fp16``/``--bf16`` at any O-level, with or without
``--use_combine_grad``) casts the model itself and all-reduces the gradients itself, in place
of the framework's DDP wrapper. FSDP instead owns the parameters as shards, all-gathers them for
the forward and reduce-scatters the gradients; the two cannot be stacked, so the combination is
refused before anything runs, with what to use instead. What FSDP does take:

* fp32: ``--fsdp`` alone, or with ``--fsdp_config`` (a JSON object or a file).
* FSDP's own mixed precision (bf16 compute and gradient reduction, fp32 shards and optimizer
  state): no ``--bf16``, but ``ACCELERATE_MIXED_PRECISION=bf16`` in the environment (what
  ``accelerate launch --mixed_precision bf16`` sets), which the Trainer hands to FSDP's policy.

``--fsdp "full_shard auto_wrap"`` (the string form transformers deprecates) is translated into
``--fsdp`` plus ``fsdp_config`` entries here, so it keeps working without the warning. FSDP1
(``fsdp_config`` version 1) and the strategies that do not shard or shard per node only
(``no_shard``, ``hybrid_shard``) are refused: they are FSDP1 only and were never run here.

Refused as well: ``--fsdp`` in a single process, ``--fsdp_config`` without ``--fsdp``, and
(``setup_sharding``, once the model exists) masked-LM heads whose tied bias FSDP2 cannot group.
accelerate turns FSDP on for GPUs and NPUs only; ``setup_sharding`` turns it on for CPU
processes too, where it would otherwise train with DDP. ``--deepspeed`` is refused on the CPU
(accelerate ignores it there), when DeepSpeed is not installed, and with the suite's precision
flags (DeepSpeed's config sets its own).

``ShardingReport`` measures, at the first optimizer step, how many elements of the parameters,
gradients and optimizer state each process really holds, logs it and writes
``OUTPUT_DIR/sharding.json`` at the end of training.
"""

import json
import logging
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import TrainerCallback

from .auto_ddp import all_devices_command
from .device import is_distributed, resolve_device
from .errors import UsageError

logger = logging.getLogger(__name__)

SHARDING_FILE = "sharding.json"
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
    if not is_distributed() and all_devices_command("cpu" if args.use_cpu else resolve_device()) is None:
        script = os.path.basename(sys.argv[0])
        raise UsageError(f"--fsdp shards the model over several processes, and this run is one: start it with "
                         f"torchrun --nproc_per_node N {script} ..., or NPROC_PER_NODE=N with a launcher")


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


# ---------------------------------------------------------------------------- the proof


def local_elements(tensors) -> tuple[int, int]:
    """(elements this process holds, elements of the full tensors) over ``tensors``.

    A sharded tensor (DTensor) holds only its local shard; a plain tensor is held whole.
    """
    held = full = 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        held += local.numel()
        full += tensor.numel()  # a DTensor's numel is the full tensor's
    return held, full


def _optimizer_state_tensors(optimizer) -> list:
    states = getattr(optimizer, "state", {})
    return [value for state in states.values() for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0]


def measure(model, optimizer) -> dict:
    """Elements held by this process: parameters, gradients and optimizer state, each (held, full)."""
    parameters = list(model.parameters())
    return {
        "parameters": local_elements(parameters),
        "gradients": local_elements(p.grad for p in parameters),
        "optimizer_state": local_elements(_optimizer_state_tensors(optimizer)),
    }


class ShardingReport(TrainerCallback):
    """At the first optimizer step, what each process holds; logged, and written to sharding.json."""

    def __init__(self, mixed_precision: str = "no"):
        self.mixed_precision = mixed_precision  # FSDP's own policy, which run_info.json does not know
        self.per_rank: list[dict] | None = None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.per_rank is not None:
            return
        mine = measure(model, optimizer)
        gathered = [None] * args.world_size
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        self.per_rank = [{"rank": rank, **{key: {"held": held, "full": full} for key, (held, full) in counts.items()}}
                         for rank, counts in enumerate(gathered)]
        if state.is_world_process_zero:
            for row in self.per_rank:
                held, full = row["parameters"]["held"], row["parameters"]["full"]
                logger.info("Sharding: rank %d holds %d of %d parameter elements (%.1f%%), %d gradient and %d "
                            "optimizer-state elements", row["rank"], held, full, 100 * held / max(full, 1),
                            row["gradients"]["held"], row["optimizer_state"]["held"])

    def on_train_end(self, args, state, control, **kwargs):
        # Only a finished run writes it: one stopped early must leave --output_dir as resumable as before.
        if self.per_rank is None or not state.is_world_process_zero or state.global_step < state.max_steps:
            return
        with open(os.path.join(args.output_dir, SHARDING_FILE), "w", encoding="utf-8") as f:
            json.dump({"world_size": args.world_size, "mixed_precision": self.mixed_precision,
                       "measured_at": "first optimizer step", "per_rank": self.per_rank}, f, indent=2)
            f.write("\n")


def setup_sharding(trainer) -> None:
    """After the Trainer is built: FSDP on CPU processes too, and the ShardingReport of an FSDP run.

    accelerate turns FSDP on for GPUs and NPUs only; on CPU processes it silently falls back to
    DDP, with every process holding the whole model. FSDP2 itself runs on the CPU over gloo, so
    the FSDP plugin the Trainer built is put in place here, as accelerate does on a GPU.
    """
    args = trainer.args
    if not args.fsdp:
        return
    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)  # FSDP's own policy (ACCELERATE_MIXED_PRECISION)
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        PartialState().distributed_type = DistributedType.FSDP  # as accelerate records it, or it reverts
        trainer.is_fsdp_enabled = True
    if not trainer.is_fsdp_enabled and args.world_size > 1:
        raise UsageError(f"--fsdp: accelerate does not shard on this setup ({state.distributed_type}); "
                         "drop --fsdp to train with DDP")
    _check_ties_fsdp_can_shard(trainer.model)
    if state.mixed_precision != "no":
        logger.info("FSDP mixed precision (ACCELERATE_MIXED_PRECISION=%s): %s compute and gradient reduction, "
                    "fp32 shards and optimizer state", state.mixed_precision, state.mixed_precision)
    trainer.add_callback(ShardingReport(state.mixed_precision))


def _check_ties_fsdp_can_shard(model) -> None:
    """Refuse a model whose output layer shares a parameter with a module other than the input embedding.

    accelerate puts the input embedding, the output layer and the final norm in one FSDP group,
    and FSDP2 cannot shard one parameter in two groups. Masked-LM heads (BERT, RoBERTa) tie the
    output layer's bias to ``lm_head.bias`` outside it, and fail in their first forward.
    """
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None:
        return
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    owned = {prefix for prefix, module in model.named_modules() if module is output or module is embedding}
    for parameter in output.parameters():
        outside = [n for n in names[id(parameter)] if not any(n.startswith(prefix + ".") for prefix in owned)]
        if outside:
            raise UsageError(f"--fsdp with {type(model).__name__}: its output layer shares a parameter with "
                             f"{outside[0]}, which FSDP2's grouping cannot shard; train it without --fsdp (DDP)")
