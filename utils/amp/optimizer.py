"""Apex-style mixed precision in plain PyTorch, on any device: the optimizer side.

``MixedPrecisionOptimizer`` wraps an inner optimizer with loss scaling, fp32 master weights
(O2) and, with ``combine_grad``, flat gradient buffers. The other parts of ``utils/amp/``:

* ``config``: ``AmpConfig`` (O-level, half dtype, loss-scale settings, backend);
* ``casting``: ``prepare_model`` (casting per O-level) and ``autocast_context``;
* ``scaler``: ``LossScaler`` and the per-device overflow checks;
* ``master_store`` / ``combine_grad``: where masters and grads live (per tensor, or flat);
* ``weights``: the fp32 weights to save, and the masters after a load;
* ``apex_bridge``: apex's amp behind the same ``AmpOptimizer`` interface.

A training loop without the Trainer (``utils/train/precision.py`` does the same through its hooks)::

    cfg = AmpConfig.from_flags(fp16=True, bf16=False, opt_level="O2", combine_grad=True)
    model = prepare_model(model.to(device), cfg)          # before building the optimizer
    optimizer = MixedPrecisionOptimizer(
        decay_and_no_decay_groups, lambda groups: torch.optim.AdamW(groups, lr=lr, fused=True), cfg
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # drives the inner groups
    for micro_batches in steps:
        for batch in micro_batches:
            with autocast_context(cfg, device.type):
                loss = model(**batch).loss / len(micro_batches)
            optimizer.scale_loss(loss).backward()          # the scale is applied in fp32
        # under DDP: all-reduce every tensor of optimizer.grad_buffers() here
        grad_norm = optimizer.clip_grad_norm(max_norm)   # unscales first; inf when overflowed
        optimizer.step()                                  # skipped on overflow
        if not optimizer.step_was_skipped:
            scheduler.step()
        optimizer.zero_grad()
    torch.save(optimizer.state_dict(), ...)               # inner state + masters + scaler
    weights = fp32_state_dict(model, optimizer)           # utils.amp.weights: fp32, from the masters

With ``combine_grad`` the grads are views into a flat buffer: zero them with
``optimizer.zero_grad()``, or call ``optimizer.guard_grad_views(model)`` once when
something else sets them to None (the HF Trainer's ``model.zero_grad()``). Build the
optimizer after the model is on its device and prepared. After loading weights into the
model, ``sync_masters`` brings the masters up to date (``utils.amp.weights.sync_masters_on_load``
does it on every ``load_state_dict``).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from utils.amp.combine_grad import FlatStore, MasterDtypeRule
from utils.amp.config import AmpConfig
from utils.amp.master_store import MasterStore, PerTensorStore
from utils.amp.scaler import LossScaler, OverflowCheck, overflow_check_for

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


class AmpOptimizer(Protocol):
    """What the Trainer integration needs from a mixed-precision optimizer (ours or apex's)."""

    step_was_skipped: bool
    model_params: list[torch.nn.Parameter]

    def backward(self, loss: torch.Tensor, run_backward: Callable[[torch.Tensor], None],
                 last_micro_batch: bool) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor: ...

    def drop_update(self) -> None:
        """Make the coming step a no-op, leaving the grad storage in place."""

    def logs(self) -> dict[str, float]: ...

    @property
    def overflow_stuck(self) -> bool:
        """Gradients keep overflowing at the minimum loss scale: training cannot go on."""

    def guard_grad_views(self, model: torch.nn.Module) -> Any: ...

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor: ...

    def sync_masters(self, model: torch.nn.Module, loaded: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _as_groups(params: Iterable) -> list[dict]:
    items = list(params)
    groups = [dict(item) for item in items] if items and isinstance(items[0], dict) else [{"params": items}]
    seen: set[int] = set()
    for group in groups:
        # Frozen parameters stay out: in a flat buffer they would still be weight-decayed.
        group["params"] = [p for p in group["params"] if p.requires_grad]
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears in more than one parameter group")
            seen.add(id(p))
    devices = {p.device for group in groups for p in group["params"]}
    if len(devices) > 1:
        raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
    return groups


def _master_dtype_rule(cfg: AmpConfig) -> MasterDtypeRule:
    if cfg.master_weights:
        return lambda p: torch.float32
    return lambda p: p.dtype


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    if len(grads) == 1:
        return torch.linalg.vector_norm(grads[0], norm_type, dtype=torch.float32)
    norms = torch._foreach_norm(grads, norm_type, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


# torch's optimizers with a fused kernel on CUDA (one launch for the whole update of a flat buffer).
_FUSED_ON_CUDA = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def with_multi_tensor_kernel(optimizer_cls, kwargs: dict, device_type: str) -> dict:
    """``kwargs`` choosing the kernel that steps the masters: fused on CUDA, else foreach.

    torch leaves CPU tensors on its per-tensor loop unless asked; a user's own ``fused``/``foreach``
    (``--optim adamw_torch_fused``) stands, and other devices (NPU: not run yet) keep torch's choice.
    """
    if kwargs.get("fused") or kwargs.get("foreach") is not None or device_type not in ("cuda", "cpu"):
        return kwargs
    accepted = inspect.signature(optimizer_cls.__init__).parameters
    if device_type == "cuda" and issubclass(optimizer_cls, _FUSED_ON_CUDA) and "fused" in accepted:
        return {**kwargs, "fused": True}
    if "foreach" in accepted:
        return {**kwargs, "foreach": True}
    return kwargs


def innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that updates the weights, under accelerate's and our wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """Which kernel steps ``optimizer``: "fused", "foreach", "for-loop", or the class of one without the choice.

    An unset ``foreach`` is resolved as torch resolves it at ``step`` (foreach on CUDA, the loop elsewhere).
    """
    inner = innermost(optimizer)
    defaults = inner.defaults
    if "foreach" not in defaults and "fused" not in defaults:
        return type(inner).__name__
    if defaults.get("fused"):
        return "fused"
    foreach = defaults.get("foreach")
    if foreach is None:
        params = [p for group in inner.param_groups for p in group["params"]]
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False)
    return "foreach" if foreach else "for-loop"


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """Loss scaling, fp32 masters (O2) and combined grads around an inner optimizer.

    ``params``: parameters or parameter groups of the prepared model (group options such
    as ``weight_decay`` are kept). ``optimizer_factory`` builds the inner optimizer from
    groups whose ``params`` are the masters (flat tensors with ``combine_grad``).
    ``param_groups``/``state``/``defaults`` are the inner optimizer's, so LR schedulers
    built on this wrapper drive it. The base class ``__init__`` is deliberately not run.
    ``overflow_check`` defaults to the one the parameters' device needs.
    """

    def __init__(
        self,
        params: Iterable,
        optimizer_factory: OptimizerFactory,
        cfg: AmpConfig,
        scaler: LossScaler | None = None,
        overflow_check: OverflowCheck | None = None,
    ) -> None:
        groups = _as_groups(params)
        store_type = FlatStore if cfg.combine_grad else PerTensorStore
        self._store: MasterStore = store_type(groups, _master_dtype_rule(cfg))
        self.optimizer = optimizer_factory(self._store.optimizer_groups)
        self.cfg = cfg
        self.scaler = scaler if scaler is not None else LossScaler.from_config(cfg)
        self.step_was_skipped = False
        device = self.model_params[0].device if self.model_params else torch.device("cpu")
        self._overflow = overflow_check if overflow_check is not None else overflow_check_for(device)
        self._found_inf: bool | None = None  # None until this step's grads are unscaled
        self._drop_requested = False

    # The inner optimizer owns the groups and state (properties: load_state_dict replaces them).
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self.optimizer.defaults

    @property
    def model_params(self) -> list[torch.nn.Parameter]:
        return self._store.model_params

    @property
    def overflow_stuck(self) -> bool:
        return self.scaler.stuck

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("the mixed-precision layout is fixed; build a new optimizer instead")

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor the optimizer steps for ``param`` (``param`` itself when it has no master)."""
        return self._store.master_of(param)

    def guard_grad_views(self, model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle | None:
        """With grads that are views (combine_grad), re-point grads reset to None before each forward.

        Needed when something else zeroes grads with ``set_to_none`` (the HF Trainer calls
        ``model.zero_grad()`` after every step); returns the hook handle, None when not needed.
        """
        if not self._store.grads_are_views:
            return None
        store = self._store

        def restore(module: torch.nn.Module, args: tuple) -> None:  # None: inputs unchanged
            store.restore_grad_views()

        return model.register_forward_pre_hook(restore)

    def grad_buffers(self) -> list[torch.Tensor]:
        """Tensors backward accumulates into: flat buffers with ``combine_grad``, else each grad."""
        return self._store.grad_buffers()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the scale, in fp32 (a half loss times 2**16 is inf in fp16)."""
        self._overflow.before_backward()
        return loss.float() * self.scaler.scale if self.scaler.enabled else loss

    def backward(self, loss: torch.Tensor, run_backward: Callable[[torch.Tensor], None],
                 last_micro_batch: bool = True) -> None:
        run_backward(self.scale_loss(loss))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._store.zero_grad(set_to_none)
        self._found_inf = None

    def drop_update(self) -> None:
        """The coming ``step`` leaves the weights and optimizer state as they are (a non-finite loss)."""
        self._drop_requested = True

    def unscale_and_check(self) -> bool:
        """Bring grads to the masters and unscale them, once per step; True on inf/NaN."""
        if self._found_inf is None:
            self._store.gather()
            grads = self._store.master_grads()
            found = False
            if self.scaler.enabled and grads:
                found = self._overflow.unscale_and_check(grads, 1.0 / self.scaler.scale)
            self._found_inf = found
        return self._found_inf

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the unscaled master grads to ``max_norm``; returns the norm before clipping."""
        found_inf = self.unscale_and_check()
        grads = self._store.master_grads()
        if found_inf or not grads:
            return torch.tensor(math.inf if found_inf else 0.0)
        total = _total_norm(grads, norm_type)
        # Multiply unconditionally (coefficient clamped at 1) to avoid a host sync.
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if len(grads) == 1:
            grads[0].mul_(coefficient)
        else:
            torch._foreach_mul_(grads, coefficient)
        return total

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the masters unless the grads overflowed or the update was dropped; update the scale."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = self.unscale_and_check()
        self.step_was_skipped = found_inf or self._drop_requested
        if not self.step_was_skipped:
            self.optimizer.step()
            self._store.publish()
        scale = self.scaler.scale
        self.scaler.update(found_inf)
        if found_inf:
            self._log_skip(scale)
        self._found_inf = None
        self._drop_requested = False
        return loss

    def _log_skip(self, scale_before: float) -> None:
        if self.scaler.dynamic:
            logger.info("gradient overflow: step skipped, loss scale %g -> %g", scale_before, self.scaler.scale)
        else:
            logger.warning("gradient overflow with static loss scale %g: step skipped", scale_before)

    def logs(self) -> dict[str, float]:
        """The fp16 loss scale and the overflow-skipped steps, for the training logs."""
        if not self.scaler.enabled:
            return {}
        return {"loss_scale": self.scaler.scale, "skipped_steps": self.scaler.skipped_steps}

    @torch.no_grad()
    def sync_masters(self, model: torch.nn.Module, loaded: dict[str, torch.Tensor]) -> None:
        """After ``loaded`` went into ``model``: masters take its full-precision values, then the model the masters'."""
        managed = {id(p) for p in self.model_params}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in loaded and id(param) in managed:
                self.master_of(param).copy_(loaded[name])
        self._store.publish()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "optimizer": self.optimizer.state_dict(),
            "masters": self._store.state_dict(),
            "scaler": self.scaler.state_dict(),
            "amp": {"opt_level": self.cfg.opt_level, "combine_grad": self.cfg.combine_grad},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict["amp"]
        current = {"opt_level": self.cfg.opt_level, "combine_grad": self.cfg.combine_grad}
        if saved != current:
            raise ValueError(f"checkpoint was written with {saved}, this run uses {current}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._store.load_state_dict(state_dict["masters"])
        self.scaler.load_state_dict(state_dict["scaler"])
        self._found_inf = None
