"""The tiktoken path gives the tokenizer call's ids, exactly, or is not used."""

import itertools
import logging
import sys

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

import utils.data.fast_tokenize as fast_tokenize
from conftest import DATA, TOKENIZERS, WIKI_TEST_RAW
from utils.data.prepare import SampleRecipe
from utils.data.fast_tokenize import ByteLevelEncoder, exact_encoder

WIKI_VALID = DATA / "wikitext-2-v1" / "wiki.valid.tokens"  # has <unk>, an added token of RoBERTa's
# What real text can hold that a plain BPE would get wrong: added tokens (with and without lstrip),
# whitespace runs, other scripts, emoji, contractions, digits, empty rows.
EDGE_CASES = ["", " ", "\n", "\n\n \n", "  two  spaces\t\ttabs ", "<|endoftext|>a<|endoftext|>", "x <mask> y",
              "<s>hi</s> <pad><unk>", "日本語のテキスト 🤗🤗", "it's I'll we'VE 123456 ...!!", "ﬁ ligature é café"]


def lines(path, limit=None) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)[:limit]


def tokenizer_ids(tokenizer, texts) -> np.ndarray:
    ids = tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
    return np.fromiter(itertools.chain.from_iterable(ids), np.int64)


@pytest.mark.parametrize("name", ["gpt2", "roberta-base"])
def test_ids_equal_the_tokenizer_call_on_real_text(name):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    texts = lines(WIKI_TEST_RAW) + lines(WIKI_VALID, 2000) + EDGE_CASES
    flat, lengths = ByteLevelEncoder(tokenizer).encode(texts)
    calls = tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
    assert flat.dtype == np.int32
    assert lengths.tolist() == [len(ids) for ids in calls]
    assert np.array_equal(flat, tokenizer_ids(tokenizer, texts))
    assert len(flat) > 400_000  # the whole test split and 2,000 validation lines, not a toy


@pytest.mark.parametrize("name", ["xlnet-base-cased", "bert-base-uncased"])
def test_other_tokenizers_use_the_tokenizers_library(name, caplog):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    with caplog.at_level(logging.INFO, logger="utils.data.fast_tokenize"):
        assert exact_encoder(tokenizer, lines(WIKI_TEST_RAW, 50)) is None
    assert "Tokenizing with the tokenizers library" in caplog.text


def test_a_difference_on_the_sample_means_the_tokenizers_library(monkeypatch, caplog):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    real = ByteLevelEncoder.encode

    def off_by_one(self, texts):
        flat, lengths = real(self, texts)
        flat[len(flat) // 2] += 1  # one id wrong in the middle of the sample
        return flat, lengths

    monkeypatch.setattr(ByteLevelEncoder, "encode", off_by_one)
    with caplog.at_level(logging.INFO, logger="utils.data.fast_tokenize"):
        assert exact_encoder(tokenizer, lines(WIKI_TEST_RAW, 200)) is None
    assert "ids differ" in caplog.text


def test_without_tiktoken_the_tokenizers_library_runs(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    with caplog.at_level(logging.INFO, logger="utils.data.fast_tokenize"):
        assert exact_encoder(tokenizer, lines(WIKI_TEST_RAW, 20)) is None
    assert "install tiktoken" in caplog.text


def test_a_bpe_that_is_not_byte_level_is_refused():
    with pytest.raises(fast_tokenize.Unsupported):
        fast_tokenize._check_pipeline({"model": {"type": "BPE"}, "normalizer": {"type": "NFC"},
                                       "pre_tokenizer": {"type": "ByteLevel"}})
    with pytest.raises(fast_tokenize.Unsupported):
        fast_tokenize._check_pipeline({"model": {"type": "BPE", "dropout": 0.1}, "normalizer": None,
                                       "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}})


@pytest.mark.parametrize("name", ["gpt2", "roberta-base"])
def test_blocks_equal_the_stock_list_pipeline(name, tmp_path, caplog):
    """Packed through tiktoken in two processes, the blocks are those of tokenizer call + list chain."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    texts = lines(WIKI_VALID, 1500)
    stream = list(itertools.chain.from_iterable(tokenizer(texts, verbose=False)["input_ids"]))
    expected = [stream[i:i + 256] for i in range(0, len(stream) // 256 * 256, 256)]
    for workers in (None, 2):
        recipe = SampleRecipe(tokenizer, column="text", seq_len=256, line_by_line=False, pad_to_max_length=False,
                              num_proc=workers)
        with caplog.at_level(logging.INFO, logger="utils.data.fast_tokenize"):
            samples = recipe.build(Dataset.from_dict({"text": texts}), None, str(tmp_path / str(workers)))
        assert "Tokenizing with tiktoken" in caplog.text
        assert samples["input_ids"] == expected


def test_blocks_from_the_splits_arrow_file_equal_the_stock_list_pipeline(tmp_path):
    """A split loaded from a text file is read from its Arrow file piece by piece, not memory-mapped."""
    from datasets import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    rows = load_dataset("text", data_files={"train": str(WIKI_TEST_RAW)}, cache_dir=str(tmp_path / "cache"),
                        keep_linebreaks=True)["train"]
    assert rows.cache_files and rows._indices is None
    stream = list(itertools.chain.from_iterable(tokenizer(list(rows["text"]), verbose=False)["input_ids"]))
    recipe = SampleRecipe(tokenizer, column="text", seq_len=128, line_by_line=False, pad_to_max_length=False,
                          num_proc=None)
    samples = recipe.build(rows, None, str(tmp_path / "work"))
    assert samples["input_ids"] == [stream[i:i + 128] for i in range(0, len(stream) // 128 * 128, 128)]
