"""Torch on one thread for small problems (the landmark fits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with torch on one thread: on tiny tensors more threads only spin,
    which is ten times slower on a busy CPU. Torch is imported here, not by callers'
    modules, so importing them stays cheap."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
