"""Writing files so that a crash never leaves half of one (the store and curves files)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Characters of the file's name its temporary file keeps (at most 4 bytes each): any
#: name the file system takes (255 bytes) leaves room for the temporary one's.
TMP_NAME_CHARS = 40


def check_writable(folder: str | Path) -> None:
    """OSError now where ``folder`` cannot take a file (a read-only mount, a folder not
    ours, a full disk), rather than after minutes of work: a byte written there, flushed,
    and removed."""
    probe = Path(folder) / f".probe-{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
            f.flush()
    finally:
        with contextlib.suppress(OSError):  # never in place of an error above
            probe.unlink()


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one: a
    temporary file in the same folder, flushed to disk, renamed over ``path``, and the
    folder flushed so the rename itself survives a power cut. A symbolic link is
    followed: the file it points to is replaced, as writing it in place would."""
    atomic_write_all([(path, data)])


def atomic_write_all(files: Iterable[tuple[str | Path, bytes]]) -> None:
    """Write files that belong together (a bundle's, a frame range's): every one to its
    temporary file first, then each renamed into place in the order given, so a failure
    while writing (a full disk, a folder where a file should go, an error or interrupt
    raised by ``files`` itself) leaves all the old ones as they were and none of the new.
    Put the file that describes the others last. ``files`` may be a generator: each
    file's bytes are let go once staged. Each file as :func:`atomic_write`."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            path = Path(path)
            if path.is_symlink():
                path = Path(os.path.realpath(path))
            if path.is_dir():  # found now, not when renaming after others were
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name[:TMP_NAME_CHARS]}.{secrets.token_hex(4)}.tmp")
            staged.append((path, tmp))
            with _naming(path), open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in staged:
            with _naming(path):
                os.replace(tmp, path)
    finally:
        for _, tmp in staged:
            with contextlib.suppress(OSError):  # never in place of an error above
                tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(path.parent for path, _ in staged):
        fsync_dir(folder)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError names the file asked for, not its temporary one."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a no-op on Windows, where folders cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
