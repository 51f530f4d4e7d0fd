"""Runs as clusters start them: Kubernetes pods that form one job, and 2-process runs that end with 0 every time.

Kubernetes is emulated on loopback: two launchers on this machine, each with the variables a pod gets
(Kubeflow Trainer's TrainJob: torchrun's PET_*; a PyTorchJob without them: MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK), sharing one output folder as the pods share a volume.
"""

import subprocess
import sys

import pytest

from conftest import ROOT, TINY, clean_env, free_port, read_json

# 8 samples of 64 tokens, 2 per process and step: 1 epoch is 2 steps with 2 processes, 4 with one.
TRAIN = [*TINY["clm"], "--do_train", "--per_device_train_batch_size", "2", "--num_train_epochs", "1",
         "--max_train_samples", "8", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]


def pod_env(cluster: str, rank: int, port: int) -> dict:
    if cluster == "trainjob":
        pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    else:
        pod = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
    return clean_env(**pod, DEVICE="cpu", AMP_FLAGS="", MODEL="", DATASET="", PYTHON=sys.executable)


@pytest.mark.parametrize("cluster", ["trainjob", "pytorchjob"])
def test_two_pods_running_the_1p_launcher_form_one_job(cluster, text_files, tmp_path):
    out, port = tmp_path / "shared-volume" / "out", free_port()
    command = ["bash", str(ROOT / "scripts" / "train_clm_1p.sh"), *TRAIN, "--train_file", str(text_files["train"]),
               "--output_dir", str(out)]
    pods = [subprocess.Popen(command, cwd=tmp_path, env=pod_env(cluster, rank, port), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    printed = [pod.communicate(timeout=600)[0] for pod in pods]
    for pod, text in zip(pods, printed):
        assert pod.returncode == 0, text[-4000:]
    assert read_json(out / "run_info.json")["world_size"] == 2
    assert read_json(out / "trainer_state.json")["global_step"] == 2  # the 8 samples split over 2 processes
    # Node 0 writes the results; node 1 keeps a log of its own.
    assert "| gpt2 | 2p |" in (out / "train.log").read_text()
    assert "device: cpu, 2p" in (out / "train_node1.log").read_text()
    assert "| gpt2 |" not in printed[1]


def test_two_process_runs_end_with_status_0_every_time(text_files, tmp_path):
    """Ten 2-process runs of 2 steps, DDP and FSDP in turn: each process leaves its process group and exits 0.

    A process that ended while gloo's threads were still releasing its last collective used to
    abort at exit (SIGABRT, "terminate called without an active exception") about one run in ten.
    """
    flags = [*TINY["clm"], "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "2",
             "--max_train_samples", "8", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
             "--train_file", str(text_files["train"]), "--cache_dir", str(tmp_path / "cache")]
    for attempt in range(10):
        sharding = ["--fsdp"] if attempt % 2 else []
        logs = tmp_path / f"logs{attempt}"  # each process's stderr in a file of its own (--redirects 2)
        command = [sys.executable, "-m", "utils.launch.torchrun", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "--log-dir", str(logs), "--redirects", "2", str(ROOT / "run_clm.py"), *flags,
                   *sharding, "--output_dir", str(tmp_path / f"run{attempt}")]
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=clean_env())
        stderr = {rank: [path.read_text() for path in logs.glob(f"**/attempt_0/{rank}/stderr.log")] for rank in (0, 1)}
        assert process.returncode == 0, (f"run {attempt + 1} of 10 {sharding}: {process.stderr[-2000:]}\n"
                                         f"--- rank 1's stderr:\n{''.join(stderr[1])}")
        assert len(stderr[0]) == len(stderr[1]) == 1  # found, and read in full
        assert not any("terminate called" in text for texts in stderr.values() for text in texts)
