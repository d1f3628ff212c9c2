"""Run the weightflow CLI with writes under one directory failing with ENOSPC past a budget.

    python enospc_shim.py BUDGET_BYTES DIR -- ARGS...

The fallback of the disk-full test where no small tmpfs can be mounted.  Python-level
writes are intercepted (open/io.open file objects, os.write on descriptors opened under
DIR, shutil copies); once more than BUDGET_BYTES have been written below DIR, a write
raises OSError(ENOSPC) as a full filesystem would.  Writes made inside C libraries
(SQLite) are not seen.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import sys

BUDGET = int(sys.argv[1])
ROOT = os.path.realpath(sys.argv[2])
ARGS = sys.argv[sys.argv.index("--") + 1:]
_written = [0]
_fd_paths: dict[int, str] = {}
_real_open, _real_os_open, _real_os_write = io.open, os.open, os.write


def _under(path) -> str | None:
    if isinstance(path, int):
        return _fd_paths.get(path)
    try:
        p = os.path.realpath(os.fspath(path))
    except TypeError:
        return None
    return p if p == ROOT or p.startswith(ROOT + os.sep) else None


def _charge(n: int, path: str) -> None:
    if _written[0] + n > BUDGET:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    _written[0] += n


class _File:
    def __init__(self, fh, path):
        self._fh, self._path = fh, path

    def write(self, data):
        n = len(data.encode() if isinstance(data, str) else memoryview(data).cast("B"))
        _charge(n, self._path)
        return self._fh.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _open(file, mode="r", *args, **kwargs):
    fh = _real_open(file, mode, *args, **kwargs)
    path = _under(file)
    if path and any(c in mode for c in "wax+"):
        return _File(fh, path)
    return fh


def _os_open(path, flags, *args, **kwargs):
    fd = _real_os_open(path, flags, *args, **kwargs)
    p = _under(path)
    if p and flags & (os.O_WRONLY | os.O_RDWR):
        _fd_paths[fd] = p
    return fd


def _os_write(fd, data):
    p = _fd_paths.get(fd)
    if p:
        _charge(len(memoryview(data).cast("B")), p)
    return _real_os_write(fd, data)


builtins.open = io.open = _open
os.open, os.write = _os_open, _os_write
shutil._USE_CP_SENDFILE = False  # copies go through the wrapped file objects

if __name__ == "__main__":
    from weightflow.dsl.cli import main

    raise SystemExit(main(ARGS))
