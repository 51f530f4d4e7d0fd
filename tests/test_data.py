"""The data pipeline on real WikiText-2 text and the real GPT-2 / BERT tokenizers."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from conftest import TOKENIZERS, WIKI_TEST_RAW
from utils.data import SampleRecipe, pack_blocks, prepare_datasets, tokenized_cache_root


@pytest.fixture(scope="module")
def rows() -> Dataset:
    lines = WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines(keepends=True)[:1200]
    return Dataset.from_dict({"text": lines})


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")


def list_group_texts(token_lists: list[list[int]], block: int) -> list[list[int]]:
    """The straightforward version: concatenate Python lists, cut, drop the tail."""
    stream = sum(token_lists, [])
    usable = len(stream) // block * block
    return [stream[i: i + block] for i in range(0, usable, block)]


def recipe(tokenizer, seq_len=128, line_by_line=False, pad=False) -> SampleRecipe:
    return SampleRecipe(tokenizer, column="text", seq_len=seq_len, line_by_line=line_by_line,
                        pad_to_max_length=pad, num_proc=None)


def test_packing_equals_list_concatenation(rows, gpt2, tmp_path):
    token_lists = gpt2(list(rows["text"]))["input_ids"]
    expected = list_group_texts(token_lists, 128)
    samples = recipe(gpt2).build(rows, None, str(tmp_path))
    assert samples["input_ids"] == expected
    total = sum(len(ids) for ids in token_lists)
    assert len(expected) == total // 128 and total % 128 > 0  # a tail was dropped


def test_pack_blocks_drops_only_the_incomplete_tail():
    blocks = pack_blocks(np.arange(10, dtype=np.int32), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_blocks(np.arange(3, dtype=np.int32), 4).shape == (0, 4)


def test_max_samples_reads_a_prefix_and_matches_the_full_corpus(rows, gpt2, tmp_path):
    full = recipe(gpt2).build(rows, None, str(tmp_path))
    first = recipe(gpt2).build(rows, 20, str(tmp_path))
    assert first["input_ids"] == full["input_ids"][:20]


def test_line_by_line_keeps_each_non_blank_line(rows, tmp_path):
    bert = AutoTokenizer.from_pretrained(TOKENIZERS / "bert-base-uncased")
    lines = [line for line in rows["text"] if line.strip()]
    samples = recipe(bert, seq_len=32, line_by_line=True).build(rows, None, str(tmp_path))
    assert len(samples) == len(lines)
    assert samples[0]["input_ids"] == bert(lines[0], truncation=True, max_length=32)["input_ids"]
    assert max(len(ids) for ids in samples["input_ids"]) == 32

    padded = recipe(bert, seq_len=32, line_by_line=True, pad=True).build(rows, 50, str(tmp_path))
    assert len(padded) == 50
    assert {len(ids) for ids in padded["input_ids"]} == {32}
    assert sum(padded[0]["attention_mask"]) == len(samples[0]["input_ids"])


def test_prepared_data_is_cached_and_reused(rows, gpt2, tmp_path, caplog):
    data_args = SimpleNamespace(max_train_samples=None, max_eval_samples=None, text_column_name=None,
                                preprocessing_num_workers=None, overwrite_cache=False, streaming=False)
    training_args = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1,
                                    main_process_first=lambda desc: _null_context())
    raw = {"train": rows}
    cache = str(tmp_path)

    def prepare(seq_len=128, **changes):
        for key, value in changes.items():
            setattr(data_args, key, value)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="utils.data"):
            samples = prepare_datasets(raw, gpt2, data_args, training_args, seq_len=seq_len, cache_dir=cache)
        return samples["train"], caplog.text

    first, log = prepare()
    assert "Tokenizing" in log
    again, log = prepare()
    assert "Reusing tokenized data" in log and again["input_ids"] == first["input_ids"]
    _, log = prepare(seq_len=64)
    assert "Tokenizing" in log  # another block size is another entry
    _, log = prepare(overwrite_cache=True)
    assert "again (--overwrite_cache)" in log
    entries = [p for p in (tmp_path / "tokenized").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2
    assert tokenized_cache_root(cache) == str(tmp_path / "tokenized")

    # The cache holds int32 ids only: a few bytes per token, not 24 (int64 ids, mask and labels).
    n_tokens = len(first) * 128
    entry = min(entries, key=lambda p: sum(f.stat().st_size for f in p.rglob("*.arrow")))
    size = sum(f.stat().st_size for f in entry.rglob("*.arrow"))
    assert 4 * n_tokens <= size < 5 * n_tokens


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
