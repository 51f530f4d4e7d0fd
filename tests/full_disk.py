"""Test-only: run a script as if the disk filled up while one checkpoint is being saved.

    FULL_DISK_AT=checkpoint-N python tests/full_disk.py run_clm.py FLAGS...

Every file opened for writing inside a folder named checkpoint-N (or a file of that name, as
FULL_DISK_AT=train_results.json) fails with ENOSPC, as on a full disk: it is opened (so created,
or emptied, as a real open would) and the write fails. Everything else is written as usual. Kept
out of the shipped modules on purpose.
"""

import builtins
import errno
import os
import runpy
import sys

_open = builtins.open
_FULL = os.environ["FULL_DISK_AT"]


def _open_on_a_full_disk(file, mode="r", *args, **kwargs):
    writing = any(letter in mode for letter in "wax+")
    # A file written whole through NAME.tmp (utils/files.py) fails as NAME would.
    parts = [part.removesuffix(".tmp") for part in os.path.normpath(os.fspath(file)).split(os.sep)] \
        if isinstance(file, (str, os.PathLike)) else []
    if writing and _FULL in parts:
        _open(file, mode, *args, **kwargs).close()  # the open succeeds; the first write finds no space
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return _open(file, mode, *args, **kwargs)


if __name__ == "__main__":
    builtins.open = _open_on_a_full_disk
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
