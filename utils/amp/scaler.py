"""fp16 loss scaling: the scale itself, and how a step's gradients are checked for overflow.

``LossScaler`` has apex's semantics (static, or dynamic from 2**16: halve and skip the step
on inf/NaN gradients, double after ``growth_interval`` clean steps, at most 2**24), plus a
floor (``min_scale``, default 1): the scale never drops below it, and when the gradients
keep overflowing at the floor the scaler reports itself ``stuck`` so that training can stop
instead of skipping every step.

The overflow check depends on the device:

* ``InfNanCheck`` (CPU, CUDA, and NPUs that compute with inf/NaN): one fused
  unscale-and-check kernel over the gradients.
* ``SaturationFlagCheck`` (Ascend 910A/910ProB in saturation mode): overflowing values
  saturate to the largest finite number, so the gradients look clean; the hardware records
  the overflow in a global status register instead. The register is cleared before the
  first backward of each optimizer step (so a stale flag from the previous step or an
  evaluation does not skip this one, and an overflow in any micro-batch still counts), read
  at the check, and the result is all-reduced (max) over the processes so that every rank
  skips the same steps.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch

from utils.amp.config import DEFAULT_SCALE_WINDOW, AmpConfig, LossScale
from utils.dist import any_process

logger = logging.getLogger(__name__)

# Consecutive overflowing steps at the minimum scale after which the scaler gives up.
FLOOR_PATIENCE = 5


class LossScaler:
    """Loss scale with apex semantics and a floor; ``update`` is called once per optimizer step.

    Counters: ``scale``, ``clean_steps`` (consecutive steps without overflow since the scale
    last changed), ``skipped_steps`` (steps skipped for inf/NaN grads) and
    ``floor_overflows`` (consecutive overflowing steps at ``min_scale``).
    """

    def __init__(
        self,
        loss_scale: LossScale = "dynamic",
        *,
        enabled: bool = True,
        growth_interval: int = DEFAULT_SCALE_WINDOW,
        init_scale: float = 2.0**16,
        max_scale: float = 2.0**24,
        min_scale: float = 1.0,
    ) -> None:
        self.enabled = enabled
        self.dynamic = enabled and loss_scale == "dynamic"
        self.growth_interval = growth_interval
        self.max_scale = max_scale
        self.min_scale = min_scale
        static = init_scale if loss_scale == "dynamic" else float(loss_scale)
        self.scale = static if enabled else 1.0
        self.clean_steps = 0
        self.skipped_steps = 0
        self.floor_overflows = 0

    @classmethod
    def from_config(cls, cfg: AmpConfig) -> LossScaler:
        return cls(cfg.loss_scale, enabled=cfg.uses_loss_scaling, growth_interval=cfg.growth_interval,
                   min_scale=cfg.min_loss_scale)

    @property
    def stuck(self) -> bool:
        """Gradients overflowed ``FLOOR_PATIENCE`` steps in a row at the minimum scale."""
        return self.floor_overflows >= FLOOR_PATIENCE

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.skipped_steps += 1
            self.clean_steps = 0
            if self.dynamic:
                at_floor = self.scale <= self.min_scale
                self.floor_overflows = self.floor_overflows + 1 if at_floor else 0
                self.scale = max(self.scale / 2.0, self.min_scale)
            return
        self.clean_steps += 1
        self.floor_overflows = 0
        if self.dynamic and self.clean_steps >= self.growth_interval:
            self.scale = min(self.scale * 2.0, self.max_scale)
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "skipped_steps": self.skipped_steps,
            "dynamic": self.dynamic,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        # A static scale from the command line wins over a checkpoint's scale.
        if self.dynamic and state["dynamic"]:
            self.scale = max(float(state["scale"]), self.min_scale)


# ------------------------------------------------------------------ overflow checks
class OverflowCheck(Protocol):
    """How a step's scaled gradients are unscaled and checked for overflow."""

    def before_backward(self) -> None:
        """Called before every backward; a step's first call starts its overflow record."""

    def unscale_and_check(self, grads: list[torch.Tensor], inv_scale: float) -> bool:
        """Multiply ``grads`` by ``inv_scale`` in place; True when this step overflowed."""


class InfNanCheck:
    """Overflow shows as inf/NaN in the gradients: one fused kernel unscales and finds them."""

    def __init__(self) -> None:
        self._found_inf: torch.Tensor | None = None
        self._inv_scale: torch.Tensor | None = None

    def before_backward(self) -> None:
        pass

    def unscale_and_check(self, grads: list[torch.Tensor], inv_scale: float) -> bool:
        device = grads[0].device
        if self._found_inf is None or self._found_inf.device != device:
            self._found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            self._inv_scale = torch.empty(1, dtype=torch.float32, device=device)
        self._found_inf.zero_()
        self._inv_scale.fill_(inv_scale)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, self._inv_scale)
        return bool(self._found_inf.item())  # one host sync per step


class SaturationFlagCheck:
    """Overflow recorded in the NPU's float-status register (saturation mode; see the module doc).

    ``npu_utils`` is ``torch_npu.npu.utils`` (``clear_npu_overflow_flag``, ``npu_check_overflow``);
    ``reduce_max`` combines the flag over the processes.
    """

    def __init__(self, npu_utils: Any, reduce_max: Callable[[bool, torch.device], bool] = any_process):
        self.npu_utils = npu_utils
        self.reduce_max = reduce_max
        self._step_started = False

    def before_backward(self) -> None:
        if not self._step_started:
            self.npu_utils.clear_npu_overflow_flag()
            self._step_started = True

    def unscale_and_check(self, grads: list[torch.Tensor], inv_scale: float) -> bool:
        # Read the register before touching the grads: in saturation mode it ignores its argument.
        found = bool(self.npu_utils.npu_check_overflow(grads))
        found = self.reduce_max(found, grads[0].device)
        self._step_started = False
        if not found:
            torch._foreach_mul_(grads, inv_scale)
        return found


def _npu_utils() -> Any | None:
    """``torch_npu.npu.utils`` when torch_npu is already loaded (the device setup loads it), else None."""
    if "torch_npu" not in sys.modules:
        return None
    try:
        return importlib.import_module("torch_npu.npu.utils")
    except ImportError:
        return None


def overflow_check_for(device: torch.device) -> OverflowCheck:
    """The flag-register check on NPUs without inf/NaN support, the inf/NaN kernel everywhere else."""
    if getattr(device, "type", device) == "npu":
        utils = _npu_utils()
        supports_inf_nan = getattr(utils, "is_support_inf_nan", None)
        # torch_npu releases from before inf/NaN mode lack the query: those NPUs saturate.
        if utils is not None and (supports_inf_nan is None or not supports_inf_nan()):
            logger.info("NPU in saturation mode: overflow is read from the float-status register")
            return SaturationFlagCheck(utils)
    return InfNanCheck()
