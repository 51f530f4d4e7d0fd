"""The fp32 weights of a mixed-precision model: what to save, and keeping the masters right after a load.

Under O2 the weights that count are the optimizer's fp32 masters, not the half model's:
``fp32_state_dict`` saves those, and ``sync_masters_on_load`` hands weights loaded into the model
(the Trainer's best checkpoint at the end, a user's ``load_state_dict``) on to the masters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from utils.amp.optimizer import AmpOptimizer


def sync_masters_on_load(model: torch.nn.Module, optimizer: AmpOptimizer) -> list[Any]:
    """After every ``model.load_state_dict`` (the Trainer's best-model load, a user's), resync the masters.

    Otherwise the masters keep the last weights and the next save or step silently undoes the load.
    Returns the two hook handles.
    """
    loaded: dict[str, torch.Tensor] = {}

    def remember(module, state_dict, prefix, *args) -> None:
        loaded.update({key.removeprefix(prefix): value for key, value in state_dict.items()})

    def resync(module, incompatible_keys) -> None:
        optimizer.sync_masters(model, loaded)
        loaded.clear()

    return [model.register_load_state_dict_pre_hook(remember), model.register_load_state_dict_post_hook(resync)]


@torch.no_grad()
def fp32_state_dict(model: torch.nn.Module, optimizer: AmpOptimizer | None = None) -> dict[str, torch.Tensor]:
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
