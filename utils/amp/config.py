"""What a mixed-precision run is: the O-level, the half dtype, the loss-scale settings and who runs them.

``AmpConfig`` is the one owner of these facts. It is built once, from the flags, when they are
parsed (``LMTrainingArguments.amp_config``, None for fp32), and checks them there, each refusal
naming its flag. The Trainer hooks take it, replace ``backend`` (and ``combine_grad``, where apex
drops it) with what they actually run, and keep that copy; the optimizer, the loss scaler, the
non-finite-loss guard, the log line and run_info.json all read the copy the run used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.errors import UsageError

OPT_LEVELS = ("O0", "O1", "O2", "O3")
HALF_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("native", "apex")
DEFAULT_OPT_LEVEL = "O1"  # with --fp16/--bf16 and no --fp16_opt_level
DEFAULT_SCALE_WINDOW = 2000  # clean steps after which a dynamic loss scale doubles (apex's)
DEFAULT_MIN_SCALE = 1.0
LossScale = float | str


def parse_loss_scale(text: LossScale) -> LossScale:
    """``"dynamic"`` or a positive finite number, from a command-line string."""
    cleaned = str(text).strip().lower()
    if cleaned == "dynamic":
        return "dynamic"
    try:
        value = float(cleaned)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--loss_scale: loss scale must be 'dynamic' or a positive number, got {str(text)!r}")
    return value


@dataclass(frozen=True)
class AmpConfig:
    """How to run mixed precision; ``half_dtype`` is None for an fp32 reference (O0 only)."""

    opt_level: str
    half_dtype: torch.dtype | None = None
    loss_scale: LossScale = "dynamic"
    growth_interval: int = DEFAULT_SCALE_WINDOW
    combine_grad: bool = False
    min_loss_scale: float = DEFAULT_MIN_SCALE
    backend: str = "native"

    def __post_init__(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise UsageError(f"--fp16_opt_level {self.opt_level}: choose one of {', '.join(OPT_LEVELS)}")
        if self.half_dtype is None and self.opt_level != "O0":
            raise UsageError(f"--fp16_opt_level {self.opt_level} needs --fp16 or --bf16")
        if self.half_dtype is None and self.combine_grad:
            raise UsageError("--use_combine_grad needs --fp16 or --bf16 (it is part of the mixed-precision setup)")
        if self.half_dtype is not None and self.half_dtype not in HALF_DTYPES:
            raise ValueError(f"half_dtype must be torch.float16 or torch.bfloat16, got {self.half_dtype}")
        if self.loss_scale != "dynamic":
            parse_loss_scale(self.loss_scale)
        if self.growth_interval < 1:
            raise UsageError(f"--loss_scale_window {self.growth_interval}: must be 1 or more")
        if not (math.isfinite(self.min_loss_scale) and self.min_loss_scale > 0):
            raise UsageError(f"--min_loss_scale {self.min_loss_scale}: give a positive number (default 1)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @classmethod
    def from_flags(cls, *, fp16: bool, bf16: bool, opt_level: str | None = None, loss_scale: LossScale = "dynamic",
                   combine_grad: bool = False, growth_interval: int = DEFAULT_SCALE_WINDOW,
                   min_loss_scale: float = DEFAULT_MIN_SCALE) -> AmpConfig | None:
        """The config the precision flags ask for, checked; None for a plain fp32 run."""
        if fp16 and bf16:
            raise UsageError("--fp16 and --bf16 exclude each other: choose one")
        half = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
        level = opt_level or (DEFAULT_OPT_LEVEL if half is not None else "O0")
        config = cls(level, half, parse_loss_scale(loss_scale), growth_interval, combine_grad, min_loss_scale)
        return config if half is not None else None

    @property
    def uses_loss_scaling(self) -> bool:
        """fp16 below O0 scales the loss; bf16 has fp32's range and O0 computes in fp32."""
        return self.opt_level != "O0" and self.half_dtype == torch.float16

    @property
    def skips_overflowing_steps(self) -> bool:
        """True when the loss scaler itself skips steps with inf/NaN gradients (dynamic fp16 scale).

        Everything else (bf16, O0, a static scale) needs the non-finite-loss guard.
        """
        return self.uses_loss_scaling and self.loss_scale == "dynamic"

    @property
    def master_weights(self) -> bool:
        return self.opt_level == "O2"

    @property
    def precision(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.half_dtype, "fp32")

    def report(self) -> dict:
        """The precision as every report shows it (log, run_info.json, model card, the launcher's row)."""
        return {
            "amp_type": self.opt_level if self.precision == "fp16" else f"{self.precision} {self.opt_level}",
            "precision": self.precision,
            "precision_backend": self.backend,
            "opt_level": self.opt_level,
            "combine_grad": self.combine_grad,
            "loss_scale": self.loss_scale if self.uses_loss_scaling else None,
        }


FP32_REPORT = {"amp_type": "fp32", "precision": "fp32", "precision_backend": "none", "opt_level": None,
               "combine_grad": False, "loss_scale": None}


def precision_report(config: AmpConfig | None) -> dict:
    """``config.report()``, or the fp32 run's (no mixed precision at all)."""
    return dict(FP32_REPORT) if config is None else config.report()
