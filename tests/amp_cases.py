"""Tiny models of the three families the scripts train, with deterministic batches, for the AMP tests.

GPT-2 (run_clm.py), RoBERTa masked LM (run_mlm.py) and XLNet permutation LM (run_plm.py), each
2 layers of width 32 over a vocabulary of 128 with dropout off. The masks and permutations are
drawn once per sample with a fixed seed, so a batch of 8 and four batches of 2 hold exactly the
same targets: only then can gradient accumulation be compared with one big batch.
"""

import torch
from transformers import (DataCollatorForPermutationLanguageModeling, GPT2Config, GPT2LMHeadModel, RobertaConfig,
                          RobertaForMaskedLM, XLNetConfig, XLNetLMHeadModel, XLNetTokenizerFast)

from conftest import TOKENIZERS
from utils.amp.weights import fp32_state_dict
from utils.flags.arguments import LMTrainingArguments
from utils.data.collators import CausalLMCollator
from utils.model.metrics import TokenAccuracy
from utils.train.trainer import LMTrainer

SEQ, VOCAB = 32, 128
MASK_ID = 6  # XLNet's <mask>; RoBERTa's tiny vocabulary has no special meaning for it either
FIRST_WORD = 7  # ids below are special tokens in XLNet's tokenizer


def gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    options = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**options, **config}))


def roberta(seed: int = 0) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    return RobertaForMaskedLM(RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ + 2, type_vocab_size=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1))


def xlnet(seed: int = 0) -> XLNetLMHeadModel:
    torch.manual_seed(seed)
    return XLNetLMHeadModel(XLNetConfig(
        vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64, dropout=0.0, pad_token_id=5))


def _blocks(n: int, seed: int) -> torch.Tensor:
    """Learnable token blocks: a random start, then +1, within the ordinary (non-special) ids."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB - FIRST_WORD, (n, 1), generator=generator)
    return FIRST_WORD + (starts + torch.arange(SEQ)) % (VOCAB - FIRST_WORD)


def clm_samples(n: int, seed: int) -> list[dict]:
    return [{"input_ids": row, "labels": row.clone()} for row in _blocks(n, seed)]


def mlm_samples(n: int, seed: int) -> list[dict]:
    """About 15% of the tokens masked (at least one per sample); the others carry no label."""
    blocks = _blocks(n, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    masked = torch.rand(blocks.shape, generator=generator) < 0.15
    masked[:, 0] = True
    labels = torch.where(masked, blocks, -100)
    inputs = torch.where(masked, MASK_ID, blocks)
    return [{"input_ids": x, "labels": y} for x, y in zip(inputs, labels)]


def plm_samples(n: int, seed: int) -> list[dict]:
    """XLNet's permutation targets, drawn by transformers' collator one sample at a time."""
    tokenizer = XLNetTokenizerFast.from_pretrained(TOKENIZERS / "xlnet-base-cased")
    collator = DataCollatorForPermutationLanguageModeling(tokenizer=tokenizer)
    samples = []
    for i, row in enumerate(_blocks(n, seed)):
        torch.manual_seed(seed * 1000 + i)
        inputs, perm_mask, target_mapping, labels = collator.torch_mask_tokens(row[None])
        samples.append({"input_ids": inputs[0], "perm_mask": perm_mask[0], "target_mapping": target_mapping[0],
                        "labels": labels[0]})
    return samples


def stack(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


FAMILIES = {"clm": (gpt2, clm_samples), "mlm": (roberta, mlm_samples), "plm": (xlnet, plm_samples)}


def family_trainer(task: str, out, train=None, model=None, **flags) -> LMTrainer:
    """LMTrainer over the task's tiny model and 48 fixed samples, in order, logging every step."""
    make_model, make_samples = FAMILIES[task]
    options = dict(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                   per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=3, logging_steps=1,
                   learning_rate=3e-3, adam_epsilon=1e-3, save_strategy="no", train_sampling_strategy="sequential",
                   fps_warmup_steps=1)
    options.update(flags)
    return LMTrainer(model=model or make_model(), args=LMTrainingArguments(**options),
                     train_dataset=train if train is not None else make_samples(48, seed=1),
                     eval_dataset=make_samples(16, seed=2), data_collator=stack,
                     accuracy=TokenAccuracy(shift=task == "clm"))


def logged(trainer: LMTrainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if "loss" in entry]


# One family, GPT-2, with its own learnable blocks (+1 mod 128): the mixed-precision Trainer tests.
def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=SEQ,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def blocks(n: int, seed: int) -> list[dict]:
    """Learnable token blocks: a random start, then +1 mod 128."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 128, (n, 1), generator=generator)
    return [{"input_ids": row} for row in (starts + torch.arange(SEQ)) % 128]


TRAIN, EVAL = blocks(48, seed=1), blocks(16, seed=2)


def make_trainer(out, model=None, **flags) -> LMTrainer:
    options = dict(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                   per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=6, logging_steps=1,
                   learning_rate=3e-3, adam_epsilon=1e-3, save_strategy="no", train_sampling_strategy="sequential",
                   fps_warmup_steps=1)
    options.update(flags)
    return LMTrainer(model=model or tiny_model(), args=LMTrainingArguments(**options), train_dataset=TRAIN,
                     eval_dataset=EVAL, data_collator=CausalLMCollator(), accuracy=TokenAccuracy(shift=True))


def losses(trainer: LMTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def weights(trainer: LMTrainer) -> dict:
    """The fp32 weights save_model would write (masters under O2)."""
    masters = trainer.precision.optimizer if trainer.precision is not None else None
    return fp32_state_dict(trainer.model, masters)


def poison_grads_at(trainer: LMTrainer, steps: set, value: float) -> None:
    """inf/NaN into one weight's grad during the backward of the given optimizer steps."""
    weight = trainer.model.transformer.h[0].mlp.c_fc.weight

    def hook(grad):
        if trainer.state.global_step in steps:
            grad = grad.clone()
            grad.view(-1)[0] = value
        return grad

    weight.register_hook(hook)
