"""Avatars on disk: one folder per avatar, appearing only when complete.

Layout: ``ROOT/<id>/avatar.npz`` and ``ROOT/<id>/meta.json``. A save writes a hidden
``.tmp-*`` folder, fsyncs every file and the folder, then renames it to ``<id>`` (atomic
on POSIX and NTFS); a process killed mid-save leaves only a ``.tmp-*`` folder, which a
later start removes once nothing has written to it for :data:`STALE_SECONDS` (another
service on the same store may be saving into a fresh one). ``meta.json`` records the npz's
SHA-256, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np

from protocol import errors
from protocol.errors import ProtocolError
from protocol.files import check_writable, fsync_dir

from .avatar import FORMAT_VERSION, Avatar

log = logging.getLogger(__name__)
ID_RE = re.compile(r"^[0-9a-f]{12}$")
STALE_SECONDS = 600.0  # an unfinished save this long untouched was interrupted


class Store:
    """The avatar folder. Thread-safe for the service's use: saves and deletes are
    atomic renames, reads never see partial avatars."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        #: per avatar id, its meta.json's (inode, size, mtime) and summary: a listing (and
        #: so every request naming an avatar by name) reads only the metas that changed
        #: (2,000 avatars: 39 ms against 145 ms, ``benchmarks/protocol.py``)
        self._summaries: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        #: per avatar id whose arrays failed to load, its files' stamps then (:func:`_stamps`),
        #: its name and why: listings name it as damaged until a file changes (they read no
        #: avatar.npz; one edited by hand was listed as valid, then failed at each use)
        self._unloadable: dict[str, tuple[tuple[tuple[int, int, int], ...], str, str]] = {}
        for stale in self.root.glob(".tmp-*"):
            if _untouched_for(stale) > STALE_SECONDS:
                log.warning("removing unfinished avatar %s left by an interrupted save", stale.name)
                shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)

    def _dir(self, avatar_id: str) -> Path:
        if not ID_RE.match(avatar_id):
            raise ProtocolError(
                errors.NOT_FOUND, f"no avatar {avatar_id!r} (ids are 12 hex digits)"
            )
        return self.root / avatar_id

    def save(self, avatar: Avatar) -> None:
        avatar.validate()
        final = self._dir(avatar.id)
        if final.exists():
            raise ProtocolError(errors.INTERNAL, f"avatar {avatar.id} already exists")
        tmp = self.root / f".tmp-{avatar.id}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            with open(tmp / "avatar.npz", "wb") as f:
                np.savez_compressed(f, **avatar.to_arrays())
                f.flush()
                os.fsync(f.fileno())
            meta = dict(avatar.meta)
            meta.update(
                id=avatar.id,
                name=avatar.name,
                format_version=FORMAT_VERSION,
                **bounding_sphere(avatar),
                sha256=hashlib.sha256((tmp / "avatar.npz").read_bytes()).hexdigest(),
            )
            with open(tmp / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise storage_error(exc, f"cannot save avatar {avatar.id} into", self.root) from exc
            raise
        fsync_dir(self.root)

    def check_writable(self) -> None:
        """ProtocolError ``storage`` now where the store cannot take a file (a read-only
        mount, a folder not ours, a full disk), rather than after a build's minutes of
        work: a byte written and removed, as a save would write it."""
        try:
            check_writable(self.root)
        except OSError as exc:
            raise storage_error(exc, "cannot save a new avatar into the store", self.root) from exc

    def meta(self, avatar_id: str) -> dict[str, Any]:
        path = self._dir(avatar_id) / "meta.json"
        try:
            meta = json.loads(read_regular(path, META_BYTES).decode("utf-8"))
        except FileNotFoundError:
            raise ProtocolError(errors.NOT_FOUND, f"no avatar {avatar_id!r}") from None
        except (OSError, ValueError) as exc:
            raise ProtocolError(errors.INTERNAL, f"avatar {avatar_id} is damaged: {exc}") from None
        if (
            not isinstance(meta, dict)
            or meta.get("id") != avatar_id
            or not isinstance(meta.get("name"), str)
            or not isinstance(meta.get("created", ""), str)
            or not _summary_types(meta)
        ):
            raise ProtocolError(errors.INTERNAL, f"avatar {avatar_id} has a damaged meta.json")
        version = 1 if meta.get("format_version") is None else meta["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:  # list: not offered
            raise ProtocolError(
                errors.UNSUPPORTED_VERSION,
                f"avatar {avatar_id} was written by a newer splatface (format {version}; this "
                f"service reads up to {FORMAT_VERSION}): update the service",
            )
        return meta

    def load(self, avatar_id: str) -> Avatar:
        """The avatar, its arrays validated; a damaged one raises ``internal`` saying so
        (and is named by listings from then on)."""
        stamps = _stamps(self._dir(avatar_id))  # of the files read here, taken before
        meta = self.meta(avatar_id)
        path = self._dir(avatar_id) / "avatar.npz"
        try:
            data = read_regular(path, AVATAR_BYTES)
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            name = str(meta.get("name", ""))
            return Avatar.from_arrays(avatar_id, name, read_npz(data, path.name), meta)
        except (OSError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError) and not self._dir(avatar_id).exists():
                raise ProtocolError(errors.NOT_FOUND, f"no avatar {avatar_id!r}") from None
            message = f"avatar {avatar_id} is damaged and cannot be loaded: {exc}"
            # what the files hold, not a read that failed (a mount dropped for a moment)
            if stamps is not None and isinstance(exc, ValueError):
                self._unloadable[avatar_id] = (stamps, str(meta.get("name", "")), message)
            raise ProtocolError(errors.INTERNAL, message) from None

    def list(self) -> list[dict[str, Any]]:
        """Summaries of every valid avatar, oldest first; damaged ones are logged."""
        return self.listing()[0]

    def listing(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """(summaries of every valid avatar, oldest first; ``{id, message}`` of each
        damaged one, which are logged too). A meta unchanged since the last listing (same
        file, size and time) is not read again: saves replace it by a rename, so any
        change is a new file."""
        out, known, damaged = [], {}, []
        with os.scandir(self.root) as found:
            ids = sorted(e.name for e in found if ID_RE.match(e.name) and e.is_dir())
        for avatar_id in ids:
            d = self.root / avatar_id
            try:
                stamp = _stamp(d / "meta.json")
                cached = self._summaries.get(avatar_id)
                if cached is not None and cached[0] == stamp:
                    entry = cached[1]
                else:
                    entry = summary(self.meta(avatar_id))
                if not (d / "avatar.npz").is_file():
                    raise ProtocolError(errors.INTERNAL, f"avatar {avatar_id} has no avatar.npz")
                unloadable = self._unloadable.get(avatar_id)
                if unloadable is not None:
                    if unloadable[0] == _stamps(d):
                        raise ProtocolError(errors.INTERNAL, unloadable[2])
                    self._unloadable.pop(avatar_id, None)  # changed since: try it again
            except OSError as exc:  # deleted meanwhile, or its meta unreadable
                if d.is_dir():
                    log.warning("avatar %s: %s", avatar_id, exc)
                    damaged.append({"id": avatar_id, "message": f"avatar {avatar_id}: {exc}"})
                continue
            except ProtocolError as exc:
                log.warning("%s", exc.message)
                damaged.append({"id": avatar_id, "message": exc.message})
                continue
            known[avatar_id] = (stamp, entry)
            out.append(dict(entry))
        self._summaries = known
        return sorted(out, key=lambda m: m.get("created", "")), damaged

    def resolve(self, ref: str) -> str:
        """An avatar id from an id or a unique name."""
        if ID_RE.match(ref) and (self.root / ref).is_dir():
            return ref
        matches = [m["id"] for m in self.list() if m["name"] == ref]
        if not matches:  # one found damaged when loaded: its load says so, not not_found
            matches = [i for i, (_, name, _) in list(self._unloadable.items()) if name == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ProtocolError(
                errors.BAD_REQUEST,
                f"{len(matches)} avatars are named {ref!r}; use an id: {', '.join(matches)}",
            )
        raise ProtocolError(errors.NOT_FOUND, f"no avatar with id or name {ref!r}")

    def exists(self, avatar_id: str) -> bool:
        return self._dir(avatar_id).is_dir()

    def delete(self, avatar_id: str) -> None:
        src = self._dir(avatar_id)
        if not src.is_dir():
            raise ProtocolError(errors.NOT_FOUND, f"no avatar {avatar_id!r}")
        trash = self.root / f".trash-{avatar_id}-{secrets.token_hex(4)}"
        try:
            os.rename(src, trash)
        except OSError as exc:
            raise storage_error(exc, f"cannot delete avatar {avatar_id} from", self.root) from exc
        fsync_dir(self.root)
        self._unloadable.pop(avatar_id, None)
        shutil.rmtree(trash, ignore_errors=True)


#: Largest files a store reads (a meta.json is a few KB, an avatar's arrays tens of MB):
#: past them an avatar is damaged, not read whole into memory.
META_BYTES = 1 << 20
AVATAR_BYTES = 1 << 30


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; ValueError for
    anything else. A FIFO put in a store hung ``list`` (and every client behind it), and
    a link to /dev/zero was read until memory ran out."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path.name} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over {limit} bytes")
    return data


def read_npz(data: bytes, name: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file's bytes; ValueError where they are none (a truncated
    copy answered zipfile's bare "File is not a zip file" as an internal error)."""
    import io
    import zipfile
    import zlib

    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of them")
        with z:
            return {k: z[k] for k in z.files}
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{name} is truncated or not an .npz archive ({exc})") from None


def _stamps(folder: Path) -> tuple[tuple[int, int, int], ...] | None:
    """:func:`_stamp` of an avatar's meta.json and avatar.npz, or None where one cannot
    be read."""
    try:
        return tuple(_stamp(folder / f) for f in ("meta.json", "avatar.npz"))
    except OSError:
        return None


def _stamp(path: Path) -> tuple[int, int, int]:
    """A file's (inode, size, mtime): a file replaced (a new inode) or rewritten has a new
    one."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _summary_types(meta: dict[str, Any]) -> bool:
    """Whether what :func:`summary` serves has the types clients rely on (a meta.json
    edited by hand with a text for ``center`` crashed the CLI framing its camera)."""

    def number(v: Any) -> bool:  # one msgpack can send: an integer within 64 bits
        if isinstance(v, int) and not isinstance(v, bool):
            return -(1 << 63) <= v < 1 << 63
        return isinstance(v, float) and math.isfinite(v)

    center, warnings = meta.get("center", [0, 0, 0]), meta.get("warnings", [])
    return (
        isinstance(center, list) and len(center) == 3 and all(number(c) for c in center)
        and number(meta.get("radius", 0.0))
        and isinstance(meta.get("gaussians", 0), int) and number(meta.get("gaussians", 0))
        and all(isinstance(meta.get(k, ""), str) for k in ("preset", "builder"))
        and isinstance(warnings, list)
        and all(isinstance(w, dict) and isinstance(w.get("message"), str)
                and isinstance(w.get("code", ""), str) for w in warnings)
    )  # fmt: skip


def storage_error(exc: OSError, doing: str, folder: Path) -> ProtocolError:
    """``storage``: ``doing`` (``"cannot save avatar X into"``) ``folder``, and why; the
    folder the user knows, not the temporary names the system call failed on."""
    return ProtocolError(
        errors.STORAGE, f"{doing} {folder}: {exc.strerror or exc}", {"path": str(folder)}
    )


def _untouched_for(folder: Path) -> float:
    """Seconds since anything in ``folder`` (or the folder itself) was last written."""
    import time

    try:
        times = [folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())]
    except OSError:  # gone meanwhile: its save finished or failed
        return 0.0
    return time.time() - max(times)


def bounding_sphere(avatar: Avatar) -> dict[str, Any]:
    """``center`` and ``radius`` as stored (to 10 µm) and served: clients frame cameras
    and turn recorded head angles about them, so the bundle states the same values."""
    return {
        "center": [round(float(c), 5) for c in avatar.center],
        "radius": round(avatar.radius, 5),
    }


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """An avatar's entry in ``list`` (SPEC.md). ``enhanced``: whether the diffusion fill
    painted what its photo never saw (only ``meta.json`` said so)."""
    keys = ("id", "name", "created", "preset", "gaussians", "center", "radius", "builder",
            "warnings")  # fmt: skip
    return {**{k: meta[k] for k in keys if k in meta}, "enhanced": bool(meta.get("enhance"))}
