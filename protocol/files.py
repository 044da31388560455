"""Writing files so that a crash never leaves half of one (the store and curves files)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

#: Characters of the file's name its temporary file keeps (at most 4 bytes each): any
#: name the file system takes (255 bytes) leaves room for the temporary one's.
TMP_NAME_CHARS = 40


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one: a
    temporary file in the same folder, flushed to disk, renamed over ``path``, and the
    folder flushed so the rename itself survives a power cut. A symbolic link is
    followed: the file it points to is replaced, as writing it in place would."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:TMP_NAME_CHARS]}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # name the file asked for, not the temporary one
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    finally:
        with contextlib.suppress(OSError):  # never in place of the error above
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a no-op on Windows, where folders cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
