"""Flat-buffer storage of parameters, gradients and master weights ("combined gradients").

``FlatStore`` moves every parameter of a set of optimizer parameter groups into a few
contiguous buffers, so that the per-step bookkeeping of mixed precision is one operator
over a flat buffer instead of one per tensor:

* master buffers, one per master dtype (fp32 for O0/O1/O2, the half dtype for O3), hold
  the weights the optimizer steps, plus a grad buffer of the same shape;
* model buffers, one per model dtype, hold the half weights and half grads of the O2
  parameters that have an fp32 master ("shadowed" parameters).

Each parameter group owns one contiguous span of each master buffer it uses: its
shadowed parameters first, then the parameters that are their own master (fp32 norm
weights under O2, every parameter under O0/O1/O3). The inner optimizer sees one flat
``nn.Parameter`` per (group, master dtype), a view of that span, so weight-decay groups
stay separate. A parameter's ``.data`` and ``.grad`` are views into these buffers, so
autograd accumulates straight into them.

Every parameter starts at a multiple of ``ALIGNMENT`` elements; the padding stays zero
(zero weight, zero grad: every elementwise optimizer keeps it zero), and the aligned
starts keep vectorised kernels on their fast path.

Rules for callers:

* build the store after the model is on its device and cast (``.to()`` or ``.half()``
  afterwards moves parameters out of the buffers; ``gather`` then raises);
* never set ``.grad`` to None between forward and step: zero in place (``zero_grad``).
  Grads found None are re-pointed (and zeroed) by ``restore_grad_views``, which
  ``MixedPrecisionOptimizer.guard_grad_views(model)`` runs before each forward, so the
  HF Trainer's ``model.zero_grad()`` after every step costs two buffer fills. Grads
  replaced later are copied back at ``gather``, with a warning.
* single device: all parameters must live on one device;
* elementwise optimizers only (``is_elementwise``): the optimizer sees one 1-D tensor per
  group, so an optimizer that looks at a tensor's shape or norm (Adafactor's factored
  moments, LAMB's trust ratio) would silently compute something else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Elements, not bytes: the same element offset is used in the half model buffer and the
# fp32 master buffer, so 64 elements is a multiple of 64 bytes for every dtype.
ALIGNMENT = 64

MasterDtypeRule = Callable[[torch.Tensor], torch.dtype]


# Optimizers whose update of an element depends on that element alone (and on scalars).
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adamax,
    torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adadelta, torch.optim.Rprop,
    torch.optim.ASGD,
)


def is_elementwise(optimizer_cls: type) -> bool:
    """Whether ``optimizer_cls`` gives the same result on flat buffers as on the separate tensors."""
    return isinstance(optimizer_cls, type) and issubclass(optimizer_cls, ELEMENTWISE_OPTIMIZERS)


def aligned_numel(numel: int, alignment: int = ALIGNMENT) -> int:
    """``numel`` rounded up to a multiple of ``alignment``."""
    return -(-numel // alignment) * alignment


@dataclass(frozen=True)
class Span:
    """The range ``[start, start + numel)`` of a 1-D buffer."""

    start: int
    numel: int

    def of(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer.narrow(0, self.start, self.numel)


@dataclass(frozen=True)
class _Slot:
    """Where one parameter lives: its master span, and its model span if shadowed."""

    param: torch.nn.Parameter
    master_dtype: torch.dtype
    master: Span
    model_dtype: torch.dtype | None = None
    model: Span | None = None


@dataclass(frozen=True)
class _Link:
    """A run of shadowed parameters laid out identically in a model and a master buffer."""

    model_dtype: torch.dtype
    model: Span
    master_dtype: torch.dtype
    master: Span

    def views(
        self, masters: dict[torch.dtype, torch.Tensor], models: dict[torch.dtype, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This run's (master, model) spans in one family of buffers (data or grad)."""
        return self.master.of(masters[self.master_dtype]), self.model.of(models[self.model_dtype])


def bucket_by(items: Iterable[torch.Tensor], key: Callable[[torch.Tensor], torch.dtype]) -> dict:
    """Items grouped by ``key``, keeping first-appearance order of keys and items."""
    buckets: dict = {}
    for item in items:
        buckets.setdefault(key(item), []).append(item)
    return buckets


class _Allocator:
    """Hands out aligned spans; the buffer sizes are known once every span is taken."""

    def __init__(self) -> None:
        self.sizes: dict[torch.dtype, int] = {}

    def take(self, dtype: torch.dtype, numel: int) -> Span:
        start = self.sizes.get(dtype, 0)
        self.sizes[dtype] = start + aligned_numel(numel)
        return Span(start, numel)

    def position(self, dtype: torch.dtype) -> int:
        return self.sizes.get(dtype, 0)


def _zeros(sizes: dict[torch.dtype, int], device: torch.device) -> dict[torch.dtype, torch.Tensor]:
    return {dtype: torch.zeros(size, dtype=dtype, device=device) for dtype, size in sizes.items()}


class FlatStore:
    """Parameters, grads and masters of ``groups`` in flat buffers (see module docstring).

    ``master_dtype_of(p)`` gives the dtype of ``p``'s master copy; ``p`` is shadowed (gets
    a separate master) when that differs from ``p.dtype``.
    """

    grads_are_views = True  # every .grad is a view into a flat buffer (see restore_grad_views)

    def __init__(self, groups: list[dict], master_dtype_of: MasterDtypeRule) -> None:
        self.model_params = [p for group in groups for p in group["params"]]
        self._device = self.model_params[0].device if self.model_params else torch.device("cpu")
        masters, models = _Allocator(), _Allocator()
        self._slots: list[_Slot] = []
        self._links: list[_Link] = []
        self._own_spans: list[tuple[torch.dtype, Span]] = []
        group_spans = [self._plan_group(group, master_dtype_of, masters, models) for group in groups]
        self._slot_by_id = {id(slot.param): slot for slot in self._slots}

        self.master_data = _zeros(masters.sizes, self._device)
        self.master_grad = _zeros(masters.sizes, self._device)
        self.model_data = _zeros(models.sizes, self._device)
        self.model_grad = _zeros(models.sizes, self._device)
        self._views = self._bind_params()
        # Built once: taking a view each step costs operator calls too.
        self._grad_links = [link.views(self.master_grad, self.model_grad) for link in self._links]
        self._data_links = [link.views(self.master_data, self.model_data) for link in self._links]
        self.optimizer_groups = [
            self._optimizer_group(group, spans) for group, spans in zip(groups, group_spans)
        ]
        self._warned_repair = False

    # ----------------------------------------------------------------- layout
    def _plan_group(
        self, group: dict, master_dtype_of: MasterDtypeRule, masters: _Allocator, models: _Allocator
    ) -> list[tuple[torch.dtype, Span]]:
        spans = []
        for master_dtype, params in bucket_by(group["params"], master_dtype_of).items():
            begin = masters.position(master_dtype)
            shadowed = [p for p in params if p.dtype != master_dtype]
            for model_dtype, run in bucket_by(shadowed, lambda p: p.dtype).items():
                self._plan_shadowed_run(run, master_dtype, model_dtype, masters, models)
            own = [p for p in params if p.dtype == master_dtype]
            own_begin = masters.position(master_dtype)
            for p in own:
                self._slots.append(_Slot(p, master_dtype, masters.take(master_dtype, p.numel())))
            if own:
                own_end = masters.position(master_dtype)
                self._own_spans.append((master_dtype, Span(own_begin, own_end - own_begin)))
            spans.append((master_dtype, Span(begin, masters.position(master_dtype) - begin)))
        return spans

    def _plan_shadowed_run(
        self,
        run: list[torch.nn.Parameter],
        master_dtype: torch.dtype,
        model_dtype: torch.dtype,
        masters: _Allocator,
        models: _Allocator,
    ) -> None:
        # Both allocators advance by the same aligned sizes, so the run is one span in each.
        master_begin, model_begin = masters.position(master_dtype), models.position(model_dtype)
        for p in run:
            master = masters.take(master_dtype, p.numel())
            model = models.take(model_dtype, p.numel())
            self._slots.append(_Slot(p, master_dtype, master, model_dtype, model))
        numel = masters.position(master_dtype) - master_begin
        self._links.append(
            _Link(model_dtype, Span(model_begin, numel), master_dtype, Span(master_begin, numel))
        )

    @torch.no_grad()
    def _bind_params(self) -> list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]:
        """Copy every parameter into its spans and re-point ``.data``/``.grad`` at them."""
        views = []
        for slot in self._slots:
            p = slot.param
            master_view = slot.master.of(self.master_data[slot.master_dtype]).view(p.shape)
            master_view.copy_(p.data)
            data_view = master_view
            grad_view = slot.master.of(self.master_grad[slot.master_dtype]).view(p.shape)
            if slot.model is not None:
                data_view = slot.model.of(self.model_data[slot.model_dtype]).view(p.shape)
                data_view.copy_(p.data)
                grad_view = slot.model.of(self.model_grad[slot.model_dtype]).view(p.shape)
            if p.grad is not None:
                grad_view.copy_(p.grad)
            p.data = data_view
            p.grad = grad_view
            views.append((p, data_view, grad_view))
        return views

    def _optimizer_group(self, group: dict, spans: list[tuple[torch.dtype, Span]]) -> dict:
        flats = []
        for dtype, span in spans:
            flat = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=self._device))
            flat.data = span.of(self.master_data[dtype])
            flat.grad = span.of(self.master_grad[dtype])
            flats.append(flat)
        options = {key: value for key, value in group.items() if key != "params"}
        return {**options, "params": flats}

    # ------------------------------------------------------------- per step
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the grad buffers in place; ``set_to_none`` is ignored (grads must stay views).

        Only what backward writes is zeroed: the masters of shadowed parameters are
        overwritten by ``gather``.
        """
        del set_to_none
        for buffer in self.grad_buffers():
            buffer.zero_()
        for p, _, grad_view in self._views:
            if p.grad is not grad_view:
                p.grad = grad_view

    @torch.no_grad()
    def restore_grad_views(self) -> bool:
        """Point every ``.grad`` back at its view; True if any had been replaced.

        A grad set to None counts as zero (``nn.Module.zero_grad``, which the HF Trainer
        calls after each step: then all are None and the buffers are zeroed in one go);
        a fresh grad tensor is copied into its view.
        """
        stray = [(p, view) for p, _, view in self._views if p.grad is not view]
        if not stray:
            return False
        if len(stray) == len(self._views) and all(p.grad is None for p, _ in stray):
            self.zero_grad()
            return True
        for p, view in stray:
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view
        return True

    @torch.no_grad()
    def gather(self) -> None:
        """Make the master grads hold this step's grads (copy half grads up under O2)."""
        self._check_data_views()
        self._repair_grad_views()
        for master, model in self._grad_links:
            master.copy_(model)

    def master_grads(self) -> list[torch.Tensor]:
        """The flat master grad buffers, one per master dtype."""
        return list(self.master_grad.values())

    @torch.no_grad()
    def publish(self) -> None:
        """Copy the stepped masters back into the half model weights."""
        for master, model in self._data_links:
            model.copy_(master)

    def grad_buffers(self) -> list[torch.Tensor]:
        """The flat tensors backward accumulates into (what a DDP all-reduce must cover)."""
        if not self._links:
            return list(self.master_grad.values())
        own = [span.of(self.master_grad[dtype]) for dtype, span in self._own_spans]
        return [*self.model_grad.values(), *own]

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The master weight of ``param`` (a view of the master buffer, in ``param``'s shape)."""
        slot = self._slot_by_id.get(id(param))
        if slot is None or slot.param is not param:
            raise KeyError("parameter is not managed by this store")
        return slot.master.of(self.master_data[slot.master_dtype]).view(param.shape)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"master_data": {str(dtype): buf for dtype, buf in self.master_data.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["master_data"]
        if set(saved) != {str(dtype) for dtype in self.master_data}:
            raise ValueError(f"master buffers {sorted(saved)} do not match this layout")
        for dtype, buffer in self.master_data.items():
            source = saved[str(dtype)]
            if source.shape != buffer.shape:
                raise ValueError(
                    f"master buffer {dtype} has {source.numel()} elements, this layout has "
                    f"{buffer.numel()}: the checkpoint comes from a different model or grouping"
                )
            buffer.copy_(source)
        self.publish()

    # ------------------------------------------------------------ integrity
    def _check_data_views(self) -> None:
        for p, data_view, _ in self._views:
            if p.data_ptr() != data_view.data_ptr():
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} no longer lives in its flat buffer "
                    "(was the model moved or cast after the optimizer was built?)"
                )

    def _repair_grad_views(self) -> None:
        # Something replaced grad views after the last forward, so autograd wrote this
        # step's grads into fresh tensors: copy them back (one copy per parameter).
        if self.restore_grad_views() and not self._warned_repair:
            logger.warning(
                "combine_grad: .grad was reset between forward and step; copied back into the "
                "flat buffer. Zero grads with optimizer.zero_grad() or guard_grad_views(model)."
            )
            self._warned_repair = True
