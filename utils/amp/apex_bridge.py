"""apex's amp behind the same ``AmpOptimizer`` interface as the native ``MixedPrecisionOptimizer``.

Used for fp16 when an apex release with ``amp`` is installed (NVIDIA's older releases, or
Ascend's fork, the only one with ``combine_grad``). Where apex's behaviour needs care:

* apex replaces ``optimizer.zero_grad`` by one without arguments: it is called without any;
* apex casts all floating model arguments to half at O2/O3: the Trainer's token count
  ``num_items_in_batch`` reaches the model as an integer tensor, which apex leaves alone;
* ``amp.initialize`` has no growth-window option: ``--loss_scale_window`` is set on apex's
  scalers afterwards; ``--min_loss_scale`` is passed as apex's ``min_loss_scale``;
* Ascend's apex supports ``combine_grad`` at O1 and O2 only (it warns at O3): it is passed
  only there;
* apex (Ascend's ``combine_grad`` above all) owns the grad storage: a dropped update never
  touches ``.grad``, the step is simply not taken.

Tested against a stand-in ``apex.amp`` (tests/test_apex_bridge.py), not yet against a real apex.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from utils.amp.config import AmpConfig
from utils.errors import UsageError

logger = logging.getLogger(__name__)

# Ascend's apex combines gradients at these levels only.
COMBINE_GRAD_LEVELS = ("O1", "O2")


def load_apex_amp() -> Any | None:
    """``apex.amp`` when an apex release that still has it is installed, else None.

    apex is only imported when its ``amp`` folder exists, so that an apex without amp never
    shows up in ``sys.modules``.
    """
    spec = importlib.util.find_spec("apex")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    if not any(os.path.isdir(os.path.join(location, "amp")) for location in locations):
        return None
    try:
        from apex import amp
    except Exception as exc:  # a broken build can raise nearly anything
        logger.warning("apex is installed but apex.amp failed to import (%s): using native AMP", exc)
        return None
    return amp if hasattr(amp, "initialize") and hasattr(amp, "scale_loss") else None


def choose_backend(requested: str, cfg: AmpConfig) -> tuple[AmpConfig, Any | None]:
    """The config as it will run, and apex.amp when apex runs it, for ``--amp_backend`` auto/apex/native.

    Under apex the config says so (``backend``), and says ``combine_grad`` only where Ascend's apex
    combines gradients: that is what the run uses and what its reports show.
    """
    if requested == "native":
        return cfg, None
    amp = load_apex_amp()
    usable = amp is not None and cfg.half_dtype == torch.float16
    if requested == "apex" and not usable:
        why = "apex with amp is not installed" if amp is None else "apex's amp does fp16 only"
        raise UsageError(f"--amp_backend apex: {why}; use --amp_backend native")
    if not usable:
        return cfg, None
    combine = cfg.combine_grad and cfg.opt_level in COMBINE_GRAD_LEVELS
    if cfg.combine_grad and not combine:
        logger.warning("--use_combine_grad: apex combines gradients at O1/O2 only; %s runs without", cfg.opt_level)
    return replace(cfg, backend="apex", combine_grad=combine), amp


def _initialize_options(cfg: AmpConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "opt_level": cfg.opt_level,
        # The precision config decides whether the loss is scaled at all (not at O0).
        "loss_scale": cfg.loss_scale if cfg.uses_loss_scaling else 1.0,
        "min_loss_scale": cfg.min_loss_scale,
    }
    if cfg.combine_grad:  # choose_backend kept it only where apex combines
        options["combine_grad"] = True
    return options


def _count_as_integer(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # apex casts every floating argument of the model to half at O2/O3, the Trainer's float
    # num_items_in_batch too (inf from 65,520 on in fp16); a whole count as int64 passes untouched.
    count = kwargs.get("num_items_in_batch")
    if isinstance(count, torch.Tensor) and count.is_floating_point() and bool((count == count.round()).all()):
        return args, {**kwargs, "num_items_in_batch": count.to(torch.int64)}
    return None


def initialize_apex(amp: Any, model: torch.nn.Module, groups: list[dict], optimizer: torch.optim.Optimizer,
                    cfg: AmpConfig) -> ApexAmpOptimizer:
    """``amp.initialize`` with the run's settings, wrapped as an ``AmpOptimizer``."""
    model.register_forward_pre_hook(_count_as_integer, with_kwargs=True)  # runs before apex's patched forward
    try:
        model, optimizer = amp.initialize(model, optimizer, **_initialize_options(cfg))
    except TypeError as err:
        if cfg.combine_grad and "combine_grad" in str(err):
            raise UsageError("--use_combine_grad: this apex has no combine_grad (Ascend's apex has); "
                             "drop the flag or use --amp_backend native") from None
        raise
    for scaler in getattr(getattr(amp, "_amp_state", None), "loss_scalers", None) or []:
        if hasattr(scaler, "_scale_seq_len"):  # apex's growth window, which initialize does not take
            scaler._scale_seq_len = cfg.growth_interval
    return ApexAmpOptimizer(amp, optimizer, [p for group in groups for p in group["params"]])


class ApexAmpOptimizer(torch.optim.Optimizer):
    """An optimizer that ``amp.initialize`` has patched, with ``MixedPrecisionOptimizer``'s interface.

    ``model_params``: the model's parameters in the order of the optimizer's groups; apex's
    master parameters come in the same order (one per parameter without ``combine_grad``).
    """

    def __init__(self, amp: Any, optimizer: torch.optim.Optimizer, model_params: list[torch.nn.Parameter]) -> None:
        self.amp = amp
        self.optimizer = optimizer
        self.model_params = model_params
        self.step_was_skipped = False
        self.skipped_steps = 0
        self._drop_requested = False
        masters = list(amp.master_params(optimizer))
        # Ascend's combine_grad keeps flat masters: no per-parameter master to read then.
        paired = len(masters) == len(model_params)
        self._master_by_id = {id(p): m for p, m in zip(model_params, masters)} if paired else {}
        if not paired:
            logger.warning("apex keeps %d master tensors for %d parameters: saved weights are the model's own",
                           len(masters), len(model_params))

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)
    overflow_stuck = False  # apex holds its scale at min_loss_scale and keeps skipping

    def _loss_scaler(self) -> Any | None:
        scalers = getattr(getattr(self.amp, "_amp_state", None), "loss_scalers", None)
        return scalers[0] if scalers else None

    @property
    def loss_scale(self) -> float | None:
        scaler = self._loss_scaler()
        return float(scaler.loss_scale()) if scaler is not None else None

    def backward(self, loss: torch.Tensor, run_backward: Callable[[torch.Tensor], None],
                 last_micro_batch: bool = True) -> None:
        # apex unscales into the master grads when the context exits; between micro-batches
        # of one step it must not (delay_unscale), as apex's gradient-accumulation recipe says.
        with self.amp.scale_loss(loss, self.optimizer, delay_unscale=not last_micro_batch) as scaled:
            run_backward(scaled)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(self.amp.master_params(self.optimizer)), max_norm)

    def drop_update(self) -> None:
        self._drop_requested = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        overflow = bool(getattr(self._loss_scaler(), "_has_overflow", False))
        dropped, self._drop_requested = self._drop_requested, False
        self.step_was_skipped = overflow or dropped
        self.skipped_steps += overflow
        if dropped and not overflow:
            return None  # the grads stay where apex keeps them; zero_grad clears them
        # On overflow apex has replaced optimizer.step by a one-off no-op: calling it restores the real one.
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad()  # apex's patched zero_grad takes no arguments

    def logs(self) -> dict[str, float]:
        return {"loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps}

    def guard_grad_views(self, model: torch.nn.Module) -> None:
        return None  # apex manages its own grad storage

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self._master_by_id.get(id(param), param)

    @torch.no_grad()
    def sync_masters(self, model: torch.nn.Module, loaded: dict[str, torch.Tensor]) -> None:
        for name, param in model.named_parameters(remove_duplicate=False):
            master = self._master_by_id.get(id(param))
            if master is not None and name in loaded:
                master.copy_(loaded[name])

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "amp": self.amp.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.amp.load_state_dict(state_dict["amp"])
        self.skipped_steps = int(state_dict["skipped_steps"])
