"""Cost of one mixed-precision optimizer step, with and without combine_grad.

A step here is: unscale + inf check + grad-norm clipping + optimizer step (+ the O2
master copies) + zero_grad(set_to_none=False), on fake fp16-scaled gradients filled
once. It prints a Markdown table of the median wall time per step and the number of
``aten::`` operator calls in one step (torch.profiler, nested calls included).

    python benchmarks/bench_amp_step.py --sizes tiny,gpt2 --steps 5
    python benchmarks/bench_amp_step.py --sizes tiny --steps 2      # a few seconds

``--device`` defaults to cpu, plus cuda when it is available.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (sets the torch backend autoload switch before torch loads)
import torch  # noqa: E402
from common import print_table  # noqa: E402

from utils.amp.casting import prepare_model  # noqa: E402
from utils.amp.config import AmpConfig  # noqa: E402
from utils.amp.optimizer import MixedPrecisionOptimizer  # noqa: E402

SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, vocab_size=256, n_positions=64),
    "gpt2": dict(n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024),  # GPT-2 small, 124M
}
LEVELS = ("O1", "O2")
ADAMW_KINDS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=default_devices, help="comma list, e.g. cpu,cuda")
    parser.add_argument("--sizes", default="tiny,gpt2", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--adamw", default="fused", help=f"comma list of {', '.join(ADAMW_KINDS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    for name, allowed in (("sizes", SIZES), ("adamw", ADAMW_KINDS)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}, choose from {', '.join(allowed)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def gpt2_shaped(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> torch.nn.Module:
    """GPT-2's parameter set (names, shapes, LayerNorms; lm_head tied) without its forward.

    Only the optimizer step is timed, so no forward is needed; this avoids importing
    transformers, which takes longer than the small benchmark itself.
    """
    width = n_embd

    def block() -> torch.nn.Module:
        return torch.nn.ModuleDict({
            "ln_1": torch.nn.LayerNorm(width),
            "attn_c_attn": torch.nn.Linear(width, 3 * width),
            "attn_c_proj": torch.nn.Linear(width, width),
            "ln_2": torch.nn.LayerNorm(width),
            "mlp_c_fc": torch.nn.Linear(width, 4 * width),
            "mlp_c_proj": torch.nn.Linear(4 * width, width),
        })

    with torch.device("meta"):
        model = torch.nn.ModuleDict({
            "wte": torch.nn.Embedding(vocab_size, width),
            "wpe": torch.nn.Embedding(n_positions, width),
            "h": torch.nn.ModuleList(block() for _ in range(n_layer)),
            "ln_f": torch.nn.LayerNorm(width),
        })
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """Decay / no-decay groups the way the Trainer splits them (biases and norms: none)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if "bias" in name or "ln_" in name else decay).append(param)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def build_optimizer(base: torch.nn.Module, level: str, combine: bool, adamw: str, device: torch.device):
    cfg = AmpConfig(level, torch.float16, "dynamic", combine_grad=combine)
    model = prepare_model(copy.deepcopy(base).to(device), cfg)
    kwargs = ADAMW_KINDS[adamw]
    optimizer = MixedPrecisionOptimizer(
        decay_groups(model), lambda groups: torch.optim.AdamW(groups, lr=1e-4, **kwargs), cfg
    )
    with torch.no_grad():
        for param in optimizer.model_params:
            fake = torch.randn_like(param) * 1e-2  # small enough not to overflow at scale 2**16
            if param.grad is None:
                param.grad = fake
            else:
                param.grad.copy_(fake)
    return model, optimizer


def one_step(optimizer: MixedPrecisionOptimizer) -> None:
    optimizer.clip_grad_norm(1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep per-tensor grads alive, as the flat ones are


def count_aten_ops(optimizer: MixedPrecisionOptimizer) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step(optimizer)
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def time_steps(optimizer: MixedPrecisionOptimizer, steps: int, device: torch.device) -> float:
    """Median milliseconds per step: robust to the odd step slowed by other work on the host."""
    for _ in range(2):  # the first step creates the optimizer state
        one_step(optimizer)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        one_step(optimizer)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp16 dynamic loss scale, "
          f"AdamW, grads clipped to 1.0\n")
    rows = []
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        base = gpt2_shaped(**SIZES[size])
        n_params = sum(p.numel() for p in base.parameters())
        for device in map(torch.device, args.device.split(",")):
            for level in LEVELS:
                for adamw in args.adamw.split(","):
                    for combine in (False, True):
                        model, optimizer = build_optimizer(base, level, combine, adamw, device)
                        ms = time_steps(optimizer, args.steps, device)
                        ops = count_aten_ops(optimizer)
                        rows.append([device.type, size, f"{n_params / 1e6:.1f}M", level, adamw, str(combine),
                                     f"{ms:.2f}", str(ops)])
                        del model, optimizer
    print_table(["device", "size", "params", "level", "adamw", "combine_grad", "median ms/step", "aten ops/step"], rows)


if __name__ == "__main__":
    main()
