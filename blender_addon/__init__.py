"""splatface for Blender: build, drive, render and export Gaussian-splat heads.

Installed as an extension (``bl_ext.<repo>.splatface``) or imported as ``blender_addon``
from a checkout. This file stays free of ``bpy`` so the bpy-free ``core`` package can be
imported (and tested) without Blender; everything that touches Blender loads in
:func:`register`.
"""

from __future__ import annotations


def register() -> None:
    from . import registration

    registration.register()


def unregister() -> None:
    from . import registration

    registration.unregister()
