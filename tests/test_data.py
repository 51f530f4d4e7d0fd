"""The data pipeline on real WikiText-2 text and the real GPT-2 / BERT tokenizers."""

import contextlib
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

import utils.data.prepare as data_module
import utils.data.raw as raw_data
from conftest import TINY, TOKENIZERS, WIKI_TEST_RAW, read_json, run_script
from utils.data.arrow_files import file_span, write_rows
from utils.data.prepare import SampleRecipe, pack_blocks, prepare_datasets
from utils.data.cache import tokenized_cache_root
from utils.data.raw import load_raw_datasets


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


def test_a_slice_of_a_file_backed_split_packs_only_its_rows(rows, gpt2, tmp_path):
    # A held-out validation split, or --max_train_samples' prefix, is a slice of the same Arrow file.
    rows.save_to_disk(str(tmp_path / "split"))
    mapped = load_from_disk(str(tmp_path / "split"))
    part = mapped.select(range(100, 400))
    expected = list_group_texts(gpt2(list(part["text"]))["input_ids"], 128)
    assert recipe(gpt2).build(part, None, str(tmp_path / "work"))["input_ids"] == expected
    everything = list_group_texts(gpt2(list(mapped["text"]))["input_ids"], 128)
    assert recipe(gpt2).build(mapped, None, str(tmp_path / "work"))["input_ids"] == everything


def test_runs_of_rows_across_record_batches_are_read_from_the_file_exactly(gpt2, tmp_path):
    # Text loaded in small chunks: an Arrow file of many record batches, as a large corpus gives.
    loaded = datasets.load_dataset("text", data_files=str(WIKI_TEST_RAW), cache_dir=str(tmp_path / "cache"),
                                   keep_linebreaks=True, chunksize=64 << 10)["train"]
    with pa.OSFile(loaded.cache_files[0]["filename"]) as source, pa.ipc.open_stream(source) as reader:
        assert sum(1 for _ in reader) > 4
    held_out = raw_data._hold_out_validation(datasets.DatasetDict(train=loaded), 5)
    runs = [loaded, loaded.select(range(1500, 2600)), loaded.select(range(1000, 3000)).select(range(300, 900)),
            held_out["train"], held_out["validation"]]
    for part in runs:
        assert file_span(part) is not None  # read by plain reads, not through the memory map
        expected = list_group_texts(gpt2(list(part["text"]))["input_ids"], 128)
        assert recipe(gpt2).build(part, None, str(tmp_path / "work"))["input_ids"] == expected
    shuffled = loaded.shuffle(seed=0).select(range(600))
    assert file_span(shuffled) is None
    expected = list_group_texts(gpt2(list(shuffled["text"]))["input_ids"], 128)
    assert recipe(gpt2).build(shuffled, None, str(tmp_path / "work"))["input_ids"] == expected


def test_rows_written_to_a_cache_file_read_back_the_same(rows, tmp_path):
    bert = AutoTokenizer.from_pretrained(TOKENIZERS / "bert-base-uncased")
    samples = recipe(bert, seq_len=32, line_by_line=True, pad=True).build(rows, None, str(tmp_path / "work"))
    two_files = rows.map(lambda batch: batch, batched=True, num_proc=2, cache_file_name=str(tmp_path / "two.arrow"))
    assert file_span(two_files) is None
    for part in (samples, samples.select(range(10, 90)), samples.shuffle(seed=0), two_files, rows):
        write_rows(part, str(tmp_path / "copy.arrow"))
        back = Dataset.from_file(str(tmp_path / "copy.arrow"))
        assert back.features == part.features
        assert back.to_dict() == part.to_dict()


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
                                    main_process_first=lambda desc: contextlib.nullcontext())
    raw = {"train": rows}
    cache = str(tmp_path)

    def prepare(seq_len=128, **changes):
        for key, value in changes.items():
            setattr(data_args, key, value)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="utils.data.cache"):
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


# ------------------------------------------------------------- cache keys and workers


def _args(**changes):
    data_args = SimpleNamespace(max_train_samples=None, max_eval_samples=None, text_column_name=None,
                                preprocessing_num_workers=None, overwrite_cache=False, streaming=False,
                                train_file=None, validation_file=None, dataset_name=None, keep_linebreaks=True,
                                validation_split_percentage=5, sample_by="line")
    training_args = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1,
                                    main_process_first=lambda desc: contextlib.nullcontext())
    for key, value in changes.items():
        setattr(training_args if hasattr(training_args, key) else data_args, key, value)
    return data_args, training_args


def test_text_read_in_small_chunks_gives_the_rows_of_the_default_chunks(tmp_path, monkeypatch):
    # Smaller chunks keep memory flat; the rows must still be the file's lines, as the text builder gives them.
    monkeypatch.setattr(raw_data, "TEXT_CHUNK_BYTES", 64 << 10)
    source = tmp_path / "corpus.txt"
    source.write_bytes(WIKI_TEST_RAW.read_bytes() + b"a line without its line break")
    data_args, _ = _args(train_file=str(source), validation_file=str(source))
    ours = load_raw_datasets(SimpleNamespace(cache_dir=str(tmp_path / "ours"), token=None), data_args)
    default = datasets.load_dataset("text", data_files=str(source), cache_dir=str(tmp_path / "default"),
                                    keep_linebreaks=True)["train"]
    assert ours["train"]["text"] == default["text"]
    assert len(default) > 4000 and ours["train"]["text"][-1] == "a line without its line break"


def test_two_workers_give_the_same_samples_as_one(rows, gpt2, tmp_path):
    one = recipe(gpt2).build(rows, None, str(tmp_path))
    two = SampleRecipe(gpt2, column="text", seq_len=128, line_by_line=False, pad_to_max_length=False,
                       num_proc=2).build(rows, None, str(tmp_path))
    assert two["input_ids"] == one["input_ids"]
    prefix = SampleRecipe(gpt2, column="text", seq_len=128, line_by_line=False, pad_to_max_length=False,
                          num_proc=2).build(rows, 30, str(tmp_path))
    assert prefix["input_ids"] == one["input_ids"][:30]


def test_cache_with_two_workers_is_reused_and_matches(rows, gpt2, tmp_path, caplog):
    raw = {"train": rows}
    with caplog.at_level(logging.INFO, logger="utils.data.cache"):
        data_args, training_args = _args(preprocessing_num_workers=2)
        two = prepare_datasets(raw, gpt2, data_args, training_args, seq_len=128, cache_dir=str(tmp_path))["train"]
        assert "Tokenizing" in caplog.text
        caplog.clear()
        # The worker count does not change the samples, so it is not part of the key.
        data_args, training_args = _args()
        one = prepare_datasets(raw, gpt2, data_args, training_args, seq_len=128, cache_dir=str(tmp_path))["train"]
        assert "Reusing tokenized data" in caplog.text
    fresh = recipe(gpt2).build(rows, None, str(tmp_path / "work"))
    assert two["input_ids"] == one["input_ids"] == fresh["input_ids"]


def test_an_edited_source_file_is_tokenized_again(gpt2, tmp_path, caplog):
    text = tmp_path / "train.txt"
    lines = WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines(keepends=True)[:300]
    text.write_text("".join(lines), encoding="utf-8")
    model_args = SimpleNamespace(cache_dir=str(tmp_path / "cache"), token=None)

    def prepare():
        data_args, training_args = _args(train_file=str(text), validation_file=str(text))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="utils.data.cache"):
            raw = load_raw_datasets(model_args, data_args)
            samples = prepare_datasets(raw, gpt2, data_args, training_args, seq_len=64, cache_dir=model_args.cache_dir)
        return raw["train"]._fingerprint, samples["train"]["input_ids"], caplog.text

    fingerprint, first, log = prepare()
    assert "Tokenizing" in log
    assert prepare()[2].count("Reusing tokenized data") == 1

    # The same size, one word changed: datasets' fingerprint follows the file's mtime.
    edited = "".join(lines).replace(" the ", " THE ", 1)
    assert len(edited) == len("".join(lines))
    text.write_text(edited, encoding="utf-8")
    new_fingerprint, second, log = prepare()
    assert new_fingerprint != fingerprint
    assert "Tokenizing" in log and "Reusing" not in log
    assert second != first


def test_cache_is_reused_by_a_second_run_of_the_script(text_files, tmp_path):
    flags = [*TINY["clm"], "--report_to", "none", "--disable_tqdm", "true", "--validation_file", text_files["valid"],
             "--do_eval", "--max_eval_samples", "8", "--cache_dir", tmp_path / "cache"]
    first = run_script("clm", *flags, "--output_dir", tmp_path / "a")
    assert "Reusing tokenized data" not in first.stdout + first.stderr
    second = run_script("clm", *flags, "--output_dir", tmp_path / "b")
    assert "Reusing tokenized data" in second.stdout + second.stderr
    a, b = (read_json(tmp_path / run / "eval_results.json") for run in "ab")
    assert (a["eval_loss"], a["eval_samples"]) == (b["eval_loss"], b["eval_samples"])


# ------------------------------------------------------------------- line by line


def test_line_by_line_equals_the_straightforward_version_blank_lines_included(tmp_path):
    bert = AutoTokenizer.from_pretrained(TOKENIZERS / "bert-base-uncased")
    lines = ["", "\n", "   \n", "\t", " A first line.\n", "second\n", "", " = = Heading = = \n", "x" * 400 + "\n"]
    rows = Dataset.from_dict({"text": lines})
    # The Hugging Face example: drop empty and whitespace-only lines, tokenize with truncation.
    kept = [line for line in lines if len(line) > 0 and not line.isspace()]
    expected = bert(kept, truncation=True, max_length=32)["input_ids"]
    samples = recipe(bert, seq_len=32, line_by_line=True).build(rows, None, str(tmp_path))
    assert samples["input_ids"] == expected
    assert len(samples) == 4


# ---------------------------------------------------------------------- streaming


def test_streaming_evaluation_is_bounded_by_default(rows, gpt2, caplog, monkeypatch):
    monkeypatch.setattr(data_module, "STREAM_EVAL_SAMPLES", 5)
    data_args, training_args = _args(streaming=True, do_train=False, do_eval=True)
    stream = {"validation": rows.to_iterable_dataset()}
    with caplog.at_level(logging.INFO, logger="utils.data.prepare"):
        samples = prepare_datasets(stream, gpt2, data_args, training_args, seq_len=64)["eval"]
    assert "evaluating on the first 5 samples" in caplog.text
    assert len(list(samples)) == 5

    data_args.max_eval_samples = 7  # an explicit bound wins
    samples = prepare_datasets(stream, gpt2, data_args, training_args, seq_len=64)["eval"]
    assert len(list(samples)) == 7


def test_streamed_blocks_equal_the_prepared_ones(rows, gpt2, tmp_path):
    prepared = recipe(gpt2).build(rows, None, str(tmp_path))
    streamed = [list(s["input_ids"]) for s in recipe(gpt2).stream(rows.to_iterable_dataset())]
    # Packing happens per group of rows on the fly, so each group drops its own tail: fewer, not other, tokens.
    assert all(len(block) == 128 for block in streamed)
    assert 0.9 * len(prepared) <= len(streamed) <= len(prepared)
    assert streamed[0] == prepared["input_ids"][0]


def test_packing_piece_by_piece_keeps_one_continuous_stream(rows, gpt2, tmp_path, monkeypatch):
    # Pieces of 7 rows: almost every block spans two pieces, and still equals the list version.
    monkeypatch.setattr(data_module, "PACK_ROWS", 7)
    token_lists = gpt2(list(rows["text"][:300]))["input_ids"]
    samples = recipe(gpt2, seq_len=50).build(rows.select(range(300)), None, str(tmp_path))
    assert samples["input_ids"] == list_group_texts(token_lists, 50)


def test_a_one_row_corpus_trains_and_small_ones_keep_a_training_row(rows):
    from datasets import DatasetDict

    # One row (a one-line file, a JSON file of one object): nothing held out, the row trains.
    one = raw_data._hold_out_validation(DatasetDict(train=rows.select(range(1))), 5)
    assert list(one) == ["train"] and len(one["train"]) == 1
    # A hold-out never takes every row.
    two = raw_data._hold_out_validation(DatasetDict(train=rows.select(range(2))), 99)
    assert (len(two["train"]), len(two["validation"])) == (1, 1)
