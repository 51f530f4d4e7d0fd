"""The apex backend's wiring, against a stand-in ``apex.amp`` (no apex with amp installs here).

The stand-in does what apex's amp promises at the interface the suite uses and records the
calls: ``initialize`` gets the O-level and loss scale, ``scale_loss`` multiplies the loss by the
scale and, unless ``delay_unscale``, divides the accumulated grads back when it exits. With the
model left in fp32, a run through it must then equal a plain fp32 run (a power-of-two scale is
exact), which checks that the Trainer scales, unscales, clips and steps once per micro-batch and
step, in that order.
"""

import logging
import sys
import textwrap

import pytest

from conftest import read_json
from test_amp_trainer import losses, make_trainer

FAKE_AMP = '''
import contextlib
import types

calls = []
_amp_state = types.SimpleNamespace(loss_scalers=[])


class _Scaler:
    _has_overflow = False

    def __init__(self, scale):
        self._scale = scale

    def loss_scale(self):
        return self._scale


def initialize(model, optimizer, opt_level, loss_scale, **options):
    calls.append(("initialize", opt_level, loss_scale, options))
    _amp_state.loss_scalers[:] = [_Scaler(2.0 ** 16 if loss_scale == "dynamic" else float(loss_scale))]
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

    with caplog.at_level(logging.INFO, logger="utils.amp_trainer"):
        trainer = make_trainer(tmp_path / "apex", fp16=True, gradient_accumulation_steps=2, max_grad_norm=0.5,
                               max_steps=3)
    assert trainer.amp_backend == "apex"
    assert "Mixed precision: apex backend, float16 O1, loss scale dynamic" in caplog.text
    trainer.train()

    from apex import amp

    assert amp.calls[0] == ("initialize", "O1", "dynamic", {})
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

    assert amp.calls[0] == ("initialize", "O2", 128.0, {"combine_grad": True})
    assert make_trainer(tmp_path / "native", fp16=True, amp_backend="native").amp_backend == "native"
    # apex's amp does fp16 only: bf16 stays native even with apex installed.
    assert make_trainer(tmp_path / "bf16", bf16=True).amp_backend == "native"
