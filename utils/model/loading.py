"""Config, tokenizer and model: from the hub, a local folder, or built from scratch."""

import logging
import math
import os

import huggingface_hub.constants
import torch
from huggingface_hub.errors import HFValidationError, StrictDataclassClassValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError

from transformers import AutoConfig, AutoTokenizer, CONFIG_MAPPING

from utils.errors import UsageError
from utils.model.vocab_padding import pad_vocabulary

logger = logging.getLogger(__name__)

# The from-scratch way that needs nothing from the hub: the tokenizers bundled in data/tokenizers.
OFFLINE_FROM_SCRATCH = ("--model_type gpt2 --tokenizer_name data/tokenizers/gpt2 (run_clm.py), --model_type roberta "
                        "--tokenizer_name data/tokenizers/roberta-base (run_mlm.py), --tokenizer_name "
                        "data/tokenizers/xlnet-base-cased (run_plm.py)")

# Models whose position ids start after the padding index, so two positions are not usable.
_OFFSET_POSITIONS = {"roberta", "camembert", "xlm-roberta", "xlm-roberta-xl", "longformer", "data2vec-text",
                     "roberta-prelayernorm", "xmod", "ibert", "mpnet"}
# Tokenizers without a real limit report a huge model_max_length.
_UNBOUNDED = 10**9


def supported_model_types(model_class) -> list[str]:
    """The --model_type values that ``model_class`` can build."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:
        return sorted(mapping._model_mapping)
    return [model_class.config_class.model_type]


def _hub_kwargs(model_args) -> dict:
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def load_config(model_args, model_class):
    """The model config: --config_name, else the model's, else a new one of --model_type."""
    if model_args.config_overrides and (model_args.model_name_or_path or model_args.config_name):
        raise UsageError(
            "--config_overrides only applies when training from scratch; drop it, or drop "
            "--model_name_or_path/--config_name and give --model_type"
        )
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        flag = "--config_name" if model_args.config_name else "--model_name_or_path"
        config = _from_pretrained(AutoConfig, source, flag, model_args)
    else:
        choices = supported_model_types(model_class)
        if not model_args.model_type and len(choices) == 1:
            # A script of one architecture (run_plm.py: XLNet) builds it, as the Hugging Face examples do.
            logger.warning("No model, config or --model_type given: training a new %s model from scratch "
                           "(%s defaults)", choices[0], model_class.config_class.__name__)
            return _apply_overrides(model_class.config_class(), model_args, model_class)
        if not model_args.model_type:
            raise UsageError("no model: pass --model_name_or_path, --config_name, or --model_type to train from "
                             f"scratch (offline, e.g. {OFFLINE_FROM_SCRATCH})")
        if model_args.model_type not in choices or model_args.model_type not in CONFIG_MAPPING:
            raise UsageError(f"--model_type {model_args.model_type}: not supported here; choose one of {', '.join(choices)}")
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("Training a new %s model from scratch", model_args.model_type)
    return _apply_overrides(config, model_args, model_class)


def _apply_overrides(config, model_args, model_class):
    if model_args.config_overrides:
        pairs = model_args.config_overrides.split(",")
        if not all("=" in pair for pair in pairs):
            raise UsageError(f"--config_overrides {model_args.config_overrides!r}: write key=value pairs "
                             "separated by commas, e.g. n_layer=2,n_embd=64")
        try:
            config.update_from_string(model_args.config_overrides)
            if hasattr(config, "validate"):
                config.validate()
        except (ValueError, StrictDataclassClassValidationError) as err:
            err = err.__cause__ or err  # the validator's own message is the useful one
            raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {err}") from None
        except TypeError as err:  # a key whose default is None: its type cannot be told from the text
            raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {err}; set such keys in a "
                             "config.json and pass --config_name") from None
        logger.info("Config after --config_overrides: %s", model_args.config_overrides)
    if config.model_type not in supported_model_types(model_class):
        raise UsageError(f"model type {config.model_type} cannot be trained by this script; "
                         f"it supports {', '.join(supported_model_types(model_class))}")
    return config


def load_tokenizer(model_args):
    """The tokenizer of --tokenizer_name, else of the model."""
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if not source:
        raise UsageError("no tokenizer: training a tokenizer is not supported; pass --tokenizer_name (a folder or hub name)")
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    tokenizer = _from_pretrained(AutoTokenizer, source, flag, model_args, use_fast=model_args.use_fast_tokenizer)
    _require_vocabulary(tokenizer, f"{flag} {source}")
    return tokenizer


_PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def _require_vocabulary(tokenizer, source: str) -> None:
    # A folder with tokenizer_config.json but without its vocabulary files still loads, as a
    # tokenizer that turns any text into nothing or unknown tokens: every split would then look empty.
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise UsageError(
            f"{source}: the tokenizer has no vocabulary (it turns text into {'nothing' if not ids else 'unknown tokens'}); "
            "the folder needs its vocabulary files too (tokenizer.json, or vocab.json and merges.txt, vocab.txt, "
            "spiece.model)"
        )


def load_model(model_args, config, tokenizer, model_class):
    """The model's weights from --model_name_or_path, or fresh ones from the config."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        model = _from_pretrained(model_class, model_args.model_name_or_path, "--model_name_or_path", model_args,
                                 config=config, dtype=dtype, **attention)
    else:
        model = _new_model(model_class, config, model_args, dtype, attention)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("New model: %.2fM parameters", n_params / 1e6)
    chosen = model.config._attn_implementation
    if attention and chosen != attention["attn_implementation"]:  # transformers only warned
        raise UsageError(f"--attn_implementation {attention['attn_implementation']}: {type(model).__name__} "
                         f"does not have it (it runs {chosen}); drop the flag or pick {chosen}")
    logger.info("Attention: %s (%s)", chosen,
                "--attn_implementation" if attention else "transformers' default: sdpa where the model has it")
    # A tokenizer with added tokens needs a larger embedding matrix.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if model_args.pad_vocab_to_multiple_of:
        pad_vocabulary(model, model_args.pad_vocab_to_multiple_of)
    return model


def _new_model(model_class, config, model_args, dtype, attention: dict):
    """A model with fresh weights; a config the model's layers reject is the user's to fix."""
    try:
        if hasattr(model_class, "from_config"):  # an Auto class
            return model_class.from_config(config, trust_remote_code=model_args.trust_remote_code, dtype=dtype,
                                           **attention)
        model = model_class(config)
        if attention:
            model.set_attn_implementation(attention["attn_implementation"])
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    except (ValueError, TypeError, AssertionError) as err:
        flag = f"--config_overrides {model_args.config_overrides!r}" if model_args.config_overrides else \
            f"--model_type {model_args.model_type}"
        if attention and "attention implementation" in str(err):
            flag = f"--attn_implementation {attention['attn_implementation']}"
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(f"{flag}: the {config.model_type} model cannot be built with this config: {message}") from None


def _from_pretrained(loader, source: str, flag: str, model_args, **kwargs):
    looks_local = os.path.exists(source) or not _hub_name(source)
    if looks_local and not os.path.exists(source):
        raise UsageError(f"{flag} {source}: no such folder")
    try:
        return loader.from_pretrained(source, **_hub_kwargs(model_args), **kwargs)
    except SafetensorError as err:
        raise UsageError(f"{flag} {source}: its weights file is damaged (cut short while copying or downloading?): "
                         f"{err}; copy or download it again") from None
    except (OSError, ValueError) as err:
        if _offline():
            hint = (" (HF_HUB_OFFLINE is set, so only local folders work; to train from scratch instead: "
                    f"{OFFLINE_FROM_SCRATCH})")
        else:
            hint = "" if looks_local else f" (without hub access, train from scratch instead: {OFFLINE_FROM_SCRATCH})"
        # A name like owner/name that is no folder here was asked of the hub: say that no folder has it either.
        where = " from the hub, and no local folder has that name" if not looks_local and "/" in source else ""
        message = " ".join(str(err).split())[:300]
        raise UsageError(f"{flag} {source}: cannot load it{where}{hint}: {message}") from None


def _hub_name(source: str) -> bool:
    """A name the hub could hold: ``gpt2`` or ``owner/name`` (``openai-community/gpt2``), not a path like
    ``./x``, ``/x`` or ``a/b/c``. Asked only when no folder of that name exists."""
    if source.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _offline() -> bool:
    """HF_HUB_OFFLINE is set (read now: a test or a wrapper may set it after huggingface_hub was imported)."""
    return huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true")


def model_max_length(tokenizer, config) -> int | None:
    """The longest sequence both the tokenizer and the model's position table allow, if bounded."""
    limits = []
    if tokenizer.model_max_length < _UNBOUNDED:
        limits.append(tokenizer.model_max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions - first_position_id(config))
    return min(limits) if limits else None


def first_position_id(config) -> int:
    """The position id of a sequence's first token: after the padding index for RoBERTa-like models, else 0."""
    return (config.pad_token_id or 0) + 1 if config.model_type in _OFFSET_POSITIONS else 0


def resolve_seq_len(requested: int | None, tokenizer, config, flag: str, default: int = 1024,
                    minimum: int = 1, why: str = "") -> int:
    """The sequence length to use: the request clamped to the model, or min(default, model maximum).

    A request below ``minimum`` is refused with ``why``, the reason the objective needs that many.
    """
    limit = model_max_length(tokenizer, config)
    if requested is None:
        return min(default, limit) if limit else default
    if requested <= 0:
        raise UsageError(f"{flag} {requested}: give a positive number of tokens")
    if requested < minimum:
        raise UsageError(f"{flag} {requested}: too short{': ' + why if why else ''}; give at least {minimum}")
    if limit and requested > limit:
        logger.warning("%s %d is longer than the model allows (%d); using %d", flag, requested, limit, limit)
        return limit
    return requested


def require_mask_token(tokenizer, task: str) -> None:
    if tokenizer.mask_token is None:
        raise UsageError(
            f"the tokenizer {tokenizer.name_or_path} has no mask token, which {task} needs; "
            "use a tokenizer that has one (e.g. bert, roberta, xlnet) via --tokenizer_name"
        )


# The share of batches allowed to come out of the masking with no masked token, and so no loss.
_MAX_UNMASKED_BATCHES = 0.01


def require_maskable_tokens(tokenizer, seq_len: int, mlm_probability: float, training_args) -> None:
    """Refuse a --max_seq_length so short that batches often have no token to predict.

    A batch without a masked token has no loss (0 / 0): training would stop at once as if the
    loss had diverged. The chance is (1 - p) ** (maskable tokens per sequence x batch size).
    """
    batch_size = (training_args.per_device_train_batch_size if training_args.do_train
                  else training_args.per_device_eval_batch_size)
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    maskable = max(seq_len - specials, 0)  # the special tokens are never masked
    unmasked = (1 - mlm_probability) ** (maskable * batch_size)
    if unmasked > _MAX_UNMASKED_BATCHES:
        needed = math.ceil(math.log(_MAX_UNMASKED_BATCHES) / (batch_size * math.log(1 - mlm_probability)))
        raise UsageError(
            f"--max_seq_length {seq_len}: only {maskable} token(s) per sequence besides the {specials} special ones "
            f"can be masked, so with "
            f"--mlm_probability {mlm_probability} and batches of {batch_size} about {unmasked:.0%} of the batches "
            f"would mask no token and have no loss; give --max_seq_length {needed + specials} or more, or a "
            "larger batch"
        )
