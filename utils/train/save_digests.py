"""Checksums of a checkpoint's files taken from the bytes as they are saved, so that its marker reads nothing back.

While ``digests_of_saves(folder)`` is active, the two writers that hold nearly all of a checkpoint's
bytes hash what they write into ``folder``:

* ``torch.save`` (optimizer, scheduler, RNG, loss scaler, training arguments) writes through a
  ``DigestingWriter``. torch names the archive inside such a file ``archive/`` rather than after
  the file; ``torch.load`` reads both.
* safetensors' ``save_file``, as transformers calls it for the weights, writes from the tensors'
  memory; its header (a few KB) is read back and the tensors are hashed from that same memory, in
  the order the header places them in the file.

The digests are those of ``utils.files.file_digest``, so the marker's check at resume reads the
files as usual (utils/runs/checkpoints.py). Anything written another way (config, tokenizer and
Trainer state: JSON and text of a few MB at most, other processes' RNG files) is not in the
returned map, and the marker reads it back.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
import transformers.modeling_utils

from utils.files import DigestingWriter, new_digest

SAFETENSORS_METADATA = "__metadata__"


@contextmanager
def digests_of_saves(folder: str):
    """Yield ``{absolute path: (digest, size)}``, filled by the saves into ``folder`` made inside the block."""
    written: dict[str, tuple[str, int]] = {}
    root = os.path.abspath(folder) + os.sep
    torch_save = torch.save
    safetensors_save = transformers.modeling_utils.safe_save_file

    def target(path) -> str | None:
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(root):
            return os.path.abspath(path)
        return None

    def save(obj, f, *args, **kwargs):
        path = target(f)
        if path is None:
            return torch_save(obj, f, *args, **kwargs)
        with DigestingWriter(path) as out:
            torch_save(obj, out, *args, **kwargs)
        written[path] = out.result()
        return None

    def save_file(tensors, filename, metadata=None):
        path = target(filename)
        if path is None:
            return safetensors_save(tensors, filename, metadata=metadata)
        on_cpu = {name: tensor.detach().cpu() for name, tensor in tensors.items()}  # what safetensors writes from
        safetensors_save(on_cpu, filename, metadata=metadata)
        digest = _safetensors_digest(path, on_cpu)
        if digest is not None:
            written[path] = digest
        return None

    torch.save, transformers.modeling_utils.safe_save_file = save, save_file
    try:
        yield written
    finally:
        torch.save, transformers.modeling_utils.safe_save_file = torch_save, safetensors_save


def _safetensors_digest(path: str, tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """The digest and size of the safetensors file ``path`` holding ``tensors``, from their memory.

    The file is 8 bytes of header length, the JSON header, then each tensor's bytes at its
    ``data_offsets``. None (the marker reads the file back) for a layout with gaps or other sizes.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        header = f.read(int.from_bytes(prefix, "little"))
    digest = new_digest()
    digest.update(prefix)
    digest.update(header)
    spans = sorted((entry["data_offsets"], name) for name, entry in json.loads(header).items()
                   if name != SAFETENSORS_METADATA)
    end = 0
    for (start, stop), name in spans:
        if name not in tensors or start != end:
            return None
        data = tensors[name].reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != stop - start:
            return None
        digest.update(data)
        end = stop
    return digest.hexdigest(), len(prefix) + len(header) + end
