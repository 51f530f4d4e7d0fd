"""The one clock behind every speed figure: warm-up left out, saves and evaluations paused, one definition."""

from types import SimpleNamespace

import pytest

import utils.report.speed as speed

ARGS = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2)  # 16 per step


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(speed.time, "perf_counter", fake)
    return fake


def control(save=False, evaluate=False):
    return SimpleNamespace(should_save=save, should_evaluate=evaluate)


def step(callback, clock, seconds, **pause):
    clock.now += seconds
    callback.on_step_end(ARGS, None, control(**pause))


def tiny_model(n_params: int, layers: int, width: int):
    import torch

    model = torch.nn.Linear(n_params, 1, bias=False)
    model.config = SimpleNamespace(num_hidden_layers=layers, hidden_size=width)
    return model


def test_fps_leaves_out_the_warm_up_and_the_time_spent_saving_and_evaluating(clock):
    callback = speed.SpeedCallback(warmup_steps=2, tokens_per_sample=128)
    step(callback, clock, 30)  # slow first steps: not timed
    step(callback, clock, 20)
    step(callback, clock, 2, save=True, evaluate=True)
    clock.now += 50  # the evaluation
    callback.on_evaluate(ARGS, None, None)
    clock.now += 40  # the checkpoint that follows it
    callback.on_save(ARGS, None, None)
    step(callback, clock, 2)
    step(callback, clock, 2, evaluate=True)
    clock.now += 9
    callback.on_evaluate(ARGS, None, None)
    callback.on_train_end(ARGS, None, None)

    metrics = callback.metrics(ARGS, tiny_model(10, 1, 8))
    # 3 timed steps of 16 samples in 6 training seconds
    assert metrics["fps"] == pytest.approx(8.0)
    assert metrics["fps_tokens_per_second"] == pytest.approx(8.0 * 128)
    assert "mfu" not in metrics  # no known peak for this device


def test_logged_tokens_per_second_is_the_same_figure_over_the_steps_since_the_last_log(clock):
    callback = speed.SpeedCallback(warmup_steps=0, tokens_per_sample=64)
    step(callback, clock, 4)
    step(callback, clock, 4, save=True)
    clock.now += 100  # saving: not training time
    callback.on_save(ARGS, None, None)
    assert callback.since_last_log(ARGS) == {"tokens_per_second": pytest.approx(2 * 16 * 64 / 8)}
    step(callback, clock, 2)
    assert callback.since_last_log(ARGS) == {"tokens_per_second": pytest.approx(16 * 64 / 2)}
    callback.on_train_end(ARGS, None, None)
    # With no warm-up, the final figure covers the same steps as the logs together.
    assert callback.metrics(ARGS, tiny_model(10, 1, 8))["fps_tokens_per_second"] == pytest.approx(3 * 16 * 64 / 10)


def test_too_few_steps_give_no_fps(clock):
    callback = speed.SpeedCallback(warmup_steps=5, tokens_per_sample=64)
    for _ in range(5):
        step(callback, clock, 1)
    callback.on_train_end(ARGS, None, None)
    assert callback.metrics(ARGS, tiny_model(10, 1, 8)) == {}


def test_mfu_on_a_device_whose_peak_is_known(clock, monkeypatch):
    monkeypatch.setattr(speed, "_PEAK_FLOPS", (("Test Accelerator", 1e7),))
    callback = speed.SpeedCallback(warmup_steps=0, tokens_per_sample=100, device_name="The Test Accelerator X")
    step(callback, clock, 1)
    callback.on_train_end(ARGS, None, None)
    metrics = callback.metrics(ARGS, tiny_model(1000, 2, 32))
    tokens_per_second = 16 * 100
    flops_per_token = 6 * 1000 + 12 * 2 * 32 * 100
    assert metrics["mfu"] == pytest.approx(tokens_per_second * flops_per_token / (1e7 * 2), abs=1e-4)  # 2 devices


def test_peak_flops_takes_the_most_specific_name():
    # The PCIe part is slower than the SXM one whose name it contains; CPUs have none.
    assert speed.peak_flops("NVIDIA H100 PCIe") < speed.peak_flops("NVIDIA H100 80GB HBM3")
    assert speed.peak_flops("cpu") is None and speed.peak_flops("Some Future Accelerator") is None
