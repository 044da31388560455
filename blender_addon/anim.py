"""F-curves on shape keys across Blender versions.

4.4+ keep keyframes in slotted actions (layers → strips → channel bags); 5.0 removed
``Action.fcurves``; 4.2/4.3 have only ``Action.fcurves``. Everything that writes keys goes
through :func:`shape_key_fcurves`.
"""

from __future__ import annotations

import bpy
import numpy as np

from .core.curves import KeyframePlan


def _has_slots() -> bool:
    return bpy.app.version >= (4, 4, 0)


def shape_key_fcurves(key: bpy.types.Key, action_name: str) -> bpy.types.bpy_prop_collection:
    """The F-curve collection keys of ``key`` should be written to (created as needed)."""
    anim = key.animation_data or key.animation_data_create()
    action = anim.action
    if action is None:
        action = bpy.data.actions.new(action_name)
        anim.action = action
    if not _has_slots():
        return action.fcurves
    from bpy_extras import anim_utils

    slot = anim.action_slot
    if slot is None:
        slot = action.slots.new(id_type="KEY", name=key.name)
        anim.action_slot = slot
    return anim_utils.action_ensure_channelbag_for_slot(action, slot).fcurves


def key_shapes(key: bpy.types.Key, plan: KeyframePlan, names: tuple[str, ...]) -> int:
    """Key ``plan`` onto ``key``'s blocks named ``names`` (plan column order); returns the
    number of F-curves written. Existing keys on those curves are replaced."""
    fcurves = shape_key_fcurves(key, f"{key.user.name}_splatface")
    frames = np.asarray(plan.frames, np.float32)
    written = 0
    for i, name in enumerate(names):
        if name not in key.key_blocks:
            continue
        path = f'key_blocks["{name}"].value'
        fc = fcurves.find(path)
        if fc is not None:
            fcurves.remove(fc)
        fc = fcurves.new(path)
        fc.keyframe_points.add(len(frames))
        co = np.empty((len(frames), 2), np.float32)
        co[:, 0] = frames
        co[:, 1] = plan.values[:, i]
        fc.keyframe_points.foreach_set("co", co.ravel())
        fc.keyframe_points.foreach_set("interpolation", [_linear()] * len(frames))
        fc.update()
        written += 1
    return written


def _linear() -> int:
    return bpy.types.Keyframe.bl_rna.properties["interpolation"].enum_items["LINEAR"].value


def keyed_value(key: bpy.types.Key, name: str, frame: float) -> float | None:
    """The F-curve value of ``key_blocks[name]`` at ``frame`` (None if not keyed)."""
    anim = key.animation_data
    if anim is None or anim.action is None:
        return None
    if _has_slots():
        from bpy_extras import anim_utils

        if anim.action_slot is None:
            return None
        bag = anim_utils.action_get_channelbag_for_slot(anim.action, anim.action_slot)
        fcurves = None if bag is None else bag.fcurves
    else:
        fcurves = anim.action.fcurves
    fc = None if fcurves is None else fcurves.find(f'key_blocks["{name}"].value')
    return None if fc is None else fc.evaluate(frame)
