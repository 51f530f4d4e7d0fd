"""Shared fixtures: small real text, tiny model flags, and running the scripts as a user does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiers import slow_reason

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TOKENIZERS = DATA / "tokenizers"
WIKI_TEST_RAW = DATA / "wikitext-2-raw-v1" / "wiki.test.raw"

# Tiny from-scratch models: a few hundred kB of weights besides the embeddings.
TINY = {
    "clm": ["--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / "gpt2"),
            "--config_overrides", "n_layer=2,n_embd=64,n_head=2,n_positions=128", "--block_size", "64"],
    "mlm": ["--model_type", "roberta", "--tokenizer_name", str(TOKENIZERS / "roberta-base"),
            "--config_overrides", "num_hidden_layers=2,hidden_size=64,num_attention_heads=2,"
            "intermediate_size=128,max_position_embeddings=130", "--max_seq_length", "64"],
    "plm": ["--model_type", "xlnet", "--tokenizer_name", str(TOKENIZERS / "xlnet-base-cased"),
            "--config_overrides", "n_layer=2,d_model=64,n_head=2,d_head=32,d_inner=128", "--max_seq_length", "64"],
}
QUICK = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_steps", "4",
         "--report_to", "none", "--disable_tqdm", "true", "--seed", "7"]


@pytest.fixture(scope="session", autouse=True)
def offline_hub(tmp_path_factory):
    """No hub access, and hub/dataset caches private to this test session."""
    home = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict:
    """Real WikiText-2 text cut into a train and a validation file (and csv/json copies)."""
    folder = tmp_path_factory.mktemp("text")
    lines = WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines(keepends=True)
    train, valid = lines[:700], lines[700:900]
    paths = {"train": folder / "train.txt", "valid": folder / "valid.txt"}
    paths["train"].write_text("".join(train), encoding="utf-8")
    paths["valid"].write_text("".join(valid), encoding="utf-8")
    for split, rows in (("train", train), ("valid", valid)):
        texts = [line.rstrip("\n") for line in rows]
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                handle.write(json.dumps({"id": i, "content": text}) + "\n")
        with open(folder / f"{split}.json", "w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(json.dumps({"text": text}) + "\n")
        import csv

        with open(folder / f"{split}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["title", "text"])
            writer.writerows([[f"row {i}", text] for i, text in enumerate(texts)])
        paths[f"{split}_jsonl"] = folder / f"{split}.jsonl"
        paths[f"{split}_json"] = folder / f"{split}.json"
        paths[f"{split}_csv"] = folder / f"{split}.csv"
    return paths


def run_script(task: str, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run run_<task>.py in a fresh interpreter, as a user would."""
    command = [sys.executable, str(ROOT / f"run_{task}.py"), *map(str, args)]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                             timeout=600)
    if check and process.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stderr[-4000:]}")
    return process


FAULT_PLUGIN = ROOT / "tests" / "fault_plugin"  # the test-only fault injection (tests/fault_plugin/sitecustomize.py)


def with_faults(faults: str, *paths) -> dict:
    """The environment that loads the test-only fault plugin into the scripts' processes."""
    return {"LM_FAULT_PLAN": faults, "PYTHONPATH": os.pathsep.join(map(str, (FAULT_PLUGIN, *paths)))}


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's own torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment of a fresh shell on a CPU machine, with ``extra`` on top: no launcher, cluster or
    run settings inherited from the test run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "LM_", "ACCELERATE_", "TORCHELASTIC_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                         "NPROC_PER_NODE", "DEVICE", "AMP_FLAGS", "OUTPUT_DIR", "MODEL", "DATASET")}
    return {**env, "PYTHONPATH": str(ROOT), "LM_DEVICE": "cpu", **extra}


def read_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ the quick tier: pytest -m "not slow"


def pytest_collection_modifyitems(config, items):
    for item in items:  # slow: starts a process or trains more than a few steps, read from its code (tests/tiers.py)
        if why := slow_reason(item):
            item.add_marker(pytest.mark.slow(reason=why))
