"""``python scripts/ray_train.py clm|mlm|plm --num_workers N [--use_gpu] [--max_failures K] [run_TASK.py's flags]``.

The recipe, with its flags and outputs, run by Ray Train's ``TorchTrainer``: N workers, each one
process of the recipe (utils/raytrain/worker.py), on the Ray cluster that ``RAY_ADDRESS`` names,
else on a local Ray started here with one CPU per worker at least.

* **The run folder** is --output_dir, for the recipe as for Ray: Ray Train's ``storage_path`` is
  its parent and its ``name`` its last part, so that the checkpoints are reported to Ray where
  they are, and Ray's ``Result.checkpoint`` is the newest. On a cluster of several nodes it must be
  on a file system that every node sees, as the project and the data must (the same paths).
  The run folder rules hold as under torchrun: a rerun resumes, the rerun of a finished run does
  nothing, a second run into a folder in use is refused. Ray's list of the checkpoints reported by
  an earlier start there is dropped before a start: the run folder decides what to resume from,
  and Ray would refuse to start with a list that names checkpoints rotated out since.
* **The environment** of a worker on another node is not the driver's: the suite's (``LM_*``),
  Hugging Face's (``HF_*``, ``TRANSFORMERS_*``, ``TOKENIZERS_*``) and ``NPU_*`` settings travel
  with the run, and PYTHONPATH with the project in front. Tokens do not (Ray shows a run's
  environment on its dashboard): log in to the hub on each node.
* **Failures.** A worker that dies or fails makes Ray Train end the group and start it again, up
  to --max_failures times; it resumes from the newest complete checkpoint.
* **Stops.** The first SIGTERM or SIGINT to this driver (``ray job stop``, a scheduler, Ctrl+C)
  reaches the workers: they finish the step, save a checkpoint and stop, and the driver exits
  with 143 or 130; the same command resumes. ``ray job stop`` kills the driver after
  RAY_JOB_STOP_WAIT_TIME_S (3 s by default): submit with a longer one. A second signal ends the
  driver at once, and Ray ends the workers with it.
* **Exit status**: the recipe's own, as under torchrun (0; 2 for bad input, with its ``error:``
  line; 3 for a non-finite loss; 130 or 143 for a stop with the work saved), or 1 when Ray Train
  gave up after --max_failures restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from utils.cli import Command, Ending
from utils.errors import UsageError
from utils.flags.arguments import command_fingerprint
from utils.flags.launch_flags import read_flags
from utils.flags.parser import flag_parser
from utils.launch.auto_ddp import PROJECT_ROOT
from utils.raytrain.control import RunControl
from utils.runs.folder import RunFolder
from utils.runs.record import RAY_CHECKPOINT_LIST
from utils.train.stops import SAME_STOP_SECONDS, STOP_SIGNALS

logger = logging.getLogger(__name__)

TASKS = ("clm", "mlm", "plm")
INSTALL = 'pip install "ray[train]"'
FORWARDED_ENV = ("LM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "NPU_")
# The local Ray's shared-memory object store: the recipes pass no data through it (Ray's default takes 30% of RAM).
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


@dataclass
class RayTrainArguments:
    """The launcher's own flags; every other flag is run_TASK.py's."""

    num_workers: int = field(metadata={"help": "Training processes (Ray Train workers), one process of the recipe "
                                               "each: one CPU each, or one GPU each with --use_gpu."})
    use_gpu: bool = field(default=False, metadata={"help": "Give each worker one GPU."})
    max_failures: int = field(
        default=0,
        metadata={"help": "How many times a failed worker makes Ray Train restart the whole group, which resumes "
                          "from the newest complete checkpoint (-1: no limit)."})

    def __post_init__(self):
        if self.num_workers < 1:
            raise UsageError(f"--num_workers {self.num_workers}: give 1 or more")
        if self.max_failures < -1:
            raise UsageError(f"--max_failures {self.max_failures}: give 0 or more, or -1 for no limit")


def parse_command(command: Command) -> tuple[RayTrainArguments, Command, str]:
    """The launcher's flags, the recipe's command (run_TASK.py and the other flags) and its --output_dir (absolute)."""
    parser = flag_parser(RayTrainArguments, prog="scripts/ray_train.py", allow_abbrev=False,
                         usage="%(prog)s [--num_workers N] [--use_gpu] [--max_failures N] {clm,mlm,plm} "
                               "[run_TASK.py's flags ...]",
                         epilog="Every other flag is run_TASK.py's (see python run_clm.py --help).")
    parser.add_argument("task", choices=TASKS, help="The recipe: run_clm.py, run_mlm.py or run_plm.py.")
    launcher, task, flags = parser.parse_args_into_dataclasses(list(command.args), return_remaining_strings=True)
    recipe = Command(os.path.join(PROJECT_ROOT, f"run_{task.task}.py"), tuple(flags))
    output_dir = read_flags(task.task, recipe.flags())[2]
    if not output_dir:
        raise UsageError("--output_dir: give the run's folder (Ray Train keeps its record of the run there too)")
    return launcher, recipe, os.path.abspath(os.path.expanduser(output_dir))  # as TrainingArguments reads it


def task_arguments(recipe: Command) -> list[type]:
    """The recipe's own argument dataclasses: those its script (run_TASK.py) defines."""
    script = importlib.import_module(os.path.splitext(recipe.name)[0])
    return [value for value in vars(script).values()
            if dataclasses.is_dataclass(value) and value.__module__ == script.__name__]


def main() -> Ending:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    args, recipe, output_dir = parse_command(Command.of_process())
    # Before Ray starts, and before Ray's list goes.
    RunFolder.check_before_workers(output_dir, command_fingerprint(recipe, *task_arguments(recipe)))
    ray, train = _import_ray()
    _start_ray(ray, args)
    control = ray.remote(num_cpus=0)(RunControl).remote()
    trainer = _trainer(train, args, recipe, output_dir, control)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, RAY_CHECKPOINT_LIST))  # see the module doc
    result, error = _fit(trainer, control)
    if result is not None:
        logger.info("Ray Train's newest checkpoint: %s", result.checkpoint and result.checkpoint.path)
    endings = ray.get(control.endings.remote())
    ray.shutdown()  # the workers' last lines are printed before the run's own
    return run_ending(endings, error, args.max_failures)


def _trainer(train, args: RayTrainArguments, recipe: Command, output_dir: str, control):
    """The TorchTrainer of the run: its workers run ``recipe``, Ray's run folder is ``output_dir``."""
    from utils.raytrain.worker import train_worker  # imports Ray Train's modules: only once Ray is known to be there

    return train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"control": control, "cwd": os.getcwd(), "script": recipe.script, "args": recipe.args},
        scaling_config=train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=train.RunConfig(name=os.path.basename(output_dir), storage_path=os.path.dirname(output_dir),
                                   failure_config=train.FailureConfig(max_failures=args.max_failures),
                                   worker_runtime_env={"env_vars": worker_environment()}),
    )


def _import_ray():
    try:
        import ray
        import ray.train
        import ray.train.torch
    except ImportError as err:
        raise UsageError(f"Ray Train is not installed ({err}): {INSTALL}") from None
    return ray, ray.train


def _start_ray(ray, args: RayTrainArguments) -> None:
    """Join the cluster RAY_ADDRESS names, else start a local Ray; check that it has the workers' devices."""
    cluster = os.environ.get("RAY_ADDRESS")
    if cluster:
        ray.init(address=cluster)
    else:
        # CPU workers share the cores, as torchrun's CPU processes do: at least one CPU per worker.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.num_workers),
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False)
    device = "GPU" if args.use_gpu else "CPU"
    have = int(ray.cluster_resources().get(device, 0))
    if have >= args.num_workers:
        return
    where = f"the Ray cluster at {cluster}" if cluster else "this machine"
    message = f"--num_workers {args.num_workers}{' --use_gpu' if args.use_gpu else ''}: {where} has {have} {device}(s)"
    if not cluster:
        raise UsageError(f"{message}; lower --num_workers")
    logger.warning("%s now: Ray Train waits until it has %d", message, args.num_workers)


def worker_environment() -> dict[str, str]:
    """The settings that travel with the run to its workers (see the module doc)."""
    env = {name: value for name, value in os.environ.items()
           if name.startswith(FORWARDED_ENV) and "TOKEN" not in name}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # the recipe's prints as prints, not each once more through logging
    return env


def _fit(trainer, control):
    """``trainer.fit()``, with this process's stop signals passed to the workers: its result, or the error it raised.

    The fit runs in a thread: Ray Train would otherwise take SIGINT for itself (to abort the run at
    once), and the main thread has to be free to take the signals.
    """
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as err:  # TrainingFailedError: Ray Train gave up; told in run_ending
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    with DriverStops(control):
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    return outcome.get("result"), outcome.get("error")


class DriverStops:
    """SIGTERM/SIGINT to the driver: the first goes to the workers, a second one ends the driver at once."""

    def __init__(self, control):
        self.control = control
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> DriverStops:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
            self.control.stop.remote(signum)
            print(f"ray_train.py: {signal.Signals(signum).name} received: the workers save a checkpoint and stop "
                  "(a second signal stops them at once)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self._received_at < SAME_STOP_SECONDS:
            return  # the same stop, delivered twice (to the process and to its group)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def run_ending(endings: dict, error: BaseException | None, max_failures: int) -> Ending:
    """How the run ended: the first worker (by rank) that ended with an error, else Ray's error, else rank 0."""
    failed = [endings[rank] for rank in sorted(endings) if endings[rank].status != 0]
    if failed:
        return failed[0]
    if error is not None:
        return Ending(1, f"error: Ray Train gave up on the run (--max_failures {max_failures}): {_cause(error)}")
    return endings.get(0, Ending())


def _cause(error: BaseException) -> str:
    """Ray's error in one line: each failed worker's first line (Ray Train's WorkerGroupError), else its own."""
    failures = getattr(error, "worker_failures", None) or {}
    causes = [f"rank {rank}: {_first_line(failures[rank])}" for rank in sorted(failures)]
    return "; ".join(causes) or _first_line(error)


def _first_line(error: BaseException) -> str:
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__
