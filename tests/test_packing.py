"""--packing document: whole documents in blocks, none attending to another, every figure per real token.

Each family is checked against the plain model run on one document at a time (fp32, within
1e-5); the reported eval loss against the plain saved model's own losses over the documents.
A streamed fp16 O2 --use_combine_grad run resumes bit for bit: tests/test_scripts.py's resume test.
"""

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (AlbertConfig, AlbertForMaskedLM, AutoModelForCausalLM, AutoTokenizer, BertConfig,
                          BertForMaskedLM, BertLMHeadModel, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
                          GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM, XLNetConfig, XLNetLMHeadModel)

from conftest import QUICK, ROOT, TINY, TOKENIZERS, WIKI_TEST_RAW, free_port, read_json, run_script
from utils.data.packing import DocumentPacker, PackedCausalLMCollator, PackedMaskedLMCollator, best_fit
from utils.data.prepare import SampleRecipe
from utils.data.raw import load_raw_datasets
from utils.errors import UsageError
from utils.model.documents import prepared_for_documents
from utils.eval.loss_sum import TokenLossSum

# Tiny models on a shared 2-core machine: a second thread per process only waits on the first.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
LINES = [line for line in WIKI_TEST_RAW.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {name: AutoTokenizer.from_pretrained(TOKENIZERS / name)
            for name in ("gpt2", "bert-base-uncased", "roberta-base")}


def run(task: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    return run_script(task, *args, check=check, env=ONE_THREAD)


def torchrun(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "run_clm.py", *map(str, args)]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, **ONE_THREAD})
    assert process.returncode == 0, process.stderr[-3000:]
    return process


def documents_of(blocks: Dataset, first: int) -> list[list[int]]:
    """The documents in stored blocks: each starts where the positions restart."""
    found = []
    for ids, positions in zip(blocks["input_ids"], blocks["position_ids"]):
        assert len(ids) == len(positions)
        for token, position in zip(ids, positions):
            if position == first:
                found.append([])
            found[-1].append(token)
    return found


# ---------------------------------------------------------------------------- documents into blocks


def test_best_fit_decreasing_fills_blocks_tighter_than_cutting_in_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, 2000)
    blocks = best_fit(lengths, 128)
    filled = np.bincount(blocks, weights=lengths)
    assert filled.max() <= 128 and set(blocks) == set(range(len(filled)))  # numbered as opened, none empty
    lower_bound = -(-lengths.sum() // 128)
    assert len(filled) <= lower_bound * 1.02 + 1  # near the least number of blocks that could hold them
    # A new block whenever the next piece does not fit (what packing in order gives) needs many more.
    in_order, room = 0, 0
    for length in lengths:
        if length > room:
            in_order, room = in_order + 1, 128
        room -= length
    assert len(filled) < 0.9 * in_order


@pytest.mark.parametrize("name, first, ends_with", [("gpt2", 0, "eos"), ("bert-base-uncased", 0, None),
                                                    ("roberta-base", 2, None)])
def test_every_document_stays_whole_with_its_end_and_positions_restart(tokenizers, tmp_path, name, first, ends_with):
    tokenizer = tokenizers[name]
    rows = Dataset.from_dict({"text": ["", "   \n", *LINES[:300]]})  # blank rows are no documents
    packer = DocumentPacker(tokenizer, 64, first_position=first)
    recipe = SampleRecipe(tokenizer, column="text", seq_len=64, line_by_line=False, pad_to_max_length=False,
                          num_proc=None, documents=packer)
    blocks = recipe.build(rows, None, str(tmp_path))

    expected = []
    for ids in tokenizer(LINES[:300])["input_ids"]:
        if ends_with == "eos":
            ids = ids + [tokenizer.eos_token_id]  # GPT-2 ends a text with nothing: each document gets its EOS
        else:
            assert ids[-1] in tokenizer.all_special_ids  # [SEP], </s>: already ended, nothing added
        expected += [ids[start:start + 64] for start in range(0, len(ids), 64)]  # longer ones: block-sized pieces
    assert any(len(ids) > 64 for ids in tokenizer(LINES[:300])["input_ids"])
    assert sorted(documents_of(blocks, first)) == sorted(expected)
    for positions in blocks["position_ids"]:
        assert len(positions) <= 64
        restarts = [i for i, p in enumerate(positions) if p == first]
        for start, stop in zip(restarts, restarts[1:] + [len(positions)]):
            assert positions[start:stop] == list(range(first, first + stop - start))
    real = sum(map(len, blocks["input_ids"]))
    assert real == sum(map(len, expected)) and real / (64 * len(blocks)) > 0.97  # best fit: little padding


def test_streamed_document_blocks_equal_the_prepared_ones(tokenizers, tmp_path):
    tokenizer = tokenizers["gpt2"]
    rows = Dataset.from_dict({"text": LINES[:400]})  # fewer rows than a streamed group: packed alike
    recipe = SampleRecipe(tokenizer, column="text", seq_len=64, line_by_line=False, pad_to_max_length=False,
                          num_proc=None, documents=DocumentPacker(tokenizer, 64, first_position=0))
    prepared = recipe.build(rows, None, str(tmp_path))
    streamed = list(recipe.stream(rows.to_iterable_dataset()))
    assert [list(s["input_ids"]) for s in streamed] == prepared["input_ids"]
    assert [list(s["position_ids"]) for s in streamed] == prepared["position_ids"]


def test_the_stock_samples_keep_their_cache_key(tokenizers):
    # Without --packing document the key is made of what it was made of before the option existed.
    tokenizer = tokenizers["gpt2"]
    stock = SampleRecipe(tokenizer, column="text", seq_len=64, line_by_line=False, pad_to_max_length=False,
                         num_proc=None)
    packed = SampleRecipe(tokenizer, column="text", seq_len=64, line_by_line=False, pad_to_max_length=False,
                          num_proc=None, documents=DocumentPacker(tokenizer, 64, first_position=0))
    import hashlib
    import json
    from utils.data.cache import tokenizer_digest
    from utils.data.prepare import CACHE_FORMAT
    parts = {"format": CACHE_FORMAT, "source": "src", "tokenizer": tokenizer_digest(tokenizer), "column": "text",
             "seq_len": 64, "line_by_line": False, "pad_to_max_length": False, "max_samples": None}
    assert stock.key("src", None) == hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    assert packed.key("src", None) != stock.key("src", None)


# ---------------------------------------------------------------------------- each family, one document at a time

TINY_MODELS = {
    "gpt2": ("gpt2", lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128))),
    "bert": ("bert-base-uncased", lambda: BertForMaskedLM(BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=30522))),
    "roberta": ("roberta-base", lambda: RobertaForMaskedLM(RobertaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=50265,
        max_position_embeddings=130, pad_token_id=1))),
    "distilbert": ("bert-base-uncased", lambda: DistilBertForMaskedLM(DistilBertConfig(
        n_layers=2, dim=64, n_heads=2, hidden_dim=128, vocab_size=30522))),
    "albert": ("bert-base-uncased", lambda: AlbertForMaskedLM(AlbertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, embedding_size=32,
        vocab_size=30522))),
}


@pytest.fixture
def one_thread():
    # Tiny models on a shared 2-core machine: a second thread only waits on the first.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_a_packed_batch_gives_each_document_what_it_gets_alone(tokenizers, family, attention, one_thread):
    torch.manual_seed(0)
    tokenizer_name, make = TINY_MODELS[family]
    tokenizer = tokenizers[tokenizer_name]
    plain = make().eval()
    plain.set_attn_implementation(attention)
    packed_model = copy.deepcopy(plain)
    first = prepared_for_documents(packed_model)
    packer = DocumentPacker(tokenizer, 64, first_position=first)

    # Short lines (several documents in a block) and two long ones (cut into block-sized pieces).
    texts = sorted(LINES[:60], key=len)[:14] + [max(LINES[:60], key=len), LINES[3]]
    encoded = tokenizer(texts)["input_ids"]
    ids = np.fromiter((i for row in encoded for i in row), np.int32)
    tokens, positions, lengths = packer.pack(ids, np.array([len(row) for row in encoded]))
    cuts = np.cumsum(lengths)[:-1]
    examples = [{"input_ids": t, "position_ids": p} for t, p in zip(np.split(tokens, cuts), np.split(positions, cuts))]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(examples) >= 3 and max(lengths) > min(lengths)  # padding in the batch

    causal = family == "gpt2"
    if causal:
        batch = PackedCausalLMCollator(tokenizer)(examples)
    else:
        batch = PackedMaskedLMCollator(tokenizer=tokenizer, mlm_probability=0.3)(examples)
    with torch.no_grad():
        packed = packed_model(**batch)
    documents, labels, rows = [], [], []
    for row, (row_ids, row_positions) in enumerate(zip(batch["input_ids"], batch["position_ids"])):
        n = len(examples[row]["input_ids"])
        starts = [i for i in range(n) if row_positions[i] == first] + [n]
        for start, stop in zip(starts, starts[1:]):
            documents.append(row_ids[start:stop])
            labels.append(batch["labels"][row, start:stop])
            rows.append((row, start, stop))
    losses, count = [], 0
    with torch.no_grad():
        for doc, doc_labels, (row, start, stop) in zip(documents, labels, rows):
            alone = plain(input_ids=doc[None], labels=doc[None] if causal else doc_labels[None])
            assert torch.allclose(packed.logits[row, start:stop], alone.logits[0], atol=1e-5, rtol=0), \
                (family, attention, (packed.logits[row, start:stop] - alone.logits[0]).abs().max())
            scored = int(doc_labels.ne(-100).sum())  # causal: all but the first token, which nothing predicts
            assert not causal or scored == len(doc) - 1
            if scored > 0:
                losses.append(alone.loss * scored)
                count += scored
    # The packed loss is the token-weighted mean of the documents' losses alone.
    assert packed.loss.item() == pytest.approx((torch.stack(losses).sum() / count).item(), abs=1e-5)
    assert sum(len(d) for d in documents) == int(sum(len(e["input_ids"]) for e in examples))


def test_masked_lm_never_masks_padding_or_special_tokens(tokenizers):
    tokenizer = tokenizers["roberta-base"]
    examples = [{"input_ids": [0, 100, 200, 2, 0, 300, 2], "position_ids": [2, 3, 4, 5, 2, 3, 4]},
                {"input_ids": [0, 400, 2], "position_ids": [2, 3, 4]}]
    collator = PackedMaskedLMCollator(tokenizer=tokenizer, mlm_probability=0.99)
    for _ in range(20):
        batch = collator(examples)
        assert batch["input_ids"].shape == (2, 8)
        assert (batch["position_ids"][1, 3:] == 2).all()  # the padding's positions stay at the first one
        assert batch["labels"][1, 3:].eq(-100).all()  # padding
        special = torch.isin(batch["labels"], torch.tensor(tokenizer.all_special_ids))
        assert not special.any()


def test_the_eval_loss_weighs_every_token_the_same():
    torch.manual_seed(0)
    tally = TokenLossSum(shift=False)
    batches = []
    for masked in (0.05, 0.5):  # a sparse batch and a dense one: their means would weigh alike
        logits = torch.randn(3, 16, 40)
        labels = torch.where(torch.rand(3, 16) < masked, torch.randint(0, 40, (3, 16)), torch.tensor(-100))
        labels[0, 0] = 7
        tally.observe(logits, labels, gather=lambda rows: rows)
        batches.append((logits, labels))
    logits = torch.cat([b[0] for b in batches]).view(-1, 40)
    labels = torch.cat([b[1] for b in batches]).view(-1)
    assert tally.tokens == int(labels.ne(-100).sum())
    expected = torch.nn.functional.cross_entropy(logits.double(), labels, ignore_index=-100).item()
    assert tally.mean() == pytest.approx(expected, abs=1e-6)


def test_the_eval_loss_from_the_labelled_positions_alone_is_the_full_heads():
    # Masked LMs score their labelled positions only (utils/model/labelled_positions.py): the same sums per sample.
    torch.manual_seed(0)
    logits = torch.randn(3, 16, 40)
    labels = torch.where(torch.rand(3, 16) < 0.2, torch.randint(0, 40, (3, 16)), torch.tensor(-100))
    labels[0, 0], labels[2] = 7, -100  # a sample with no label at all
    gathered = {}
    full, labelled = TokenLossSum(shift=False), TokenLossSum(shift=False)
    full.observe(logits, labels, gather=lambda rows: gathered.setdefault("full", rows))
    kept = labels.ne(-100)
    labelled.observe_labelled(logits[kept], labels[kept], labels, gather=lambda rows: gathered.setdefault("only", rows))
    assert torch.allclose(gathered["only"], gathered["full"], atol=1e-5)
    assert labelled.tokens == full.tokens == int(kept.sum())
    assert labelled.mean() == pytest.approx(full.mean(), abs=1e-6)


def test_models_not_proven_are_refused():
    for model in (XLNetLMHeadModel(XLNetConfig(n_layer=1, d_model=32, n_head=2, d_inner=64)),
                  BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=64, is_decoder=True))):
        with pytest.raises(UsageError, match="not proven to keep packed documents apart; it works for gpt2"):
            prepared_for_documents(model)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
    gpt2.config._attn_implementation = "flash_attention_2"  # its mask path is not the one proven here
    with pytest.raises(UsageError, match="with --attn_implementation flash_attention_2: documents are proven kept "
                                         "apart with sdpa and eager only"):
        prepared_for_documents(gpt2)


# ---------------------------------------------------------------------------- the scripts


def _gpt2_flags(block: int) -> list:
    return ["--model_type", "gpt2", "--tokenizer_name", str(TOKENIZERS / "gpt2"), "--block_size", str(block),
            "--config_overrides", f"n_layer=2,n_embd=64,n_head=2,n_positions={block},resid_pdrop=0.0,"
            "embd_pdrop=0.0,attn_pdrop=0.0"]


def _short_documents(tmp_path, block: int):
    """A validation file of WikiText lines each shorter than the block (with its EOS), and their ids with EOS."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    kept = [line for line in LINES[200:600] if len(tokenizer(line)["input_ids"]) < block][:150]
    path = tmp_path / "valid.txt"
    path.write_text("".join(kept), encoding="utf-8")
    return path, [tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in kept]


def _own_loss(model_dir, documents) -> float:
    """The plain saved model's loss over the documents one by one, weighted by the tokens each predicts."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            ids = torch.tensor(ids)[None]
            total += model(input_ids=ids, labels=ids).loss.double().item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def test_eval_loss_is_the_plain_models_token_weighted_loss_over_the_documents(text_files, tmp_path):
    valid, documents = _short_documents(tmp_path, 128)
    out = tmp_path / "out"
    run("clm", *_gpt2_flags(128), *QUICK, "--max_steps", "2", "--packing", "document",
               "--train_file", text_files["train"], "--validation_file", valid, "--do_train", "--do_eval",
               "--output_dir", out)
    results = read_json(out / "eval_results.json")
    assert results["eval_samples"] < len(documents)  # several documents in a block
    assert results["eval_loss"] == pytest.approx(_own_loss(out, documents), abs=1e-4)

    # Streamed, and in two processes (whose last batches repeat blocks to even out): the same figure. The
    # two processes first take a DDP step on packed blocks at learning rate 0, which leaves the weights as they are.
    streamed = tmp_path / "streamed"
    run("clm", "--model_name_or_path", out, "--block_size", "128", "--packing", "document", "--streaming",
               "--validation_file", valid, "--do_eval", "--per_device_eval_batch_size", "8", "--report_to", "none",
               "--output_dir", streamed)
    assert read_json(streamed / "eval_results.json")["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)
    two = tmp_path / "two"
    torchrun("--model_name_or_path", out, "--block_size", "128", "--packing", "document", "--validation_file", valid,
             "--do_eval", "--per_device_eval_batch_size", "3", "--train_file", text_files["train"], "--do_train",
             "--max_steps", "1", "--learning_rate", "0", "--report_to", "none", "--output_dir", two)
    two_results = read_json(two / "eval_results.json")
    assert two_results["eval_samples"] % 6  # the last round of batches is evened out with repeats
    assert two_results["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)
    assert two_results["eval_accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-9)


MLM_FAMILIES = {
    "bert": ["--model_type", "bert", "--tokenizer_name", str(TOKENIZERS / "bert-base-uncased"), "--config_overrides",
             "num_hidden_layers=2,hidden_size=64,num_attention_heads=2,intermediate_size=128"],
    "roberta": TINY["mlm"][:-2],
    "distilbert": ["--model_type", "distilbert", "--tokenizer_name", str(TOKENIZERS / "bert-base-uncased"),
                   "--config_overrides", "n_layers=2,dim=64,n_heads=2,hidden_dim=128"],
    "albert": ["--model_type", "albert", "--tokenizer_name", str(TOKENIZERS / "bert-base-uncased"),
               "--config_overrides", "num_hidden_layers=2,hidden_size=64,num_attention_heads=2,intermediate_size=128,"
               "embedding_size=32"],
}


@pytest.mark.parametrize("family", list(MLM_FAMILIES))
def test_run_mlm_trains_each_proven_family_on_packed_documents(text_files, tmp_path, family):
    out = tmp_path / "out"
    process = run("mlm", *MLM_FAMILIES[family], "--max_seq_length", "64", *QUICK, "--max_steps", "3",
                         "--fps_warmup_steps", "1", "--packing", "document", "--train_file", text_files["train"],
                         "--validation_file", text_files["valid"], "--do_train", "--do_eval", "--output_dir", out)
    assert "keeps each document to itself" in process.stdout + process.stderr
    train, evaluation = read_json(out / "train_results.json"), read_json(out / "eval_results.json")
    assert np.isfinite(train["train_loss"]) and np.isfinite(evaluation["eval_loss"])
    assert 0 <= evaluation["eval_accuracy"] <= 1
    # Real tokens per second: the blocks' mean length without padding, below the block size.
    assert 0.9 * 64 < train["fps_tokens_per_second"] / train["fps"] < 64


@pytest.mark.parametrize("task, flags, message", [
    ("plm", TINY["plm"], "XLNetLMHeadModel (xlnet) is not proven to keep packed documents apart; it works for gpt2"),
    ("clm", ["--model_type", "llama", "--tokenizer_name", str(TOKENIZERS / "gpt2"), "--config_overrides",
             "num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2"],
     "LlamaForCausalLM (llama) is not proven to keep packed documents apart"),
    ("mlm", [*TINY["mlm"], "--line_by_line"], "--packing document with --line_by_line"),
    ("clm", [*TINY["clm"], "--loss_chunk_size", "16"], "--loss_chunk_size 16 with --packing document and an "
     "evaluation: the eval loss per token needs the scores"),
])
def test_what_cannot_keep_documents_apart_is_refused_with_one_line(text_files, tmp_path, task, flags, message):
    process = run(task, *flags, *QUICK, "--packing", "document", "--train_file", text_files["train"],
                         "--validation_file", text_files["valid"], "--do_train", "--do_eval",
                         "--output_dir", tmp_path / "out", check=False)
    assert process.returncode == 2 and "Traceback" not in process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {message}") or (last.startswith("error: --packing document") and message in last)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sample_by_paragraph_makes_each_paragraph_a_document(tmp_path, text_files):
    text = tmp_path / "paragraphs.txt"
    text.write_text("First paragraph,\nits second line.\n\nSecond one.\n\nThird.\n", encoding="utf-8")
    model_args = SimpleNamespace(cache_dir=str(tmp_path / "cache"), token=None)
    data_args = SimpleNamespace(dataset_name=None, train_file=None, validation_file=str(text), keep_linebreaks=True,
                                streaming=False, sample_by="paragraph")
    rows = load_raw_datasets(model_args, data_args)["validation"]
    assert rows["text"] == ["First paragraph,\nits second line.", "Second one.", "Third.\n"]
    data_args.validation_file = str(text_files["valid_csv"])
    with pytest.raises(UsageError, match="--sample_by paragraph splits text files; in csv data each row is a document"):
        load_raw_datasets(model_args, data_args)


NO_DROPOUT_GPT2 = _gpt2_flags(64)


def _losses(out) -> list:
    return [e["loss"] for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]


def test_fsdp_on_two_processes_trains_as_one_process_does(text_files, tmp_path):
    # Sequential order, no dropout: two processes of 2 blocks take the 4 blocks one process takes per step.
    flags = [*NO_DROPOUT_GPT2, *QUICK, "--packing", "document", "--max_steps", "3", "--logging_steps", "1",
             "--train_sampling_strategy", "sequential", "--train_file", text_files["train"], "--do_train"]
    run("clm", *flags, "--per_device_train_batch_size", "4", "--output_dir", tmp_path / "one")
    torchrun(*flags, "--per_device_train_batch_size", "2", "--fsdp", "--output_dir", tmp_path / "fsdp")
    assert read_json(tmp_path / "fsdp" / "sharding.json")["world_size"] == 2
    one, fsdp = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    assert len(one) == len(fsdp) == 3
    assert fsdp == pytest.approx(one, rel=1e-5)
