"""Mixed precision inside the Trainer: the suite's apex-style O-levels (``utils.amp``) or apex's amp.

``MixedPrecisionMixin`` goes before ``Trainer`` in a subclass's bases. With ``--fp16``/``--bf16``
it works through the Trainer's hooks: the model is cast once at construction,
``create_optimizer`` wraps the Trainer's optimizer, the forward runs in
``autocast_smart_context_manager``, the loss is scaled in ``accelerator.backward``, clipping goes
through ``_clip_grad_norm``, ``log`` adds the loss scale, and ``_save`` writes normal weights.
accelerate's own mixed precision is off (``LMTrainingArguments``). Without them the Trainer runs
as it is. Both backends follow ``utils.amp.AmpOptimizer``, so no hook asks which one it has.
"""

import logging
import math
from itertools import chain

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerCallback

from .amp import AmpOptimizer, MixedPrecisionOptimizer, autocast_context, prepare_model
from .amp_config import amp_config_from_args
from .amp_weights import fp32_state_dict, sync_masters_on_load
from .apex_bridge import choose_backend, initialize_apex
from .combine_grad import is_elementwise
from .errors import UsageError

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

    ``trainer.stop_reason`` then turns ``stopped_at`` into the run's error line and exit status.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = self.trainer.amp_optimizer
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


class MixedPrecisionMixin:
    """The Trainer's mixed-precision hooks (see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.amp_config = amp_config_from_args(self.args)  # None: plain fp32, the Trainer as it is
        self.amp_optimizer: AmpOptimizer | None = None  # built by create_optimizer
        self._model_hooks: list = []
        self._reduce_grads = False  # True: we all-reduce the grads ourselves (native backend under DDP)
        if self.amp_config is not None:
            self._setup_amp()

    def _setup_amp(self) -> None:
        cfg = self.amp_config
        self.amp_backend, self._apex_amp = choose_backend(self.args.amp_backend, cfg)
        self.args.amp_backend = self.amp_backend  # "auto" resolved, for the run report
        logger.info("Mixed precision: %s backend, %s %s, loss scale %s, combine_grad %s", self.amp_backend,
                    str(cfg.half_dtype).removeprefix("torch."), cfg.opt_level,
                    cfg.loss_scale if cfg.uses_loss_scaling else "none", cfg.combine_grad)
        # save_model writes the weights in the dtype the model came in (fp32, or --dtype), not O2's.
        self._weights_dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                                   torch.float32)
        # Trainer.training_step calls accelerator.backward(loss) and returns the loss for logging:
        # scaling inside backward keeps the logged loss unscaled.
        self._unscaled_backward = self.accelerator.backward
        self.accelerator.backward = self._amp_backward
        self.scale_floor = ScaleFloorCallback(self)
        self.add_callback(self.scale_floor)
        if self.amp_backend == "apex":
            return  # amp.initialize casts the model together with the optimizer (create_optimizer)
        # Once, here: the Trainer has put the model on its device, and builds the optimizer later.
        # Evaluation before any training then runs in the training precision too.
        prepare_model(self.model, cfg)
        if self.args.world_size > 1:
            self._reduce_grads_ourselves()

    def _reduce_grads_ourselves(self) -> None:
        """Under DDP, all-reduce our gradient buffers after backward instead of wrapping the model in DDP.

        DDP would all-reduce its own buckets during backward; with combine_grad the flat buffers are
        already one tensor each, reduced once per optimizer step (``_amp_backward``).
        """
        for tensor in chain(self.model.parameters(), self.model.buffers()):
            if tensor.is_floating_point():
                dist.broadcast(tensor.data, src=0)  # what DDP's constructor does: rank 0's weights everywhere
        # accelerate never wraps a model it has prepared already, so the Trainer's prepare() skips DDP.
        self.accelerator.prepare_model(self.model, evaluation_mode=True)
        self._reduce_grads = True

    def _amp_backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``accelerator.backward`` with the fp16 loss scale; then our DDP all-reduce on the last micro-batch."""
        last_micro_batch = self.accelerator.sync_gradients
        self.amp_optimizer.backward(loss, lambda scaled: self._unscaled_backward(scaled, **kwargs), last_micro_batch)
        if last_micro_batch and self._reduce_grads:
            all_reduce_mean(self.amp_optimizer.grad_buffers(), self.args.world_size,
                            pack=not self.amp_config.combine_grad)

    def _decay_groups(self, model: torch.nn.Module) -> list[dict]:
        """The Trainer's two parameter groups (as in create_optimizer): decayed, and biases and norms."""
        decay = set(self.get_decay_parameter_names(model))
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for name, p in named if name in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0}]

    def _check_optimizer(self, optimizer_cls, kwargs: dict) -> None:
        optim = getattr(self.args.optim, "value", self.args.optim)  # the flag's spelling, not the enum's
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or (
                {"params", "model", "optimizer_dict"} & kwargs.keys()):
            raise UsageError(f"--optim {optim} lays out the parameters itself, which --fp16/--bf16 here "
                             "cannot wrap: use e.g. adamw_torch or adamw_torch_fused")
        if self.amp_config.combine_grad and not is_elementwise(optimizer_cls):
            raise UsageError(f"--use_combine_grad: --optim {optim} updates each weight by its shape or "
                             "norm, which one flat buffer would change; drop --use_combine_grad or use an elementwise "
                             "optimizer (adamw_torch, adamw_torch_fused, sgd)")

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.amp_config is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = (self.optimizer_cls_and_kwargs
                                 or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        self._check_optimizer(optimizer_cls, kwargs)
        groups = self._decay_groups(opt_model)
        if self.amp_backend == "apex":
            self.amp_optimizer = initialize_apex(self._apex_amp, opt_model, groups, optimizer_cls(groups, **kwargs),
                                                 self.amp_config)
        else:
            self.amp_optimizer = MixedPrecisionOptimizer(groups, lambda g: optimizer_cls(g, **kwargs), self.amp_config)
        for handle in self._model_hooks:
            handle.remove()
        # Weights loaded into the model (the best checkpoint at the end) must reach the masters too.
        self._model_hooks = sync_masters_on_load(opt_model, self.amp_optimizer)
        # The Trainer calls model.zero_grad() (grads to None) after each step: with combine_grad the
        # grads must point back into the flat buffer before the next backward.
        guard = self.amp_optimizer.guard_grad_views(opt_model)
        self._model_hooks += [guard] if guard is not None else []
        self.optimizer = _AmpAcceleratedOptimizer(self.amp_optimizer)
        return self.optimizer

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # Used for the training forward and in prediction_step: evaluation runs in the training precision.
        if self.amp_config is None or self.amp_backend == "apex":
            return super().autocast_smart_context_manager(cache_enabled)
        return autocast_context(self.amp_config, self.args.device.type)

    def _clip_grad_norm(self, model):
        if self.amp_optimizer is None:
            return super()._clip_grad_norm(model)
        return self.amp_optimizer.clip_grad_norm(self.args.max_grad_norm)  # unscaled master grads; inf on overflow

    def _get_grad_norm(self, model, grad_norm=None):
        if self.amp_optimizer is not None and grad_norm is None:
            grad_norm = self.amp_optimizer.clip_grad_norm(math.inf)  # the norm only (no --max_grad_norm)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.amp_config is None or state_dict is not None:
            return super()._save(output_dir, state_dict)
        # fp32 weights from the masters (O2), then the dtype the model came in: from_pretrained loads them as
        # any other checkpoint.
        weights = fp32_state_dict(self.model, self.amp_optimizer)
        super()._save(output_dir, _cast_keeping_ties(weights, self._weights_dtype))
        if self.args.should_save:
            # save_pretrained wrote the model's own dtype (half under O2/O3) into config.json.
            self.model.config.dtype = str(self._weights_dtype).removeprefix("torch.")
            self.model.config.save_pretrained(output_dir or self.args.output_dir)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.amp_optimizer is not None:
            logs.update(self.amp_optimizer.logs())  # fp16 loss scale and overflow-skipped steps beside the loss
        super().log(logs, start_time)
