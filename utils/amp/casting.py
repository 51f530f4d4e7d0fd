"""Casting a model for an O-level, and the context its forward runs in.

* O0/O1: the model stays fp32 (O1's forward runs under ``torch.autocast``).
* O2: every weight is half except those of normalization layers, which stay fp32 with
  their inputs cast to fp32 and their outputs back to half by hooks.
* O3: every weight is half.

Under O2 and O3 two more hooks keep the loss right:

* the model's activation inputs (``inputs_embeds``, pixel values, positional tensors), and
  those of the model's own modules that compute with their weights directly (XLNet's
  relative attention and its fp32 position encodings), are cast to the half dtype, but
  never the loss and bookkeeping arguments: counts such as the
  Trainer's ``num_items_in_batch`` (65,520 tokens or more are inf in fp16), labels and masks
  keep their dtype (the models cast masks themselves);
* the logits leave the output layer in fp32, so that every model's cross-entropy (and the
  loss scaling after it) runs in fp32; the matmul itself stays half.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from utils.amp.config import AmpConfig

# torch's normalization layers; models' own (LlamaRMSNorm, T5LayerNorm, ...) are told by name.
_TORCH_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm, torch.nn.RMSNorm,
                torch.nn.modules.batchnorm._NormBase)


def is_norm_module(module: torch.nn.Module) -> bool:
    """A normalization layer: a leaf module that is one of torch's norms or is named ``...Norm``.

    Containers whose names mention a norm (``RobertaPreLayerNormEmbeddings``,
    ``DbrxNormAttentionNorm``) are not: their Linear children are ordinary half layers.
    """
    if next(module.children(), None) is not None:
        return False
    return isinstance(module, _TORCH_NORMS) or type(module).__name__.endswith("Norm")


def keeps_its_dtype(name: str) -> bool:
    """Keyword arguments that are not activations: counts, labels and masks."""
    return name == "num_items_in_batch" or "label" in name or name.endswith("mask")


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


def _activation_caster(dtype: torch.dtype) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cast = {key: value if keeps_its_dtype(key) else _cast_floats(value, dtype) for key, value in kwargs.items()}
        return _cast_floats(args, dtype), cast

    return hook


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


def _computes_with_own_weights(module: torch.nn.Module) -> bool:
    """A model's own module holding weights it combines with tensors it builds itself.

    XLNet's relative attention multiplies its half weights with fp32 position encodings it
    makes inside the model. torch's own layers, and leaf layers such as transformers' Conv1D,
    only ever see the previous layer's output: a hook on them would cast nothing, at every forward.
    """
    owns = next(module.parameters(recurse=False), None) is not None
    has_children = next(module.children(), None) is not None
    return owns and has_children and not type(module).__module__.startswith("torch.")


def _half_except_norms(model: torch.nn.Module, half: torch.dtype) -> None:
    for module in model.modules():
        if is_norm_module(module):
            _cast_module_tensors(module, torch.float32)
            module.register_forward_pre_hook(_input_caster(torch.float32), with_kwargs=True)
            module.register_forward_hook(_output_caster(half))
        else:
            _cast_module_tensors(module, half)


def _cast_activations_into(model: torch.nn.Module, half: torch.dtype) -> None:
    """Half activation inputs for the model, and for its modules that compute with their own weights."""
    model.register_forward_pre_hook(_activation_caster(half), with_kwargs=True)
    for module in model.modules():
        if module is not model and not is_norm_module(module) and _computes_with_own_weights(module):
            module.register_forward_pre_hook(_activation_caster(half), with_kwargs=True)


def _output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def prepare_model(model: torch.nn.Module, cfg: AmpConfig) -> torch.nn.Module:
    """Cast ``model`` in place for ``cfg.opt_level`` (call once, before the optimizer)."""
    if cfg.opt_level in ("O0", "O1"):
        return model.float()
    assert cfg.half_dtype is not None  # guaranteed by AmpConfig
    if cfg.opt_level == "O3":
        model.to(cfg.half_dtype)
    else:
        _half_except_norms(model, cfg.half_dtype)
    _cast_activations_into(model, cfg.half_dtype)
    output_layer = _output_layer(model)
    if output_layer is not None:
        output_layer.register_forward_hook(_output_caster(torch.float32))
    return model


def autocast_context(cfg: AmpConfig, device_type: str) -> contextlib.AbstractContextManager:
    """The context the forward (and loss) runs in: autocast for O1, nothing otherwise."""
    if cfg.opt_level == "O1":
        return torch.autocast(device_type=device_type, dtype=cfg.half_dtype)
    return contextlib.nullcontext()
