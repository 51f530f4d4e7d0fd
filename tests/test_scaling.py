"""Sharded training on 2 CPU processes (gloo), the combinations refused, and Slurm's settings for torchrun.

The sharded runs are the real script under torchrun; each is compared with a DDP run of the
same data order (sequential sampling, no dropout): what each process holds comes from the run's
own sharding.json (local shard sizes at the first optimizer step), the losses from
trainer_state.json, the weights from model.safetensors. Slurm's variables are turned into torchrun's
settings with a scontrol stand-in on PATH; tests/test_slurm.py runs scripts/slurm.sh on a real Slurm.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

import utils  # noqa: F401  (before torch, as in the scripts)
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, clean_env, free_port, read_json
from utils.errors import UsageError
from utils.flags.checks import check_scaling_flags

NO_DROPOUT = ["--config_overrides", "n_layer=2,n_embd=64,n_head=2,n_positions=128,resid_pdrop=0,embd_pdrop=0,"
              "attn_pdrop=0"]
STEPS = 6
TRAIN = [*TINY["clm"], *NO_DROPOUT, "--do_train", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "2", "--max_steps", str(STEPS), "--logging_steps", "1",
         "--save_steps", "100000", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7",
         "--train_sampling_strategy", "sequential"]


def losses(out: Path) -> list[float]:
    return [entry["loss"] for entry in read_json(out / "trainer_state.json")["log_history"] if "loss" in entry]


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, text_files):
    """Training flags with the module's text files and one tokenized-data cache for all runs."""
    cache = tmp_path_factory.mktemp("cache")
    return [*TRAIN, "--train_file", str(text_files["train"]), "--cache_dir", str(cache)]


class Runs:
    """Two-process runs, each started once and shared by the tests that read it."""

    def __init__(self, root: Path, flags: list):
        self.root, self.flags, self.done = root, flags, {}

    def __call__(self, name: str, *extra, env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in self.done:
            out = self.root / name
            command = [sys.executable, "-m", "utils.launch.torchrun", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), str(ROOT / "run_clm.py"), *self.flags, *extra, "--output_dir", str(out)]
            process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                                     env=clean_env(**(env or {})))
            assert process.returncode == 0, process.stderr[-4000:]
            self.done[name] = (process, out)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared, offline_hub):
    return Runs(tmp_path_factory.mktemp("runs"), shared)


def assert_sharded_in_two(out: Path, mixed_precision: str = "no") -> None:
    report = read_json(out / "sharding.json")
    assert report["world_size"] == 2 and len(report["per_rank"]) == 2
    assert report["mixed_precision"] == mixed_precision
    for kind in ("parameters", "gradients", "optimizer_state"):
        held = [rank[kind]["held"] for rank in report["per_rank"]]
        full = report["per_rank"][0][kind]["full"]
        assert full > 0
        assert sum(held) == full, (kind, held, full)  # every element on exactly one process
        assert all(abs(h / full - 0.5) < 0.01 for h in held), (kind, held, full)
    parameters = report["per_rank"][0]["parameters"]["full"]
    # The whole model: the tied embedding counted once, as DDP holds it.
    assert parameters == sum(t.numel() for name, t in weights(out).items() if name != "lm_head.weight")
    # AdamW keeps two moments per parameter element, sharded as the parameters are.
    assert report["per_rank"][0]["optimizer_state"]["full"] == 2 * parameters


# ---------------------------------------------------------------------------- FSDP


def test_fsdp_in_fp32_shards_everything_and_trains_as_ddp_does(runs):
    _, ddp = runs("ddp")
    process, fsdp = runs("fsdp", "--fsdp")
    assert_sharded_in_two(fsdp)
    assert "Sharding: rank 1 holds" in process.stdout
    assert not (ddp / "sharding.json").exists()  # not sharded, nothing claimed
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    assert len(losses(fsdp)) == STEPS
    reference, sharded = weights(ddp), weights(fsdp)
    for name, tensor in reference.items():  # the saved model is whole, and the same
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_with_its_own_bf16_policy_shards_and_stays_close_to_fp32(runs):
    _, ddp = runs("ddp")
    # Also the string form transformers deprecates: it is read as --fsdp with fsdp_config, without the warning.
    process, bf16 = runs("fsdp_bf16", "--fsdp", "full_shard auto_wrap", env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "is read as --fsdp --fsdp_config" in process.stderr
    assert "Passing `fsdp` as a string" not in process.stdout + process.stderr
    assert_sharded_in_two(bf16, "bf16")
    assert "FSDP mixed precision (ACCELERATE_MIXED_PRECISION=bf16)" in process.stdout
    half, full = losses(bf16), losses(ddp)
    assert half != full  # bf16 really computed: its losses are rounded to bf16
    assert half == pytest.approx(full, rel=0.02)
    for name, tensor in weights(bf16).items():
        assert tensor.dtype == torch.float32, name  # the shards and the saved model stay fp32


# ---------------------------------------------------------------------------- Slurm


def fake_slurm(folder: Path) -> Path:
    """A scontrol stand-in that expands the node lists of these tests, and logs its calls."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": '[[ "$1 $2" == "show hostnames" ]] || exit 1\necho "$*" >> "$FAKE_SLURM/scontrol.log"\n'
                    'case $3 in "gpu[07-10]") printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n" ;; *) echo "$3" ;; esac\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return bin_dir


def derived(env: dict) -> dict:
    shell = ('. scripts/slurm_env.sh && slurm_job_env && slurm_node_env && '
             'for v in NNODES NODE_RANK MASTER_ADDR MASTER_PORT PET_RDZV_BACKEND PET_RDZV_ENDPOINT PET_RDZV_ID; '
             'do echo "$v=${!v}"; done')
    process = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert process.returncode == 0, process.stderr
    return dict(line.split("=", 1) for line in process.stdout.splitlines())


SLURM_JOB = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "12345"}


def test_slurm_variables_become_torchrun_settings(tmp_path):
    bin_dir = fake_slurm(tmp_path)
    env = clean_env(**SLURM_JOB, FAKE_SLURM=str(tmp_path), PATH=f"{bin_dir}:/usr/bin:/bin")
    assert derived(env) == {
        "NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "gpu07", "MASTER_PORT": "31846",  # 29500 + 2345 + 1
        "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "gpu07:31846", "PET_RDZV_ID": "12345",
    }
    assert (tmp_path / "scontrol.log").read_text() == "show hostnames gpu[07-10]\n"
    # Given ones win.
    given = derived({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert (given["MASTER_ADDR"], given["PET_RDZV_ENDPOINT"]) == ("10.0.0.1", "10.0.0.1:4000")


def test_slurm_jobs_near_each_other_or_10000_apart_get_different_ports(tmp_path):
    env = clean_env(**SLURM_JOB, FAKE_SLURM=str(tmp_path), PATH=f"{fake_slurm(tmp_path)}:/usr/bin:/bin")
    nearby = [*range(12000, 12400), *range(19990, 20010)]  # across a multiple of 10000 too
    apart = [12345 + 10000 * m for m in range(30)]
    for jobs in (nearby, apart):
        shell = ('. scripts/slurm_env.sh && for j in "$@"; do (SLURM_JOB_ID=$j; unset MASTER_PORT; slurm_job_env; '
                 'echo "$MASTER_PORT"); done')
        process = subprocess.run(["bash", "-c", shell, "bash", *map(str, jobs)], cwd=ROOT, capture_output=True,
                                 text=True, env=env, timeout=60)
        ports = [int(port) for port in process.stdout.split()]
        assert len(ports) == len(jobs) and len(set(ports)) == len(jobs), process.stderr
        assert all(29500 <= port < 39500 for port in ports)
    # A job id that is not a number (an array task's): a port all the same, no bash arithmetic error.
    for job in ("12345_7", "12345+1", "007"):
        derived_env = derived({**env, "SLURM_JOB_ID": job})
        assert 29500 <= int(derived_env["MASTER_PORT"]) < 39500 and derived_env["PET_RDZV_ID"] == job
    assert derived({**env, "SLURM_JOB_ID": "12345_7"}) != derived({**env, "SLURM_JOB_ID": "12345_8"})


def test_slurm_node_list_is_parsed_without_scontrol(tmp_path):
    if any((Path(folder) / "scontrol").exists() for folder in ("/usr/bin", "/bin")):
        pytest.skip("a real scontrol is installed")
    env = clean_env(**SLURM_JOB, PATH="/usr/bin:/bin")
    assert derived(env)["MASTER_ADDR"] == "gpu07"
    cases = {"node[01-04,07]": "node01", "gpu-a7,gpu-b[1-2]": "gpu-a7", "n[3-4]-ib": "n3-ib", "host1": "host1",
             "rack1-n[0010-0020]": "rack1-n0010", "r[1-2]n[5-6],z": "r1n5", "a[9],b[1-3]": "a9"}
    shell = '. scripts/slurm_env.sh && for l in "$@"; do slurm_first_host "$l"; done'
    process = subprocess.run(["bash", "-c", shell, "bash", *cases], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=60)
    assert process.stdout.splitlines() == list(cases.values())
    missing = subprocess.run(["bash", "-c", ". scripts/slurm_env.sh && slurm_job_env"], cwd=ROOT, text=True,
                             capture_output=True, env=clean_env(PATH="/usr/bin:/bin"), timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: SLURM_NNODES is not set")


# ---------------------------------------------------------------------------- refused


REFUSED = {
    # name: (flags, environment, fragments of the error line); "launcher" runs scripts/train_clm_1p.sh
    "fsdp_fp16": (["--fsdp", "--fp16"], {}, ("--fsdp with --fp16", "ACCELERATE_MIXED_PRECISION=bf16")),
    "fsdp_bf16": (["--fsdp", "--bf16"], {}, ("--fsdp with --bf16", "drop the precision flags")),
    "fsdp_o2": (["--fsdp", "--fp16", "--fp16_opt_level", "O2"], {}, ("--fsdp with --fp16 --fp16_opt_level O2",)),
    "fsdp_o2_combine_grad": (["--fsdp", "--bf16", "--fp16_opt_level", "O2", "--use_combine_grad"], {},
                             ("--fsdp with --bf16 --fp16_opt_level O2 --use_combine_grad",)),
    # The launchers' default precision, as a user first tries it.
    "launcher": (["--fsdp"], {"DEVICE": "cpu"},
                 ("run_clm.py failed (exit 2)", "--fsdp with --fp16 --fp16_opt_level O2 --use_combine_grad",
                  'AMP_FLAGS=""')),
    "fsdp_accelerate_fp16": (["--fsdp"], {"ACCELERATE_MIXED_PRECISION": "fp16"},
                             ("ACCELERATE_MIXED_PRECISION=fp16", "bf16")),
    "deepspeed_on_cpu": (["--deepspeed", "ds.json"], {}, ("--deepspeed on the CPU", "--fsdp")),
    "fsdp_in_one_process": (["--fsdp"], {}, ("--fsdp shards the model over several processes", "torchrun")),
}


def refuse(name: str, tmp: Path, train_file: str) -> tuple:
    flags, env, _ = REFUSED[name]
    (tmp / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    before = sorted(p.name for p in tmp.rglob("*"))
    run = [*TINY["clm"], "--do_train", "--train_file", train_file, "--max_steps", "1", *flags,
           "--output_dir", str(tmp / "out")]
    command = (["bash", str(ROOT / "scripts" / "train_clm_1p.sh"), *run] if name == "launcher"
               else [sys.executable, str(ROOT / "run_clm.py"), *run])
    process = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300,
                             env=clean_env(**env, PYTHON=sys.executable))
    after = sorted(p.name for p in tmp.rglob("*"))
    if name == "launcher":  # the launcher's log, as in tests/test_bad_input.py
        after = [p for p in after if p not in ("out", "train.log")]
    return process, before, after


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, text_files, offline_hub):
    folders = {name: tmp_path_factory.mktemp(name) for name in REFUSED}
    with ThreadPoolExecutor(1 if "PYTEST_XDIST_WORKER" in os.environ else 2) as pool:
        futures = {name: pool.submit(refuse, name, folders[name], str(text_files["train"])) for name in REFUSED}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsharded_combinations_stop_with_one_line(name, refusals):
    process, before, after = refusals[name]
    err = process.stderr
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err + process.stdout
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for fragment in REFUSED[name][2]:
        assert fragment in lines[0], lines[0]
    assert after == before  # nothing written


def fsdp_args(**flags) -> SimpleNamespace:
    defaults = {"fsdp": True, "fsdp_config": None, "deepspeed": None, "fp16": False, "bf16": False,
                "fp16_opt_level": None, "use_combine_grad": False, "use_cpu": True}
    return SimpleNamespace(**{**defaults, **flags})


@pytest.mark.parametrize("flags, fragments", [
    ({"fsdp_config": '{"version": 1}'}, ("--fsdp_config version 1", "version 2")),
    ({"fsdp": "no_shard"}, ("--fsdp 'no_shard'", "--fsdp alone")),
    ({"fsdp": "hybrid_shard auto_wrap"}, ("--fsdp 'hybrid_shard'",)),
    ({"fsdp_config": "nope.json"}, ("--fsdp_config nope.json", "no such file")),
    ({"fsdp_config": "[1, 2]"}, ("--fsdp_config [1, 2]", "give a JSON object")),
    ({"fsdp_config": "{version: 1}"}, ("--fsdp_config {version: 1}", "not valid JSON")),
    ({"deepspeed": "ds.json"}, ("--fsdp and --deepspeed",)),
    ({"fsdp": None, "fsdp_config": '{"version": 2}'}, ("--fsdp_config is only read with --fsdp",)),
    ({"fsdp_config": '{"state_dict_type": "SHARDED_STATE_DICT"}'}, ("state_dict_type SHARDED_STATE_DICT",
                                                                    "no final model")),
])
def test_fsdp_settings_that_would_not_shard_are_refused(flags, fragments, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError) as refused:
        check_scaling_flags(fsdp_args(**flags))
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_fsdp_string_form_becomes_fsdp_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = fsdp_args(fsdp="full_shard auto_wrap offload", fsdp_config='{"fsdp_transformer_layer_cls_to_wrap": "X"}')
    check_scaling_flags(args)
    assert args.fsdp is True
    assert args.fsdp_config == {"transformer_layer_cls_to_wrap": "X", "reshard_after_forward": True,
                                "cpu_offload": True}
    off = fsdp_args(fsdp="false")
    check_scaling_flags(off)
    assert off.fsdp is None


@pytest.mark.parametrize("model_class, config, refused", [
    ("GPT2LMHeadModel", {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, None),
    ("XLNetLMHeadModel", {"model_type": "xlnet", "n_layer": 1, "d_model": 32, "n_head": 2, "d_head": 16,
                          "d_inner": 64}, None),
    ("RobertaForMaskedLM", {"model_type": "roberta", "num_hidden_layers": 1, "hidden_size": 32,
                            "num_attention_heads": 2, "intermediate_size": 64}, "lm_head.bias"),
    ("BertForMaskedLM", {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                         "intermediate_size": 64}, "cls.predictions.bias"),
])
def test_models_whose_ties_fsdp_cannot_group_are_refused(model_class, config, refused):
    # Masked-LM heads tie the output bias to a parameter outside the output layer: FSDP2 fails on it.
    import transformers

    from utils.train.sharding import _check_ties_fsdp_can_shard

    config = transformers.AutoConfig.for_model(**config)
    model = getattr(transformers, model_class)(config)
    if refused is None:
        _check_ties_fsdp_can_shard(model)
        return
    with pytest.raises(UsageError, match=f"--fsdp with {model_class}: .* {refused}"):
        _check_ties_fsdp_can_shard(model)
