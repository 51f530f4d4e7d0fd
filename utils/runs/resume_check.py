"""Can this model resume from that checkpoint? Checked before training starts.

Without this check the Trainer finds out while loading, with a traceback: a folder that holds
no checkpoint ("Can't find a valid checkpoint"), weights of a model of another size (a
state-dict size mismatch), e.g. when the command's --config_overrides changed since the
checkpoint was written, a checkpoint laid out for --fsdp resumed without it (or the other way
round), or a torch file cut short in a checkpoint that has no completion marker to tell. Only
the headers of the weight files and the directories at the end of the torch files are read.
"""

from __future__ import annotations

import json
import os
import zipfile

import torch
from safetensors import SafetensorError, safe_open

from utils.errors import UsageError

TRAINER_STATE = "trainer_state.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
FSDP_STATE = "pytorch_model_fsdp"  # the Trainer's --fsdp checkpoints hold their model state under this name
TORCH_FILES = (".pt", ".pth", ".bin")  # torch.save archives: optimizer, scheduler, RNG states, arguments


def check_resumable(checkpoint: str | None, model, given: bool, fsdp: bool = False) -> None:
    """Raise UsageError unless ``checkpoint`` (if any) is a Trainer checkpoint of a model shaped like ``model``.

    ``given``: it came from --resume_from_checkpoint (else resuming found it in --output_dir);
    ``fsdp``: this run shards the model with --fsdp. Called before the Trainer exists, which
    already creates --output_dir.
    """
    if checkpoint is None:
        return
    where = f"--resume_from_checkpoint {checkpoint}" if given else \
        f"{checkpoint} (the newest checkpoint in --output_dir, which resuming takes)"
    weights = weight_files(checkpoint)
    if not weights or not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)):
        raise UsageError(f"{where} is not a checkpoint of a training run (it needs model weights and "
                         f"{TRAINER_STATE}); give a checkpoint-N folder that a training run wrote")
    restart = "" if given else ", or add --overwrite_output_dir to start over"
    _check_trainer_state(checkpoint, where, restart)
    _check_layout(checkpoint, where, fsdp, restart)
    _check_torch_files(checkpoint, where, restart)
    try:
        shapes = stored_shapes(weights)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UsageError(f"{where} is damaged: its weights cannot be read ({' '.join(str(err).split())[:200]}); "
                         "resume from an earlier checkpoint") from None
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    common = [name for name in shapes if name in expected]
    if not common:
        raise UsageError(f"{where} holds weights of another kind of model (no weight names in common with the "
                         f"{model.config.model_type} built here); use the model flags of the run that wrote it{restart}")
    for name in common:
        if shapes[name] != expected[name]:
            raise UsageError(
                f"{where} holds a model of another size ({name} is {_shape(shapes[name])} there, "
                f"{_shape(expected[name])} here); use the model flags (--config_overrides, --model_type, "
                f"--config_name) of the run that wrote it{restart}"
            )
    missing, extra = _unmatched(shapes, model)
    if missing or extra:
        # The Trainer loads the shared weights and only warns: the rest would start from random values.
        differ = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in
                  ((missing, "of this model's weights are not there"), (extra, "of its weights are not in this model"))
                  if names]
        raise UsageError(f"{where} holds another model: {' and '.join(differ)}, as when the number of layers "
                         "changed; use the model flags (--config_overrides, --model_type, --config_name) of the run "
                         f"that wrote it{restart}")


def _unmatched(shapes: dict, model) -> tuple[list[str], list[str]]:
    """The model's weights the checkpoint lacks, and the checkpoint's the model lacks.

    A tied weight (GPT-2's lm_head.weight is its wte.weight) is saved under one of its names only.
    """
    state = model.state_dict()
    aliases: dict = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.data_ptr() else name
        aliases.setdefault(key, []).append(name)
    missing = sorted(name for names in aliases.values() if not any(n in shapes for n in names) for name in names)
    return missing, sorted(name for name in shapes if name not in state)


def _check_trainer_state(checkpoint: str, where: str, restart: str) -> None:
    """The Trainer reads trainer_state.json on resuming, with a traceback if it is not a JSON object."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        state = err
    if not isinstance(state, dict):
        why = " ".join(str(state).split())[:200] if isinstance(state, Exception) else "not a JSON object"
        raise UsageError(f"{where} is damaged: its {TRAINER_STATE} cannot be read ({why}); resume from an earlier "
                         f"checkpoint{restart}")


def _check_layout(checkpoint: str, where: str, fsdp: bool, restart: str) -> None:
    """An --fsdp checkpoint resumes under --fsdp only, a plain one without it (the Trainer loads each its own way)."""
    sharded = any(name.startswith(FSDP_STATE) for name in os.listdir(checkpoint))
    if sharded and not fsdp:
        raise UsageError(f"{where} was written by an --fsdp run: resume it with --fsdp, as that run was "
                         f"started{restart}")
    if fsdp and not sharded:
        raise UsageError(f"{where} was written by a run without --fsdp: resume it without --fsdp{restart}")


def _check_torch_files(checkpoint: str, where: str, restart: str) -> None:
    """Each torch archive is whole: a file cut short lacks the directory a zip archive ends with."""
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not name.endswith(TORCH_FILES) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's format before 1.6, a bare pickle: nothing to check
        if not legacy and not zipfile.is_zipfile(path):
            raise UsageError(f"{where} is damaged: its {name} is cut short (not a whole torch archive); resume from "
                             f"an earlier checkpoint{restart}")


def weight_files(folder: str) -> list[str]:
    """The files holding the model's weights, in the first layout found (sharded or not)."""
    for index in (SAFETENSORS_INDEX, TORCH_WEIGHTS_INDEX):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError):
                return []
            return [os.path.join(folder, shard) for shard in shards]
    for name in (SAFETENSORS, TORCH_WEIGHTS):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    return []


def stored_shapes(files: list[str]) -> dict[str, tuple]:
    """``{tensor name: shape}`` of the weight files, from their headers where the format allows."""
    shapes = {}
    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        else:  # a torch pickle: memory-mapped, so the tensors' data is not read
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            shapes.update({name: tuple(tensor.shape) for name, tensor in state.items()})
    return shapes


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "a scalar"
