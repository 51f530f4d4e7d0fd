"""What users see after a run: the results table, the curves PNG, TensorBoard, the model card, the logs."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import QUICK, ROOT, TINY, read_json, run_script

SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def run(text_files, tmp_path_factory):
    """One real tiny clm run with two evaluations during training, a log line per step and TensorBoard."""
    out = tmp_path_factory.mktemp("reports") / "run"
    process = run_script("clm", *TINY["clm"], *QUICK, "--train_file", text_files["train"], "--validation_file",
                         text_files["valid"], "--do_train", "--do_eval", "--eval_strategy", "steps",
                         "--eval_steps", "2", "--logging_steps", "1", "--max_steps", "4", "--max_eval_samples", "16",
                         "--fps_warmup_steps", "1", "--report_to", "tensorboard", "--output_dir", out)
    return SimpleNamespace(out=out, log=process.stdout + process.stderr, results=read_json(out / "all_results.json"),
                           history=read_json(out / "trainer_state.json")["log_history"])


def load_plot_curves():
    """scripts/plot_curves.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("plot_curves", SCRIPTS / "plot_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def table_rows(markdown: str) -> list[dict]:
    """The Markdown table as dicts keyed by the header cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, separator, body = split[0], split[1], split[2:]
    assert set(separator) == {"---"}
    return [dict(zip(header, row)) for row in body]


def test_results_table_has_one_row_per_run_with_the_saved_numbers(run, tmp_path):
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(run.out / "run_info.json", second)
    changed = {**run.results, "eval_accuracy": 0.5}
    (second / "all_results.json").write_text(json.dumps(changed))

    process = run_tool("results_table.py", run.out, second)
    assert process.returncode == 0, process.stderr
    rows = table_rows(process.stdout)
    assert list(rows[0])[:12] == ["model", "devices", "Acc", "FPS", "AMP_Type", "Epochs", "eval loss", "perplexity",
                                  "bits/byte", "byte ppl", "word ppl", "tokens/s"]
    assert len(rows) == 2
    first, r = rows[0], run.results
    assert (first["model"], first["devices"], first["AMP_Type"]) == ("gpt2", "1p", "fp32")
    assert first["Acc"] == f"{r['eval_accuracy']:.4f}"
    assert first["FPS"] == f"{r['fps']:.1f}"  # after the warm-up step, as in the launcher's row
    assert first["perplexity"] == f"{r['perplexity']:.2f}"
    assert (first["eval loss"], first["bits/byte"], first["byte ppl"], first["word ppl"]) == (
        f"{r['eval_loss']:.4f}", f"{r['eval_bits_per_byte']:.4f}", f"{r['eval_byte_perplexity']:.4f}",
        f"{r['eval_word_perplexity']:.2f}")
    assert first["tokens/s"] == f"{r['fps_tokens_per_second']:.0f}"
    assert first["Epochs"] == f"{r['epoch']:.2f}"
    assert rows[1]["Acc"] == "0.5000"


def test_results_table_reports_a_directory_without_results(run, tmp_path):
    process = run_tool("results_table.py", run.out, tmp_path)
    assert process.returncode == 2
    assert len(table_rows(process.stdout)) == 1
    assert "all_results.json" in process.stderr


def test_plot_curves_writes_a_png_of_the_logged_series(run, tmp_path):
    png = tmp_path / "curves.png"
    process = run_tool("plot_curves.py", run.out, "--out", png)
    assert process.returncode == 0, process.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 400 and height > 300

    # The data behind the figure, from the same function the script uses.
    runs = load_plot_curves().plot_curves([str(run.out)], str(tmp_path / "again.png"))
    series = runs[str(run.out)]
    losses = [(e["step"], e["loss"]) for e in run.history if "loss" in e]
    assert series["training loss"] == ([s for s, _ in losses], [v for _, v in losses])
    assert series["training loss"][0] == [1, 2, 3, 4]
    eval_steps, eval_losses = series["evaluation loss"]
    assert {2, 4} <= set(eval_steps)  # two evaluations during training (and the final one)
    assert series["evaluation perplexity"][1] == pytest.approx([math.exp(v) for v in eval_losses], rel=1e-5)
    assert all(0.0 <= a <= 1.0 for a in series["evaluation accuracy"][1])


def test_plot_curves_compares_runs_on_one_figure(run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run.out / "trainer_state.json", other)
    runs = load_plot_curves().plot_curves([str(run.out), str(other)], str(tmp_path / "both.png"))
    assert list(runs) == [str(run.out), str(other)]
    assert (tmp_path / "both.png").stat().st_size > 0


def test_training_logs_carry_tokens_per_second(run):
    train_logs = [e for e in run.history if "loss" in e]
    assert len(train_logs) == 4
    assert all(e["tokens_per_second"] > 0 for e in train_logs)


def test_tensorboard_gets_event_files_with_the_training_scalars(run):
    events = list((run.out / "runs").glob("*/events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for folder in {e.parent for e in events}:
        tags |= set(EventAccumulator(str(folder)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_second", "eval/loss", "eval/accuracy"} <= tags


def test_model_card_holds_data_metrics_precision_and_hardware(run, text_files):
    card = (run.out / "README.md").read_text(encoding="utf-8")
    r = run.results
    for text in (str(text_files["train"]), f"| eval loss | {r['eval_loss']:.4f} |",
                 f"| perplexity | {r['perplexity']:.2f} |", f"| eval accuracy | {r['eval_accuracy']:.4f} |",
                 f"| bits per byte | {r['eval_bits_per_byte']:.4f} |",
                 f"| byte perplexity | {r['eval_byte_perplexity']:.4f} |",
                 f"| word perplexity | {r['eval_word_perplexity']:.2f} |",
                 f"| train samples/s (whole run) | {r['train_samples_per_second']:.2f} |",
                 f"| tokens/s after warm-up | {r['fps_tokens_per_second']:.0f} |",
                 "- precision: fp32", "- device: cpu", "- processes: 1 (1p)"):
        assert text in card, text


def test_start_of_run_block_is_logged_once(run):
    assert run.log.count("Run setup:") == 1
    for text in ("device: cpu", "world size: 1", "precision: fp32, backend none, opt level n/a, combine_grad False",
                 "effective batch size 4 = 4 per device x 1 accumulation steps x 1 processes"):
        assert text in run.log, text
    info = read_json(run.out / "run_info.json")
    assert (info["device"].split(":")[0], info["world_size"], info["effective_batch_size"]) == ("cpu", 1, 4)
