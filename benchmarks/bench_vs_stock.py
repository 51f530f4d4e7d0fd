"""This project against the stock Hugging Face pipelines, in one command, back to back, with the ratios.

"stock" is what the Hugging Face run_clm.py, run_mlm.py and run_plm.py examples do, re-implemented
here: the tokenizer called in datasets.map (batches of 1,000 rows), group_texts concatenating
Python lists, the example's collator (default_data_collator; DataCollatorForLanguageModeling;
DataCollatorForPermutationLanguageModeling), transformers' Trainer with the same
TrainingArguments, the example's accuracy. "ours" is run_clm.py, run_mlm.py, run_plm.py. Each
case is one fresh process; with --rounds N the cases alternate N times, and the ratio is taken
between medians.

    python benchmarks/bench_vs_stock.py objectives --steps 40 --rounds 3     # the three scripts: the table
    python benchmarks/bench_vs_stock.py train --objective mlm --steps 40     # one script, with its levers
    python benchmarks/bench_vs_stock.py train --shape small --steps 20       # 6 x 384, block 256
    python benchmarks/bench_vs_stock.py train --precision bf16               # bf16 O2 + combine_grad
    python benchmarks/bench_vs_stock.py precision --shape small --steps 12   # ours: fp32, bf16 O1, bf16 O2
    python benchmarks/bench_vs_stock.py preprocess --repeats 5               # cold, WikiText-2 x5
    python benchmarks/bench_vs_stock.py ddp --steps 30                       # 2-process CPU launcher

objectives: for each script, stock and ours alternated --rounds times, fp32, the tiny configs
(GPT-2, RoBERTa, XLNet of 2 layers of width 64 with their real vocabularies), --block/sequence
128, batch 8; training on the first WikiText-2 train lines, evaluation on held-out validation
lines. The table gives train samples/s, peak RSS and eval loss, each as the median of the rounds
and as ours over stock, and the MFU of each side: samples/s times the model FLOPs of a sample
(below) over the fp32 matmul peak measured by this process in the same run (the best of a
2048^3 product, before and after the rounds). The header says when, at which commit, by which
command and under which load it ran. Model FLOPs of a sample: 6 x the weights of the layers
(12 x width^2 each) and 12 x layers x width x length for attention, per token, plus 6 x width x
vocabulary per predicted position (all but the first for clm; the 15% masked for mlm; about one
in six for plm, whose query stream is not counted): what the objective needs, the same figure
for both sides, so the MFU ratio is the speed ratio.

train: one script, its stock pipeline, ours and ours with one lever changed ("ours: ..." rows:
the allocator setting of utils/launch/cpu.py off, LM_KEEP_FREED_MEMORY=0; the model's own loss
instead of the chunked one, --loss_chunk_size 0; the head at every position, --head_at_every_position). tokens/s are timed
after --warmup steps by the same clock on both sides (utils/report/speed.py); evaluation tokens/s
and loss come from trainer.evaluate() on the same validation blocks; peak RSS is the whole
training process's.
precision: ours in fp32, bf16 O1 and bf16 O2 + combine_grad, and stock fp32, back to back; the
ratio is to ours in fp32.
ddp: scripts/train_clm_8p.sh with NPROC_PER_NODE=2 DEVICE=cpu AMP_FLAGS="" (fp32, DDP over gloo),
before (--ddp_find_unused_parameters true, what transformers picks for every model) and after
(ours: set from what the model uses).
preprocess: wall time of a whole fresh process (start, imports, loading the text, tokenizing,
packing) on an empty cache, and its peak RSS, also as it was once the text was loaded (by
datasets' text builder on both sides; ours reads it in smaller chunks, utils/data/raw.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

from common import print_table

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "data" / "wikitext-2-v1"
TOKENIZERS = ROOT / "data" / "tokenizers"
SHAPES = {  # layers, width, heads, block (sequence length)
    "tiny": (2, 64, 2, 128),
    "small": (6, 384, 6, 256),
}


@dataclass(frozen=True)
class Objective:
    """One of the three scripts, and what its stock pipeline and its model FLOPs need to know."""

    script: str
    model_type: str
    tokenizer: str
    length_flag: str
    masked_share: float | None = None  # share of positions with a label; None: causal, all but the first

    def predicted_positions(self, block: int) -> float:
        """Positions of a sample the loss predicts, on average (for the head's model FLOPs)."""
        return block - 1 if self.masked_share is None else self.masked_share * block

    def config(self, layers: int, width: int, heads: int, block: int) -> dict:
        """The model config at a shape; 4 x width feed-forward layers in all three."""
        if self.model_type == "gpt2":
            return {"n_layer": layers, "n_embd": width, "n_head": heads, "n_positions": block}
        if self.model_type == "roberta":  # two positions go to the padding offset
            return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
                    "intermediate_size": 4 * width, "max_position_embeddings": block + 2}
        return {"n_layer": layers, "d_model": width, "n_head": heads, "d_head": width // heads, "d_inner": 4 * width}


OBJECTIVES = {
    "clm": Objective("run_clm.py", "gpt2", "gpt2", "--block_size"),
    "mlm": Objective("run_mlm.py", "roberta", "roberta-base", "--max_seq_length", masked_share=0.15),
    # The collator's spans: a span of 1 to 5 tokens in every span / (1/6) tokens, so one in six on average.
    "plm": Objective("run_plm.py", "xlnet", "xlnet-base-cased", "--max_seq_length", masked_share=1 / 6),
}
PRECISIONS = {  # stock's flags, ours
    "fp32": ([], []),
    "bf16": (["--bf16"], ["--bf16", "--fp16_opt_level", "O2", "--use_combine_grad"]),
    "bf16-O1": (["--bf16"], ["--bf16", "--fp16_opt_level", "O1"]),
}
TRAIN_CASES = {  # environment, extra flags of ours, the objectives it applies to
    "stock": ({}, [], "clm,mlm,plm"),
    "ours": ({}, [], "clm,mlm,plm"),
    "ours: allocator setting off": ({"LM_KEEP_FREED_MEMORY": "0"}, [], "clm,mlm,plm"),
    "ours: --loss_chunk_size 0": ({}, ["--loss_chunk_size", "0"], "clm"),  # the model's own loss
    "ours: --head_at_every_position": ({}, ["--head_at_every_position", "true"], "mlm,plm"),
}
GOALS = {"clm": (2.0, 0.01), "mlm": (4.0, 0.03), "plm": (2.0, 0.01)}  # samples/s vs stock, eval loss tolerance
RSS_GOAL = 1.1  # peak RSS at most this times stock's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", choices=["objectives", "train", "precision", "preprocess", "ddp"])
    parser.add_argument("--objective", default="clm", choices=OBJECTIVES, help="train: which script")
    parser.add_argument("--objectives", default="clm,mlm,plm", help="objectives: which scripts")
    parser.add_argument("--shape", default="tiny", choices=SHAPES)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_blocks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the cases this many times")
    parser.add_argument("--cases", default=None, help="train: comma list of cases (default: all that apply)")
    parser.add_argument("--repeats", type=int, default=5, help="preprocess: WikiText-2 train this many times")
    parser.add_argument("--lines", type=int, default=0, help="preprocess: only the first LINES lines (0: all)")
    parser.add_argument("--tokenizer", default="gpt2", help="preprocess: a folder under data/tokenizers")
    parser.add_argument("--block_size", type=int, default=1024, help="preprocess: block length")
    parser.add_argument("--pipelines", default="stock,ours", help="preprocess: which pipelines (stock first)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.warmup = min(args.warmup, args.steps - 1)
    return args


# ------------------------------------------------------------------------ stock, in a subprocess


def stock_blocks(tokenizer, files: dict, block_size: int, cache: str, objective: str = "clm"):
    """The Hugging Face example's preprocessing, as written there (run_clm.py's, or run_mlm.py's and
    run_plm.py's: no line breaks kept, no labels column; run_mlm.py asks for the special-tokens mask)."""
    from datasets import load_dataset

    keep = {"keep_linebreaks": True} if objective == "clm" else {}
    raw = load_dataset("text", data_files=files, cache_dir=cache, **keep)
    LOADED_RSS.append(_peak_rss_mb())

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]]) // block_size * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        if objective == "clm":
            result["labels"] = result["input_ids"].copy()
        return result

    options = {"return_special_tokens_mask": True} if objective == "mlm" else {}
    tokenized = raw.map(lambda examples: tokenizer(examples["text"], **options), batched=True, remove_columns=["text"])
    return tokenized.map(group_texts, batched=True)


def stock_accuracy(eval_prediction) -> dict:
    """evaluate's "accuracy" on all predictions at once, as run_clm.py's example computes it."""
    predictions, labels = eval_prediction
    labels, predictions = labels[:, 1:].reshape(-1), predictions[:, :-1].reshape(-1)
    scored = labels != -100
    return {"accuracy": float((predictions[scored] == labels[scored]).mean())}


def stock_masked_accuracy(eval_prediction) -> dict:
    """run_mlm.py's example: the accuracy over the masked positions, all predictions at once."""
    predictions, labels = eval_prediction
    labels, predictions = labels.reshape(-1), predictions.reshape(-1)
    scored = labels != -100
    return {"accuracy": float((predictions[scored] == labels[scored]).mean())}


def stock_model_and_collator(objective: str, tokenizer, config_overrides: dict):
    """The example's model from scratch, its collator and its metrics (run_plm.py's example has none)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, DataCollatorForLanguageModeling,
                              DataCollatorForPermutationLanguageModeling, XLNetLMHeadModel, default_data_collator)

    spec = OBJECTIVES[objective]
    config = AutoConfig.for_model(spec.model_type, **config_overrides)
    argmax = {"preprocess_logits_for_metrics": lambda logits, _: logits.argmax(-1)}
    if objective == "clm":
        return (AutoModelForCausalLM.from_config(config), default_data_collator,
                {"compute_metrics": stock_accuracy, **argmax})
    if objective == "mlm":
        model = AutoModelForMaskedLM.from_config(config)
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
        metrics = {"compute_metrics": stock_masked_accuracy, **argmax}
    else:
        model = XLNetLMHeadModel(config)
        collator = DataCollatorForPermutationLanguageModeling(tokenizer=tokenizer, plm_probability=1 / 6,
                                                              max_span_length=5)
        metrics = {}
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model, collator, metrics


def stock_train(flags_json: str, out: str) -> None:
    """Train and evaluate as the example does; results to OUT/results.json."""
    from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

    sys.path.insert(0, str(ROOT))
    from utils.report.speed import SpeedCallback

    spec = json.loads(flags_json)
    objective = spec["objective"]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / OBJECTIVES[objective].tokenizer)
    blocks = stock_blocks(tokenizer, {"train": spec["train"], "validation": spec["validation"]}, spec["block"],
                          str(Path(out).parent / f"stock-cache-{objective}"), objective)
    (training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(spec["training_flags"])
    model, collator, metrics = stock_model_and_collator(objective, tokenizer, spec["config"])
    clock = SpeedCallback(spec["warmup"], spec["block"])
    trainer = Trainer(model=model, args=training_args, data_collator=collator, processing_class=tokenizer,
                      train_dataset=blocks["train"].select(range(spec["train_blocks"])),
                      eval_dataset=blocks["validation"].select(range(spec["eval_blocks"])), callbacks=[clock],
                      **metrics)
    trainer.train()
    metrics = {**clock.metrics(training_args, model), **trainer.evaluate()}
    Path(out, "results.json").write_text(json.dumps(metrics))


def stock_preprocess(text: str, cache: str, tokenizer_name: str, block_size: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / tokenizer_name)
    blocks = stock_blocks(tokenizer, {"train": text}, block_size, cache)
    report_preprocess(len(blocks["train"]) * block_size)


def ours_preprocess(text: str, cache: str, tokenizer_name: str, block_size: int) -> None:
    """run_clm.py's steps up to its samples: the CPU set-up of start_run, reading the text, preparing it."""
    sys.path.insert(0, str(ROOT))
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from utils.launch.cpu import keep_freed_memory
    from utils.data.prepare import prepare_datasets
    from utils.data.raw import load_raw_datasets

    keep_freed_memory()
    validation = Path(cache).parent / "validation.txt"  # a few lines, so that all of TEXT is training text
    with open(text, encoding="utf-8") as lines:
        validation.write_text("".join(islice(lines, 50)), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / tokenizer_name)
    model_args = SimpleNamespace(cache_dir=cache, token=None)
    data_args = SimpleNamespace(dataset_name=None, train_file=text, validation_file=str(validation),
                                keep_linebreaks=True, streaming=False, max_train_samples=None, max_eval_samples=None,
                                text_column_name=None, preprocessing_num_workers=None, overwrite_cache=False,
                                sample_by="line")
    raw = load_raw_datasets(model_args, data_args)
    LOADED_RSS.append(_peak_rss_mb())
    training_args = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1, main_process_first=lambda desc=None: contextlib.nullcontext())
    samples = prepare_datasets(raw, tokenizer, data_args, training_args, seq_len=block_size, cache_dir=cache)
    report_preprocess(len(samples["train"]) * block_size)


LOADED_RSS = []  # peak RSS once datasets has loaded the text (its text builder's share of the peak)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def report_preprocess(tokens: int) -> None:
    print(json.dumps({"tokens": tokens, "peak_rss_mb": _peak_rss_mb(), "loaded_rss_mb": LOADED_RSS[0]}))


def worker(args) -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    kind, *rest = args.worker
    {"stock-train": stock_train, "stock-preprocess": stock_preprocess, "ours-preprocess": ours_preprocess}[kind](
        *rest[:2], *([rest[2], int(rest[3])] if kind.endswith("preprocess") else []))


# ---------------------------------------------------------------------------------------- driver


def _run(command: list[str], env: dict | None = None) -> tuple[float, str, float]:
    """Run COMMAND; its wall seconds, its stdout and the peak RSS (MB) of its largest process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{err.read()[-3000:]}")
        return seconds, out.read(), usage.ru_maxrss / 1024


def train_case(case: str, args, folder: Path, files: dict, objective: str = "clm") -> dict:
    """One fresh training process of CASE (stock, ours, or ours with a lever): its speed, peak RSS and eval loss."""
    spec = OBJECTIVES[objective]
    layers, width, heads, block = SHAPES[args.shape]
    out = folder / f"out-{len(list(folder.iterdir()))}"
    common = ["--do_train", "--do_eval", "--max_steps", str(args.steps), "--per_device_train_batch_size",
              str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size), "--learning_rate", "5e-4",
              "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--log_level", "warning",
              "--seed", "7", "--output_dir", str(out)]
    stock_flags, our_flags = PRECISIONS[args.precision]
    config = spec.config(layers, width, heads, block)
    if case == "stock":
        out.mkdir()
        job = {"objective": objective, "train": files["train"], "validation": files["validation"], "block": block,
               "config": config, "training_flags": common + stock_flags, "warmup": args.warmup,
               "train_blocks": args.steps * args.batch_size, "eval_blocks": args.eval_blocks}
        _, _, peak = _run([sys.executable, __file__, "train", "--worker", "stock-train", json.dumps(job), str(out)])
        results = json.loads((out / "results.json").read_text())
    else:
        overrides = ",".join(f"{k}={v}" for k, v in config.items())
        env, case_flags, _ = TRAIN_CASES[case]
        _, _, peak = _run([
            sys.executable, spec.script, "--model_type", spec.model_type, "--tokenizer_name",
            str(TOKENIZERS / spec.tokenizer), "--config_overrides", overrides, spec.length_flag, str(block),
            "--train_file", files["train"], "--validation_file", files["validation"], "--max_train_samples",
            str(args.steps * args.batch_size), "--max_eval_samples", str(args.eval_blocks), "--fps_warmup_steps",
            str(args.warmup), "--cache_dir", str(folder / f"cache-{objective}"), *common, *our_flags, *case_flags],
            env=env)
        results = {**json.loads((out / "train_results.json").read_text()),
                   **json.loads((out / "eval_results.json").read_text())}
    shutil.rmtree(out, ignore_errors=True)
    return {"samples/s": results["fps"], "tokens/s": results["fps_tokens_per_second"],
            "eval tokens/s": results["eval_samples_per_second"] * block, "eval loss": results["eval_loss"],
            "peak RSS MB": peak}


def precision_row(args, folder: Path) -> None:
    files = training_text(folder, args)
    cases = [("ours", "fp32"), ("ours", "bf16-O1"), ("ours", "bf16"), ("stock", "fp32")]
    results = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case, precision in cases:
            run_args = argparse.Namespace(**{**vars(args), "precision": precision})
            results[(case, precision)].append(train_case(case, run_args, folder, files))
            print(case, precision, results[(case, precision)][-1], file=sys.stderr, flush=True)
    medians = {key: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for key, runs in results.items()}
    base = medians[("ours", "fp32")]
    labels = {"fp32": "fp32", "bf16-O1": "--bf16 --fp16_opt_level O1", "bf16": "--bf16 O2 --use_combine_grad"}
    rows = [[case, labels[precision], f"{m['tokens/s']:,.0f}", f"{m['tokens/s'] / base['tokens/s']:.2f}x",
             f"{m['eval loss']:.4f}", " / ".join(f"{r['tokens/s']:,.0f}" for r in results[(case, precision)])]
            for (case, precision), m in medians.items()]
    layers, width, _, block = SHAPES[args.shape]
    print(f"precision, GPT-2 {layers} x {width}, block {block}, batch {args.batch_size}, {args.steps} steps "
          f"({args.steps - args.warmup} timed), median of {args.rounds}")
    print_table(["pipeline", "precision", "train tokens/s", "vs ours fp32", "eval loss", "each round tokens/s"], rows)


def training_text(folder: Path, args) -> dict:
    """Enough WikiText-2 train lines for the run (both sides tokenize all of it, untimed), and held-out
    validation lines."""
    block = SHAPES[args.shape][3]
    needed_tokens = args.steps * args.batch_size * block * 1.3
    lines, tokens = [], 0
    for line in (WIKI / "wiki.train.tokens").read_text(encoding="utf-8").splitlines(keepends=True):
        lines.append(line)
        tokens += len(line) / 4  # about 4 characters a token
        if tokens > needed_tokens:
            break
    (folder / "train.txt").write_text("".join(lines), encoding="utf-8")
    valid = (WIKI / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)[:1200]
    (folder / "valid.txt").write_text("".join(valid), encoding="utf-8")
    return {"train": str(folder / "train.txt"), "validation": str(folder / "valid.txt")}


def alternate(cases: list[str], args, folder: Path, files: dict, objective: str) -> dict[str, list[dict]]:
    """Each case once per round, in order, --rounds times: every case sees the same machine load on average."""
    results = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            results[case].append(train_case(case, args, folder, files, objective))
            print(objective, case, results[case][-1], file=sys.stderr, flush=True)
    return results


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def train_row(args, folder: Path) -> None:
    files = training_text(folder, args)
    objective = args.objective
    cases = args.cases.split(",") if args.cases else [
        case for case, (_, _, applies) in TRAIN_CASES.items() if objective in applies.split(",")]
    results = alternate(cases, args, folder, files, objective)
    median = {case: medians(runs) for case, runs in results.items()}
    base = median.get("stock")
    rows = []
    for case, m in median.items():
        ratio = lambda key: f"{m[key] / base[key]:.2f}x" if base else "-"  # noqa: E731
        rows.append([case, f"{m['tokens/s']:,.0f}", ratio("tokens/s"), f"{m['eval tokens/s']:,.0f}",
                     ratio("eval tokens/s"), f"{m['eval loss']:.4f}",
                     f"{m['eval loss'] / base['eval loss']:.4f}" if base else "-", f"{m['peak RSS MB']:,.0f}",
                     ratio("peak RSS MB"), " / ".join(f"{r['tokens/s']:,.0f}" for r in results[case])])
    layers, width, _, block = SHAPES[args.shape]
    print(f"train, {OBJECTIVES[objective].script} ({OBJECTIVES[objective].model_type} {layers} x {width}), "
          f"length {block}, batch {args.batch_size}, {args.steps} steps ({args.steps - args.warmup} timed), "
          f"{args.precision}, median of {args.rounds}")
    print_table(["case", "train tokens/s", "vs stock", "eval tokens/s", "vs stock", "eval loss", "vs stock",
                 "peak RSS MB", "vs stock", "each round tokens/s"], rows)


# ------------------------------------------------------------------ the three scripts against stock


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s now: the best of REPEATS size^3 products on torch's threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # the first call loads the kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_flops_per_sample(objective: str, shape: str) -> float:
    """The FLOPs a training step spends on one sample, as the objective needs them (see the module doc)."""
    from transformers import AutoTokenizer

    spec = OBJECTIVES[objective]
    layers, width, _, block = SHAPES[shape]
    vocabulary = len(AutoTokenizer.from_pretrained(TOKENIZERS / spec.tokenizer))
    per_token = 6 * layers * 12 * width**2 + 12 * layers * width * block
    return block * per_token + 6 * width * vocabulary * spec.predicted_positions(block)


def machine_state() -> str:
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"load average {load} (1, 5, 15 min), {os.cpu_count()} CPUs"


def commit() -> str:
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return described.stdout.strip() or "unknown"


def objectives_row(args, folder: Path) -> None:
    """The three scripts against their stock pipelines: the ratios, MFU, and whether the goals are met."""
    started = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {machine_state()}"
    peaks = [matmul_peak_flops()]
    files = training_text(folder, args)
    objectives = args.objectives.split(",")
    results = {objective: {"ours": [], "stock": []} for objective in objectives}
    one_round = argparse.Namespace(**{**vars(args), "rounds": 1})
    for round_index in range(args.rounds):  # every round runs all the processes; who goes first alternates
        order = ["ours", "stock"] if round_index % 2 == 0 else ["stock", "ours"]
        for objective in objectives:
            for case, runs in alternate(order, one_round, folder, files, objective).items():
                results[objective][case] += runs
    peaks.append(matmul_peak_flops())
    peak = max(peaks)
    layers, width, _, block = SHAPES[args.shape]
    rows, verdicts = [], []
    for objective in objectives:
        ours, stock = medians(results[objective]["ours"]), medians(results[objective]["stock"])
        flops = model_flops_per_sample(objective, args.shape)
        speed, rss, loss = (ours[k] / stock[k] for k in ("samples/s", "peak RSS MB", "eval loss"))
        # Stock's causal loss divides by every label of a block, ours by the block - 1 it predicts.
        loss_per_prediction = loss * (block - 1) / block if objective == "clm" else loss
        each = " / ".join(f"{o['samples/s'] / s['samples/s']:.2f}x"
                          for o, s in zip(results[objective]["ours"], results[objective]["stock"]))
        rows.append([OBJECTIVES[objective].script, f"{stock['samples/s']:.1f}", f"{ours['samples/s']:.1f}",
                     f"{speed:.2f}x", f"{stock['peak RSS MB']:,.0f}", f"{ours['peak RSS MB']:,.0f}", f"{rss:.2f}x",
                     f"{stock['eval loss']:.4f}", f"{ours['eval loss']:.4f}", f"{loss:.4f}",
                     f"{loss_per_prediction:.4f}", f"{stock['samples/s'] * flops / peak:.1%}",
                     f"{ours['samples/s'] * flops / peak:.1%}", each])
        goal, tolerance = GOALS[objective]
        met = {"speed": speed >= goal, "RSS": rss <= RSS_GOAL, "loss": abs(loss_per_prediction - 1) <= tolerance}
        verdicts.append(f"{OBJECTIVES[objective].script}: samples/s {speed:.2f}x (goal >= {goal:g}x), peak RSS "
                        f"{rss:.2f}x (goal <= {RSS_GOAL:g}x), eval loss {loss_per_prediction:.4f} (goal within "
                        f"{tolerance:.0%}): " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    command = "python benchmarks/bench_vs_stock.py " + " ".join(sys.argv[1:])
    print(f"the three scripts against stock, fp32 CPU, {args.shape} configs ({layers} layers of width {width}), "
          f"length {block}, batch {args.batch_size}, {args.steps} steps ({args.steps - args.warmup} timed), "
          f"{args.eval_blocks} held-out eval blocks, median of {args.rounds} alternated rounds")
    print(f"started {started}; ended {machine_state()}")
    print(f"commit {commit()}; command: {command}")
    print(f"fp32 matmul peak {peak / 1e9:,.0f} GFLOP/s (2048^3, best of 5; "
          + " and ".join(f"{p / 1e9:,.0f}" for p in peaks) + " before and after)\n")
    print_table(["script", "stock samples/s", "ours samples/s", "vs stock", "stock peak RSS MB", "ours peak RSS MB",
                 "RSS vs stock", "stock eval loss", "ours eval loss", "loss vs stock",
                 "loss vs stock per predicted token", "stock MFU", "ours MFU", "ours / stock each round"], rows)
    print("\n" + "\n".join(verdicts))


def ddp_case(case: str, args, folder: Path, files: dict) -> tuple[float, bool]:
    import socket

    layers, width, heads, block = SHAPES[args.shape]
    out = folder / f"ddp-{len(list(folder.iterdir()))}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = f"n_layer={layers},n_embd={width},n_head={heads},n_positions={block}"
    before = ["--ddp_find_unused_parameters", "true"] if case == "before" else []
    _run(["bash", "scripts/train_clm_8p.sh", "--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / "gpt2"),
          "--config_overrides", overrides, "--block_size", str(block), "--train_file", files["train"],
          "--max_train_samples", str(2 * args.steps * args.batch_size), "--max_steps", str(args.steps),
          "--per_device_train_batch_size", str(args.batch_size), "--fps_warmup_steps", str(args.warmup),
          "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7",
          "--cache_dir", str(folder / "cache"), "--output_dir", str(out), *before],
         env={"NPROC_PER_NODE": "2", "DEVICE": "cpu", "AMP_FLAGS": "", "MASTER_PORT": str(port)})
    log = (out / "train.log").read_text()
    warned = "did not find any unused parameters" in log
    tokens_per_second = json.loads((out / "train_results.json").read_text())["fps_tokens_per_second"]
    shutil.rmtree(out, ignore_errors=True)
    return tokens_per_second, warned


def ddp_row(args, folder: Path) -> None:
    args.steps = max(args.steps, 2)
    files = training_text(folder, argparse.Namespace(**{**vars(args), "batch_size": 2 * args.batch_size}))
    results = {"before": [], "after": []}
    for _ in range(args.rounds):
        for case in results:
            results[case].append(ddp_case(case, args, folder, files))
            print(case, results[case][-1], file=sys.stderr, flush=True)
    base = statistics.median(r[0] for r in results["before"])
    rows = []
    for case, runs in results.items():
        median = statistics.median(r[0] for r in runs)
        rows.append([case, "true" if case == "before" else "from the model", f"{median:,.0f}", f"{median / base:.2f}x",
                     "yes" if any(r[1] for r in runs) else "no", " / ".join(f"{r[0]:,.0f}" for r in runs)])
    layers, width, _, block = SHAPES[args.shape]
    print(f"2-process CPU launcher, fp32, GPT-2 {layers} x {width}, block {block}, batch {args.batch_size} per "
          f"process, {args.steps} steps ({args.steps - args.warmup} timed), median of {args.rounds}")
    print_table(["case", "find_unused_parameters", "tokens/s (both)", "vs before", "torch's no-unused warning",
                 "each round tokens/s"], rows)


def preprocess_row(args, folder: Path) -> None:
    source = (WIKI / "wiki.train.tokens").read_text(encoding="utf-8")
    if args.lines:
        source = "".join(source.splitlines(keepends=True)[:args.lines])
    text = folder / f"train-x{args.repeats}.txt"
    text.write_text(source * args.repeats, encoding="utf-8")
    results = {pipeline: [] for pipeline in args.pipelines.split(",")}
    for _ in range(args.rounds):
        for pipeline in results:
            cache = folder / f"cache-{pipeline}"
            shutil.rmtree(cache, ignore_errors=True)
            seconds, stdout, _ = _run([sys.executable, __file__, "preprocess", "--worker", f"{pipeline}-preprocess",
                                       str(text), str(cache), args.tokenizer, str(args.block_size)],
                                      env={"TOKENIZERS_PARALLELISM": "true"})
            results[pipeline].append({"seconds": seconds, **json.loads(stdout.strip().splitlines()[-1])})
            print(pipeline, results[pipeline][-1], file=sys.stderr, flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    stock_s = statistics.median(r["seconds"] for r in results.get("stock") or next(iter(results.values())))
    rows = []
    for pipeline, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rows.append([pipeline, f"{seconds:.1f}", f"{stock_s / seconds:.2f}x", f"{runs[0]['tokens']:,}",
                     f"{max(r['loaded_rss_mb'] for r in runs):.0f}", f"{max(r['peak_rss_mb'] for r in runs):.0f}",
                     " / ".join(f"{r['seconds']:.1f}" for r in runs)])
    print(f"cold preprocessing, WikiText-2 train x{args.repeats} ({text.stat().st_size / 2**20:.1f} MB), "
          f"{args.tokenizer} tokenizer, block {args.block_size}, median of {args.rounds}")
    print_table(["pipeline", "process s", "speed vs stock", "tokens", "peak RSS after loading the text MB",
                 "peak RSS MB", "each round s"], rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    folder = Path(tempfile.mkdtemp(prefix="bench_vs_stock-"))
    try:
        rows = {"objectives": objectives_row, "train": train_row, "precision": precision_row,
                "preprocess": preprocess_row, "ddp": ddp_row}
        rows[args.row](args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
