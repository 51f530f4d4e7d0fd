"""Mixed-precision O-levels, loss scaling and combined gradients (utils.amp.optimizer, utils.amp.combine_grad).

A tiny GPT-2 (2 layers, width 64, vocab 256, dropout off) trains on four fixed batches
of a learnable token pattern with a hand-written loop; every run is deterministic.
AdamW uses eps=1e-3 throughout: with fp16 O3 the second moments live in fp16 and
underflow, and a tiny eps then blows the update up (apex's caveat for O3).
"""

from __future__ import annotations

import math

import pytest

import utils  # noqa: F401  (sets the torch backend autoload switch before torch loads)
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from utils.amp.casting import autocast_context, prepare_model
from utils.amp.config import AmpConfig, parse_loss_scale
from utils.amp.optimizer import MixedPrecisionOptimizer, implementation, with_multi_tensor_kernel
from utils.amp.scaler import LossScaler
from utils.amp.weights import fp32_state_dict
from utils.errors import UsageError

FP16, BF16 = torch.float16, torch.bfloat16
VOCAB, SEQ, BATCH = 256, 16, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The suite shares 2 cores with other work; one thread avoids OpenMP spin contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def make_batches(count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, VOCAB, (count, BATCH, 1), generator=generator)
    return list((starts + 7 * torch.arange(SEQ)) % VOCAB)


BATCHES = make_batches()


def param_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "ln_" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "ln_" in n]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=3e-3, eps=1e-3, fused=True)


def build(cfg: AmpConfig, seed: int = 0, scaler: LossScaler | None = None,
          model: torch.nn.Module | None = None):
    model = prepare_model(model if model is not None else make_model(seed), cfg)
    return model, MixedPrecisionOptimizer(param_groups(model), adamw, cfg, scaler)


def backward(model, optimizer, cfg: AmpConfig, step: int, accum: int = 1) -> float:
    total = 0.0
    for micro in range(accum):
        batch = BATCHES[(step * accum + micro) % len(BATCHES)]
        with autocast_context(cfg, "cpu"):
            loss = model(input_ids=batch, labels=batch).loss / accum
        optimizer.scale_loss(loss).backward()
        total += loss.item()
    return total


def train(model, optimizer, cfg: AmpConfig, steps: range, accum: int = 1, max_norm: float | None = None):
    """Returns the losses and the pre-clipping grad norms of ``steps``."""
    losses, norms = [], []
    for step in steps:
        losses.append(backward(model, optimizer, cfg, step, accum))
        if max_norm is not None:
            norms.append(optimizer.clip_grad_norm(max_norm).item())
        optimizer.step()
        optimizer.zero_grad()
    return losses, norms


def masters(optimizer: MixedPrecisionOptimizer) -> list[torch.Tensor]:
    return [optimizer.master_of(p).detach().float().clone() for p in optimizer.model_params]


def snapshot(optimizer: MixedPrecisionOptimizer) -> list[torch.Tensor]:
    return masters(optimizer) + [p.detach().clone() for p in optimizer.model_params]


# ---------------------------------------------------------------- configuration
def test_parse_loss_scale_accepts_dynamic_and_positive_numbers():
    assert parse_loss_scale(" Dynamic ") == "dynamic"
    assert parse_loss_scale("128") == 128.0
    assert parse_loss_scale("0.5") == 0.5


@pytest.mark.parametrize("text", ["0", "-1", "abc", "inf", "nan", ""])
def test_parse_loss_scale_rejects_bad_input(text):
    with pytest.raises(UsageError, match="--loss_scale: loss scale must be 'dynamic' or a positive number"):
        parse_loss_scale(text)


def test_amp_config_validates_naming_the_flags():
    with pytest.raises(UsageError, match="--fp16_opt_level O4: choose one of O0, O1, O2, O3"):
        AmpConfig("O4", FP16)
    with pytest.raises(UsageError, match="--fp16_opt_level O2 needs --fp16 or --bf16"):
        AmpConfig("O2", None)
    with pytest.raises(UsageError, match="--fp16 and --bf16 exclude each other"):
        AmpConfig.from_flags(opt_level="O1", fp16=True, bf16=True)
    cfg = AmpConfig.from_flags(opt_level="O2", fp16=False, bf16=True, loss_scale="64")
    assert (cfg.half_dtype, cfg.loss_scale, cfg.uses_loss_scaling) == (BF16, 64.0, False)
    assert AmpConfig.from_flags(opt_level="O1", fp16=True, bf16=False).uses_loss_scaling
    # The default level lives here, once: --fp16 alone is O1; no half flag is no mixed precision at all.
    assert AmpConfig.from_flags(fp16=True, bf16=False).opt_level == "O1"
    assert AmpConfig.from_flags(fp16=False, bf16=False, opt_level="O0") is None


def dtypes(model: torch.nn.Module, norms: bool | None = None) -> set[torch.dtype]:
    """Parameter dtypes of the LayerNorms (True), the rest (False) or all (None)."""
    return {p.dtype for n, p in model.named_parameters() if norms is None or ("ln_" in n) == norms}


def test_prepare_model_casts_per_level():
    assert dtypes(prepare_model(make_model(), AmpConfig("O1", FP16))) == {torch.float32}
    o2 = prepare_model(make_model(), AmpConfig("O2", FP16))
    assert dtypes(o2, norms=True) == {torch.float32}
    assert dtypes(o2, norms=False) == {FP16}
    assert dtypes(prepare_model(make_model(), AmpConfig("O3", BF16))) == {BF16}
    # The norm hooks hand half activations to the half layers after them.
    hidden = o2.transformer(input_ids=BATCHES[0]).last_hidden_state
    assert hidden.dtype == FP16 and torch.isfinite(hidden).all()


# ------------------------------------------------------------------- O-levels
STEPS = 20


@pytest.fixture(scope="module")
def fp32_losses() -> list[float]:
    cfg = AmpConfig("O0")
    model, optimizer = build(cfg)
    return train(model, optimizer, cfg, range(STEPS))[0]


def test_fp32_reference_learns(fp32_losses):
    # The pattern is learnable: without this, "close to O0" would prove little.
    assert fp32_losses[-1] < 0.8 * fp32_losses[0]


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
@pytest.mark.parametrize("half", [FP16, BF16], ids=["fp16", "bf16"])
def test_opt_level_trains_like_fp32(level, half, fp32_losses):
    cfg = AmpConfig(level, half)
    model, optimizer = build(cfg)
    losses = train(model, optimizer, cfg, range(STEPS))[0]
    assert all(math.isfinite(loss) for loss in losses)
    # The mean loss over the last pass through the 4 batches, relative to fp32's (the loss itself
    # falls by ~29%). Measured: fp16 O1 6.3e-6, O2 1.0e-5, O3 7.2e-3; bf16 O1 7.6e-5, O2 1.0e-4,
    # O3 1.06e-2. Tolerances are those with a margin of about 3x (O3 keeps no fp32 copy: 2x).
    tolerance = {"O1": 3e-4, "O2": 3e-4, "O3": 2.5e-2}[level] if half == BF16 else \
        {"O1": 3e-5, "O2": 3e-5, "O3": 2e-2}[level]
    final, reference = sum(losses[-4:]), sum(fp32_losses[-4:])
    assert abs(final - reference) / reference < tolerance
    assert optimizer.scaler.skipped_steps == 0


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_flat_buffers_stepped_by_foreach_match_the_per_tensor_loop(level):
    """The kernel chosen for the flat buffers (foreach on the CPU) against torch's for-loop AdamW."""
    results = {}
    for kernel in ("for-loop", "chosen"):
        cfg = AmpConfig(level, BF16, combine_grad=True)
        kwargs = {"lr": 3e-3, "eps": 1e-3}
        kwargs = {**kwargs, "foreach": False} if kernel == "for-loop" else \
            with_multi_tensor_kernel(torch.optim.AdamW, kwargs, "cpu")
        model = prepare_model(make_model(), cfg)
        optimizer = MixedPrecisionOptimizer(param_groups(model), lambda g: torch.optim.AdamW(g, **kwargs), cfg)
        results[kernel] = (implementation(optimizer), train(model, optimizer, cfg, range(4))[0], masters(optimizer))
    assert (results["for-loop"][0], results["chosen"][0]) == ("for-loop", "foreach")
    assert results["chosen"][1] == pytest.approx(results["for-loop"][1], rel=1e-6)
    # foreach and the loop do the same fp32 arithmetic in a different order: a few ulps apart at most.
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(results["chosen"][2], results["for-loop"][2]))


def test_fused_is_kept_and_cuda_gets_fused():
    assert with_multi_tensor_kernel(torch.optim.AdamW, {"fused": True}, "cpu") == {"fused": True}
    assert with_multi_tensor_kernel(torch.optim.AdamW, {}, "cuda") == {"fused": True}
    assert with_multi_tensor_kernel(torch.optim.Adagrad, {}, "cuda") == {"foreach": True}
    assert with_multi_tensor_kernel(torch.optim.AdamW, {}, "npu") == {}


# ------------------------------------------------------------ combined gradients
def combined_vs_per_tensor(level: str, half: torch.dtype, max_norm: float | None):
    results = {}
    for combine in (False, True):
        cfg = AmpConfig(level, half, combine_grad=combine)
        model, optimizer = build(cfg)
        _, norms = train(model, optimizer, cfg, range(6), accum=2, max_norm=max_norm)
        results[combine] = (masters(optimizer), [p.detach().clone() for p in model.parameters()], norms)
    return results[False], results[True]


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_combine_grad_is_bitwise_identical_without_clipping(level):
    (masters_a, params_a, _), (masters_b, params_b, _) = combined_vs_per_tensor(level, FP16, None)
    assert all(torch.equal(a, b) for a, b in zip(masters_a, masters_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_combine_grad_matches_with_clipping(level):
    max_norm = 0.3
    (masters_a, _, norms_a), (masters_b, _, norms_b) = combined_vs_per_tensor(level, FP16, max_norm)
    assert min(norms_a) > 2 * max_norm  # clipping really scales the grads down
    # The flat norm sums in another order than per-tensor norms: first-step norms agree to
    # 2e-5 relative (measured 3e-6), and after 6 steps the fp32 masters to 5e-5 absolute
    # (measured 1.2e-5; one step moves them by up to 3e-3).
    assert norms_a[0] == pytest.approx(norms_b[0], rel=2e-5)
    assert max((a - b).abs().max().item() for a, b in zip(masters_a, masters_b)) < 5e-5


@pytest.mark.parametrize("combine", [False, True], ids=["per_tensor", "combined"])
def test_clip_grad_norm_clips_master_grads_to_max_norm(combine):
    cfg = AmpConfig("O2", FP16, combine_grad=combine)
    model, optimizer = build(cfg)
    backward(model, optimizer, cfg, step=0)
    total = optimizer.clip_grad_norm(0.25)
    # The inner optimizer's parameters are the masters (flat ones when combined).
    master_grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]
    clipped = torch.linalg.vector_norm(torch.cat(master_grads))
    assert len(master_grads) == (2 if combine else len(optimizer.model_params))
    assert total.item() > 0.5
    assert clipped.item() == pytest.approx(0.25, rel=1e-4)


def test_combined_grads_are_views_of_the_grad_buffers():
    cfg = AmpConfig("O2", FP16, combine_grad=True)
    model, optimizer = build(cfg)
    views = [p.grad for p in optimizer.model_params]
    optimizer.zero_grad(set_to_none=True)  # ignored: zeroes in place
    backward(model, optimizer, cfg, step=0)
    assert all(p.grad is view for p, view in zip(optimizer.model_params, views))
    expected = sum(p.grad.float().pow(2).sum() for p in optimizer.model_params)
    flat = sum(buffer.float().pow(2).sum() for buffer in optimizer.grad_buffers())
    assert expected > 0 and flat.item() == pytest.approx(expected.item(), rel=1e-6)


def test_trainer_style_model_zero_grad_with_guard_matches_optimizer_zero_grad(caplog):
    # The HF Trainer zeroes with model.zero_grad() (grads -> None) after every step.
    cfg = AmpConfig("O2", FP16, combine_grad=True)
    runs = []
    for trainer_style in (False, True):
        model, optimizer = build(cfg)
        views = [p.grad for p in optimizer.model_params]
        if trainer_style:
            optimizer.guard_grad_views(model)
            model.zero_grad()
        for step in range(3):
            backward(model, optimizer, cfg, step, accum=2)
            assert all(p.grad is view for p, view in zip(optimizer.model_params, views))
            optimizer.clip_grad_norm(0.5)
            optimizer.step()
            model.zero_grad() if trainer_style else optimizer.zero_grad()
        runs.append(snapshot(optimizer))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert "combine_grad" not in caplog.text


def test_grads_reset_after_forward_are_copied_back(caplog):
    cfg = AmpConfig("O2", BF16, combine_grad=True)  # bf16: no unscaling, grads compare as is
    model, optimizer = build(cfg)
    views = [p.grad for p in optimizer.model_params]
    with autocast_context(cfg, "cpu"):
        loss = model(input_ids=BATCHES[0], labels=BATCHES[0]).loss
    model.zero_grad(set_to_none=True)  # after the forward: autograd makes fresh grads
    optimizer.scale_loss(loss).backward()
    loose = [p.grad.clone() for p in optimizer.model_params]
    optimizer.unscale_and_check()
    assert all(p.grad is view for p, view in zip(optimizer.model_params, views))
    assert all(torch.equal(view, grad) for view, grad in zip(views, loose))
    assert "reset between forward and step" in caplog.text


# ------------------------------------------------------------------ loss scaling
def inject(optimizer: MixedPrecisionOptimizer, value: float) -> None:
    with torch.no_grad():
        optimizer.model_params[3].grad.view(-1)[0] = value


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("combine", [False, True], ids=["per_tensor", "combined"])
def test_overflow_skips_step_and_halves_dynamic_scale(value, combine):
    cfg = AmpConfig("O2", FP16, combine_grad=combine)
    model, optimizer = build(cfg)
    train(model, optimizer, cfg, range(2), max_norm=1.0)
    before, scale = snapshot(optimizer), optimizer.scaler.scale
    backward(model, optimizer, cfg, step=2)
    inject(optimizer, value)
    assert not math.isfinite(optimizer.clip_grad_norm(1.0).item())
    optimizer.step()
    optimizer.zero_grad()
    assert optimizer.step_was_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(optimizer)))
    assert optimizer.scaler.scale == scale / 2
    assert optimizer.scaler.skipped_steps == 1
    losses, _ = train(model, optimizer, cfg, range(2, 5), max_norm=1.0)
    assert all(math.isfinite(loss) for loss in losses) and not optimizer.step_was_skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(optimizer)))
    assert (optimizer.scaler.scale, optimizer.scaler.skipped_steps) == (scale / 2, 1)


def test_static_scale_never_changes():
    cfg = AmpConfig("O1", FP16, loss_scale=128.0, growth_interval=2)
    model, optimizer = build(cfg)
    backward(model, optimizer, cfg, step=0)
    inject(optimizer, math.inf)
    optimizer.step()
    optimizer.zero_grad()
    assert optimizer.step_was_skipped and optimizer.scaler.skipped_steps == 1
    train(model, optimizer, cfg, range(1, 6))
    assert optimizer.scaler.scale == 128.0
    assert optimizer.scaler.clean_steps == 5


def test_dynamic_scale_doubles_after_growth_interval():
    cfg = AmpConfig("O2", FP16, growth_interval=3)
    scaler = LossScaler("dynamic", growth_interval=3, init_scale=2.0**8)
    model, optimizer = build(cfg, scaler=scaler)
    train(model, optimizer, cfg, range(2))
    assert (scaler.scale, scaler.clean_steps) == (2.0**8, 2)
    train(model, optimizer, cfg, range(2, 3))
    assert (scaler.scale, scaler.clean_steps) == (2.0**9, 0)
    train(model, optimizer, cfg, range(3, 7))
    assert (scaler.scale, scaler.clean_steps, scaler.skipped_steps) == (2.0**10, 1, 0)


def test_loss_scaler_state_round_trips_and_caps():
    scaler = LossScaler("dynamic", growth_interval=2, max_scale=2.0**17)
    for found_inf in (False, False, False, True, False, False, False, False, False):
        scaler.update(found_inf)
    assert (scaler.scale, scaler.clean_steps, scaler.skipped_steps) == (2.0**17, 1, 1)
    restored = LossScaler("dynamic", growth_interval=2)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    disabled = LossScaler(enabled=False)
    disabled.update(True)
    assert (disabled.scale, disabled.skipped_steps) == (1.0, 0)


# ------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_is_bitwise(tmp_path):
    cfg = AmpConfig("O2", FP16, combine_grad=True)

    def schedule(step: int) -> float:
        return 1.0 / (1 + step)

    def run(model, optimizer, scheduler, steps: range) -> None:
        for step in steps:
            train(model, optimizer, cfg, range(step, step + 1), accum=2, max_norm=0.5)
            scheduler.step()

    model, reference = build(cfg)
    run(model, reference, torch.optim.lr_scheduler.LambdaLR(reference, schedule), range(6))
    assert reference.param_groups[0]["lr"] == pytest.approx(3e-3 / 7)  # the scheduler drives it

    model, interrupted = build(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(interrupted, schedule)
    run(model, interrupted, scheduler, range(3))
    checkpoint = {
        "model": fp32_state_dict(model, interrupted),
        "optimizer": interrupted.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)

    fresh = make_model(seed=99)  # other weights, so only the checkpoint can make it match
    fresh.load_state_dict(checkpoint["model"])
    model, resumed = build(cfg, model=fresh)
    scheduler = torch.optim.lr_scheduler.LambdaLR(resumed, schedule)  # the Trainer's order
    resumed.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    run(model, resumed, scheduler, range(3, 6))

    assert all(torch.equal(a, b) for a, b in zip(snapshot(reference), snapshot(resumed)))
    assert resumed.scaler.state_dict() == reference.scaler.state_dict()
    assert torch.equal(resumed.state[resumed.param_groups[0]["params"][0]]["exp_avg"],
                       reference.state[reference.param_groups[0]["params"][0]]["exp_avg"])
    # Without the optimizer state the masters come from fp16-rounded weights: not the same.
    fresh = make_model(seed=99)
    fresh.load_state_dict(checkpoint["model"])
    _, unrestored = build(cfg, model=fresh)
    assert not all(torch.equal(a, b) for a, b in zip(masters(interrupted), masters(unrestored)))


def test_fp32_state_dict_takes_masters_and_keeps_ties():
    cfg = AmpConfig("O2", BF16, combine_grad=True)
    model, optimizer = build(cfg)
    train(model, optimizer, cfg, range(2))
    state = fp32_state_dict(model, optimizer)
    floats = [t for t in state.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    wte = model.transformer.wte.weight
    assert torch.equal(state["transformer.wte.weight"], optimizer.master_of(wte))
    assert not torch.equal(state["transformer.wte.weight"], wte.float())  # masters, not bf16 copies
    if "lm_head.weight" in state:
        assert state["lm_head.weight"] is state["transformer.wte.weight"]
    reloaded = make_model(seed=5)
    reloaded.load_state_dict(state)
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(reloaded.transformer.h[0].mlp.c_fc.weight, optimizer.master_of(c_fc))
