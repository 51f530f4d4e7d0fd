"""Mixed precision inside the Trainer: the suite's apex-style O-levels (``utils/amp/``) or apex's amp.

``MixedPrecision`` is what ``LMTrainer``'s mixed-precision hooks call (their map is in
``LMTrainer``'s docstring): the model is cast once when the trainer is built, the Trainer's
optimizer is wrapped in ``create_optimizer``, the forward runs in the O-level's context, the loss
is scaled inside ``accelerator.backward`` (so the logged loss stays unscaled), clipping and the
gradient norm read the unscaled master grads, the log gets the loss scale, and saving writes fp32
weights. accelerate's own mixed precision is off (``LMTrainingArguments``). Both backends follow
``utils.amp.optimizer.AmpOptimizer``, so no hook asks which one it has.

``config`` is the precision the run uses: the parsed ``AmpConfig`` with the backend that was
chosen (and apex's ``combine_grad`` as apex takes it). Reports read it, not the flags.
"""

from __future__ import annotations

import functools
import logging
from itertools import chain

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from utils.amp.apex_bridge import choose_backend, initialize_apex
from utils.amp.casting import autocast_context, prepare_model
from utils.amp.combine_grad import is_elementwise
from utils.amp.config import AmpConfig
from utils.amp.optimizer import AmpOptimizer, MixedPrecisionOptimizer, innermost, with_multi_tensor_kernel
from utils.amp.weights import fp32_state_dict, sync_masters_on_load
from utils.errors import UsageError

logger = logging.getLogger(__name__)


class _AmpAcceleratedOptimizer(AcceleratedOptimizer):
    """accelerate's optimizer wrapper around ours, reporting the steps our loss scaler skipped.

    The Trainer steps the LR scheduler unless ``accelerator.optimizer_step_was_skipped``, which
    accelerate only knows for its own GradScaler. Built already "prepared", so that
    ``accelerator.prepare`` keeps it as it is.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer, device_placement=False, scaler=None)
        self._is_accelerate_prepared = True

    @property
    def step_was_skipped(self) -> bool:
        return self.optimizer.step_was_skipped

    def drop_update(self) -> None:
        """The non-finite-loss guard's way in: the grad storage stays as the optimizer keeps it."""
        self.optimizer.drop_update()


class ScaleFloorCallback(TrainerCallback):
    """Stops training when fp16 gradients keep overflowing at ``--min_loss_scale`` (nothing more is saved).

    ``utils.train.stops.stop_reason`` then turns ``stopped_at`` into the run's error line and exit status.
    """

    def __init__(self, precision: MixedPrecision):
        self.precision = precision
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = self.precision.optimizer
        if optimizer is None or not optimizer.overflow_stuck:
            return
        self.stopped_at = state.global_step
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_save = control.should_evaluate = False


def _cast_keeping_ties(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating tensors cast to ``dtype``; tensors shared by several keys (tied weights) stay shared."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            tensor = cast.setdefault(id(tensor), tensor.to(dtype))
        out[name] = tensor
    return out


@torch.no_grad()
def all_reduce_mean(grads: list[torch.Tensor], world_size: int, pack: bool) -> None:
    """Average ``grads`` over the processes, as DDP does.

    ``pack``: per-tensor grads are copied into one buffer per dtype and reduced with one call,
    as DDP's buckets are; combine_grad's flat buffers are reduced as they are.
    """
    groups: dict = {}
    for grad in grads:
        groups.setdefault(grad.dtype if pack else id(grad), []).append(grad)
    for group in groups.values():
        flat = group[0] if len(group) == 1 else torch.cat([grad.reshape(-1) for grad in group])
        flat.div_(world_size)  # dividing first keeps scaled fp16 sums finite
        dist.all_reduce(flat)
        if len(group) > 1:
            pieces = flat.split([grad.numel() for grad in group])
            torch._foreach_copy_(group, [piece.view_as(grad) for piece, grad in zip(pieces, group)])


def wraps_in_ddp(accelerator) -> bool:
    """Whether the Trainer's ``accelerator.prepare`` would wrap the model in DDP.

    accelerate decides by the process group's backend, not by its size: any torchrun start
    counts, ``--nproc_per_node 1`` included.
    """
    return accelerator.distributed_type not in (DistributedType.NO, DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                DistributedType.XLA)


def from_torch_npu(optimizer_cls) -> bool:
    """torch_npu's fused optimizers (``--optim adamw_torch_npu_fused``): they keep the grads in a buffer of their own."""
    return (getattr(optimizer_cls, "__module__", None) or "").split(".")[0] == "torch_npu"


def fit_npu_fused_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim: str) -> None:
    """A torch_npu fused optimizer under the fp32 Trainer: grads zeroed in place, bf16 weights refused.

    The fused optimizer copies every grad into one buffer at its first step and from then on reads
    that buffer through the grads it re-pointed; the Trainer's ``model.zero_grad()`` (set_to_none)
    would let backward write fresh tensors it never reads, so every step would repeat the first grads.
    """
    if not from_torch_npu(type(innermost(optimizer))):
        return
    if any(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad):
        raise UsageError(f"--optim {optim}: torch_npu's fused optimizers refuse bf16 weights; load them in fp32 "
                         "(drop --dtype bfloat16), or use --bf16 --fp16_opt_level O2 with --optim adamw_torch")
    model.zero_grad = functools.partial(model.zero_grad, set_to_none=False)


def check_optimizer(optimizer_cls, kwargs: dict, optim: str, config: AmpConfig) -> None:
    """Refuse optimizers the mixed-precision wrapper (or one flat buffer per group) would change."""
    if from_torch_npu(optimizer_cls):
        raise UsageError(f"--optim {optim}: torch_npu's fused optimizers keep the grads in a buffer of their own, "
                         "which the mixed-precision masters bypass; use --optim adamw_torch --use_combine_grad "
                         "(one flat buffer, stepped by a foreach kernel)")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or (
            {"params", "model", "optimizer_dict"} & kwargs.keys()):
        raise UsageError(f"--optim {optim} lays out the parameters itself, which --fp16/--bf16 here "
                         "cannot wrap: use e.g. adamw_torch or adamw_torch_fused")
    if config.combine_grad and not is_elementwise(optimizer_cls):
        raise UsageError(f"--use_combine_grad: --optim {optim} updates each weight by its shape or "
                         "norm, which one flat buffer would change; drop --use_combine_grad or use an elementwise "
                         "optimizer (adamw_torch, adamw_torch_fused, sgd)")


class MixedPrecision:
    """The mixed-precision side of one ``LMTrainer`` (see the module doc)."""

    def __init__(self, trainer, config: AmpConfig):
        self.trainer = trainer
        self.config, self._apex_amp = choose_backend(trainer.args.amp_backend, config)
        self.optimizer: AmpOptimizer | None = None  # built by create_optimizer
        self._model_hooks: list = []
        self._reduce_grads = False  # True: we all-reduce the grads ourselves (native backend under DDP)
        report = self.config.report()
        logger.info("Mixed precision: %s backend, %s %s, loss scale %s, combine_grad %s", self.config.backend,
                    str(self.config.half_dtype).removeprefix("torch."), self.config.opt_level,
                    report["loss_scale"] or "none", self.config.combine_grad)
        model = trainer.model
        # save_model writes the weights in the dtype the model came in (fp32, or --dtype), not O2's.
        self.weights_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._unscaled_backward = trainer.accelerator.backward
        trainer.accelerator.backward = self.backward
        self.scale_floor = ScaleFloorCallback(self)
        trainer.add_callback(self.scale_floor)
        if self.config.backend == "apex":
            return  # amp.initialize casts the model together with the optimizer (create_optimizer)
        # Once, here: the Trainer has put the model on its device, and builds the optimizer later.
        # Evaluation before any training then runs in the training precision too.
        prepare_model(model, self.config)
        if wraps_in_ddp(trainer.accelerator):
            self._reduce_grads_ourselves()

    def _reduce_grads_ourselves(self) -> None:
        """Under DDP, all-reduce our gradient buffers after backward instead of wrapping the model in DDP.

        DDP would all-reduce its own buckets during backward; with combine_grad the flat buffers are
        already one tensor each, reduced once per optimizer step (``backward``). The model is prepared
        here, before the optimizer's buffers exist, because preparing it moves it to accelerate's
        device: under torchrun that is ``cpu:0`` even in a world of one process, and ``.to("cpu:0")``
        copies every tensor that lives on plain ``cpu`` out of the flat buffers.
        """
        model = self.trainer.model
        world_size = self.trainer.args.world_size
        if world_size > 1:
            for tensor in chain(model.parameters(), model.buffers()):
                if tensor.is_floating_point():
                    dist.broadcast(tensor.data, src=0)  # what DDP's constructor does: rank 0's weights everywhere
        # accelerate never wraps a model it has prepared already, so the Trainer's prepare() skips DDP.
        self.trainer.accelerator.prepare_model(model, evaluation_mode=True)
        self._reduce_grads = world_size > 1

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``accelerator.backward`` with the fp16 loss scale; then our DDP all-reduce on the last micro-batch."""
        last_micro_batch = self.trainer.accelerator.sync_gradients
        self.optimizer.backward(loss, lambda scaled: self._unscaled_backward(scaled, **kwargs), last_micro_batch)
        if last_micro_batch and self._reduce_grads:
            all_reduce_mean(self.optimizer.grad_buffers(), self.trainer.args.world_size,
                            pack=not self.config.combine_grad)

    def _decay_groups(self, model: torch.nn.Module) -> list[dict]:
        """The Trainer's two parameter groups (as in create_optimizer): decayed, and biases and norms."""
        decay = set(self.trainer.get_decay_parameter_names(model))
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for name, p in named if name in decay], "weight_decay": self.trainer.args.weight_decay},
                {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0}]

    def create_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings, around our masters (or apex's), wrapped for accelerate."""
        trainer = self.trainer
        optimizer_cls, kwargs = (trainer.optimizer_cls_and_kwargs
                                 or trainer.get_optimizer_cls_and_kwargs(trainer.args, model))
        check_optimizer(optimizer_cls, kwargs, getattr(trainer.args.optim, "value", trainer.args.optim), self.config)
        groups = self._decay_groups(model)
        if self.config.backend == "apex":
            self.optimizer = initialize_apex(self._apex_amp, model, groups, optimizer_cls(groups, **kwargs),
                                             self.config)
        else:
            kwargs = with_multi_tensor_kernel(optimizer_cls, kwargs, trainer.args.device.type)
            self.optimizer = MixedPrecisionOptimizer(groups, lambda g: optimizer_cls(g, **kwargs), self.config)
        for handle in self._model_hooks:
            handle.remove()
        # Weights loaded into the model (the best checkpoint at the end) must reach the masters too.
        self._model_hooks = sync_masters_on_load(model, self.optimizer)
        # The Trainer calls model.zero_grad() (grads to None) after each step: with combine_grad the
        # grads must point back into the flat buffer before the next backward.
        guard = self.optimizer.guard_grad_views(model)
        self._model_hooks += [guard] if guard is not None else []
        return _AmpAcceleratedOptimizer(self.optimizer)

    def autocast(self):
        """The context of the forward (training and evaluation): the O-level's, or apex's own patching."""
        return None if self.config.backend == "apex" else autocast_context(self.config, self.trainer.args.device.type)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the unscaled master grads; the norm before clipping (inf on overflow)."""
        return self.optimizer.clip_grad_norm(max_norm)

    def weights_to_save(self) -> dict:
        """fp32 weights from the masters (O2), in the dtype the model came in: from_pretrained loads them as usual."""
        return _cast_keeping_ties(fp32_state_dict(self.trainer.model, self.optimizer), self.weights_dtype)

    def logs(self) -> dict:
        """The fp16 loss scale and the overflow-skipped steps, beside the loss."""
        return self.optimizer.logs() if self.optimizer is not None else {}

    def report(self) -> dict:
        """The precision this run uses, for run_info.json and the model card."""
        return self.config.report()

