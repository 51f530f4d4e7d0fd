"""run_info.json and the model card say what the run used: read off the trainer's own objects, not the flags.

Each case trains one step in-process; the facts are then taken from what ran (the model's weight
dtypes, the forward's context, the optimizer's storage and loss scaler, the devices) and compared
field by field with run_info.json, its log line and the model card.
"""

import logging
import re

import pytest
import torch

from amp_cases import make_trainer
from conftest import read_json
from utils.amp.combine_grad import FlatStore
from utils.amp.optimizer import MixedPrecisionOptimizer

CASES = {
    "fp32": {},
    "fp16 O0": {"fp16": True, "fp16_opt_level": "O0"},
    "fp16 alone": {"fp16": True},
    "fp16 O2 combine_grad": {"fp16": True, "fp16_opt_level": "O2", "use_combine_grad": True},
    "fp16 O2 static scale": {"fp16": True, "fp16_opt_level": "O2", "loss_scale": "128"},
    "bf16 O1": {"bf16": True, "fp16_opt_level": "O1"},
    "bf16 O3": {"bf16": True, "fp16_opt_level": "O3", "gradient_accumulation_steps": 2},
}
HALF = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def what_ran(trainer) -> dict:
    """The setup as the trainer's objects show it, without reading a flag or a config's report."""
    dtypes = {p.dtype for p in trainer.model.parameters()}
    context = trainer.autocast_smart_context_manager()
    autocast = getattr(context, "fast_dtype", None) if isinstance(context, torch.autocast) else None
    halves = {HALF[d] for d in dtypes if d in HALF} | ({HALF[autocast]} if autocast in HALF else set())
    precision = halves.pop() if halves else ("fp32" if trainer.precision is None else
                                             HALF[trainer.precision.config.half_dtype])  # O0: fp32 compute
    optimizer = trainer.precision.optimizer if trainer.precision is not None else None
    if optimizer is None:
        level = None
    elif dtypes == {torch.float32}:
        level = "O1" if autocast is not None else "O0"
    else:
        level = "O3" if torch.float32 not in dtypes else "O2"
    scaler = getattr(optimizer, "scaler", None)
    loss_scale = None if scaler is None or not scaler.enabled else ("dynamic" if scaler.dynamic else scaler.scale)
    args = trainer.args
    return {
        "precision": precision,
        "opt_level": level,
        "amp_type": "fp32" if level is None else level if precision == "fp16" else f"{precision} {level}",
        "precision_backend": "none" if optimizer is None else
        "native" if isinstance(optimizer, MixedPrecisionOptimizer) else "apex",
        "combine_grad": isinstance(getattr(optimizer, "_store", None), FlatStore),
        "loss_scale": loss_scale,
        "world_size": args.world_size,
        "devices": f"{args.world_size}p",
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }


def card_precision(card: str) -> dict:
    line = next(line for line in card.splitlines() if line.startswith("- precision: "))
    match = re.fullmatch(r"- precision: (\S+) \(AMP_Type (.+)\), backend (\S+), opt level (\S+), "
                         r"combine_grad (\S+), loss scale (\S+)", line)
    precision, amp_type, backend, level, combine, scale = match.groups()
    return {"precision": precision, "amp_type": amp_type, "precision_backend": backend,
            "opt_level": None if level == "n/a" else level, "combine_grad": combine == "True",
            "loss_scale": None if scale == "none" else scale if scale == "dynamic" else float(scale)}


@pytest.mark.parametrize("case", list(CASES))
def test_run_info_and_the_model_card_are_what_the_run_used(case, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="utils"):
        trainer = make_trainer(tmp_path, max_steps=1, **CASES[case])
        trainer.train()
    info, ran = read_json(tmp_path / "run_info.json"), what_ran(trainer)
    assert {key: info[key] for key in ran} == ran
    assert info["device"].startswith("cpu")

    from utils.report.results import model_card

    assert card_precision(model_card(info, {})) == {key: ran[key] for key in card_precision(model_card(info, {}))}
    setup = re.search(r"precision: (\S+), backend (\S+), opt level (\S+), combine_grad (\S+), loss scale (\S+)",
                      caplog.text).groups()
    assert setup == (ran["precision"], ran["precision_backend"], ran["opt_level"] or "n/a", str(ran["combine_grad"]),
                     "none" if ran["loss_scale"] is None else str(ran["loss_scale"]))
    if trainer.precision is not None:  # the "Mixed precision: ..." line says the same loss scale
        line = re.search(r"Mixed precision: .*", caplog.text).group(0)
        assert line.endswith(f"loss scale {ran['loss_scale'] or 'none'}, combine_grad {ran['combine_grad']}")


def test_fp16_o0_scales_no_loss_and_says_so(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, fp16=True, fp16_opt_level="O0")
    trainer.train()
    assert not trainer.precision.optimizer.scaler.enabled
    assert read_json(tmp_path / "run_info.json")["loss_scale"] is None


@pytest.mark.parametrize("flags,expected", [
    ({"bf16": True, "fp16_opt_level": "O2", "use_combine_grad": True, "optim": "adamw_torch"},
     ("adamw_torch", "foreach")),  # ours picks a multi-tensor kernel for the flat buffers
    ({"bf16": True, "fp16_opt_level": "O2", "use_combine_grad": True}, ("adamw_torch_fused", "fused")),  # the default
    ({"optim": "adamw_torch"}, ("adamw_torch", "for-loop")),  # fp32: the Trainer's own AdamW, torch's CPU default
], ids=["bf16-O2-combine-adamw_torch", "bf16-O2-combine-default", "fp32-adamw_torch"])
def test_run_info_names_the_optimizer_kernel_that_ran(flags, expected, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="utils"):
        trainer = make_trainer(tmp_path, max_steps=1, **flags)
        trainer.train()
    inner = trainer.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    kernel = "fused" if inner.defaults["fused"] else "foreach" if inner.defaults["foreach"] else "for-loop"
    assert kernel == expected[1]  # what the inner torch optimizer was built with
    assert read_json(tmp_path / "run_info.json")["optimizer"] == {"name": expected[0], "implementation": kernel}
    assert f"optimizer: {expected[0]}, {kernel} kernel" in caplog.text
    assert "TF32 matmul: off" in caplog.text and read_json(tmp_path / "run_info.json")["tf32_matmul"] is False
