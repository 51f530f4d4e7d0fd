"""Flags of the transformers 4.x era, read as today's: a script or tutorial of that time runs unchanged.

transformers 5 removed or renamed these TrainingArguments. Each one given is rewritten, before the
parser sees it, into the flag that does the same today, with one log line naming that flag; one
that nothing does today stops with one ``error:`` line saying what to pass instead. Both the
scripts (``parse_args``) and the launchers (``launch_flags``) read the flags through here.
"""

from __future__ import annotations

import logging

from utils.errors import UsageError

logger = logging.getLogger(__name__)

_TRUE, _FALSE = ("true", "yes", "1", "t", "y"), ("false", "no", "0", "f", "n")
# Flags that were booleans: given bare (``--no_cuda``) they mean true.
_BOOLEAN = {"no_cuda", "group_by_length", "use_auth_token"}
# 4.x --half_precision_backend / --fp16_backend values, as --amp_backend's.
_BACKENDS = {"auto": "auto", "apex": "apex", "amp": "native", "cuda_amp": "native", "cpu_amp": "native"}
# What nothing does today, and what to pass instead.
_GONE = {
    "sharded_ddp": "use --fsdp (e.g. --fsdp full_shard)",
    "tpu_num_cores": "TPUs are not supported by this suite",
    "use_ipex": "Intel's extension is not used any more; drop it",
    "use_mps_device": "the device is chosen by itself; drop it",
}


def _bool(name: str, value: str | None) -> bool:
    if value is None or value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UsageError(f"--{name} {value}: give true or false")


def _rewrite(name: str, value: str | None, given: set[str], environ: dict) -> list[tuple[str, str]]:
    """Today's (flag, value) pairs for the 4.x flag ``--name value``; ``environ`` gets variables to set."""
    if name in _GONE:
        raise UsageError(f"--{name} (a transformers 4.x flag) has no counterpart today: {_GONE[name]}")
    if value is None and name not in _BOOLEAN:
        raise UsageError(f"--{name}: give it a value")
    if name == "evaluation_strategy":
        return [("eval_strategy", value)]
    if name in ("per_gpu_train_batch_size", "per_gpu_eval_batch_size"):
        return [(name.replace("per_gpu", "per_device"), value)]
    if name == "no_cuda":
        return [("use_cpu", str(_bool(name, value)).lower())]
    if name == "group_by_length":
        return [("train_sampling_strategy", "group_by_length")] if _bool(name, value) else []
    if name == "use_auth_token":
        if value is None or value.lower() in _TRUE + _FALSE:
            return []  # true: today's default (the `hf auth login` token); false: public files need none
        return [("token", value)]
    if name == "logging_dir":
        environ["TENSORBOARD_LOGGING_DIR"] = value  # where transformers 5's TensorBoard callback now reads it
        return []
    if name == "warmup_ratio":
        return _warmup(value, given)
    if name in ("half_precision_backend", "fp16_backend"):
        if value.lower() not in _BACKENDS:
            raise UsageError(f"--{name} {value}: give one of {', '.join(_BACKENDS)} (today: --amp_backend)")
        return [("amp_backend", _BACKENDS[value.lower()])]
    raise AssertionError(name)


def _warmup(value: str, given: set[str]) -> list[tuple[str, str]]:
    try:
        ratio = float(value)
    except ValueError:
        raise UsageError(f"--warmup_ratio {value}: give a number from 0 to 1") from None
    if "warmup_steps" in given:
        return []  # as in 4.x, --warmup_steps wins over the ratio
    if not 0 <= ratio < 1:
        raise UsageError(f"--warmup_ratio {value}: today's --warmup_steps reads a number below 1 as the ratio; "
                         "give a ratio below 1, or --warmup_steps with a number of steps")
    return [("warmup_steps", value)]


LEGACY = frozenset(_GONE) | {"evaluation_strategy", "no_cuda", "group_by_length", "use_auth_token", "logging_dir",
                             "warmup_ratio", "half_precision_backend", "fp16_backend", "per_gpu_train_batch_size",
                             "per_gpu_eval_batch_size"}


def _log(name: str, value: str | None, pairs: list[tuple[str, str]], environ: dict) -> None:
    today = " ".join(f"--{flag} {new}" for flag, new in pairs) or \
        " ".join(f"{key}={new}" for key, new in environ.items()) or "nothing (today's default)"
    shown = value is not None and (name != "use_auth_token" or value.lower() in _TRUE + _FALSE)  # never a token
    given = f"--{name}" + (f" {value}" if shown else "")
    logger.warning("%s is a transformers 4.x flag; read as %s", given, today)


def translate_flags(args: list[str]) -> tuple[list[str], dict]:
    """``args`` with 4.x flags rewritten as today's, and the environment variables they set."""
    given = {arg[2:].partition("=")[0] for arg in args if arg.startswith("--")}
    out, environ, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        name, equals, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        i += 1
        if name not in LEGACY:
            out.append(arg)
            continue
        if not equals:
            value = None
            following = args[i] if i < len(args) else None
            takes = following is not None and not following.startswith("--")
            if takes and (name not in _BOOLEAN or following.lower() in _TRUE + _FALSE or name == "use_auth_token"):
                value, i = following, i + 1
        found = {}
        pairs = _rewrite(name, value, given, found)
        _log(name, value, pairs, found)
        environ.update(found)
        for flag, new in pairs:
            out += [f"--{flag}", new]
    return out, environ


def translate_values(values: dict) -> tuple[dict, dict]:
    """The same for a file of flags: ``{flag: value}`` with the 4.x ones rewritten, and the variables."""
    given = set(values)
    out, environ = {}, {}
    for name, value in values.items():
        if name not in LEGACY:
            out[name] = value
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        found = {}
        pairs = _rewrite(name, text, given, found)
        _log(name, text, pairs, found)
        environ.update(found)
        # parse_dict takes the values as they are: keep the file's own types (a bool, a number).
        out.update({flag: new == "true" if new in ("true", "false") else value if new == text else new
                    for flag, new in pairs})
    return out, environ
