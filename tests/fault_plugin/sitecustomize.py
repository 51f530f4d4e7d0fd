"""Test-only fault injection for the scripts, kept out of the shipped modules.

A test puts this folder on PYTHONPATH; Python imports ``sitecustomize`` at start-up in every
process (the scripts, torchrun, the launcher's helpers). Nothing happens until the suite's
``utils.train.trainer`` is imported: then every LMTrainer gets ``FaultInjectionCallback`` and the
checkpoint publishing step gets a kill point. Without this folder on the path, LM_FAULT_PLAN
means nothing.

LM_FAULT_PLAN holds comma-separated ``EVENT@STEP`` entries, ``EVENT@STEP/RANK`` for one process
only. Events, at the end of optimizer step STEP unless said otherwise:

* ``sigterm``, ``sigint``: that signal to this process.
* ``kill``: SIGKILL to this process, in the first attempt only (under torchrun --max-restarts or
  scripts/ray_train.py --max_failures the restarted processes go on).
* ``kill_in_save``: SIGKILL while checkpoint-STEP is written, after its files, before it is published.
* ``kill_after_save``: SIGKILL just after checkpoint-STEP is published (and rotated).
* ``nan_loss``: the model's loss is NaN in step STEP.
* ``nan_embeddings``: the input embeddings give NaN from step STEP on (every loss after them is NaN,
  whether the model or ``--loss_chunk_size`` computes it).
* ``wait``: touch ``OUTPUT_DIR/reached-STEP-RANK``, then wait (up to 5 minutes) until the run
  receives SIGTERM or SIGINT, so that a test can signal it at a known step.
* ``drain``: under scripts/ray_train.py, what Ray Train does in a worker whose node is being drained
  (it records the preemption for ``ray.train.get_preemption_info``); then a pause of the worker's
  drain-check interval, so that the check at the end of this step asks Ray.
* ``no_half_units``: the CPU reports no half-precision matrix units (STEP is ignored), so the start of
  a ``--fp16``/``--bf16`` run times a matmul for its precision hint.
* ``sigterm_after_last_step``: SIGTERM once the last step is done (STEP is ignored), while the
  Trainer is still wrapping up training.
* ``kill_after_claim``: SIGKILL just after the run's record is first written (``RunFolder.begin``),
  before its first step (STEP is ignored).
* ``kill_after_evaluated``: SIGKILL just after the run records that its evaluation is done (its
  eval_results.json written), before the reports made from it (STEP is ignored).
* ``kill_in_rotation``: SIGKILL while checkpoint-STEP's save rotates an older checkpoint out, once
  that one is renamed aside (``tmp-checkpoint-N-old``), before it is deleted.
* ``sigterm_while_tokenizing``: SIGTERM while the training text is tokenized, once its first piece is
  done (STEP is ignored).
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time

FAULTS_ENV = "LM_FAULT_PLAN"


def planned_faults() -> dict[str, int]:
    """``{event: step}`` from LM_FAULT_PLAN for this process."""
    faults = {}
    rank = os.environ.get("RANK", "0")
    for entry in filter(None, os.environ.get(FAULTS_ENV, "").replace(" ", "").split(",")):
        event, _, where = entry.partition("@")
        step, _, only_rank = where.partition("/")
        if not only_rank or only_rank == rank:
            faults[event] = int(step or 0)
    return faults


def _first_attempt() -> bool:
    """Not a group that torchrun --max-restarts or Ray Train (utils/raytrain/worker.py) restarted."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("LM_RAY_ATTEMPT", "1") == "1"


def _make_callback_class():
    from transformers import TrainerCallback

    from utils.train.stops import PreemptionCallback

    class FaultInjectionCallback(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer
            self.faults = planned_faults()
            self._nan_hook = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.faults.get("nan_loss") == state.global_step + 1 and model is not None:
                # Prepended, so that the loss watcher's hook sees the NaN as it would a real one.
                self._nan_hook = model.register_forward_hook(_nan_loss, prepend=True)
            start = self.faults.get("nan_embeddings")
            if start is not None and state.global_step + 1 >= start and model is not None:
                model.get_input_embeddings().register_forward_hook(_nan_output)
                del self.faults["nan_embeddings"]  # the hook stays for the rest of the run

        def on_step_end(self, args, state, control, **kwargs):
            if self._nan_hook is not None:
                self._nan_hook.remove()
                self._nan_hook = None
            step = state.global_step
            if self.faults.get("sigterm") == step:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.faults.get("sigint") == step:
                os.kill(os.getpid(), signal.SIGINT)
            if self.faults.get("kill") == step and _first_attempt():
                os.kill(os.getpid(), signal.SIGKILL)
            if self.faults.get("wait") == step:
                self._wait_for_a_signal(args, step)
            if self.faults.get("drain") == step:
                _mark_node_draining()

        def on_epoch_end(self, args, state, control, **kwargs):
            if "sigterm_after_last_step" in self.faults and state.global_step >= state.max_steps:
                os.kill(os.getpid(), signal.SIGTERM)
                del self.faults["sigterm_after_last_step"]

        def _wait_for_a_signal(self, args, step):
            preemption = next(cb for cb in self.trainer.callback_handler.callbacks
                              if isinstance(cb, PreemptionCallback))
            reached = os.path.join(args.output_dir, f"reached-{step}-{os.environ.get('RANK', '0')}")
            open(reached, "w").close()
            deadline = time.monotonic() + 300
            while preemption.received is None and time.monotonic() < deadline:
                time.sleep(0.05)

    return FaultInjectionCallback


def _mark_node_draining():
    # Ray Train's PreemptionWatcher calls each worker's mark_preempt, which records this.
    from ray.train.v2._internal.execution.context import get_train_context
    from ray.train.v2.api.preemption import PreemptionInfo

    from utils.raytrain.worker import DRAIN_CHECK_SECONDS

    rank = int(os.environ.get("RANK", "0"))
    get_train_context().preemption_context.preemption_info = PreemptionInfo(None, {"drained-node": [rank]})
    time.sleep(DRAIN_CHECK_SECONDS)


def _nan_output(module, inputs, output):
    return output * float("nan")


def _nan_loss(module, inputs, outputs):
    if module.training:
        # Without a loss of the model's own, the chunked loss (--loss_chunk_size) computes it from these.
        key = "loss" if outputs.get("loss") is not None else "logits"
        outputs[key] = outputs[key] * float("nan")
    return outputs


def _install(trainer_module):
    import utils.data.prepare as prepare
    import utils.launch.cpu as cpu
    import utils.runs.checkpoints as checkpoints
    import utils.runs.folder as folder
    import utils.train.checkpointing as checkpointing

    if "no_half_units" in planned_faults():
        cpu.cpu_flags = lambda: set()

    callback_class = _make_callback_class()
    original_init = trainer_module.LMTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        # Just before the preemption callback, so that a signal sent at step N is seen at step N.
        callbacks = self.callback_handler.callbacks
        first = next(i for i, cb in enumerate(callbacks) if type(cb).__name__ == "PreemptionCallback")
        callbacks.insert(first, callback_class(self))

    trainer_module.LMTrainer.__init__ = init

    original_begin, original_mark = folder.RunFolder.begin, folder.RunFolder.mark

    def begin(self):
        original_begin(self)
        if "kill_after_claim" in planned_faults() and _first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)

    def mark(self, stage):
        original_mark(self, stage)
        if stage == "evaluated" and "kill_after_evaluated" in planned_faults() and _first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)

    folder.RunFolder.begin, folder.RunFolder.mark = begin, mark

    original_publish, original_rotate = checkpointing.publish, checkpointing.rotate

    def rotate(run_dir, *args):
        newest = max((int(name.rsplit("-", 1)[1]) for name in os.listdir(run_dir)
                      if name.startswith("checkpoint-")), default=None)
        killed_in_rotation = planned_faults().get("kill_in_rotation") == newest and _first_attempt()
        original_delete = checkpoints._delete

        def delete(path):
            os.rename(path, checkpoints._aside(path))
            os.kill(os.getpid(), signal.SIGKILL)

        if killed_in_rotation:
            checkpoints._delete = delete
        try:
            original_rotate(run_dir, *args)
        finally:
            checkpoints._delete = original_delete
        if planned_faults().get("kill_after_save") == newest:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing.rotate = rotate

    def publish(staged, final):
        step = int(final.rsplit("-", 1)[1])
        if planned_faults().get("kill_in_save") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        original_publish(staged, final)

    checkpointing.publish = publish

    original_pieces = prepare.SampleRecipe._token_pieces

    def token_pieces(self, *args, **kwargs):
        for n, piece in enumerate(original_pieces(self, *args, **kwargs)):
            if n == 0 and "sigterm_while_tokenizing" in planned_faults() and _first_attempt():
                os.kill(os.getpid(), signal.SIGTERM)
            yield piece

    prepare.SampleRecipe._token_pieces = token_pieces


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """Lets ``utils.train.trainer`` load as usual, then installs the faults into it."""

    def find_spec(self, name, path=None, target=None):
        if name != "utils.train.trainer":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _install(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(FAULTS_ENV):
    sys.meta_path.insert(0, _PatchTrainerOnImport())
