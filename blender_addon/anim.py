"""F-curves across Blender versions: shape-key weights and the head's rotation.

4.4+ keep keyframes in slotted actions (layers → strips → channel bags); 5.0 removed
``Action.fcurves``, and ``anim_utils.action_ensure_channelbag_for_slot`` only exists
from 5.0 on (4.5 has just ``action_get_channelbag_for_slot``); 4.2/4.3 have only
``Action.fcurves``. Everything that writes or reads keys goes through :func:`fcurves_for`
and :func:`find_fcurves`.
"""

from __future__ import annotations

from typing import Any

import bpy
import numpy as np
from mathutils import Matrix

from .core.curves import KeyframePlan


def _has_slots() -> bool:
    return bpy.app.version >= (4, 4, 0)


def _ensure_channelbag(action: bpy.types.Action, slot: Any) -> Any:
    """The channel bag of ``slot`` in the action's first keyframe strip (made as needed).

    What 5.0's ``action_ensure_channelbag_for_slot`` does, written out so 4.4/4.5 (which
    lack it) take the same path.
    """
    layer = action.layers[0] if len(action.layers) else action.layers.new("Layer")
    strip = layer.strips[0] if len(layer.strips) else layer.strips.new(type="KEYFRAME")
    return strip.channelbag(slot, ensure=True)


def fcurves_for(id_data: bpy.types.ID, action_name: str) -> Any:
    """The F-curve collection keys of ``id_data`` (a shape-key block, an object) should be
    written to: its action's channel bag for its slot, created as needed."""
    anim = id_data.animation_data or id_data.animation_data_create()
    action = anim.action
    if action is None:
        action = bpy.data.actions.new(action_name)
        anim.action = action
    if not _has_slots():
        return action.fcurves
    slot = anim.action_slot
    if slot is None:
        slot = action.slots.new(id_type=id_data.id_type, name=id_data.name)
        anim.action_slot = slot
    return _ensure_channelbag(action, slot).fcurves


def find_fcurves(id_data: bpy.types.ID) -> Any:
    """The F-curves animating ``id_data`` now, or None (read-only: creates nothing)."""
    anim = id_data.animation_data
    if anim is None or anim.action is None:
        return None
    return _action_fcurves(anim.action, anim.action_slot if _has_slots() else None)


def _action_fcurves(action: bpy.types.Action, slot: Any) -> Any:
    """``action``'s F-curves for ``slot`` (4.4+; ignored before), or None."""
    if not _has_slots():
        return action.fcurves
    from bpy_extras import anim_utils

    bag = anim_utils.action_get_channelbag_for_slot(action, slot)
    return None if bag is None else bag.fcurves


def rotation_animation(ob: bpy.types.Object) -> str:
    """What animates ``ob``'s rotation: "driver", "keys" (its action's, or an NLA strip's
    that plays: not muted, in a track that is not muted, nor outshone by a solo one), or
    "" for nothing."""
    anim = ob.animation_data
    if anim is None:
        return ""
    path = _rotation_path(ob.rotation_mode)
    if any(d.data_path == path for d in anim.drivers):
        return "driver"
    sources = [find_fcurves(ob)]
    if anim.use_nla:
        tracks = [t for t in anim.nla_tracks if not t.mute]
        if any(t.is_solo for t in tracks):
            tracks = [t for t in tracks if t.is_solo]
        strips = [s for t in tracks for s in t.strips]
        while strips:  # a meta strip's own strips hold its actions
            strip = strips.pop()
            if strip.mute:
                continue
            strips.extend(strip.strips)
            if strip.action is not None:
                slot = strip.action_slot if _has_slots() else None
                sources.append(_action_fcurves(strip.action, slot))
    keyed = any(fc.data_path == path for fcs in sources if fcs is not None for fc in fcs)
    return "keys" if keyed else ""


def _write_curve(fcurves: Any, path: str, index: int, frames: np.ndarray, values: Any) -> None:
    """Key ``path[index]`` linearly at ``(frames, values)`` (ascending frames), replacing
    the keys the F-curve had within that span. The F-curve itself stays, and so do the
    keys before and after the span with all they hold (handles, key type, easing) and the
    curve's extrapolation and modifiers: the artist's own work, or another take's."""
    fc = fcurves.find(path, index=index) or fcurves.new(path, index=index)
    points = fc.keyframe_points
    n = len(points)
    if n:
        old = np.empty(2 * n, np.float32)
        points.foreach_get("co", old)
        inside = (old[0::2] >= frames[0]) & (old[0::2] <= frames[-1])
        if inside.any():
            _drop_keys(points, inside)
    kept = len(points)
    points.add(len(frames))
    co = np.empty(2 * len(points), np.float32)
    points.foreach_get("co", co)
    co[2 * kept :: 2] = frames
    co[2 * kept + 1 :: 2] = values
    points.foreach_set("co", co)
    interp = np.empty(len(points), np.int32)
    points.foreach_get("interpolation", interp)
    interp[kept:] = _linear()
    points.foreach_set("interpolation", interp)
    fc.update()  # sorts the new keys in among the kept ones and sets their handles


#: What a key holds, as ``foreach_get`` reads it: (property, values per key, dtype).
#: ``co_ui`` is ``co`` as the Graph Editor edits it, not a value of its own.
KEY_FIELDS = (
    ("co", 2, np.float32), ("handle_left", 2, np.float32), ("handle_right", 2, np.float32),
    ("handle_left_type", 1, np.int32), ("handle_right_type", 1, np.int32),
    ("interpolation", 1, np.int32), ("type", 1, np.int32), ("easing", 1, np.int32),
    ("back", 1, np.float32), ("amplitude", 1, np.float32), ("period", 1, np.float32),
    ("select_control_point", 1, bool), ("select_left_handle", 1, bool),
    ("select_right_handle", 1, bool),
)  # fmt: skip


def _drop_keys(points: Any, drop: np.ndarray) -> None:
    """Remove the keys where ``drop`` (``[n]`` bool) from ``points``, the others kept
    with all they hold, in bulk: removing 36,000 keys one by one took seconds a curve
    (a take imported again over itself)."""
    n, keep = len(points), ~drop
    held = {}
    for name, width, dtype in KEY_FIELDS:
        values = np.empty(n * width, dtype)
        points.foreach_get(name, values)
        held[name] = values.reshape(n, width)[keep].ravel()
    points.clear()
    points.add(int(keep.sum()))
    for name, _, _ in KEY_FIELDS:
        points.foreach_set(name, held[name])


def key_shapes(key: bpy.types.Key, plan: KeyframePlan, names: tuple[str, ...]) -> int:
    """Key ``plan`` onto ``key``'s blocks named ``names`` (plan column order; a name not
    among the blocks, such as "", is skipped); returns the number of F-curves written.
    Existing keys on those curves within the plan's frames are replaced."""
    fcurves = fcurves_for(key, f"{key.user.name}_splatface")
    frames = np.asarray(plan.frames, np.float32)
    written = 0
    for i, name in enumerate(names):
        if name not in key.key_blocks:
            continue
        _write_curve(fcurves, f'key_blocks["{name}"].value', 0, frames, plan.values[:, i])
        written += 1
    return written


def key_rotation(ob: bpy.types.Object, frames: np.ndarray, rotations: np.ndarray) -> str:
    """Key ``ob``'s local rotation to ``rotations`` (``[K, 3, 3]``) at ``frames``, in its
    own rotation mode; returns the data path keyed. Location and scale are left alone.

    Euler angles are made compatible frame to frame and quaternions kept in one
    hemisphere, so linear interpolation between keys never takes the long way round.
    """
    mode = ob.rotation_mode
    values: list[tuple[float, ...]] = []
    prev: Any = None
    for m in np.asarray(rotations, np.float64):
        mat = Matrix(m.tolist())
        if mode == "QUATERNION":
            prev = mat.to_quaternion() if prev is None else _compatible(mat.to_quaternion(), prev)
            values.append(tuple(prev))
        elif mode == "AXIS_ANGLE":
            axis, angle = mat.to_quaternion().to_axis_angle()
            values.append((angle, *axis))
        else:
            prev = mat.to_euler(mode) if prev is None else mat.to_euler(mode, prev)
            values.append(tuple(prev))
    path = _rotation_path(mode)
    table = np.asarray(values, np.float64)
    fcurves = fcurves_for(ob, f"{ob.name}_splatface")
    frames32 = np.asarray(frames, np.float32)
    for i in range(table.shape[1]):
        _write_curve(fcurves, path, i, frames32, table[:, i])
    return path


def rotation_to_delta(ob: bpy.types.Object) -> bool:
    """Move ``ob``'s rotation, where no keys drive it, into its delta rotation and set
    the rotation to rest; True if there was one to move.

    Blender turns an object by its delta rotation after its rotation (world = delta ·
    rotation), so once a take's keys drive the rotation, an avatar the artist turned to
    face its place in the set keeps facing it, and the take turns the head within that.
    Animated rotation (keys, NLA strips, drivers) is left alone: its value is the frame's,
    not a placement (and a take imported before moved the placement already); an
    axis-angle object, which has no delta rotation in Blender's API, too."""
    mode = ob.rotation_mode
    if mode == "AXIS_ANGLE" or rotation_animation(ob):
        return False
    if mode == "QUATERNION":
        rot, delta = ob.rotation_quaternion.to_matrix(), ob.delta_rotation_quaternion.to_matrix()
    else:
        rot, delta = ob.rotation_euler.to_matrix(), ob.delta_rotation_euler.to_matrix()
    if np.allclose(np.array(rot), np.eye(3), atol=1e-7):
        return False
    placed = delta @ rot
    if mode == "QUATERNION":
        ob.delta_rotation_quaternion = placed.to_quaternion()
        ob.rotation_quaternion = (1.0, 0.0, 0.0, 0.0)
    else:
        ob.delta_rotation_euler = placed.to_euler(mode)
        ob.rotation_euler = (0.0, 0.0, 0.0)
    return True


def _rotation_path(mode: str) -> str:
    """The property an object's rotation lives in for its ``rotation_mode``."""
    return {"QUATERNION": "rotation_quaternion", "AXIS_ANGLE": "rotation_axis_angle"}.get(
        mode, "rotation_euler"
    )


def _compatible(q: Any, prev: Any) -> Any:
    """``q`` or ``-q`` (the same rotation), whichever is nearer ``prev``."""
    return -q if q.dot(prev) < 0 else q


def _linear() -> int:
    return bpy.types.Keyframe.bl_rna.properties["interpolation"].enum_items["LINEAR"].value


def keyed_value(id_data: bpy.types.ID, path: str, frame: float, index: int = 0) -> float | None:
    """The F-curve value of ``path[index]`` on ``id_data`` at ``frame`` (None if not keyed).

    ``path`` is an RNA path (``key_blocks["jawOpen"].value``, ``rotation_euler``)."""
    fcurves = find_fcurves(id_data)
    fc = None if fcurves is None else fcurves.find(path, index=index)
    return None if fc is None else fc.evaluate(frame)


def shape_value(key: bpy.types.Key, name: str, frame: float) -> float | None:
    """The keyed weight of shape ``name`` at ``frame`` (None if not keyed)."""
    return keyed_value(key, f'key_blocks["{name}"].value', frame)
