"""Sliding-window evaluation, bits per byte, byte and word perplexity: each checked against the plain model.

The independent side never uses the suite's evaluation: the saved model's own loss (fp32) over
windows cut by the Hugging Face perplexity guide's loop, and the bytes and words of the scored
tokens counted from the text, not from tokenizer offsets.
"""

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUICK, ROOT, TOKENIZERS, free_port, read_json, run_script
from utils.data.fast_tokenize import byte_level_alphabet
from utils.eval.text_units import read_stream
from utils.eval.windows import ScoredWindows, blocks, sliding

BLOCK, STRIDE = 64, 32
FIGURES = ("eval_loss", "eval_bits_per_byte", "eval_byte_perplexity", "eval_word_perplexity")


# ------------------------------------------------------------------------------ the independent side


def stream_ids(tokenizer, text: str) -> list[int]:
    """The validation text as the grouping reads it: each line with its line break, tokenized, one after the other."""
    return [i for line in text.splitlines(keepends=True) for i in tokenizer(line, verbose=False)["input_ids"]]


def guide_windows(n_tokens: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """The Hugging Face perplexity guide's loop: (begin, end, target length) of each window."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def model_nll(model, ids: list[int], windows) -> tuple[float, int]:
    """Summed loss (float64) and scored tokens of the plain model over windows (begin, end, target length)."""
    ids = torch.tensor(ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, target in windows:
            inputs = ids[begin:end]
            labels = inputs.clone()
            labels[: len(inputs) - target] = -100
            n = int((labels[1:] != -100).sum())  # the model's loss averages over these
            total += float(model(input_ids=inputs[None], labels=labels[None]).loss.double()) * n
            count += n
    return total, count


def gpt2_owned_units(tokenizer, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and words per GPT-2 token from the tokens' own bytes: a character goes with the token holding its
    first byte, a word with the token holding its first character."""
    alphabet = byte_level_alphabet()
    pieces = [bytes(alphabet[c] for c in token) for token in tokenizer.convert_ids_to_tokens(ids)]
    ends = np.cumsum([len(p) for p in pieces])
    text = b"".join(pieces).decode("utf-8")
    char_bytes = np.array([len(c.encode("utf-8")) for c in text])
    char_start = np.concatenate([[0], np.cumsum(char_bytes)[:-1]])
    owner = np.searchsorted(ends, char_start, side="right")  # the token holding each character's first byte
    n_bytes = np.bincount(owner, weights=char_bytes, minlength=len(ids)).astype(int)
    word_chars = [m.start() for m in re.finditer(r"\S+", text)]
    n_words = np.bincount(owner[word_chars], minlength=len(ids))
    return n_bytes, n_words


def figures(loss_sum: float, tokens: int, n_bytes: int, n_words: int) -> dict:
    return {"eval_loss": loss_sum / tokens, "eval_bits_per_byte": loss_sum / n_bytes / math.log(2),
            "eval_byte_perplexity": math.exp(loss_sum / n_bytes), "eval_word_perplexity": math.exp(loss_sum / n_words)}


def assert_figures(results: dict, expected: dict) -> None:
    for key in ("eval_loss", "eval_bits_per_byte"):
        assert results[key] == pytest.approx(expected[key], abs=1e-4), key
    for key in ("eval_byte_perplexity", "eval_word_perplexity"):
        assert results[key] == pytest.approx(expected[key], rel=1e-4), key


# ------------------------------------------------------------------------------ runs


def tiny_gpt2(tokenizer: str) -> list[str]:
    return ["--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / tokenizer), "--block_size", str(BLOCK),
            "--config_overrides", f"n_layer=2,n_embd=64,n_head=2,n_positions={BLOCK},"
            "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"]


@pytest.fixture(scope="module")
def held_out(text_files, tmp_path_factory):
    """A model trained a few steps on the training text, and held-out text (the first 100 validation lines)."""
    folder = tmp_path_factory.mktemp("eval_figures")
    text = "".join(text_files["valid"].read_text(encoding="utf-8").splitlines(keepends=True)[:100])
    (folder / "valid.txt").write_text(text, encoding="utf-8")
    models = {}
    for name in ("gpt2", "xlnet-base-cased"):
        models[name] = folder / name
        run_script("clm", *tiny_gpt2(name), *QUICK, "--max_steps", "6", "--learning_rate", "1e-2",
                   "--max_train_samples", "48", "--train_file", text_files["train"], "--do_train",
                   "--output_dir", models[name])
    return {"text": text, "valid": folder / "valid.txt", "models": models}


def evaluate(model_dir, valid, out, *flags):
    run_script("clm", "--model_name_or_path", model_dir, "--block_size", str(BLOCK), "--validation_file", valid,
               "--do_eval", "--per_device_eval_batch_size", "8", "--report_to", "none", "--output_dir", out, *flags)
    return read_json(out / "all_results.json")


def test_the_stream_and_its_windows_are_those_of_the_grouped_blocks(held_out, tmp_path):
    """Without a stride the evaluation reads the blocks the grouping makes, and each scores all but its first token."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    ids = stream_ids(tokenizer, held_out["text"])
    n = len(ids) // BLOCK
    results = evaluate(held_out["models"]["gpt2"], held_out["valid"], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(held_out["models"]["gpt2"]).eval()
    loss_sum, tokens = model_nll(model, ids, [(i * BLOCK, (i + 1) * BLOCK, BLOCK) for i in range(n)])
    n_bytes, n_words = gpt2_owned_units(tokenizer, ids)
    scored = np.ones(n * BLOCK, bool)
    scored[::BLOCK] = False  # each block's first token predicts nothing
    expected = figures(loss_sum, tokens, int(n_bytes[: n * BLOCK][scored].sum()), int(n_words[: n * BLOCK][scored].sum()))
    assert results["eval_samples"] == n and results["eval_tokens"] == tokens == n * (BLOCK - 1)
    assert_figures(results, expected)


@pytest.mark.parametrize("tokenizer_name", ["gpt2", "xlnet-base-cased"])
def test_sliding_window_figures_are_the_plain_models(held_out, tokenizer_name, tmp_path):
    """--eval_stride 32 --block_size 64: loss, bits per byte, byte and word perplexity as the guide's loop gives them.

    Both tokenizers cut words into pieces; XLNet's sentencepiece also normalizes the text and adds <sep> <cls>
    after every line (scored, owning no text). Every token but the first is scored: the text without " The", the
    first token's in both (" The hull of ..." starts the held-out text).
    """
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / tokenizer_name)
    text = held_out["text"]
    ids = stream_ids(tokenizer, text)
    assert text.startswith(" The ") and tokenizer.convert_ids_to_tokens(ids[0]) in ("ĠThe", "▁The")
    results = evaluate(held_out["models"][tokenizer_name], held_out["valid"], tmp_path / "out",
                       "--eval_stride", str(STRIDE))
    model = AutoModelForCausalLM.from_pretrained(held_out["models"][tokenizer_name]).eval()
    windows = guide_windows(len(ids), BLOCK, STRIDE)
    loss_sum, tokens = model_nll(model, ids, windows)
    expected = figures(loss_sum, tokens, len(text.encode("utf-8")) - len(" The"), len(text.split()) - 1)
    assert tokens == len(ids) - 1 and results["eval_tokens"] == tokens and results["eval_samples"] == len(windows)
    assert_figures(results, expected)


def test_two_processes_and_a_stream_score_the_same_windows(held_out, tmp_path):
    """torchrun with 2 processes: each window once (none repeated to even out the last batches); --streaming
    with --max_eval_samples: the first windows of the same stream."""
    model_dir = held_out["models"]["gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    ids = stream_ids(tokenizer, held_out["text"])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    n_bytes, n_words = gpt2_owned_units(tokenizer, ids)

    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_clm.py", "--model_name_or_path", str(model_dir), "--block_size", str(BLOCK),
               "--validation_file", str(held_out["valid"]), "--do_eval", "--eval_stride", str(STRIDE),
               "--per_device_eval_batch_size", "8", "--report_to", "none", "--output_dir", str(out)]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    windows = guide_windows(len(ids), BLOCK, STRIDE)
    assert len(windows) % 16  # the last batches are evened out with repeated windows
    loss_sum, tokens = model_nll(model, ids, windows)
    assert_figures(read_json(out / "all_results.json"),
                   figures(loss_sum, tokens, int(n_bytes[1:].sum()), int(n_words[1:].sum())))

    first = 50
    streamed = evaluate(model_dir, held_out["valid"], tmp_path / "streamed", "--eval_stride", str(STRIDE),
                        "--streaming", "--max_eval_samples", str(first))
    loss_sum, tokens = model_nll(model, ids, windows[:first])
    end = windows[first - 1][1]
    assert streamed["eval_samples"] == first and streamed["eval_tokens"] == tokens == end - 1
    assert_figures(streamed, figures(loss_sum, tokens, int(n_bytes[1:end].sum()), int(n_words[1:end].sum())))


# ------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize("length, block, stride", [(1000, 64, 32), (1000, 64, 63), (1000, 64, 1), (1000, 64, 7),
                                                   (64, 64, 32), (65, 64, 32), (30, 64, 16), (2, 64, 5)])
def test_sliding_windows_are_the_guides_and_score_every_token_once(length, block, stride):
    windows = sliding([(0, length)], block, stride)
    guide = guide_windows(length, block, stride)
    assert [(s, e, e - f) for s, e, f in windows.tolist()] == [(b, e, t if b else t - 1) for b, e, t in guide]
    scored = np.zeros(length, int)
    for start, end, first in windows.tolist():
        assert end - start <= block and first - start >= (1 if start == 0 else block - stride)  # context
        scored[first:end] += 1
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_sliding_windows_stay_inside_each_document():
    windows = sliding([(0, 100), (100, 101), (101, 150)], 32, 16)
    for start, end, first in windows.tolist():
        assert (end <= 100) or (start >= 101)
    assert {first for _, _, first in windows.tolist()} >= {1, 102}  # each document's first token is not scored


def test_blocks_drop_the_last_partial_one():
    assert blocks(130, 64).tolist() == [[0, 64, 1], [64, 128, 65]]


def test_window_samples_label_only_their_scored_tokens():
    stream = read_stream(lambda rows: {"input_ids": [[10 + i for i in range(len(r))] for r in rows]},
                         [["abcdefghij"]], None, offsets=False)
    samples = ScoredWindows(stream, sliding([(0, 10)], 6, 4))
    assert len(samples) == 2 and samples.scored_tokens == 9 and not samples.uniform
    second = samples[1]
    assert second["input_ids"].tolist() == [14, 15, 16, 17, 18, 19]
    assert second["labels"].tolist() == [-100, -100, 16, 17, 18, 19]
    assert samples.figures(1.0) == {"tokens": 9}  # no offsets: no text figures


@pytest.mark.parametrize("name", ["gpt2", "roberta-base", "bert-base-uncased", "xlnet-base-cased"])
def test_text_units_add_up_to_the_text_in_any_batching(name):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    rows = [" = Robert Boulter = \n", "\n", " héllo 😀 wörld\xa0x  \n", "plain", "", "   \n", "no break at the end"]

    def encode(texts):
        return tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)

    streams = [read_stream(encode, [rows[i:i + size] for i in range(0, len(rows), size)], None, offsets=True)
               for size in (1, 3, len(rows))]
    for stream in streams:
        assert stream.bytes.sum() == len("".join(rows).encode("utf-8"))
        assert stream.words.sum() == sum(len(row.split()) for row in rows)  # "wörld\xa0x" is two words
        assert stream.bytes.tolist() == streams[0].bytes.tolist() and stream.words.tolist() == streams[0].words.tolist()
    special = np.isin(streams[0].ids, tokenizer.all_special_ids) & ~np.isin(streams[0].ids, [tokenizer.unk_token_id])
    assert (streams[0].bytes[special] == 0).all()


def test_gpt2_tokens_own_their_own_bytes(text_files):
    """Byte-level BPE: the offsets give each token the bytes it is made of (a split character: the first piece)."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    text = text_files["valid"].read_text(encoding="utf-8") + "mixed 😀 and 名前\xa0here\n"
    lines = text.splitlines(keepends=True)
    stream = read_stream(lambda rows: tokenizer(rows, return_offsets_mapping=True, return_special_tokens_mask=True,
                                                verbose=False), [lines[i:i + 37] for i in range(0, len(lines), 37)],
                         None, offsets=True)
    n_bytes, n_words = gpt2_owned_units(tokenizer, stream.ids.tolist())
    assert stream.bytes.tolist() == n_bytes.tolist() and stream.words.tolist() == n_words.tolist()


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("stride, says", [("0", "--eval_stride 0: give a number from 1 to 63"),
                                          ("64", "--eval_stride 64: give a number from 1 to 63"),
                                          ("-3", "--eval_stride -3: give a number from 1 to 63"),
                                          ("half", "argument --eval_stride/--eval-stride: invalid int value")])
def test_bad_strides_are_refused_in_one_line(stride, says, text_files, tmp_path):
    process = run_script("clm", *tiny_gpt2("gpt2"), "--validation_file", text_files["valid"], "--do_eval",
                         "--eval_stride", stride, "--output_dir", tmp_path / "out", check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(f"error: {says}")
    assert "Traceback" not in process.stderr


def test_a_stride_with_the_chunked_loss_is_refused(text_files, tmp_path):
    process = run_script("clm", *tiny_gpt2("gpt2"), "--validation_file", text_files["valid"], "--do_eval",
                         "--max_eval_samples", "4", "--eval_stride", "32", "--loss_chunk_size", "64",
                         "--output_dir", tmp_path / "out", check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(
        "error: --loss_chunk_size 64 with an evaluation that sums its loss token by token (--eval_stride")
