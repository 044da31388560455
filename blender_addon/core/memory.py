"""Keep freed memory in the process between the frames of a render (Linux with glibc).

Blender allocates a new render result for every frame and frees it after. Blocks that
size glibc maps fresh from the kernel and unmaps on free (or trims off the heap's top),
so every frame pays the page faults again when Blender first writes into them: on a
2-core machine about 6 of the 12 ms that a 512x512 frame spent in Blender around the
service's render. While a ``SPLATFACE`` render runs, :class:`FrameMemory` raises glibc's
mmap and trim thresholds (``mallopt``) so a frame's freed blocks stay mapped for the next
one; when the render ends it puts glibc's defaults back and trims. Elsewhere (macOS,
Windows, musl) it does nothing. bpy-free, so tests run it in plain Python.
"""

from __future__ import annotations

import ctypes
import sys

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's default for both thresholds.
GLIBC_DEFAULT = 128 * 1024
#: The largest mmap threshold glibc accepts on 64-bit systems: blocks above it are
#: always mapped fresh (at 512x512 the largest pass is 4 MB).
MMAP_THRESHOLD_MAX = 32 << 20
#: Free memory kept at the heap's top, in frames' worth of result memory, at most
#: TRIM_MAX bytes.
FRAMES_KEPT = 4
TRIM_MAX = 512 << 20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError):
        return None
    return libc


class FrameMemory:
    """glibc's thresholds while a render runs (see the module docstring)."""

    def __init__(self) -> None:
        self._libc = _glibc()
        self.active = False

    @property
    def available(self) -> bool:
        """True where the allocator is glibc's (the thresholds can be set)."""
        return self._libc is not None

    def keep(self, frame_bytes: int) -> bool:
        """Keep freed blocks mapped for frames of ``frame_bytes`` (all of a frame's
        result passes). Returns whether a previous frame's memory was already being kept
        (so the pages this frame gets are mapped already)."""
        was = self.active
        if self._libc is not None:
            trim = int(min(max(FRAMES_KEPT * frame_bytes, GLIBC_DEFAULT), TRIM_MAX))
            ok = self._libc.mallopt(M_TRIM_THRESHOLD, trim)
            ok &= self._libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            self.active = bool(ok)
        return was

    def release(self) -> None:
        """glibc's default thresholds again, and the kept memory back to the system."""
        if self._libc is not None and self.active:
            self._libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT)
            self._libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT)
            self._libc.malloc_trim(0)
        self.active = False
