"""What a mixed-precision run is: the O-level, the half dtype and the loss-scale settings.

``AmpConfig`` is the one place that answers questions about the precision of a run (does
it scale the loss, does the scaler skip overflowing steps itself, are there fp32 masters);
the optimizer, the Trainer hooks and the non-finite-loss guard all ask it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

OPT_LEVELS = ("O0", "O1", "O2", "O3")
HALF_DTYPES = (torch.float16, torch.bfloat16)
LossScale = float | str


def parse_loss_scale(text: str) -> LossScale:
    """``"dynamic"`` or a positive finite number, from a command-line string."""
    cleaned = str(text).strip().lower()
    if cleaned == "dynamic":
        return "dynamic"
    try:
        value = float(cleaned)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"loss scale must be 'dynamic' or a positive number, got {text!r}")
    return value


@dataclass(frozen=True)
class AmpConfig:
    """How to run mixed precision; ``half_dtype`` is None when neither fp16 nor bf16."""

    opt_level: str = "O0"
    half_dtype: torch.dtype | None = None
    loss_scale: LossScale = "dynamic"
    growth_interval: int = 2000
    combine_grad: bool = False
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level must be one of {', '.join(OPT_LEVELS)}, got {self.opt_level!r}")
        if self.half_dtype is not None and self.half_dtype not in HALF_DTYPES:
            raise ValueError(f"half_dtype must be torch.float16 or torch.bfloat16, got {self.half_dtype}")
        if self.opt_level != "O0" and self.half_dtype is None:
            raise ValueError(f"opt_level {self.opt_level} needs fp16 or bf16")
        if self.loss_scale != "dynamic":
            parse_loss_scale(str(self.loss_scale))
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}")
        if not (math.isfinite(self.min_loss_scale) and self.min_loss_scale > 0):
            raise ValueError(f"min_loss_scale must be a positive number, got {self.min_loss_scale}")

    @classmethod
    def from_flags(
        cls,
        opt_level: str,
        fp16: bool,
        bf16: bool,
        loss_scale: LossScale = "dynamic",
        combine_grad: bool = False,
        growth_interval: int = 2000,
        min_loss_scale: float = 1.0,
    ) -> AmpConfig:
        if fp16 and bf16:
            raise ValueError("choose at most one of fp16 and bf16")
        half = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
        if isinstance(loss_scale, str):
            loss_scale = parse_loss_scale(loss_scale)
        return cls(opt_level, half, loss_scale, growth_interval, combine_grad, min_loss_scale)

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


def amp_config_from_args(args: Any) -> AmpConfig | None:
    """The AmpConfig of checked training arguments; None for a plain fp32 run."""
    if not (getattr(args, "fp16", False) or getattr(args, "bf16", False)):
        return None
    # Plain TrainingArguments (no suite flags) get the suite's defaults.
    return AmpConfig.from_flags(
        getattr(args, "fp16_opt_level", None) or "O1",
        fp16=args.fp16,
        bf16=args.bf16,
        loss_scale=getattr(args, "loss_scale", "dynamic"),
        combine_grad=getattr(args, "use_combine_grad", False),
        growth_interval=getattr(args, "loss_scale_window", 2000),
        min_loss_scale=getattr(args, "min_loss_scale", 1.0),
    )
