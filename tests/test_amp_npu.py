"""Overflow on Ascend NPUs in saturation mode (910A/910ProB), against a stand-in ``torch_npu``.

There, an overflowing fp16 value saturates to the largest finite number instead of becoming inf,
so the gradients look clean; the hardware sets a global float-status flag instead. The stand-in
keeps that flag: ``clear_npu_overflow_flag`` resets it and ``npu_check_overflow`` reads it. The
optimizer must clear it before the first backward of each step (not before every micro-batch),
read it at the check, and skip the step when any process saw an overflow.
"""

import sys
import types

import pytest
import torch

from utils.amp.casting import prepare_model
from utils.amp.config import AmpConfig
from utils.amp.optimizer import MixedPrecisionOptimizer
from utils.amp.scaler import InfNanCheck, SaturationFlagCheck, overflow_check_for


class FakeNpuUtils:
    def __init__(self, supports_inf_nan: bool = False):
        self.flag = False
        self.supports_inf_nan = supports_inf_nan

    def is_support_inf_nan(self) -> bool:
        return self.supports_inf_nan

    def clear_npu_overflow_flag(self) -> None:
        self.flag = False

    def npu_check_overflow(self, grads) -> bool:
        return self.flag


@pytest.fixture
def fake_torch_npu(monkeypatch):
    def install(utils: FakeNpuUtils) -> None:
        package, npu = types.ModuleType("torch_npu"), types.ModuleType("torch_npu.npu")
        module = types.ModuleType("torch_npu.npu.utils")
        for name in ("is_support_inf_nan", "clear_npu_overflow_flag", "npu_check_overflow"):
            setattr(module, name, getattr(utils, name))
        package.npu, npu.utils = npu, module
        for name, value in (("torch_npu", package), ("torch_npu.npu", npu), ("torch_npu.npu.utils", module)):
            monkeypatch.setitem(sys.modules, name, value)

    return install


def test_the_flag_register_is_read_only_where_the_device_saturates(fake_torch_npu):
    npu = types.SimpleNamespace(type="npu")
    assert isinstance(overflow_check_for(torch.device("cpu")), InfNanCheck)
    fake_torch_npu(FakeNpuUtils(supports_inf_nan=True))  # 910B and later compute with inf/NaN
    assert isinstance(overflow_check_for(npu), InfNanCheck)
    fake_torch_npu(FakeNpuUtils(supports_inf_nan=False))
    assert isinstance(overflow_check_for(npu), SaturationFlagCheck)
    assert isinstance(overflow_check_for(torch.device("cpu")), InfNanCheck)


def build(utils: FakeNpuUtils, others_overflowed: bool = False, check=None):
    cfg = AmpConfig("O2", torch.float16)
    torch.manual_seed(0)
    model = prepare_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)), cfg)
    check = check or SaturationFlagCheck(utils, reduce_max=lambda found, device: found or others_overflowed)
    optimizer = MixedPrecisionOptimizer(model.parameters(), lambda groups: torch.optim.SGD(groups, lr=0.1), cfg,
                                        overflow_check=check)
    return model, optimizer


def micro_batch(model, optimizer) -> None:
    loss = model(torch.ones(2, 4)).float().pow(2).mean()
    optimizer.scale_loss(loss).backward()


def step(model, optimizer, utils: FakeNpuUtils, overflow_in: int | None = None, micro_batches: int = 2) -> bool:
    """One optimizer step; the stand-in's flag is raised during micro-batch ``overflow_in``."""
    for index in range(micro_batches):
        micro_batch(model, optimizer)
        if index == overflow_in:
            utils.flag = True
    optimizer.step()
    optimizer.zero_grad()
    return optimizer.step_was_skipped


def test_a_stale_flag_does_not_skip_a_step_and_any_micro_batch_counts():
    utils = FakeNpuUtils()
    model, optimizer = build(utils)
    utils.flag = True  # left over from the previous step's optimizer math, or an evaluation
    assert not step(model, optimizer, utils)
    assert step(model, optimizer, utils, overflow_in=0)  # the first of two micro-batches overflowed
    assert optimizer.scaler.scale == 2.0**15 and optimizer.scaler.skipped_steps == 1
    assert not step(model, optimizer, utils)  # cleared before the next step's first backward
    assert step(model, optimizer, utils, overflow_in=1)


def test_every_process_skips_when_one_overflowed():
    utils = FakeNpuUtils()
    model, optimizer = build(utils, others_overflowed=True)
    before = [p.detach().clone() for p in model.parameters()]
    assert step(model, optimizer, utils)  # this process saw nothing, another one did
    assert all(torch.equal(p, old) for p, old in zip(model.parameters(), before))


def test_without_overflow_the_grads_are_unscaled_as_by_the_inf_nan_kernel():
    runs = []
    for check in (None, InfNanCheck()):
        model, optimizer = build(FakeNpuUtils(), check=check)
        micro_batch(model, optimizer)
        runs.append(optimizer.clip_grad_norm(float("inf")))
    assert runs[0] > 0 and torch.equal(runs[0], runs[1])


# ------------------------------------------------ --optim adamw_torch_npu_fused, against a stand-in
class StandInNpuFusedAdamW(torch.optim.AdamW):
    """What torch_npu's NpuFusedAdamW does with grads: at the first step it copies them into one
    combined buffer and re-points every ``.grad`` at it, then steps through those tensors only; it
    refuses ``zero_grad(set_to_none=True)`` and bf16 parameters."""

    __module__ = "torch_npu.optim.npu_fused_adamw"

    def __init__(self, params, **kwargs):
        super().__init__(params, **{**kwargs, "foreach": False})
        self.combined = None

    def zero_grad(self, set_to_none: bool = False):
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        super().zero_grad(set_to_none=False)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if any(p.dtype == torch.bfloat16 for p in params):
            raise TypeError("NpuFusedAdamW does not support bfloat16 parameters")
        if self.combined is None:
            self.combined = torch.cat([p.grad.reshape(-1) for p in params])
            for p, view in zip(params, self.combined.split([p.numel() for p in params])):
                p.grad = view.view_as(p)
            self.views = [p.grad for p in params]
        for p, view in zip(params, self.views):
            p.grad = view  # the combined buffer, whatever autograd wrote since
        return super().step(closure)


@pytest.fixture
def stand_in_npu_optim(monkeypatch):
    """Installs the stand-in once the trainer is built: accelerate's device probes must still find no NPU."""
    def install() -> None:
        package, optim = types.ModuleType("torch_npu"), types.ModuleType("torch_npu.optim")
        optim.NpuFusedAdamW = StandInNpuFusedAdamW
        package.optim = optim
        monkeypatch.setitem(sys.modules, "torch_npu", package)
        monkeypatch.setitem(sys.modules, "torch_npu.optim", optim)

    return install


def test_npu_fused_adamw_under_the_trainer_trains_as_adamw(stand_in_npu_optim, tmp_path):
    from amp_cases import losses, make_trainer

    reference = make_trainer(tmp_path / "adamw", optim="adamw_torch", max_steps=4)
    reference.train()
    fused = make_trainer(tmp_path / "npu", optim="adamw_torch_npu_fused", max_steps=4)
    stand_in_npu_optim()
    fused.train()
    assert type(fused.optimizer.optimizer) is StandInNpuFusedAdamW
    assert losses(fused) == pytest.approx(losses(reference), rel=1e-5)


def test_npu_fused_adamw_refuses_bf16_weights_before_the_first_step(stand_in_npu_optim, tmp_path):
    from amp_cases import make_trainer, tiny_model
    from utils.errors import UsageError

    trainer = make_trainer(tmp_path, model=tiny_model().to(torch.bfloat16), optim="adamw_torch_npu_fused")
    stand_in_npu_optim()
    with pytest.raises(UsageError, match=r"^--optim adamw_torch_npu_fused: torch_npu's fused optimizers refuse bf16"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_npu_fused_adamw_under_mixed_precision_is_refused(stand_in_npu_optim, tmp_path):
    from amp_cases import make_trainer
    from utils.errors import UsageError

    trainer = make_trainer(tmp_path, bf16=True, fp16_opt_level="O2", optim="adamw_torch_npu_fused")
    stand_in_npu_optim()
    with pytest.raises(UsageError, match=r"^--optim adamw_torch_npu_fused: .* --optim adamw_torch --use_combine_grad"):
        trainer.train()
    assert trainer.state.global_step == 0
