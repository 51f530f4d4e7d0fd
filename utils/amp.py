"""Apex-style mixed-precision optimization levels in plain PyTorch, on any device.

Levels (``AmpConfig.opt_level``):

* ``O0``: fp32 everything.
* ``O1``: fp32 weights; the forward runs under ``torch.autocast`` in the half dtype.
* ``O2``: half weights except normalization modules (class name contains "Norm"), which
  stay fp32 and get their inputs cast to fp32 and their outputs back to half by hooks;
  the optimizer steps fp32 master weights, grads are copied up and weights copied back.
* ``O3``: everything half, no masters (a speed baseline: with fp16, Adam-type optimizers
  lose small second moments; use a ``fused`` optimizer, which computes in fp32).

fp16 uses loss scaling (``LossScaler``: static, or dynamic starting at 2**16, halving and
skipping the step on inf/NaN grads, doubling after ``growth_interval`` clean steps, capped
at 2**24). bf16 and O0 run with the scaler disabled.

``combine_grad=True`` keeps weights, grads and masters in flat buffers
(``utils.combine_grad.FlatStore``) so zeroing, unscaling, the inf check, the norm, the
clipping and the optimizer step each run over a flat buffer instead of per tensor.

API: ``AmpConfig`` (+ ``from_flags``), ``parse_loss_scale``, ``LossScaler``,
``prepare_model``, ``autocast_context``, ``MixedPrecisionOptimizer`` (``scale_loss``,
``unscale_and_check``, ``clip_grad_norm``, ``step``, ``zero_grad``, ``state_dict``,
``load_state_dict``, ``grad_buffers``, ``guard_grad_views``, ``master_of``,
``step_was_skipped``, ``scaler``)
and ``fp32_state_dict``.

Training-loop usage (what a Trainer integration does)::

    cfg = AmpConfig.from_flags("O2", fp16=True, bf16=False, loss_scale="dynamic", combine_grad=True)
    model = prepare_model(model.to(device), cfg)          # before building the optimizer
    optimizer = MixedPrecisionOptimizer(
        decay_and_no_decay_groups, lambda groups: torch.optim.AdamW(groups, lr=lr, fused=True), cfg
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # drives the inner groups
    for micro_batches in steps:
        for batch in micro_batches:
            with autocast_context(cfg, device.type):
                loss = model(**batch).loss / len(micro_batches)
            optimizer.scale_loss(loss).backward()
        # under DDP: all-reduce every tensor of optimizer.grad_buffers() here
        grad_norm = optimizer.clip_grad_norm(max_norm)   # unscales first; inf when overflowed
        optimizer.step()                                  # skipped on overflow
        if not optimizer.step_was_skipped:
            scheduler.step()
        optimizer.zero_grad()
    torch.save(optimizer.state_dict(), ...)               # inner state + masters + scaler
    weights = fp32_state_dict(model, optimizer)           # fp32 weights from the masters

With ``combine_grad`` the grads are views into a flat buffer: zero them with
``optimizer.zero_grad()``, or call ``optimizer.guard_grad_views(model)`` once when
something else sets them to None (the HF Trainer's ``model.zero_grad()``); grads reset
between forward and step are still copied back, with a warning. Build the optimizer
after the model is on its device and prepared.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from utils.combine_grad import FlatStore, MasterDtypeRule

logger = logging.getLogger(__name__)

OPT_LEVELS = ("O0", "O1", "O2", "O3")
HALF_DTYPES = (torch.float16, torch.bfloat16)
LossScale = float | str
OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


# ------------------------------------------------------------------ configuration
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

    @classmethod
    def from_flags(
        cls,
        opt_level: str,
        fp16: bool,
        bf16: bool,
        loss_scale: LossScale = "dynamic",
        combine_grad: bool = False,
        growth_interval: int = 2000,
    ) -> AmpConfig:
        if fp16 and bf16:
            raise ValueError("choose at most one of fp16 and bf16")
        half = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
        if isinstance(loss_scale, str):
            loss_scale = parse_loss_scale(loss_scale)
        return cls(opt_level, half, loss_scale, growth_interval, combine_grad)

    @property
    def uses_loss_scaling(self) -> bool:
        return self.opt_level != "O0" and self.half_dtype == torch.float16

    @property
    def master_weights(self) -> bool:
        return self.opt_level == "O2"


# ------------------------------------------------------------------- loss scaling
class LossScaler:
    """Loss scale with apex semantics; ``update`` is called once per optimizer step.

    Counters: ``scale``, ``clean_steps`` (consecutive steps without overflow since the
    scale last changed) and ``skipped_steps`` (steps skipped for inf/NaN grads).
    """

    def __init__(
        self,
        loss_scale: LossScale = "dynamic",
        *,
        enabled: bool = True,
        growth_interval: int = 2000,
        init_scale: float = 2.0**16,
        max_scale: float = 2.0**24,
    ) -> None:
        self.enabled = enabled
        self.dynamic = enabled and loss_scale == "dynamic"
        self.growth_interval = growth_interval
        self.max_scale = max_scale
        static = init_scale if loss_scale == "dynamic" else float(loss_scale)
        self.scale = static if enabled else 1.0
        self.clean_steps = 0
        self.skipped_steps = 0

    @classmethod
    def from_config(cls, cfg: AmpConfig) -> LossScaler:
        return cls(cfg.loss_scale, enabled=cfg.uses_loss_scaling, growth_interval=cfg.growth_interval)

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.skipped_steps += 1
            self.clean_steps = 0
            if self.dynamic:
                self.scale /= 2.0
            return
        self.clean_steps += 1
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
            self.scale = float(state["scale"])


# ------------------------------------------------------------------ model casting
def is_norm_module(module: torch.nn.Module) -> bool:
    """Normalization layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm, ...) by class name."""
    return "Norm" in type(module).__name__


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast_floats(item, dtype) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    return value


def _input_caster(dtype: torch.dtype) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)

    return hook


def _output_caster(dtype: torch.dtype) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return _cast_floats(output, dtype)

    return hook


def _cast_module_tensors(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the module's own (not its children's) floating parameters and buffers."""
    for param in module.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_floating_point():
            setattr(module, name, buffer.to(dtype))


def _half_except_norms(model: torch.nn.Module, half: torch.dtype) -> None:
    for module in model.modules():
        if is_norm_module(module):
            _cast_module_tensors(module, torch.float32)
            module.register_forward_pre_hook(_input_caster(torch.float32), with_kwargs=True)
            module.register_forward_hook(_output_caster(half))
        else:
            _cast_module_tensors(module, half)


def prepare_model(model: torch.nn.Module, cfg: AmpConfig) -> torch.nn.Module:
    """Cast ``model`` in place for ``cfg.opt_level`` (call once, before the optimizer)."""
    if cfg.opt_level in ("O0", "O1"):
        return model.float()
    assert cfg.half_dtype is not None  # guaranteed by AmpConfig
    if cfg.opt_level == "O3":
        model.to(cfg.half_dtype)
    else:
        _half_except_norms(model, cfg.half_dtype)
    # Half weights need half inputs (pixel values, inputs_embeds); integer ids pass through.
    model.register_forward_pre_hook(_input_caster(cfg.half_dtype), with_kwargs=True)
    return model


def autocast_context(cfg: AmpConfig, device_type: str) -> contextlib.AbstractContextManager:
    """The context the forward (and loss) runs in: autocast for O1, nothing otherwise."""
    if cfg.opt_level == "O1":
        return torch.autocast(device_type=device_type, dtype=cfg.half_dtype)
    return contextlib.nullcontext()


# ------------------------------------------------------ per-tensor master storage
class PerTensorStore:
    """The ``combine_grad=False`` counterpart of ``FlatStore``: one master per tensor.

    A parameter whose master dtype equals its own dtype is its own master; the others
    (half weights under O2) get an fp32 copy that the optimizer steps.
    """

    def __init__(self, groups: list[dict], master_dtype_of: MasterDtypeRule) -> None:
        self.model_params = [p for group in groups for p in group["params"]]
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._master_by_id: dict[int, torch.Tensor] = {}
        self.optimizer_groups = [self._optimizer_group(group, master_dtype_of) for group in groups]
        self._masters = [p for group in self.optimizer_groups for p in group["params"]]

    def _optimizer_group(self, group: dict, master_dtype_of: MasterDtypeRule) -> dict:
        masters = []
        for p in group["params"]:
            master = p
            if master_dtype_of(p) != p.dtype:
                master = torch.nn.Parameter(p.detach().to(master_dtype_of(p), copy=True))
                self._pairs.append((p, master))
            self._master_by_id[id(p)] = master
            masters.append(master)
        options = {key: value for key, value in group.items() if key != "params"}
        return {**options, "params": masters}

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        # Master grads are left alone: ``gather`` overwrites them (or sets them to None).
        if set_to_none:
            for p in self.model_params:
                p.grad = None
            return
        grads = [p.grad for p in self.model_params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def gather(self) -> None:
        sources, targets = [], []
        for model_param, master in self._pairs:
            if model_param.grad is None:
                master.grad = None
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            sources.append(model_param.grad)
            targets.append(master.grad)
        if targets:
            torch._foreach_copy_(targets, sources)

    def master_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._masters if p.grad is not None]

    @torch.no_grad()
    def publish(self) -> None:
        if self._pairs:
            torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    def grad_buffers(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model_params if p.grad is not None]

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self._master_by_id[id(param)]

    def state_dict(self) -> dict:
        return {"masters": [master for _, master in self._pairs]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["masters"]
        if len(saved) != len(self._pairs):
            raise ValueError(
                f"checkpoint has {len(saved)} master tensors, this model needs {len(self._pairs)}"
            )
        for (_, master), source in zip(self._pairs, saved):
            master.copy_(source)
        self.publish()


# --------------------------------------------------------------------- optimizer
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


class _InfChecker:
    """Unscales grads and flags inf/NaN in one fused operator, reusing its two scalars."""

    def __init__(self) -> None:
        self._found_inf: torch.Tensor | None = None
        self._inv_scale: torch.Tensor | None = None

    def __call__(self, grads: list[torch.Tensor], inv_scale: float) -> bool:
        """Multiply ``grads`` by ``inv_scale`` in place; True if any is inf/NaN (one host sync)."""
        device = grads[0].device
        if self._found_inf is None or self._found_inf.device != device:
            self._found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            self._inv_scale = torch.empty(1, dtype=torch.float32, device=device)
        self._found_inf.zero_()
        self._inv_scale.fill_(inv_scale)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, self._inv_scale)
        return bool(self._found_inf.item())


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    if len(grads) == 1:
        return torch.linalg.vector_norm(grads[0], norm_type, dtype=torch.float32)
    norms = torch._foreach_norm(grads, norm_type, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """Loss scaling, fp32 masters (O2) and combined grads around an inner optimizer.

    ``params``: parameters or parameter groups of the prepared model (group options such
    as ``weight_decay`` are kept). ``optimizer_factory`` builds the inner optimizer from
    groups whose ``params`` are the masters (flat tensors with ``combine_grad``).
    ``param_groups``/``state``/``defaults`` are the inner optimizer's, so LR schedulers
    built on this wrapper drive it. The base class ``__init__`` is deliberately not run.
    """

    def __init__(
        self,
        params: Iterable,
        optimizer_factory: OptimizerFactory,
        cfg: AmpConfig,
        scaler: LossScaler | None = None,
    ) -> None:
        groups = _as_groups(params)
        store_type = FlatStore if cfg.combine_grad else PerTensorStore
        self._store: FlatStore | PerTensorStore = store_type(groups, _master_dtype_rule(cfg))
        self.optimizer = optimizer_factory(self._store.optimizer_groups)
        self.cfg = cfg
        self.scaler = scaler if scaler is not None else LossScaler.from_config(cfg)
        self.step_was_skipped = False
        self._unscale_and_find_inf = _InfChecker()
        self._found_inf: bool | None = None  # None until this step's grads are unscaled

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

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("the mixed-precision layout is fixed; build a new optimizer instead")

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor the optimizer steps for ``param`` (``param`` itself when it has no master)."""
        return self._store.master_of(param)

    def guard_grad_views(self, model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle | None:
        """With ``combine_grad``, re-point grads reset to None before each forward of ``model``.

        Needed when something else zeroes grads with ``set_to_none`` (the HF Trainer calls
        ``model.zero_grad()`` after every step); returns the hook handle, None without flat grads.
        """
        if not isinstance(self._store, FlatStore):
            return None
        store = self._store

        def restore(module: torch.nn.Module, args: tuple) -> None:  # None: inputs unchanged
            store.restore_grad_views()

        return model.register_forward_pre_hook(restore)

    def grad_buffers(self) -> list[torch.Tensor]:
        """Tensors backward accumulates into: flat buffers with ``combine_grad``, else each grad."""
        return self._store.grad_buffers()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale if self.scaler.enabled else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._store.zero_grad(set_to_none)
        self._found_inf = None

    def unscale_and_check(self) -> bool:
        """Bring grads to the masters and unscale them, once per step; True on inf/NaN."""
        if self._found_inf is None:
            self._store.gather()
            grads = self._store.master_grads()
            found = False
            if self.scaler.enabled and grads:
                found = self._unscale_and_find_inf(grads, 1.0 / self.scaler.scale)
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
        """Step the masters unless the grads overflowed; update the loss scale."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = self.unscale_and_check()
        self.step_was_skipped = found_inf
        if found_inf:
            self._log_skip()
        else:
            self.optimizer.step()
            self._store.publish()
        self.scaler.update(found_inf)
        self._found_inf = None
        return loss

    def _log_skip(self) -> None:
        if self.scaler.dynamic:
            scale = self.scaler.scale
            logger.info("gradient overflow: step skipped, loss scale %g -> %g", scale, scale / 2)
        else:
            logger.warning("gradient overflow with static loss scale %g: step skipped", self.scaler.scale)

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


# ----------------------------------------------------------------------- saving
@torch.no_grad()
def fp32_state_dict(
    model: torch.nn.Module, optimizer: MixedPrecisionOptimizer | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict in fp32, weights taken from the masters when there are any.

    Every tensor is a fresh copy (nothing aliases the flat buffers); tied weights stay
    one shared tensor so ``save_pretrained`` still recognises them.
    """
    managed = {id(p) for p in optimizer.model_params} if optimizer is not None else set()
    params = dict(model.named_parameters(remove_duplicate=False))
    copies: dict[int, torch.Tensor] = {}
    result = {}
    for name, tensor in model.state_dict().items():
        param = params.get(name)
        key = id(param) if param is not None else None
        if key is not None and key in copies:
            result[name] = copies[key]
            continue
        source = optimizer.master_of(param) if key in managed else tensor
        dtype = torch.float32 if source.is_floating_point() else source.dtype
        result[name] = source.detach().to(dtype=dtype, copy=True)
        if key is not None:
            copies[key] = result[name]
    return result


# ------------------------------------------------------- command-line integration
def check_amp_flags(args: Any) -> None:
    """Refuse bad mixed-precision flags with one line naming the flag (``UsageError``).

    ``args`` has ``fp16``, ``bf16``, ``fp16_opt_level`` (None: not given), ``loss_scale``,
    ``loss_scale_window``, ``use_combine_grad`` and ``amp_backend``.
    """
    from utils.errors import UsageError  # the module itself stays free of CLI concerns

    half = args.fp16 or args.bf16
    if args.fp16 and args.bf16:
        raise UsageError("--fp16 and --bf16 exclude each other: choose one")
    if args.fp16_opt_level is not None and args.fp16_opt_level not in OPT_LEVELS:
        raise UsageError(f"--fp16_opt_level {args.fp16_opt_level}: choose one of {', '.join(OPT_LEVELS)}")
    if args.fp16_opt_level not in (None, "O0") and not half:
        raise UsageError(f"--fp16_opt_level {args.fp16_opt_level} needs --fp16 or --bf16")
    if args.use_combine_grad and not half:
        raise UsageError("--use_combine_grad needs --fp16 or --bf16 (it is part of the mixed-precision setup)")
    try:
        parse_loss_scale(args.loss_scale)
    except ValueError as err:
        raise UsageError(f"--loss_scale: {err}") from None
    if args.loss_scale_window < 1:
        raise UsageError(f"--loss_scale_window {args.loss_scale_window}: must be 1 or more")
    if args.amp_backend not in ("auto", "native", "apex"):
        raise UsageError(f"--amp_backend {args.amp_backend}: choose auto, native or apex")


def amp_config_from_args(args: Any) -> AmpConfig | None:
    """The AmpConfig of checked training arguments; None for a plain fp32 run."""
    if not (args.fp16 or args.bf16):
        return None
    return AmpConfig.from_flags(
        args.fp16_opt_level or "O1",
        fp16=args.fp16,
        bf16=args.bf16,
        loss_scale=args.loss_scale,
        combine_grad=args.use_combine_grad,
        growth_interval=args.loss_scale_window,
    )


# ------------------------------------------------------------------ apex backend
def load_apex_amp() -> Any | None:
    """``apex.amp`` when an apex release that still has it is installed, else None.

    NVIDIA removed ``amp`` from recent apex releases; Ascend's fork keeps it (with
    ``combine_grad``). apex is only imported when its ``amp`` folder exists, so that an
    apex without amp never shows up in ``sys.modules``.
    """
    import importlib.util
    import os

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


def choose_backend(requested: str, cfg: AmpConfig) -> tuple[str, Any | None]:
    """("apex", apex.amp) or ("native", None) for ``--amp_backend`` auto/apex/native."""
    if requested == "native":
        return "native", None
    amp = load_apex_amp()
    usable = amp is not None and cfg.half_dtype == torch.float16
    if requested == "apex" and not usable:
        from utils.errors import UsageError

        why = "apex with amp is not installed" if amp is None else "apex's amp does fp16 only"
        raise UsageError(f"--amp_backend apex: {why}; use --amp_backend native")
    return ("apex", amp) if usable else ("native", None)


class ApexAmpOptimizer(torch.optim.Optimizer):
    """apex's amp behind the interface the Trainer integration uses (``MixedPrecisionOptimizer``'s).

    Built from an optimizer that ``amp.initialize`` has patched. Tested against a stand-in
    ``apex.amp`` (tests/test_apex_bridge.py), not yet against a real apex with amp.
    """

    def __init__(self, amp: Any, optimizer: torch.optim.Optimizer) -> None:
        self.amp = amp
        self.optimizer = optimizer
        self.step_was_skipped = False
        self.skipped_steps = 0

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def _loss_scaler(self) -> Any | None:
        scalers = getattr(getattr(self.amp, "_amp_state", None), "loss_scalers", None)
        return scalers[0] if scalers else None

    @property
    def loss_scale(self) -> float | None:
        scaler = self._loss_scaler()
        return float(scaler.loss_scale()) if scaler is not None else None

    def scaled_loss(self, loss: torch.Tensor, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        # apex unscales into the master grads when the context exits; between micro-batches
        # of one step it must not (delay_unscale), as apex's gradient-accumulation recipe says.
        return self.amp.scale_loss(loss, self.optimizer, delay_unscale=not last_micro_batch)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(self.amp.master_params(self.optimizer)), max_norm)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        scaler = self._loss_scaler()
        # apex replaced optimizer.step by a no-op for this step when it found an overflow.
        self.step_was_skipped = bool(getattr(scaler, "_has_overflow", False))
        self.skipped_steps += self.step_was_skipped
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "amp": self.amp.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.amp.load_state_dict(state_dict["amp"])
        self.skipped_steps = int(state_dict["skipped_steps"])
