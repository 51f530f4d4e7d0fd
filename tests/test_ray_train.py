"""scripts/ray_train.py: the recipe by Ray Train's TorchTrainer, against torchrun, through a lost worker and a stop.

Two CPU workers train the tiny GPT-2 on real text; every run must end with the weights that
``torchrun --nproc_per_node 2 run_clm.py`` with the same flags ends with. Ray is an optional extra:
without it the tests that need it skip, except in CI (CI=true), where scripts/install.sh installs
it (WITH_RAY=1) and they must run. One run starts its own small local Ray, as a user's does; the
stopped and resumed one joins a cluster through RAY_ADDRESS (a local one the test starts: 2 CPUs, a
small object store, no dashboard). The test-only fault plugin (tests/fault_plugin) holds the run at
a step for a stop, plays a node being drained and kills a worker.
"""

import fcntl
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from conftest import FAULT_PLUGIN, ROOT, TINY, free_port, read_json
from utils.cli import Command, Ending
from utils.errors import UsageError
from utils.runs.checkpoints import COMPLETE_MARKER
from utils.train.stops import PreemptionCallback

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None and os.environ.get("CI") != "true",
                               reason='Ray Train is an optional extra: pip install "ray[train]"')

# 12 samples a step (2 per worker), 30 steps, a checkpoint every 10.
FLAGS = [*TINY["clm"], "--do_train", "--do_eval", "--per_device_train_batch_size", "2",
         "--per_device_eval_batch_size", "4", "--max_steps", "30", "--save_steps", "10", "--logging_steps", "5",
         "--max_eval_samples", "8", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7"]
SCRIPT = ROOT / "scripts" / "ray_train.py"


def recipe_flags(text_files, out) -> list[str]:
    return [*FLAGS, "--train_file", str(text_files["train"]), "--validation_file", str(text_files["valid"]),
            "--output_dir", str(out)]


def ray_command(text_files, out, *launcher) -> list[str]:
    return [sys.executable, str(SCRIPT), "clm", "--num_workers", "2", *launcher, *recipe_flags(text_files, out)]


def ray_env(faults: str = "", **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LM_FAULT_PLAN", "RANK", "LOCAL_RANK",
                                                            "WORLD_SIZE")}
    if faults:
        env.update(LM_FAULT_PLAN=faults, PYTHONPATH=str(FAULT_PLUGIN))
    return {**env, **extra}


def run(command, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_weights(out, expected):
    got, want = load_file(out / "model.safetensors"), load_file(expected / "model.safetensors")
    assert got.keys() == want.keys()
    assert max((got[name].double() - want[name].double()).abs().max().item() for name in want) <= 1e-6


@pytest.fixture(scope="module")
def torchrun_run(text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "run_clm.py"), *recipe_flags(text_files, out)]
    process = run(command, ray_env())
    assert process.returncode == 0, process.stderr[-3000:]
    return out


@pytest.fixture
def ray_cluster():
    """A local Ray of 2 CPUs that the test starts and stops; runs join it through RAY_ADDRESS."""
    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    context = ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    # Its token is in ~/.ray; ray.init turned token authentication on in this process's environment,
    # which the runs inherit (ray_env), until the test ends.
    yield {"RAY_ADDRESS": context.address_info["gcs_address"]}
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@needs_ray
def test_two_ray_workers_train_as_torchrun_does_and_the_rerun_does_nothing(torchrun_run, text_files, tmp_path):
    out = tmp_path / "out"
    process = run(ray_command(text_files, out), ray_env())  # on a local Ray it starts
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "Started a local Ray instance" in process.stdout + process.stderr
    assert read_json(out / "run_info.json")["world_size"] == 2
    assert read_json(out / "run_info.json")["script"] == "run_clm.py"
    assert_same_weights(out, torchrun_run)
    assert read_json(out / "eval_results.json")["eval_loss"] == pytest.approx(
        read_json(torchrun_run / "eval_results.json")["eval_loss"], abs=1e-6)
    # Each checkpoint was reported to Ray once complete, in place: Ray's result is the newest one.
    assert f"Ray Train's newest checkpoint: {out / 'checkpoint-30'}" in process.stdout

    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    rerun = run(ray_command(text_files, out), ray_env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.strip().splitlines()[-1].startswith(f"nothing to do: {out} holds the finished run")
    assert "Ray instance" not in rerun.stdout + rerun.stderr  # told before Ray starts
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before


def stop_at(step: int, command, env, tmp_path) -> tuple[int, list[str]]:
    """Run ``command`` until both workers end step ``step`` (the plugin's wait), then SIGTERM the driver."""
    out = Path(command[command.index("--output_dir") + 1])
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                   start_new_session=True)
        try:
            reached = [out / f"reached-{step}-{rank}" for rank in (0, 1)]
            while not all(path.exists() for path in reached):
                assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                time.sleep(0.2)
            for path in reached:
                path.unlink()
            process.send_signal(signal.SIGTERM)  # as `ray job stop` does
            status = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return status, (tmp_path / "stderr").read_text().strip().splitlines()


@needs_ray
def test_a_stop_a_drained_node_and_a_killed_worker_each_keep_the_work_and_the_run_ends_as_torchrun_does(
        ray_cluster, torchrun_run, text_files, tmp_path):
    out = tmp_path / "out"
    # On a cluster the workers get the fault plan and the plugin only through the environment the run carries.
    status, lines = stop_at(12, ray_command(text_files, out), ray_env("wait@12", **ray_cluster), tmp_path)
    assert status == 143, "\n".join(lines[-40:])
    assert "Connected to Ray cluster" in "\n".join(lines)
    assert lines[-1].startswith(f"stopped: SIGTERM received; saved {out}/checkpoint-12 at step 12 of 30")
    assert (out / "checkpoint-12" / COMPLETE_MARKER).is_file() and not (out / "model.safetensors").exists()

    # The same command resumes. A node drained at step 14 gets its checkpoint at once, and the run goes on;
    # rank 1 is SIGKILLed at the end of step 21 (after checkpoint-20, in the first attempt only), and Ray
    # restarts the group, which resumes from the newest complete checkpoint, whatever Ray had recorded.
    rerun = run(ray_command(text_files, out, "--max_failures", "1"), ray_env("drain@14,kill@21/1", **ray_cluster))
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert f"Resuming from {out / 'checkpoint-12'}" in log
    assert "being drained (ranks [0]): saving a checkpoint at step 14" in log
    assert (out / "checkpoint-14" / COMPLETE_MARKER).is_file()
    assert "Ray Train restarted the group after a failure (attempt 2)" in log
    assert f"Resuming from {out / 'checkpoint-20'}" in log
    assert read_json(out / "run_info.json")["world_size"] == 2
    assert_same_weights(out, torchrun_run)


def test_a_folder_in_use_is_refused_before_ray_starts(text_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = os.open(out, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the writing process of a run in progress holds it
    try:
        process = run(ray_command(text_files, out), ray_env())
    finally:
        os.close(lock)
    assert process.returncode == 2
    assert process.stderr.strip() == (f"error: --output_dir {out} is in use by another run (it holds the folder's "
                                      "lock); wait for it to end, or choose another --output_dir")
    assert os.listdir(out) == []


def test_bad_launcher_input_is_one_line_before_ray_starts(tmp_path):
    process = run([sys.executable, str(SCRIPT), "clm", "--num_workers", "0", "--output_dir", str(tmp_path / "out")],
                  ray_env())
    assert (process.returncode, process.stderr) == (2, "error: --num_workers 0: give 1 or more\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launcher, error", [
    (["clm", "--num_workers", "2", "--max_failures", "-2", "--output_dir", "out"],
     "--max_failures -2: give 0 or more, or -1 for no limit"),
    (["clm", "--num_workers", "2", "--do_train"], "--output_dir: give the run's folder"),
])
def test_the_launchers_own_checks(launcher, error):
    from utils.raytrain.driver import parse_command

    with pytest.raises(UsageError, match=f"^{re.escape(error)}"):
        parse_command(Command("scripts/ray_train.py", tuple(launcher)))


def test_the_launcher_passes_every_other_flag_on_and_the_folder_with_them(tmp_path):
    from utils.raytrain.driver import parse_command

    flags = tmp_path / "flags.json"
    flags.write_text('{"output_dir": "from_file", "do_train": true}')
    launcher, recipe, output_dir = parse_command(Command("scripts/ray_train.py", (
        "--num_workers", "2", "mlm", "--max_failures", "3", "--num_train_epochs", "2", "--output_dir", "out")))
    assert (launcher.num_workers, launcher.use_gpu, launcher.max_failures) == (2, False, 3)
    assert recipe == Command(str(ROOT / "run_mlm.py"), ("--num_train_epochs", "2", "--output_dir", "out"))
    assert output_dir == os.path.abspath("out")
    _, recipe, output_dir = parse_command(Command("scripts/ray_train.py", ("clm", "--num_workers", "1", str(flags))))
    assert recipe.flag_file == str(flags) and output_dir == os.path.abspath("from_file")


def test_without_ray_the_entry_says_how_to_install_it(tmp_path):
    # Ray hidden from the driver, as on a machine where the extra is not installed.
    code = ("import runpy, sys; sys.modules['ray'] = None; "
            f"sys.argv = [{str(SCRIPT)!r}, 'clm', '--num_workers', '2', '--output_dir', {str(tmp_path / 'out')!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    process = run([sys.executable, "-c", code], ray_env())
    assert process.returncode == 2
    assert process.stderr.strip().startswith("error: Ray Train is not installed")
    assert process.stderr.strip().endswith(': pip install "ray[train]"')


def test_a_stop_requested_in_a_worker_thread_saves_a_checkpoint_and_stops():
    # Ray Train runs the recipe in a worker thread, where no signal handler can be set: the driver's stop
    # arrives through request_stop instead, and must end training as a first SIGTERM does.
    callback, args = PreemptionCallback(), TrainingArguments(output_dir="unused", report_to="none")
    callback.stops_from = "the test"
    state, control = TrainerState(global_step=5, max_steps=10), TrainerControl()
    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def train():
        try:
            callback.on_train_begin(args, state, control)
            callback.request_stop(signal.SIGTERM)
            callback.on_step_end(args, state, control)
            callback.on_train_end(args, state, control)
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert errors == []
    assert control.should_save and control.should_training_stop and callback.stopped_at == 5
    assert callback.exit_status == 143 and callback.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_run_ends_as_its_first_failed_worker_else_as_ray_else_as_rank_0():
    from utils.raytrain.driver import run_ending

    stopped, refused = Ending(143, "stopped: ..."), Ending(2, "error: --output_dir ... is in use")
    assert run_ending({0: Ending(), 1: Ending()}, None, 0) == Ending()
    assert run_ending({0: Ending(0, "nothing to do: ..."), 1: Ending(0, "nothing to do: ...")}, None, 0).line == \
        "nothing to do: ..."
    assert run_ending({0: stopped, 1: stopped}, None, 0) == stopped
    assert run_ending({0: refused}, RuntimeError("Training failed due to worker errors:\n..."), 1) == refused
    gave_up = run_ending({}, RuntimeError("Controller failed\n..."), 3)
    assert gave_up.status == 1 and gave_up.line == ("error: Ray Train gave up on the run (--max_failures 3): "
                                                    "RuntimeError: Controller failed")
    workers = RuntimeError("Training failed due to worker errors:\n...")
    workers.worker_failures = {1: ConnectionError("The actor died unexpectedly.\n..."), 0: RuntimeError("\ngloo: reset")}
    assert run_ending({}, workers, 0).line == ("error: Ray Train gave up on the run (--max_failures 0): rank 0: "
                                               "RuntimeError: gloo: reset; rank 1: ConnectionError: The actor died "
                                               "unexpectedly.")
