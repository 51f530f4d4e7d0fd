"""The GPU measurement, prepared to run once in at most 8 minutes on one H100/H200-class GPU.

    python benchmarks/bench_gpu.py              # GPT-2 124M on the GPU: a Markdown table, then one JSON line
    python benchmarks/bench_gpu.py --dry_run    # the same code on the CPU at a tiny size (a minute or two)

Correctness: GPT-2 124M (12 x 768, block 1024, vocabulary 50,257) from scratch, dropout 0, the
same fixed WikiText-2 blocks in the same order, 30 steps at batch 8; the loss and grad norm of
every step for O0 (fp32, TF32 off), bf16 O1, bf16 O2 + combine_grad, fp16 O1, fp16 O2 +
combine_grad (dynamic loss scale), and bf16 O2 + combine_grad with --loss_chunk_size, with
--torch_compile and with --pad_vocab_to_multiple_of 64 (50,304 rows; the padded entries' scores
are -inf, so the loss is the true vocabulary's); the ratios to O0 at the last step.

Speed, side by side in this one process: the stock pipeline (transformers' Trainer, its bf16
autocast, SDPA attention) against ours (LMTrainer, bf16 O2 + combine_grad, with and without
--torch_compile, with --pad_vocab_to_multiple_of 64, with --loss_chunk_size 1024, the CPU's
default for causal LMs) on the same blocks at batch 8 and 16 x 1024: tokens/s after the warm-up steps
and MFU, both from the suite's one clock (utils/report/speed.py, which also holds the table of
device peaks: an unknown device gives MFU null), and peak CUDA memory. Real apex at O2 with
combine_grad too, when it imports; and the stock pipeline with --use_liger_kernel when
liger-kernel imports (Liger has no kernels for GPT-2: the same speed as stock is expected, and the
JSON line says whether its table has gpt2, and what our run says about the flag).

Budget (H100/H200, estimated, not yet measured): a 124M step at 8 x 1024 takes ~0.1 s in bf16 and
~0.3 s in fp32 without TF32, so the 8 correctness runs of 30 steps are ~45 s of steps; each
run also builds a model (~3 s) and the two compiled runs (one per batch shape) compile for
~60 s each. The 10 speed runs of WARMUP + TIMED = 25 steps at batch 8/16 are ~40 s of steps
(12 with apex and liger), plus 2 more compilations. About 5.5 minutes in all; a case that would start after BUDGET_S is
skipped (and says so) rather than overrunning.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402,F401  (before torch: see utils/__init__.py)
import torch  # noqa: E402

from common import print_table, show_progress  # noqa: E402

BUDGET_S = 7 * 60  # no case starts after this: the last one still ends within 8 minutes
SIZES = {  # model, block, correctness batch, speed batches, correctness steps, warm-up and timed speed steps
    "gpt2-124m": dict(config=dict(n_layer=12, n_embd=768, n_head=12), block=1024, batch=8, speed_batches=(8, 16),
                      steps=30, warmup=5, timed=20),
    "dry-run": dict(config=dict(n_layer=1, n_embd=64, n_head=2), block=64, batch=2, speed_batches=(2, 4),
                    steps=4, warmup=1, timed=2),
}
BF16_O2_COMBINE = dict(bf16=True, fp16_opt_level="O2", use_combine_grad=True)
CORRECTNESS = {  # row: LMTrainingArguments flags
    "O0 (fp32, TF32 off)": dict(fp16_opt_level=None),
    "bf16 O1": dict(bf16=True, fp16_opt_level="O1"),
    "bf16 O2 + combine_grad": BF16_O2_COMBINE,
    "fp16 O1": dict(fp16=True, fp16_opt_level="O1"),
    "fp16 O2 + combine_grad (dynamic scale)": dict(fp16=True, fp16_opt_level="O2", use_combine_grad=True,
                                                   loss_scale="dynamic"),
    "bf16 O2 + combine_grad + --loss_chunk_size 1024": dict(**BF16_O2_COMBINE, loss_chunk_size=1024),
    "bf16 O2 + combine_grad + --torch_compile": dict(**BF16_O2_COMBINE, torch_compile=True),
    "bf16 O2 + combine_grad + --pad_vocab_to_multiple_of 64": dict(**BF16_O2_COMBINE, pad_vocab_to_multiple_of=64),
}
SPEED = {  # pipeline: LMTrainingArguments flags of ours (None: the stock Trainer)
    "stock (Trainer, bf16 autocast, SDPA)": None,
    "ours bf16 O2 + combine_grad": BF16_O2_COMBINE,
    "ours bf16 O2 + combine_grad + --torch_compile": dict(**BF16_O2_COMBINE, torch_compile=True),
    "ours bf16 O2 + combine_grad + --pad_vocab_to_multiple_of 64": dict(**BF16_O2_COMBINE, pad_vocab_to_multiple_of=64),
    "ours bf16 O2 + combine_grad + --loss_chunk_size 1024": dict(**BF16_O2_COMBINE, loss_chunk_size=1024),
}
APEX = "apex O2 + combine_grad"
LIGER = "stock + --use_liger_kernel"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="the same code on the CPU at a tiny size")
    parser.add_argument("--output_dir", default="/tmp/bench_gpu", help="the runs' scratch folder (nothing is saved)")
    return parser.parse_args(argv)


def fixed_blocks(block: int, count: int) -> list[torch.Tensor]:
    """The first COUNT blocks of BLOCK GPT-2 tokens of WikiText-2 train (v1): the same data for every case."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizers" / "gpt2")
    ids: list[int] = []
    with open(ROOT / "data" / "wikitext-2-v1" / "wiki.train.tokens", encoding="utf-8") as text:
        while len(ids) < block * count:
            lines = list(islice(text, 1000))
            if not lines:
                raise SystemExit(f"error: WikiText-2 train holds fewer than {count} blocks of {block} tokens")
            ids += [i for row in tokenizer(lines)["input_ids"] for i in row]
    return list(torch.tensor(ids[:block * count]).view(count, block))


def fresh_model(size: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", **size["config"], n_positions=size["block"], vocab_size=50257,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def common_flags(args, size: dict, batch: int, steps: int, warmup: int) -> dict:
    return dict(output_dir=args.output_dir, use_cpu=args.dry_run, per_device_train_batch_size=batch,
                max_steps=steps, logging_steps=1, learning_rate=6e-4, warmup_steps=0, save_strategy="no",
                report_to="none", disable_tqdm=True, seed=0, train_sampling_strategy="sequential",
                fps_warmup_steps=warmup, **({} if args.dry_run else {"tf32": False}))


def our_trainer(args, size: dict, blocks, batch: int, steps: int, warmup: int, flags: dict):
    """LMTrainer as run_clm.py builds it (its collator, accuracy, tokens per sample), over BLOCKS."""
    from utils.data.collators import CausalLMCollator
    from utils.flags.arguments import LMTrainingArguments
    from utils.model.metrics import TokenAccuracy
    from utils.train.trainer import LMTrainer

    from utils.model.vocab_padding import pad_vocabulary

    flags = dict(flags)
    model = fresh_model(size)
    if flags.get("pad_vocab_to_multiple_of"):  # a model flag: load_model pads the model as this does
        pad_vocabulary(model, flags.pop("pad_vocab_to_multiple_of"))
    training_args = LMTrainingArguments(**common_flags(args, size, batch, steps, warmup), **flags)
    return LMTrainer(model=model, args=training_args, train_dataset=[{"input_ids": b} for b in blocks],
                     data_collator=CausalLMCollator(), accuracy=TokenAccuracy(shift=True),
                     tokens_per_sample=size["block"])


def stock_trainer(args, size: dict, blocks, batch: int, steps: int, warmup: int, use_liger_kernel: bool = False):
    """transformers' Trainer as its run_clm.py example uses it, bf16 autocast, with the suite's clock added."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from utils.launch.device import device_name
    from utils.report.speed import SpeedCallback

    flags = common_flags(args, size, batch, steps, warmup)
    clock = SpeedCallback(flags.pop("fps_warmup_steps"), size["block"], device_name(device_type(args)))
    training_args = TrainingArguments(**flags, bf16=True, use_liger_kernel=use_liger_kernel)
    trainer = Trainer(model=fresh_model(size), args=training_args, data_collator=default_data_collator,
                      train_dataset=[{"input_ids": b, "labels": b} for b in blocks], callbacks=[clock])
    trainer.speed = clock
    return trainer


def quiet(trainer):
    """Without the Trainer's printed log dicts (disable_tqdm prints them): stdout is the tables and the JSON line."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def device_type(args) -> str:
    return "cpu" if args.dry_run else "cuda"


def release(args) -> None:
    """Between cases: nothing of the last one stays cached or counts in the next one's peak memory."""
    gc.collect()
    torch._dynamo.reset()
    if not args.dry_run:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(args) -> float:
    if args.dry_run:  # the CPU has no per-case counter: the process's peak RSS so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return torch.cuda.max_memory_allocated() / 2**20


def correctness(args, size: dict, blocks, started: float) -> dict:
    rows = {}
    for label, flags in CORRECTNESS.items():
        if time.perf_counter() - started > BUDGET_S:
            rows[label] = {"skipped": "over the time budget"}
            continue
        release(args)
        trainer = quiet(our_trainer(args, size, blocks, size["batch"], size["steps"], 1, flags))
        trainer.train()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        rows[label] = {"loss": [e["loss"] for e in history], "grad_norm": [e["grad_norm"] for e in history]}
        show_progress([label, f"last loss {rows[label]['loss'][-1]:.4f}"])
        del trainer
    base = rows["O0 (fp32, TF32 off)"]
    for row in rows.values():
        if "loss" in row:
            row["loss_ratio_to_o0"] = row["loss"][-1] / base["loss"][-1]
            row["grad_norm_ratio_to_o0"] = row["grad_norm"][-1] / base["grad_norm"][-1]
    return rows


def speed_case(args, size: dict, blocks, batch: int, flags: dict | None) -> dict:
    release(args)
    steps = size["warmup"] + size["timed"]
    if flags is None or flags.get("stock"):
        trainer = stock_trainer(args, size, blocks, batch, steps, size["warmup"],
                                use_liger_kernel=bool(flags and flags.get("use_liger_kernel")))
    else:
        trainer = our_trainer(args, size, blocks, batch, steps, size["warmup"], flags)
    quiet(trainer).train()
    metrics = trainer.speed.metrics(trainer.args, trainer.model)
    result = {"tokens_per_s": metrics.get("fps_tokens_per_second"), "mfu": metrics.get("mfu"),
              "peak_memory_mb": round(peak_memory_mb(args), 1)}
    del trainer
    return result


def speed(args, size: dict, blocks, started: float) -> list[dict]:
    cases = dict(SPEED)
    if apex_importable():
        cases[APEX] = {**BF16_O2_COMBINE, "amp_backend": "apex"}
    if liger_report()["importable"]:
        cases[LIGER] = {"stock": True, "use_liger_kernel": True}
    rows = []
    for batch in size["speed_batches"]:
        for label, flags in cases.items():
            row = {"pipeline": label, "batch": batch}
            if time.perf_counter() - started > BUDGET_S:
                rows.append({**row, "skipped": "over the time budget"})
                continue
            rows.append({**row, **speed_case(args, size, blocks, batch, flags)})
            show_progress([label, str(batch), f"{rows[-1]['tokens_per_s']} tokens/s"])
    return rows


def apex_importable() -> bool:
    try:
        import apex.amp  # noqa: F401
    except ImportError:
        return False
    return True


def liger_report() -> dict:
    """Whether liger-kernel imports, whether its table has GPT-2, and what our run does with --use_liger_kernel."""
    from types import SimpleNamespace

    from utils.errors import UsageError
    from utils.model.liger import check_liger, liger_model_types

    args = SimpleNamespace(use_liger_kernel=True)
    try:
        has_gpt2 = "gpt2" in liger_model_types()
    except UsageError as err:
        return {"importable": False, "ours": str(err)}
    check_liger(args, SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))
    return {"importable": True, "gpt2_in_table": has_gpt2, "ours_keeps_the_flag": args.use_liger_kernel}


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def print_tables(result: dict) -> None:
    print(f"\ncorrectness, GPT-2 {result['model']}, batch {result['batch']}, {result['steps']} steps; "
          f"{result['device']}\n")
    print_table(["case", "loss step 1", "loss last", "vs O0", "grad norm last", "vs O0"], [
        [label, *(["skipped"] + ["-"] * 4 if "skipped" in row else [
            _number(row["loss"][0]), _number(row["loss"][-1]), _number(row["loss_ratio_to_o0"]),
            _number(row["grad_norm"][-1]), _number(row["grad_norm_ratio_to_o0"])])]
        for label, row in result["correctness"].items()])
    stock_label = next(label for label, flags in SPEED.items() if flags is None)
    stock = {row["batch"]: row.get("tokens_per_s") for row in result["speed"] if row["pipeline"] == stock_label}
    print(f"\nspeed after {result['warmup']} warm-up steps, {result['timed']} timed; peak {result['peak_flops']}\n")
    print_table(["pipeline", "batch", "tokens/s", "vs stock", "MFU", "peak memory MB"], [
        [row["pipeline"], f"{row['batch']} x {result['block']}", _number(row.get("tokens_per_s"), 0),
         _number(row["tokens_per_s"] / stock[row["batch"]], 2) + "x" if row.get("tokens_per_s") and
         stock.get(row["batch"]) else "-", _number(row.get("mfu")), _number(row.get("peak_memory_mb"), 0)]
        for row in result["speed"]])


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run with --dry_run on the CPU")
    from transformers.utils import logging as hf_logging

    from utils.launch.device import describe_device, device_name, tf32_matmul
    from utils.report.speed import peak_flops

    logging.disable(logging.WARNING)  # the runs' own logs would bury the tables
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    size = SIZES["dry-run" if args.dry_run else "gpt2-124m"]
    count = max(size["batch"] * size["steps"], max(size["speed_batches"]) * (size["warmup"] + size["timed"]))
    blocks = fixed_blocks(size["block"], count)
    result = {"dry_run": args.dry_run, "device": describe_device(device_type(args)),
              "peak_flops": peak_flops(device_name(device_type(args))), "torch": torch.__version__,
              "model": f"{size['config']['n_layer']} x {size['config']['n_embd']}", "block": size["block"],
              "batch": size["batch"], "steps": size["steps"], "warmup": size["warmup"], "timed": size["timed"],
              "apex": apex_importable(), "liger": liger_report(),
              "peak_memory": "process peak RSS so far (CPU)" if args.dry_run else "torch.cuda.max_memory_allocated"}
    result["correctness"] = correctness(args, size, blocks, started)
    result["tf32_matmul"] = tf32_matmul(device_type(args))
    result["speed"] = speed(args, size, blocks, started)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_tables(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
