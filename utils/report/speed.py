"""Training speed, with one clock and one definition of each figure.

The clock counts training time only: it starts after ``--fps_warmup_steps`` optimizer steps
(kernel selection, compilation and allocator growth make the first steps slow) and pauses while
a checkpoint is saved or an evaluation runs. From it:

* ``fps``: samples per second over all devices, per device batch x accumulation x processes
  per optimizer step, over the timed steps (the launchers' FPS column);
* ``fps_tokens_per_second``: ``fps`` times the mean tokens in a training sample;
* ``mfu``: tokens/s x training FLOPs per token / (peak FLOP/s x devices), on devices whose
  peak is known;
* ``tokens_per_second`` in the training logs: the same tokens/s over the steps since the last
  log (warm-up steps included, pauses not).

The Trainer's own ``train_samples_per_second`` (whole run time, start-up included) is kept as it
is; it is not one of these.
"""

import logging
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Dense (no sparsity) 16-bit tensor throughput per device, FLOP/s; bf16 and fp16 peak the
# same on these parts. Names are matched as substrings of get_device_name(), first match wins.
_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5; NVIDIA's datasheet gives 1979 TFLOPS with sparsity
    ("H200", 989e12),  # same compute die as H100 SXM, more memory
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    # Ascend: Huawei publishes little; 910B figures circulating for the 910B1-B4 bins range
    # from ~280 to ~376 TFLOPS fp16. 313e12 is the commonly quoted one, treat MFU as approximate.
    ("910B", 313e12),
    ("Ascend910", 256e12),  # first-generation Ascend 910, Huawei's launch figure for fp16
)


def peak_flops(name: str | None) -> float | None:
    """Peak dense bf16/fp16 FLOP/s of one device called ``name`` (``device_name()``).

    None for CPUs and unknown parts, so an MFU estimate is left out instead of guessed.
    """
    for pattern, flops in _PEAK_FLOPS:
        if name and pattern.lower() in name.lower():
            return flops
    return None


def effective_batch_size(args) -> int:
    """Samples per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def flops_per_token(model, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention (fwd + bwd).

    N counts every parameter once (tied embeddings once); the same approximation as in the
    PaLM paper's model-FLOPs-utilization definition.
    """
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", 0) or 0
    width = getattr(config, "hidden_size", 0) or 0
    return 6.0 * n_params + 12.0 * layers * width * seq_len


def _synchronize() -> None:
    # Kernels run asynchronously: wait for them so the timestamps mean what they say.
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


class SpeedCallback(TrainerCallback):
    """The clock of training time, and the speed figures read from it (see the module doc)."""

    def __init__(self, warmup_steps: int, tokens_per_sample: float | None, device_name: str | None = None):
        self.warmup_steps = warmup_steps
        self.tokens_per_sample = tokens_per_sample
        self.peak = peak_flops(device_name)
        self.on_train_begin()

    # ----------------------------------------------------------------- the clock

    def on_train_begin(self, *args, **kwargs):
        self.trained = 0.0  # training seconds before the current stretch
        self.running_since = time.perf_counter()  # None while paused
        self.steps = 0  # optimizer steps in this process: a resumed run warms up again
        self.warm_at = (0.0, 0) if self.warmup_steps == 0 else None  # (training seconds, steps)
        self.end = None  # (training seconds, steps) at the end of training
        self.last_log = (0.0, 0)
        self.save_pending = False

    def now(self) -> float:
        """Training seconds so far."""
        running = time.perf_counter() - self.running_since if self.running_since is not None else 0.0
        return self.trained + running

    def _pause(self) -> None:
        _synchronize()
        self.trained = self.now()
        self.running_since = None

    def _resume(self) -> None:
        if self.running_since is None:
            self.running_since = time.perf_counter()
        self.save_pending = False

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == self.warmup_steps:
            _synchronize()
            self.warm_at = (self.now(), self.steps)
        if control.should_save or control.should_evaluate:
            self._pause()
            self.save_pending = control.should_save

    def on_evaluate(self, args, state, control, **kwargs):
        if not self.save_pending:  # a save follows an evaluation in the same step
            self._resume()

    def on_save(self, args, state, control, **kwargs):
        self._resume()

    def on_train_end(self, args, state, control, **kwargs):
        _synchronize()
        self.end = (self.now(), self.steps)

    # ----------------------------------------------------------------- the figures

    def _tokens_per_second(self, args, seconds: float, steps: int) -> float | None:
        if not self.tokens_per_sample or seconds <= 0 or steps <= 0:
            return None
        return steps * effective_batch_size(args) * self.tokens_per_sample / seconds

    def since_last_log(self, args) -> dict:
        """``tokens_per_second`` over the steps since the previous call (for the training logs)."""
        now = (self.now(), self.steps)
        seconds, steps = now[0] - self.last_log[0], now[1] - self.last_log[1]
        self.last_log = now
        tokens_per_second = self._tokens_per_second(args, seconds, steps)
        return {} if tokens_per_second is None else {"tokens_per_second": round(tokens_per_second, 1)}

    def metrics(self, args, model) -> dict:
        """``fps`` and, with tokens per sample, ``fps_tokens_per_second`` and ``mfu`` (see the module doc)."""
        if self.end is None or self.warm_at is None or self.end[1] <= self.warm_at[1]:
            logger.warning("Too few steps to measure FPS after %d warm-up steps", self.warmup_steps)
            return {}
        seconds, steps = self.end[0] - self.warm_at[0], self.end[1] - self.warm_at[1]
        if seconds <= 0:
            return {}
        result = {"fps": round(steps * effective_batch_size(args) / seconds, 3), "fps_warmup_steps": self.warmup_steps}
        tokens_per_second = self._tokens_per_second(args, seconds, steps)
        if tokens_per_second is not None:
            result["fps_tokens_per_second"] = round(tokens_per_second, 3)
            if self.peak:
                achieved = tokens_per_second * flops_per_token(model, self.tokens_per_sample)
                result["mfu"] = round(achieved / (self.peak * args.world_size), 4)
        return result
