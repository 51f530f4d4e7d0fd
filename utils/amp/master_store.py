"""Where the optimizer's master weights and gradients live: the protocol, and one master per tensor.

``MixedPrecisionOptimizer`` keeps its parameters in a ``MasterStore``:

* ``PerTensorStore`` (here, ``combine_grad=False``): every parameter keeps its own grad; a
  parameter whose master dtype differs from its own (half weights under O2) gets an fp32
  copy that the optimizer steps, the others are their own master.
* ``utils.amp.combine_grad.FlatStore`` (``combine_grad=True``): the same in a few flat buffers.

Both follow ``MasterStore``, so the optimizer never asks which one it has.
"""

from __future__ import annotations

from typing import Protocol

import torch

from utils.amp.combine_grad import MasterDtypeRule


class MasterStore(Protocol):
    """The storage side of mixed precision, per step: zero, gather, (optimizer step), publish."""

    model_params: list[torch.nn.Parameter]
    optimizer_groups: list[dict]  # what the inner optimizer is built from: the masters
    grads_are_views: bool  # True: ``.grad`` must keep pointing into the store (FlatStore.restore_grad_views)

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def gather(self) -> None:
        """Make the master grads hold this step's grads."""

    def master_grads(self) -> list[torch.Tensor]: ...

    def publish(self) -> None:
        """Copy the stepped masters into the model's weights."""

    def grad_buffers(self) -> list[torch.Tensor]:
        """The tensors backward accumulates into (what a DDP all-reduce covers)."""

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PerTensorStore:
    """One master per tensor (see the module doc)."""

    grads_are_views = False

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
