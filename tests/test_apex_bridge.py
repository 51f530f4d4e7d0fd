"""The apex backend's wiring, against a stand-in ``apex.amp`` (no apex with amp installs here).

The stand-in does what apex's amp promises at the interface the suite uses and records the
calls: ``initialize`` gets the O-level and loss scale and, like apex, replaces the optimizer's
``zero_grad`` by one without arguments and builds scalers with a fixed growth window
(``_scale_seq_len``); ``scale_loss`` multiplies the loss by the scale and, unless
``delay_unscale``, divides the accumulated grads back when it exits. With the
model left in fp32, a run through it must then equal a plain fp32 run (a power-of-two scale is
exact), which checks that the Trainer scales, unscales, clips and steps once per micro-batch and
step, in that order.
"""

import logging
import sys
import textwrap

import pytest
import torch

from conftest import read_json
from amp_cases import losses, make_trainer

FAKE_AMP = '''
import contextlib
import types

import torch

calls = []
_amp_state = types.SimpleNamespace(loss_scalers=[])


class _Scaler:
    _has_overflow = False

    def __init__(self, scale):
        self._scale = scale
        self._scale_seq_len = 2000  # apex's window: initialize has no option for it

    def loss_scale(self):
        return self._scale


def initialize(model, optimizer, opt_level, loss_scale, **options):
    calls.append(("initialize", opt_level, loss_scale, options))
    _amp_state.loss_scalers[:] = [_Scaler(2.0 ** 16 if loss_scale == "dynamic" else float(loss_scale))]

    def zero_grad():  # apex's patched zero_grad takes no arguments
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    optimizer.zero_grad = zero_grad
    if opt_level in ("O2", "O3"):  # apex casts every floating argument to half (the model stays fp32 here)
        forward = model.forward

        def half_inputs(*args, **kwargs):
            cast = {key: value.half() if torch.is_tensor(value) and value.is_floating_point() else value
                    for key, value in kwargs.items()}
            return forward(*args, **cast)

        model.forward = half_inputs
    return model, optimizer


def master_params(optimizer):
    for group in optimizer.param_groups:
        yield from group["params"]


@contextlib.contextmanager
def scale_loss(loss, optimizer, delay_unscale=False):
    scale = _amp_state.loss_scalers[0].loss_scale()
    yield loss * scale
    calls.append(("scale_loss", delay_unscale))
    if not delay_unscale:
        for param in master_params(optimizer):
            if param.grad is not None:
                param.grad.div_(scale)


def state_dict():
    return {"scale": _amp_state.loss_scalers[0].loss_scale()}


def load_state_dict(state):
    _amp_state.loss_scalers[0]._scale = state["scale"]
'''


@pytest.fixture
def fake_apex(tmp_path, monkeypatch):
    package = tmp_path / "site" / "apex"
    (package / "amp").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "amp" / "__init__.py").write_text(textwrap.dedent(FAKE_AMP))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    for name in [name for name in sys.modules if name == "apex" or name.startswith("apex.")]:
        del sys.modules[name]  # later tests in this process must not see an apex


def test_auto_takes_apex_and_a_run_through_it_equals_fp32(fake_apex, tmp_path, caplog):
    reference = make_trainer(tmp_path / "fp32", gradient_accumulation_steps=2, max_grad_norm=0.5, max_steps=3)
    reference.train()

    with caplog.at_level(logging.INFO, logger="utils.train.precision"):
        trainer = make_trainer(tmp_path / "apex", fp16=True, gradient_accumulation_steps=2, max_grad_norm=0.5,
                               max_steps=3)
    assert trainer.precision.config.backend == "apex"
    assert "Mixed precision: apex backend, float16 O1, loss scale dynamic" in caplog.text
    trainer.train()

    from apex import amp

    assert amp.calls[0] == ("initialize", "O1", "dynamic", {"min_loss_scale": 1.0})
    # Two micro-batches a step: unscale only when the second one's backward is done.
    assert amp.calls[1:] == [("scale_loss", True), ("scale_loss", False)] * 3
    assert losses(trainer) == pytest.approx(losses(reference), rel=1e-6)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {entry["loss_scale"] for entry in logged} == {2.0**16}
    assert {entry["skipped_steps"] for entry in logged} == {0}
    assert read_json(tmp_path / "apex" / "run_info.json")["precision_backend"] == "apex"


def test_combine_grad_is_passed_to_apex_and_native_can_be_forced(fake_apex, tmp_path):
    trainer = make_trainer(tmp_path / "apex", fp16=True, fp16_opt_level="O2", use_combine_grad=True,
                           loss_scale="128", max_steps=1)
    trainer.train()
    from apex import amp

    assert amp.calls[0] == ("initialize", "O2", 128.0, {"min_loss_scale": 1.0, "combine_grad": True})
    assert make_trainer(tmp_path / "native", fp16=True, amp_backend="native").precision.config.backend == "native"
    # apex's amp does fp16 only: bf16 stays native even with apex installed.
    assert make_trainer(tmp_path / "bf16", bf16=True).precision.config.backend == "native"


# ----------------------------------------------------------- where apex needs care
def test_zero_grad_works_with_apexs_argument_free_zero_grad(fake_apex, tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", max_steps=1)
    trainer.train()
    params = [p for group in trainer.precision.optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.ones_like(param)
    trainer.precision.optimizer.zero_grad(set_to_none=True)  # what the Trainer's interface passes
    assert all(param.grad is None for param in params)


def test_loss_scale_window_and_floor_reach_apex(fake_apex, tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", loss_scale_window=7, min_loss_scale=4.0,
                           max_steps=1)
    trainer.train()
    from apex import amp

    assert amp._amp_state.loss_scalers[0]._scale_seq_len == 7
    assert amp.calls[0][3]["min_loss_scale"] == 4.0


def test_combine_grad_goes_to_apex_at_o1_and_o2_only(fake_apex, tmp_path, caplog):
    from apex import amp

    for level, passed in (("O1", True), ("O2", True), ("O3", False)):
        amp.calls.clear()
        make_trainer(tmp_path / level, fp16=True, fp16_opt_level=level, use_combine_grad=True,
                     max_steps=1).train()
        assert ("combine_grad" in amp.calls[0][3]) == passed, level
    assert "apex combines gradients at O1/O2 only" in caplog.text


def test_a_dropped_update_leaves_apexs_grads_in_place(fake_apex, tmp_path):
    from utils.train.stops import drop_update

    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", loss_scale="128", max_steps=1,
                           lr_scheduler_type="constant")
    trainer.train()
    params = [p for group in trainer.precision.optimizer.param_groups for p in group["params"]]
    grads = [torch.full_like(param, 0.5) for param in params]
    for param, grad in zip(params, grads):
        param.grad = grad
    before = [param.detach().clone() for param in params]
    drop_update(trainer.model, trainer.optimizer)  # what the non-finite-loss guard calls
    trainer.optimizer.step()
    assert all(param.grad is grad for param, grad in zip(params, grads))  # Ascend's shared storage survives
    assert all(torch.equal(param, old) for param, old in zip(params, before))
    assert trainer.precision.optimizer.step_was_skipped
    trainer.optimizer.step()  # the next step is a real one again
    assert not all(torch.equal(param, old) for param, old in zip(params, before))


def test_apex_and_native_optimizers_offer_the_same_interface():
    from utils.amp.optimizer import AmpOptimizer, MixedPrecisionOptimizer
    from utils.amp.apex_bridge import ApexAmpOptimizer

    members = [name for name in vars(AmpOptimizer) if not name.startswith("_")] + ["step_was_skipped"]
    assert {"backward", "drop_update", "logs", "sync_masters", "clip_grad_norm"} <= set(members)
    for cls in (MixedPrecisionOptimizer, ApexAmpOptimizer):
        missing = [name for name in members if name != "step_was_skipped" and not hasattr(cls, name)]
        assert not missing, (cls.__name__, missing)


def test_a_token_count_past_fp16s_range_reaches_the_model_whole(fake_apex, tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", max_steps=1)
    trainer.train()
    batch = {"input_ids": torch.arange(32)[None] % 128, "labels": torch.arange(32)[None] % 128}
    count = torch.tensor(8 * 8 * 2 * 1023) / 1  # the Trainer's float count of a big accumulated batch
    with torch.no_grad():
        loss = trainer.model(**batch, num_items_in_batch=count).loss
        summed = trainer.model(**batch).loss * 31  # the mean over the 31 targets, summed
    assert loss.item() == pytest.approx(summed.item() / count.item(), rel=1e-6)
