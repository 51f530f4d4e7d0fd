"""Mixed-precision runs that once gave a wrong model without any error, one test each.

In-process LMTrainer runs on the tiny models of ``amp_cases`` and ``test_amp_trainer``; the
non-finite losses come from the test-only fault plugin (tests/fault_plugin/sitecustomize.py).
"""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM, TrainerCallback

from amp_cases import family_trainer, logged, mlm_samples, stack
from amp_cases import make_trainer, poison_grads_at
from utils.amp.casting import autocast_context, is_norm_module, prepare_model
from utils.amp.config import AmpConfig
from utils.amp.optimizer import MixedPrecisionOptimizer
from utils.amp.scaler import LossScaler
from utils.amp.weights import fp32_state_dict
from utils.flags.arguments import LMTrainingArguments
from utils.errors import TrainingStopped, UsageError
from fault_plugin.sitecustomize import _make_callback_class
from utils.train.stops import NonFiniteLossCallback, find_callback, stop_reason

FP16, BF16 = torch.float16, torch.bfloat16


class Snapshots(TrainerCallback):
    """The fp32 weights (the masters) after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.taken = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.taken.append(fp32_state_dict(self.trainer.model, self.trainer.precision.optimizer))


def nan_loss_at(step: int, trainer, monkeypatch) -> None:
    """The model's loss is NaN in optimizer step ``step`` of this in-process trainer."""
    monkeypatch.setenv("LM_FAULT_PLAN", f"nan_loss@{step}")
    trainer.add_callback(_make_callback_class()(trainer))


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


# ------------------------------------------------ a skipped non-finite loss under combine_grad
def test_skipping_a_nonfinite_loss_with_combine_grad_goes_on_training(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, bf16=True, fp16_opt_level="O2", use_combine_grad=True,
                           on_nonfinite_loss="skip", max_steps=5, lr_scheduler_type="constant")
    nan_loss_at(2, trainer, monkeypatch)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    taken = snapshots.taken
    assert find_callback(trainer, NonFiniteLossCallback).skipped_steps == [2]
    assert same(taken[1], taken[0])  # step 2's update was dropped
    for step in (2, 3, 4):  # and every later step moves the masters again
        assert not same(taken[step], taken[step - 1]), step
    assert all(torch.isfinite(tensor).all() for tensor in taken[-1].values())


# ------------------------------------------- fp16 O0: the guard watches what no scaler does
def test_fp16_o0_has_the_nonfinite_loss_guard(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O0", max_steps=4)
    nan_loss_at(2, trainer, monkeypatch)
    trainer.train()
    assert trainer.state.global_step == 2
    stopped = stop_reason(trainer)
    assert stopped is not None and "non-finite loss (NaN or inf) at step 2" in str(stopped)


@pytest.mark.parametrize("flags,skips", [
    ({"fp16": True, "fp16_opt_level": "O2"}, True), ({"fp16": True, "fp16_opt_level": "O0"}, False),
    ({"fp16": True, "fp16_opt_level": "O2", "loss_scale": "128"}, False), ({"bf16": True}, False),
])
def test_the_precision_config_says_who_skips_overflowing_steps(flags, skips, tmp_path):
    trainer = make_trainer(tmp_path, **flags)
    guard = find_callback(trainer, NonFiniteLossCallback)
    assert trainer.precision.config.skips_overflowing_steps == skips
    assert guard.scaler_skips == skips  # the guard stands aside exactly where the scaler skips


# -------------------------------------------------- the best model at the end, under O2
@pytest.mark.parametrize("combine", [True, False], ids=["combined", "per-tensor"])
def test_o2_load_best_model_at_end_saves_the_best_weights(combine, tmp_path):
    # greater_is_better on the eval loss makes the first checkpoint (highest loss) the best one.
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", use_combine_grad=combine, max_steps=4,
                           eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                           load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    trainer.save_model(tmp_path / "final")
    final, best, last = (load_file(path / "model.safetensors")
                         for path in (tmp_path / "final", tmp_path / "checkpoint-1", tmp_path / "checkpoint-4"))
    assert same(final, best)
    assert not same(final, last)


# ------------------------------------------------ combine_grad and non-elementwise optimizers
def test_combine_grad_refuses_an_optimizer_that_looks_at_shapes(tmp_path):
    trainer = make_trainer(tmp_path, bf16=True, fp16_opt_level="O2", use_combine_grad=True, optim="adafactor")
    with pytest.raises(UsageError, match="--use_combine_grad: --optim adafactor") as caught:
        trainer.train()
    assert "\n" not in str(caught.value)
    sgd = make_trainer(tmp_path / "sgd", bf16=True, fp16_opt_level="O2", use_combine_grad=True, optim="sgd",
                       max_steps=2)
    sgd.train()  # elementwise: the flat path stays
    assert all(math.isfinite(loss) for loss in logged(sgd, "loss"))


# ---------------------------------------------------- a half loss times the loss scale
def test_the_loss_scale_multiplies_in_fp32():
    cfg = AmpConfig("O2", FP16)
    model = prepare_model(torch.nn.Linear(2, 2), cfg)
    optimizer = MixedPrecisionOptimizer(model.parameters(), lambda groups: torch.optim.SGD(groups, lr=0.1), cfg)
    scaled = optimizer.scale_loss(torch.tensor(4.5, dtype=FP16))
    assert scaled.dtype == torch.float32 and scaled.item() == 4.5 * 2**16  # 294,912: inf in fp16


@pytest.mark.parametrize("task", ["mlm", "plm"])
def test_roberta_and_xlnet_fp16_steps_are_not_skipped_for_the_scale(task, tmp_path):
    dynamic = family_trainer(task, tmp_path / "dynamic", fp16=True, fp16_opt_level="O2", loss_scale_window=1,
                             max_steps=2)
    dynamic.train()
    assert logged(dynamic, "skipped_steps") == [0, 0]
    assert logged(dynamic, "loss_scale") == [2.0**17, 2.0**18]  # 2**16 doubles after every clean step
    static = family_trainer(task, tmp_path / "static", fp16=True, fp16_opt_level="O2", loss_scale="65536")
    before = {name: p.detach().float().clone() for name, p in static.model.named_parameters()}
    static.train()
    assert logged(static, "skipped_steps") == [0, 0, 0]
    assert not same(before, fp32_state_dict(static.model, static.precision.optimizer))


# ------------------------------------------------------- norm layers are told by type
class ProjectionNorm(torch.nn.Module):  # a container whose name ends in Norm, as DbrxNormAttentionNorm
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


class ToyRMSNorm(torch.nn.Module):  # a model's own norm layer, as LlamaRMSNorm
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))


def test_only_leaf_normalization_layers_count_as_norms():
    assert is_norm_module(torch.nn.LayerNorm(4)) and is_norm_module(ToyRMSNorm())
    assert is_norm_module(torch.nn.BatchNorm1d(4)) and is_norm_module(torch.nn.GroupNorm(2, 4))
    assert not is_norm_module(ProjectionNorm()) and not is_norm_module(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("half", [FP16, BF16], ids=["fp16", "bf16"])
def test_roberta_prelayernorm_runs_at_o2_like_o0(half):
    def model():
        torch.manual_seed(0)
        return RobertaPreLayerNormForMaskedLM(RobertaPreLayerNormConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40, type_vocab_size=1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=1))

    batch = stack(mlm_samples(4, seed=3))
    losses = []
    for cfg in (AmpConfig("O0"), AmpConfig("O2", half)):
        prepared = prepare_model(model(), cfg)
        with autocast_context(cfg, "cpu"):
            loss = prepared(**batch).loss
        loss.float().backward()
        assert all(torch.isfinite(p.grad).all() for p in prepared.parameters() if p.grad is not None)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)  # measured 2e-5 (fp16), 5e-4 (bf16)


# ---------------------------------------------------------------- a floor for the scale
def test_the_loss_scale_never_reaches_zero():
    scaler = LossScaler("dynamic")
    for _ in range(1091):  # enough halvings to reach 0.0 without a floor
        scaler.update(True)
    assert scaler.scale == 1.0 and 1.0 / scaler.scale == 1.0


def test_overflows_that_persist_at_the_floor_stop_training(tmp_path):
    trainer = make_trainer(tmp_path, fp16=True, fp16_opt_level="O2", min_loss_scale=2.0**14, max_steps=20,
                           save_strategy="steps", save_steps=2)
    poison_grads_at(trainer, set(range(100)), math.inf)
    trainer.train()
    stopped = stop_reason(trainer)  # what train_and_save raises: the run's line and exit status
    assert isinstance(stopped, TrainingStopped)
    # 2**16 and 2**15 halve; from 2**14 on five overflows in a row at the floor: steps 3 to 7.
    assert trainer.state.global_step == 7
    message = str(stopped)
    assert stopped.exit_status == 3 and "\n" not in message
    assert message.startswith("error: fp16 gradients overflowed at the minimum loss scale 16384 for 5 steps")
    assert "up to step 7" in message and "checkpoint-6" in message and "--bf16" in message
    assert not (tmp_path / "checkpoint-7").exists()


# ---------------------------------------------------------------------------- O3
def test_fp16_o3_refuses_an_adam_epsilon_that_blows_up():
    with pytest.raises(UsageError, match="--adam_epsilon 1e-08") as caught:
        LMTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", fp16=True, fp16_opt_level="O3")
    assert "--adam_epsilon 0.0001 or more" in str(caught.value)
    LMTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", bf16=True, fp16_opt_level="O3")


def test_fp16_o3_trains_with_the_smallest_epsilon_it_accepts(tmp_path):
    reference = make_trainer(tmp_path / "fp32", adam_epsilon=1e-4)
    reference.train()
    trainer = make_trainer(tmp_path / "o3", fp16=True, fp16_opt_level="O3", adam_epsilon=1e-4)
    trainer.train()
    losses = logged(trainer, "loss")
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert losses == pytest.approx(logged(reference, "loss"), rel=1e-2)  # measured 2.1e-3; eps 1e-8: 7.5e-2
