"""Sharded training under the Trainer (``--fsdp``): FSDP on CPU processes too, and proof that it shards.

Which --fsdp/--deepspeed settings are taken is decided when the flags are parsed
(utils/flags/checks.py). Here, once the Trainer exists: accelerate turns FSDP on for GPUs and
NPUs only, and ``setup_sharding`` turns it on for CPU processes too, where it would otherwise
train with DDP; masked-LM heads whose tied bias FSDP2 cannot group are refused.

``ShardingReport`` measures, at the first optimizer step, how many elements of the parameters,
gradients and optimizer state each process really holds, logs it and writes
``OUTPUT_DIR/sharding.json`` at the end of training.
"""

import logging
import os
import json

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import TrainerCallback

from utils.errors import UsageError
from utils.runs.record import SHARDING

logger = logging.getLogger(__name__)


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
        with open(os.path.join(args.output_dir, SHARDING), "w", encoding="utf-8") as f:
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
