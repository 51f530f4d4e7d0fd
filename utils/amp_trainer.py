"""Mixed precision inside the Trainer: the suite's apex-style O-levels (``utils.amp``) or apex's amp.

``MixedPrecisionMixin`` goes before ``Trainer`` in a subclass's bases. With ``--fp16``/``--bf16``
it works through the Trainer's hooks: the model is cast once at construction,
``create_optimizer`` wraps the Trainer's optimizer, the forward runs in
``autocast_smart_context_manager``, the loss is scaled in ``accelerator.backward``, clipping goes
through ``_clip_grad_norm``, ``log`` adds the loss scale, and ``_save`` writes normal weights.
accelerate's own mixed precision is off (``LMTrainingArguments``). Without them the Trainer runs
as it is.
"""

import logging
import math
from itertools import chain

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer

from .amp import (ApexAmpOptimizer, MixedPrecisionOptimizer, amp_config_from_args, autocast_context, choose_backend,
                  fp32_state_dict, prepare_model)
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
        self.amp_optimizer: MixedPrecisionOptimizer | ApexAmpOptimizer | None = None  # built by create_optimizer
        self._grad_guard = None
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

    def _amp_backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``accelerator.backward`` with the fp16 loss scale; then the DDP all-reduce on the last micro-batch."""
        last_micro_batch = self.accelerator.sync_gradients
        if isinstance(self.amp_optimizer, ApexAmpOptimizer):
            with self.amp_optimizer.scaled_loss(loss, last_micro_batch) as scaled:
                self._unscaled_backward(scaled, **kwargs)
            return  # apex runs under accelerate's DDP wrapper, which reduces the grads
        self._unscaled_backward(self.amp_optimizer.scale_loss(loss), **kwargs)
        if last_micro_batch and self.args.world_size > 1:
            all_reduce_mean(self.amp_optimizer.grad_buffers(), self.args.world_size,
                            pack=not self.amp_config.combine_grad)

    def _decay_groups(self, model: torch.nn.Module) -> list[dict]:
        """The Trainer's two parameter groups (as in create_optimizer): decayed, and biases and norms."""
        decay = set(self.get_decay_parameter_names(model))
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for name, p in named if name in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0}]

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.amp_config is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = (self.optimizer_cls_and_kwargs
                                 or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or (
                {"params", "model", "optimizer_dict"} & kwargs.keys()):
            raise UsageError(f"--optim {self.args.optim} lays out the parameters itself, which --fp16/--bf16 here "
                             "cannot wrap: use e.g. adamw_torch or adamw_torch_fused")
        groups = self._decay_groups(opt_model)
        if self.amp_backend == "apex":
            self.amp_optimizer = self._apex_initialize(opt_model, optimizer_cls(groups, **kwargs))
        else:
            self.amp_optimizer = MixedPrecisionOptimizer(groups, lambda g: optimizer_cls(g, **kwargs), self.amp_config)
            # The Trainer calls model.zero_grad() (grads to None) after each step: with combine_grad the
            # grads must point back into the flat buffer before the next backward.
            if self._grad_guard is not None:
                self._grad_guard.remove()
            self._grad_guard = self.amp_optimizer.guard_grad_views(opt_model)
        self.optimizer = _AmpAcceleratedOptimizer(self.amp_optimizer)
        return self.optimizer

    def _apex_initialize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ApexAmpOptimizer:
        cfg = self.amp_config
        options = {"opt_level": cfg.opt_level, "loss_scale": cfg.loss_scale}
        if cfg.combine_grad:
            options["combine_grad"] = True  # Ascend's apex; NVIDIA's has no such option
        try:
            model, optimizer = self._apex_amp.initialize(model, optimizer, **options)
        except TypeError as err:
            if cfg.combine_grad and "combine_grad" in str(err):
                raise UsageError("--use_combine_grad: this apex has no combine_grad (Ascend's apex has); "
                                 "drop the flag or use --amp_backend native") from None
            raise
        return ApexAmpOptimizer(self._apex_amp, optimizer)

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

    def _amp_logs(self) -> dict:
        optimizer = self.amp_optimizer
        if isinstance(optimizer, MixedPrecisionOptimizer) and optimizer.scaler.enabled:
            return {"loss_scale": optimizer.scaler.scale, "skipped_steps": optimizer.scaler.skipped_steps}
        if isinstance(optimizer, ApexAmpOptimizer):
            return {"loss_scale": optimizer.loss_scale, "skipped_steps": optimizer.skipped_steps}
        return {}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.amp_config is None or state_dict is not None:
            return super()._save(output_dir, state_dict)
        # fp32 weights from the masters (O2), then the dtype the model came in: from_pretrained loads them as
        # any other checkpoint. apex keeps its masters to itself: its weights are the model's, upcast.
        masters = self.amp_optimizer if isinstance(self.amp_optimizer, MixedPrecisionOptimizer) else None
        state_dict = _cast_keeping_ties(fp32_state_dict(self.model, masters), self._weights_dtype)
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            # save_pretrained wrote the model's own dtype (half under O2/O3) into config.json.
            self.model.config.dtype = str(self._weights_dtype).removeprefix("torch.")
            self.model.config.save_pretrained(output_dir or self.args.output_dir)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._amp_logs())  # fp16 loss scale and overflow-skipped steps beside the loss
        super().log(logs, start_time)
