"""The ``protocol`` package the add-on talks through.

``make addon`` vendors a copy as ``<add-on>/protocol`` (Blender extensions may use relative
imports only); in a checkout the repository's own package is used, so tests exercise the
same code the service speaks.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec(f"{__package__}.protocol") is not None:
    try:
        from . import protocol as _impl  # type: ignore[attr-defined]
        from .protocol import files as _files  # type: ignore[attr-defined]
        from .protocol import launch as _launch  # type: ignore[attr-defined]
    except ModuleNotFoundError as exc:  # the vendored copy is there; what it needs is not
        raise ImportError(
            f"splatface needs the Python module {exc.name!r}, which its release zip carries "
            "as a wheel for Windows, macOS and Linux; reinstall the add-on from a zip made "
            "by 'make addon' (a --no-wheels zip needs it installed into Blender's Python)"
        ) from exc
else:  # a checkout: the repository's own package
    import protocol as _impl
    from protocol import files as _files
    from protocol import launch as _launch

ARKIT_NAMES = _impl.ARKIT_NAMES
NUM_SHAPES = _impl.NUM_SHAPES
Client = _impl.Client
CurveKeys = _impl.CurveKeys
ProtocolError = _impl.ProtocolError
load_animation = _impl.load_animation
Animation = _impl.Animation
head_pivot = _impl.head_pivot
head_rotation = _impl.head_rotation
errors = _impl.errors
wait_for_endpoint = _launch.wait_for_endpoint
atomic_write = _files.atomic_write
atomic_write_all = _files.atomic_write_all
is_loopback_endpoint = _launch.is_loopback_endpoint

__all__ = [
    "ARKIT_NAMES",
    "NUM_SHAPES",
    "Animation",
    "Client",
    "CurveKeys",
    "ProtocolError",
    "atomic_write",
    "atomic_write_all",
    "errors",
    "head_pivot",
    "head_rotation",
    "load_animation",
    "is_loopback_endpoint",
    "wait_for_endpoint",
]
