"""The layout is the architecture: utils/ as packages by concern, imports pointing down one declared order.

``LAYERS`` is that order, lowest first (docs/layout.md shows the same). A module may import
modules of a lower layer, and modules of its own package; nothing else of the suite, counting
imports inside functions too. The components (amp, data, model) import only the bottom layer.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_json

LAYERS = [
    ["utils.errors", "utils.dist"],  # the bottom: what a run is made to end with, and its processes
    ["utils.files", "utils.cli"],  # whole-file writes; the command line and the exit status
    ["utils.amp", "utils.data", "utils.model"],  # the components
    ["utils.eval"],  # evaluation figures over the text: reads the data and the model's metrics
    ["utils.launch"],  # devices and processes
    ["utils.flags"],  # the flags, parsed and checked
    ["utils.runs"],  # the run folder
    ["utils.report"],  # what a run says about itself
    ["utils.train"],  # the Trainer: the only code that subclasses or patches it
    ["utils.raytrain"],  # the recipes run by Ray Train (scripts/ray_train.py; Ray an optional extra)
]
UNIT_LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def suite_modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "utils").rglob("*.py")):
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[dotted.removesuffix(".__init__")] = path
    return found


def unit_of(module: str) -> str | None:
    """The layer unit a module belongs to: its package (utils.amp) or, for a loose module, itself."""
    unit = ".".join(module.split(".")[:2])
    return unit if unit in UNIT_LAYER else None


def imports_of(module: str, path: Path, known: dict) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        names.update(name for name in candidates if name in known and name != module and name != "utils")
    return names


def test_every_module_belongs_to_a_declared_layer():
    assert [m for m in suite_modules() if m != "utils" and unit_of(m) is None] == []


def test_imports_point_down_the_declared_order():
    known = suite_modules()
    upward = []
    for module, path in known.items():
        if module == "utils":
            continue
        for target in imports_of(module, path, known):
            mine, theirs = unit_of(module), unit_of(target)
            if theirs != mine and UNIT_LAYER[theirs] >= UNIT_LAYER[mine]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_import_rule_catches_an_upward_import(tmp_path):
    # The rule above must be able to fail: a component importing the Trainer is caught.
    known = {"utils.amp.optimizer": tmp_path / "optimizer.py", "utils.train.trainer": tmp_path / "trainer.py"}
    known["utils.amp.optimizer"].write_text("def f():\n    from utils.train.trainer import LMTrainer\n")
    found = imports_of("utils.amp.optimizer", known["utils.amp.optimizer"], known)
    assert found == {"utils.train.trainer"}
    assert UNIT_LAYER[unit_of("utils.train.trainer")] > UNIT_LAYER[unit_of("utils.amp.optimizer")]


def test_no_import_cycle():
    tool = ROOT.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/import_cycles.py is not beside the project")
    process = subprocess.run([sys.executable, str(tool)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (process.returncode, process.stdout) == (0, "")


def test_utils_is_packages_with_a_few_loose_modules():
    entries = sorted(p.name for p in (ROOT / "utils").iterdir() if p.name != "__pycache__")
    loose = [name for name in entries if name.endswith(".py") and name != "__init__.py"]
    packages = [name for name in entries if (ROOT / "utils" / name / "__init__.py").is_file()]
    assert len(loose) <= 4 and len(packages) >= 5, entries
    assert sorted(loose + packages + ["__init__.py"]) == entries


def test_modules_and_recipes_stay_short():
    long = {str(path.relative_to(ROOT)): n for path in suite_modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 350}
    assert long == {}
    recipes = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in ROOT.glob("run_*.py")}
    assert len(recipes) == 3 and max(recipes.values()) <= 90, recipes


def test_the_command_line_is_read_in_one_module():
    readers = [str(path.relative_to(ROOT)) for path in suite_modules().values()
               if "sys.argv" in path.read_text(encoding="utf-8")]
    assert readers == ["utils/cli.py"]


def test_no_test_module_imports_another():
    tests = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    offenders = [f"{path.name}: {target}" for path in (ROOT / "tests").glob("*.py")
                 for target in imports_of(path.stem, path, {name: None for name in tests})]
    assert offenders == []


def layout_tree() -> set[str]:
    """The paths docs/layout.md's tree shows under utils/ (two spaces of indent per level)."""
    block = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8").split("```")[1]
    paths, stack = set(), []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+\.py|\S+/)(\s|$)", line)
        if match is None:
            continue
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2).rstrip("/")]
        if stack[0] == "utils" and depth > 0:
            paths.add("/".join(stack))
    return paths


def test_docs_layout_is_the_folder_tree():
    # Every module, and every package (its __init__.py), as the tree shows them: utils/amp, utils/amp/config.
    actual = {str(path.relative_to(ROOT).with_suffix("")).removesuffix("/__init__")
              for path in (ROOT / "utils").rglob("*.py") if path != ROOT / "utils" / "__init__.py"}
    shown = {path.removesuffix(".py") for path in layout_tree()}
    assert shown == actual


# ------------------------------------------------------- a run folder written before the move

FIXTURE = ROOT / "tests" / "fixtures" / "run_before_layout"
BLOCK = 16
FIXTURE_COMMAND = [
    "--model_name_or_path", str(FIXTURE / "init"), "--tokenizer_name", str(FIXTURE / "tokenizer"), "--block_size", str(BLOCK),
    "--train_file", "data/wikitext-2-raw-v1/wiki.test.raw", "--do_train", "--max_steps", "4", "--save_steps", "2",
    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--seed", "7", "--report_to", "none",
    "--disable_tqdm", "true", "--bf16", "--fp16_opt_level", "O2", "--use_combine_grad", "--max_train_samples", "16",
]


def test_a_run_stopped_before_the_move_resumes_after_it(tmp_path):
    # The reference is the old layout's own uninterrupted run (expected/), so that the test compares two
    # implementations from the same stored weights, not the machine's random initialisation with another's.
    resumed = tmp_path / "resumed"
    shutil.copytree(FIXTURE / "run", resumed)
    assert "utils.arguments" in (resumed / "checkpoint-2" / "training_args.bin").read_bytes().decode("latin-1")
    process = subprocess.run([sys.executable, "run_clm.py", *FIXTURE_COMMAND, "--output_dir", str(resumed)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"Resuming from {resumed / 'checkpoint-2'}" in process.stdout + process.stderr
    losses = {e["step"]: e["loss"] for e in read_json(resumed / "trainer_state.json")["log_history"] if "loss" in e}
    expected_losses = {int(step): loss for step, loss in read_json(FIXTURE / "expected" / "losses.json").items()}
    assert sorted(losses) == [1, 2, 3, 4]
    # Steps 3 and 4 ran after the move, from the checkpoint's weights, optimizer, schedule and data order.
    # The old code divided each block's loss by its 16 labels; today it divides by the 15 positions
    # that predict one (the first label predicts nothing).
    old_count = BLOCK / (BLOCK - 1)
    assert [losses[step] for step in (3, 4)] == pytest.approx(
        [expected_losses[step] * old_count for step in (3, 4)], rel=1e-3)
    # The weights moved by steps 3 and 4 as the old code moved them, compared as a whole against the size
    # of the update: a bf16 gradient near zero may take the other sign on another CPU, and today's count
    # scales the gradients by 16/15 against Adam moments of the old scale (0.8% of the update, measured).
    start = load_file(FIXTURE / "run" / "checkpoint-2" / "model.safetensors")
    expected, got = load_file(FIXTURE / "expected" / "model.safetensors"), load_file(resumed / "model.safetensors")
    update = torch.cat([(expected[name] - start[name]).flatten() for name in expected])
    miss = torch.cat([(got[name] - expected[name]).flatten() for name in expected])
    assert update.norm() > 0 and miss.norm() < 0.05 * update.norm()
