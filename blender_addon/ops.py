"""Operators: connect, build (with progress and cancel), import, curves, export.

Socket work runs on the worker thread and reports back through the main-thread queue;
errors become ``self.report({'ERROR'}, ...)`` there, and in the panel's status line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bpy
import numpy as np
import zmq
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import anim, avatar, prefs, props, runtime
from ._protocol import (
    ARKIT_NAMES,
    Client,
    ProtocolError,
    atomic_write,
    atomic_write_all,
    head_rotation,
    load_animation,
)
from .core.curves import plan_keyframes
from .core.service import run_build

PRESETS = [
    ("fast", "Fast", "About 10 s on two CPU cores, ~17k Gaussians: a quick look"),
    ("default", "Default", "About a minute on two CPU cores, ~41k Gaussians"),
    ("high", "High", "About 2 minutes on two CPU cores, ~82k Gaussians, most detail"),
]


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return f"{exc.message} [{exc.code}]"
    return str(exc) or type(exc).__name__


def _file_path(op: bpy.types.Operator, path: str) -> str | None:
    """``path`` made absolute, or None once ``op`` has reported why it cannot be: a
    ``//`` path is relative to the saved .blend, and an unsaved one has no folder (it
    would land wherever Blender was started)."""
    if path.startswith("//") and not bpy.data.filepath:
        op.report({"ERROR"}, f"{path} is relative to the .blend: save the file first, or "
                             "choose a full path")  # fmt: skip
        return None
    return bpy.path.abspath(path)


def _scene_defaults(op: bpy.types.Operator, **values: Any) -> None:
    """Set ``op``'s properties to the scene's ``values`` where neither the caller nor the
    user gave them (a property's own default cannot follow the scene)."""
    for name, value in values.items():
        if not op.properties.is_property_set(name):
            setattr(op, name, value)


def _client(op: bpy.types.Operator) -> Client | None:
    """The shared client, or None once ``op`` has reported why there is none (a malformed
    endpoint, unreadable CurveZMQ keys)."""
    try:
        return runtime.client()
    except (ValueError, OSError) as exc:
        op.report({"ERROR"}, str(exc))
        return None


def _report_error(message: str) -> None:
    st = props.state()
    st.error = message
    st.status = message
    runtime.tag_redraw()


# -- connection --------------------------------------------------------------------


def _apply_list(avatars: list[dict[str, Any]], select: str = "") -> None:
    """Show the service's avatars; ``select``: the id to make the list's active row."""
    st = props.state()
    if {item.avatar_id for item in st.avatars} - {a["id"] for a in avatars}:
        runtime.store_changed()
    st.avatars.clear()
    for a in avatars:
        item = st.avatars.add()
        item.name = a.get("name", "")
        item.avatar_id = a["id"]
        item.preset = a.get("preset", "")
        item.gaussians = int(a.get("gaussians", 0))
        item.warnings = "\n".join(w.get("message", "") for w in a.get("warnings", ()))
    ids = [item.avatar_id for item in st.avatars]
    if select in ids:
        st.avatar_index = ids.index(select)
    st.avatar_index = min(st.avatar_index, max(0, len(st.avatars) - 1))


class SPLATFACE_OT_connect(bpy.types.Operator):
    """Connect to the service (starting a local one if the preferences allow)"""

    bl_idname = "splatface.connect"
    bl_label = "Connect"

    def execute(self, context: bpy.types.Context) -> set[str]:
        client = _client(self)
        if client is None:
            return {"CANCELLED"}
        settings = runtime.settings()
        st = props.state()
        st.status = f"connecting to {settings.endpoint}…"

        def work() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            runtime.start_if_down()
            return client.hello("splatface-blender"), client.avatars()

        def done(future: Future) -> None:
            st = props.state()
            exc = future.exception()
            if exc is not None:
                st.connected, st.backend = False, ""
                _report_error(f"cannot reach {settings.endpoint}: {_error_text(exc)}")
                return
            hello, avatars = future.result()
            st.connected, st.backend, st.error = True, hello.get("backend", ""), ""
            st.status = f"{hello.get('service', 'splatface')} {hello.get('service_version', '')}"
            _apply_list(avatars)
            runtime.tag_redraw()

        runtime.submit(work, done)
        return {"FINISHED"}


class SPLATFACE_OT_refresh(bpy.types.Operator):
    """List the avatars on the service"""

    bl_idname = "splatface.refresh"
    bl_label = "Refresh avatars"

    def execute(self, context: bpy.types.Context) -> set[str]:
        client = _client(self)
        if client is None:
            return {"CANCELLED"}

        def done(future: Future) -> None:
            exc = future.exception()
            if exc is not None:
                props.state().connected = False
                _report_error(f"cannot list avatars: {_error_text(exc)}")
                return
            props.state().connected = True
            _apply_list(future.result())
            runtime.tag_redraw()

        def work() -> list[dict[str, Any]]:
            runtime.start_if_down()
            return client.avatars()

        runtime.submit(work, done)
        return {"FINISHED"}


# -- avatars -------------------------------------------------------------------------


def fetch_and_create(client: Client, avatar_id: str, then: Any = None) -> Future:
    """Fetch mesh and rig on the worker, make the objects on the main thread."""

    def done(future: Future) -> None:
        exc = future.exception()
        if exc is not None:
            _report_error(f"cannot fetch avatar {avatar_id}: {_error_text(exc)}")
            return
        reply = future.result()
        active = bpy.context.view_layer.active_layer_collection.collection
        # the active collection, as Add > Mesh puts new objects, unless it is linked from
        # another file (it cannot take objects): then the scene's, as Add > Mesh does too
        editable = active.library is None and active.is_editable
        proxy, head = avatar.create_avatar(
            active if editable else bpy.context.scene.collection,
            reply.header["avatar"],
            reply.arrays["vertices"],
            reply.arrays["triangles"],
            reply.arrays["shape_deltas"],
            list(reply.header["shape_names"]),
        )
        props.state().status = f"imported {proxy.name}"
        for ob in bpy.context.view_layer.objects.selected:
            ob.select_set(False)
        proxy.select_set(True)
        head.select_set(True)  # moved or turned, the whole avatar goes: the head leads
        bpy.context.view_layer.objects.active = proxy  # ready for Import face curves
        if then is not None:
            then(proxy)
        runtime.tag_redraw()

    def work() -> Any:
        runtime.start_if_down()
        return client.get(avatar_id, mesh=True, rig=True)

    return runtime.submit(work, done)


class SPLATFACE_OT_import_avatar(bpy.types.Operator):
    """Add the selected service avatar to the scene: proxy mesh with 52 shape keys and a
    head empty"""

    bl_idname = "splatface.import_avatar"
    bl_label = "Add to scene"

    avatar_id: bpy.props.StringProperty(name="Avatar id", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        avatar_id = self.avatar_id
        if not avatar_id:
            st = props.state()
            if not (0 <= st.avatar_index < len(st.avatars)):
                self.report({"ERROR"}, "no avatar selected")
                return {"CANCELLED"}
            avatar_id = st.avatars[st.avatar_index].avatar_id
        client = _client(self)
        if client is None:
            return {"CANCELLED"}
        fetch_and_create(client, avatar_id)
        return {"FINISHED"}


class SPLATFACE_OT_delete_avatar(bpy.types.Operator):
    """Delete the selected avatar from the service's store"""

    bl_idname = "splatface.delete_avatar"
    bl_label = "Delete from service"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        st = props.state()
        return 0 <= st.avatar_index < len(st.avatars)

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        st = props.state()
        users = _proxies_using(st.avatars[st.avatar_index].avatar_id)
        message = _in_use(users) or "It cannot be undone."
        return context.window_manager.invoke_confirm(self, event, message=message)

    def execute(self, context: bpy.types.Context) -> set[str]:
        st = props.state()
        avatar_id = st.avatars[st.avatar_index].avatar_id
        client = _client(self)
        if client is None:
            return {"CANCELLED"}
        users = _proxies_using(avatar_id)
        if users:
            self.report({"WARNING"}, _in_use(users))

        def work() -> list[dict[str, Any]]:
            runtime.start_if_down()
            client.delete(avatar_id)
            return client.avatars()

        def done(future: Future) -> None:
            exc = future.exception()
            if exc is not None:
                _report_error(f"cannot delete {avatar_id}: {_error_text(exc)}")
                return
            _apply_list(future.result())

        runtime.submit(work, done)
        return {"FINISHED"}


def _proxies_using(avatar_id: str) -> list[str]:
    """Names of this file's avatar proxies that render ``avatar_id``."""
    using = avatar.proxies(bpy.data.objects)
    return sorted(ob.name for ob in using if ob.splatface.avatar_id == avatar_id)


def _in_use(users: list[str]) -> str:
    """What deleting an avatar these proxies use costs them ("" for none)."""
    if not users:
        return ""
    return (f"{len(users)} object(s) in this file use it ({', '.join(users[:5])}"
            f"{' ...' * (len(users) > 5)}): their renders and exports fail once it is "
            "gone, and a build from the same photo is another avatar")  # fmt: skip


# -- builds --------------------------------------------------------------------------


def start_build(image_path: str, name: str, preset: str, face: int, enhance: bool) -> Future:
    """Start a build on the worker; the panel follows it, the avatar is added when done.
    ``enhance``: paint unseen parts with the preferences' diffusion folders (if set)."""
    data = Path(image_path).read_bytes()
    client = runtime.client()
    folders = prefs.enhance_folders(enhance)
    st = props.state()
    st.building, st.build_job, st.build_stage, st.build_fraction = True, "", "queued", 0.0
    st.build_image, st.build_name, st.build_preset, st.build_face = image_path, name, preset, face
    st.build_enhance = enhance
    st.error = ""
    runtime.build_cancel.clear()

    def on_status(status: dict[str, Any]) -> None:
        runtime.main_queue.post(_apply_status, status)

    def work() -> dict[str, Any]:
        runtime.start_if_down()
        return run_build(
            client,
            data,
            name=name,
            preset=preset,
            face=None if face < 0 else face,
            enhance=folders,
            on_status=on_status,
            cancel=runtime.build_cancel,
        )

    def done(future: Future) -> None:
        st = props.state()
        st.building = False
        exc = future.exception()
        if exc is not None:
            if getattr(exc, "code", "") == "cancelled":  # asked for: not an error
                st.build_stage, st.status = "cancelled", "build cancelled"
                runtime.tag_redraw()
                return
            st.build_stage = "failed"
            _report_error(f"build failed: {_error_text(exc)}")
            return
        status = future.result()
        st.build_stage, st.build_fraction = "done", 1.0
        built = status["avatar_id"]
        st.status = f"built {built}"
        fetch_and_create(client, built)
        # the new avatar selected, so that the panel shows its warnings
        runtime.submit(client.avatars, lambda f: f.exception() or _apply_list(f.result(), built))

    return runtime.submit(work, done, on=runtime.build_worker)


def _start_build(op: bpy.types.Operator, *args: Any) -> set[str]:
    """:func:`start_build` for an operator: FINISHED, or CANCELLED once ``op`` has
    reported why the build could not start (an unreadable photo, a malformed endpoint)."""
    try:
        start_build(*args)
    except (ValueError, OSError) as exc:
        op.report({"ERROR"}, f"cannot start the build: {exc}")
        return {"CANCELLED"}
    return {"FINISHED"}


def _apply_status(status: dict[str, Any]) -> None:
    st = props.state()
    st.build_job = status.get("job", "")
    st.build_stage = status.get("stage", "") or status.get("state", "")
    st.build_fraction = float(status.get("fraction", 0.0))
    faces = status.get("faces")
    if faces is not None and len(faces) != len(st.faces):
        st.faces.clear()
        for f in faces:
            item = st.faces.add()
            item.box = [float(v) for v in f["box"]]
            item.score = float(f.get("score", 0.0))
    runtime.tag_redraw()


class SPLATFACE_OT_build(bpy.types.Operator, ImportHelper):
    """Build an avatar from a portrait photo on the service"""

    bl_idname = "splatface.build"
    bl_label = "Build avatar from image…"

    filter_glob: bpy.props.StringProperty(
        default="*.png;*.jpg;*.jpeg;*.webp;*.tif;*.tiff;*.bmp", options={"HIDDEN"}
    )
    avatar_name: bpy.props.StringProperty(name="Name", description="Empty: from the file name")
    preset: bpy.props.EnumProperty(name="Preset", items=PRESETS, default="default")
    face: bpy.props.IntProperty(
        name="Face", description="Which face (0 = largest; -1 = largest)", default=-1, min=-1
    )
    enhance: bpy.props.BoolProperty(
        name="Diffusion fill",
        description="Paint the parts of the head the photo never saw with the diffusion "
        "model set in the add-on's preferences (or the service's own); slow on a CPU",
        default=True,
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return not props.state().building

    def execute(self, context: bpy.types.Context) -> set[str]:
        path = _file_path(self, self.filepath)
        if path is None:
            return {"CANCELLED"}
        if not os.path.isfile(path):
            self.report({"ERROR"}, f"no such image: {path}")
            return {"CANCELLED"}
        props.state().faces.clear()
        name = self.avatar_name or Path(path).stem
        return _start_build(self, path, name, self.preset, self.face, self.enhance)


class SPLATFACE_OT_build_face(bpy.types.Operator):
    """Build again from the same photo with another of the faces found"""

    bl_idname = "splatface.build_face"
    bl_label = "Build this face"

    face: bpy.props.IntProperty(min=0)

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        st = props.state()
        return not st.building and bool(st.build_image)

    def execute(self, context: bpy.types.Context) -> set[str]:
        st = props.state()
        base = re.sub(r"-face\d+$", "", st.build_name)  # "two-face1" builds "two-face0"
        return _start_build(
            self, st.build_image, f"{base}-face{self.face}", st.build_preset, self.face,
            st.build_enhance,
        )  # fmt: skip


class SPLATFACE_OT_cancel_build(bpy.types.Operator):
    """Cancel the running build"""

    bl_idname = "splatface.cancel_build"
    bl_label = "Cancel build"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return props.state().building

    def execute(self, context: bpy.types.Context) -> set[str]:
        runtime.build_cancel.set()
        props.state().status = "cancelling…"
        return {"FINISHED"}


# -- curves --------------------------------------------------------------------------


@dataclass(frozen=True)
class CurvesImport:
    """What :func:`import_curves` keyed: frames per shape, the head's rotation path
    ("" when the take had no head angles or head motion was off), and the shapes the file
    has no column for (left as they were)."""

    frames: int
    head_path: str
    missing: tuple[str, ...] = ()
    placement_moved: bool = False  # the head empty's rotation went into its delta rotation
    driven: bool = False  # a driver sets the head's rotation, over the take's keys
    driven_shapes: tuple[str, ...] = ()  # shapes a driver sets, over the take's keys
    apart: bool = False  # the proxy was moved or turned away from its head empty


def import_curves(
    proxy: bpy.types.Object, path: str, start_frame: int, head_motion: bool = True
) -> CurvesImport:
    """Key a curves file (Live Link Face CSV, splatface CSV, .npy) onto ``proxy``'s shape
    keys at the scene frame rate, and the take's head rotation (Live Link Face's
    HeadYaw/Pitch/Roll, see ``protocol.head_rotation``) onto its head empty, which sits at
    the neck pivot, so the head turns as ``splatface render --curves`` turns it. Keys
    within the take's frames are replaced, keys outside them kept; shapes the file has no
    column for keep their keys (``missing``)."""
    scene = bpy.context.scene
    take = load_animation(path)
    scene_fps = scene.render.fps / scene.render.fps_base
    times = take.row_times()  # a capture's dropped frames keep their time
    rate = take.row_rate()  # else rows one step apart (a 60 fps take on a 30 fps clock)
    plan = plan_keyframes(take.curves, rate, scene_fps, start_frame, times)
    key = proxy.data.shape_keys
    if key is None:
        raise ValueError(f"{proxy.name} has no shape keys")
    if key.library is not None:  # keys written there are not saved with this file
        raise ValueError(
            f"{proxy.name}'s shape keys are linked from {key.library.filepath}, where its "
            "keys would be lost on save: override its mesh too (Outliner: Library Override "
            "> Make > Selected & Content; in Python, "
            "obj.data.override_create(remap_local_usages=True)), make it local (Object > "
            "Relations > Make Local > Selected Objects and Data), or import the take in that "
            "file"
        )
    head = proxy.parent
    head_path, placed, driven = "", False, False
    if head_motion and take.head_angles is not None:
        if head is None or head.splatface.role != "HEAD":
            raise ValueError(f"{proxy.name} has no head empty to key the head rotation on")
        angles = plan_keyframes(take.head_angles, rate, scene_fps, start_frame, times)
        driven = anim.rotation_animation(head) == "driver"
        placed = anim.rotation_to_delta(head)
        head_path = anim.key_rotation(head, angles.frames, head_rotation(*angles.values.T))
    keyed = tuple("" if n in take.missing else n for n in ARKIT_NAMES)
    anim.key_shapes(key, plan, keyed)
    drivers = key.animation_data.drivers if key.animation_data else ()
    paths = {d.data_path for d in drivers if not d.mute}
    driven_shapes = tuple(n for n in keyed if n and f'key_blocks["{n}"].value' in paths)
    apart = bool(head_path) and not _is_identity(proxy.matrix_basis)
    return CurvesImport(len(plan.frames), head_path, take.missing, placed, driven,
                        driven_shapes, apart)  # fmt: skip


def _is_identity(m: Any) -> bool:
    return bool(np.allclose(np.array(m), np.eye(4), atol=1e-6))


class SPLATFACE_OT_import_curves(bpy.types.Operator, ImportHelper):
    """Key a Live Link Face CSV (or splatface's tracked-video output) onto the active
    avatar's shape keys, and its head rotation onto the head empty, at the scene frame
    rate"""

    bl_idname = "splatface.import_curves"
    bl_label = "Import face curves (.csv)"
    bl_options = {"REGISTER", "UNDO"}

    filename_ext = ".csv"
    filter_glob: bpy.props.StringProperty(default="*.csv;*.npy", options={"HIDDEN"})
    start_frame: bpy.props.IntProperty(
        name="Start frame",
        description="Frame the take's first row is keyed on, negative for pre-roll "
        "(default: the scene's start frame)",
        default=1,
    )
    head_motion: bpy.props.BoolProperty(
        name="Head rotation",
        description="Key the take's head yaw, pitch and roll (Live Link Face) as rotation "
        "keyframes on the avatar's head empty, turning about the neck",
        default=True,
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return avatar.proxy_of(context.active_object) is not None

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        _scene_defaults(self, start_frame=context.scene.frame_start)  # in the file browser
        return super().invoke(context, event)

    def execute(self, context: bpy.types.Context) -> set[str]:
        proxy = avatar.proxy_of(context.active_object)
        _scene_defaults(self, start_frame=context.scene.frame_start)  # called from a script
        start = self.start_frame
        path = _file_path(self, self.filepath)
        if path is None:
            return {"CANCELLED"}
        try:
            done = import_curves(proxy, path, start, self.head_motion)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        head = f" and the head's {done.head_path}" if done.head_path else ""
        self.report({"INFO"}, f"keyed {done.frames} frames on {proxy.name}{head}")
        if done.placement_moved:
            self.report(
                {"INFO"},
                f"{proxy.parent.name}'s rotation, where the avatar was placed, is now its "
                "delta rotation (Object > Transform > Delta Transform): the take turns the "
                "head from there",
            )
        if done.driven:
            self.report(
                {"WARNING"},
                f"a driver sets {proxy.parent.name}'s rotation, over the take's head rotation "
                "keys: remove the driver to see them, or import without Head rotation",
            )
        if done.driven_shapes:
            self.report(
                {"WARNING"},
                f"a driver sets {len(done.driven_shapes)} shape key(s) over the take's keys "
                f"({', '.join(done.driven_shapes)}): remove or mute the drivers to see them",
            )
        if done.apart:
            self.report(
                {"WARNING"},
                f"{proxy.name} was moved or turned apart from its head empty "
                f"{proxy.parent.name}: the take turns the head about {proxy.parent.name}, "
                f"so the head swings round its old place; place an avatar by its head empty "
                f"(clear {proxy.name}'s location and rotation, and move {proxy.parent.name})",
            )
        if done.missing:
            self.report(
                {"WARNING"},
                f"the file has no column for {len(done.missing)} shape(s), left as they were: "
                + ", ".join(done.missing),
            )
        lacking = [n for n in avatar.missing_shapes(proxy) if n not in done.missing]
        if lacking:
            self.report(
                {"WARNING"},
                f"{proxy.name} has no shape key named {', '.join(lacking)} (renamed or "
                "deleted?): not keyed, and rendered as 0",
            )
        return {"FINISHED"}


# -- export --------------------------------------------------------------------------

EXPORT_MODES = [
    ("CURRENT", "Current frame", "One .ply of the current frame"),
    ("RANGE", "Frame range", "One .ply per frame: name_NNNN.ply"),
    ("BUNDLE", "Rigged bundle", "A zip with the glTF head (52 morph targets) and the Gaussians"),
]


def export_frames(
    proxy: bpy.types.Object,
    path: str,
    mode: str,
    frame_start: int,
    frame_end: int,
    frame_step: int = 1,
    sh_degree: int | None = None,
    warnings: list[str] | None = None,
) -> list[str]:
    """Write ``.ply`` files (world space, posed as evaluated) or the bundle, all whole or
    none of them (a range that fails leaves none of its frames); returns paths.
    ``sh_degree``: the files' SH degree (default: the avatar's own). ``warnings`` gets
    what the export could not follow (``avatar.proxy_state``), once each."""
    client = runtime.client()
    timeout = runtime.settings().timeout
    scene = bpy.context.scene
    avatar_id = proxy.splatface.avatar_id
    out = Path(path)
    if mode == "BUNDLE":
        data = client.export(avatar_id, format="bundle", timeout=timeout).arrays["file"]
        target = out.with_suffix(".zip")
        atomic_write(target, data.tobytes())
        return [str(target)]
    avatar.fetch_rest(client, [proxy], timeout)
    if mode == "CURRENT":
        frames = [scene.frame_current]
    else:
        if frame_end < frame_start:
            raise ValueError(f"frame range {frame_start}..{frame_end} is empty")
        frames = list(range(frame_start, frame_end + 1, max(1, frame_step)))
    written = []
    current = scene.frame_current

    def posed() -> Iterator[tuple[Path, bytes]]:
        for frame in frames:
            scene.frame_set(frame)
            depsgraph = bpy.context.evaluated_depsgraph_get()
            ob = proxy.evaluated_get(depsgraph)
            curves = avatar.evaluated_curves(ob, depsgraph)
            to_mesh, warning = avatar.proxy_state(ob, depsgraph, True, "export")
            if warning and warnings is not None and warning not in warnings:
                warnings.append(warning)
            head = np.array(ob.matrix_world, np.float64) @ to_mesh
            reply = client.export(avatar_id, curves=curves[None], head=head, timeout=timeout,
                                  sh_degree=sh_degree)  # fmt: skip
            target = out if mode == "CURRENT" else out.with_name(f"{out.stem}_{frame:04d}.ply")
            written.append(str(target))
            yield target, reply.arrays["file"].tobytes()

    try:
        atomic_write_all(posed())
    finally:
        scene.frame_set(current)
    return written


class SPLATFACE_OT_export_ply(bpy.types.Operator, ExportHelper):
    """Export the active avatar as Gaussian splats (.ply, world space, posed as in the
    scene) for a frame or a range, or as the rigged bundle"""

    bl_idname = "splatface.export_ply"
    bl_label = "Export Gaussian Splat"

    filename_ext = ".ply"
    filter_glob: bpy.props.StringProperty(default="*.ply;*.zip", options={"HIDDEN"})
    mode: bpy.props.EnumProperty(name="Export", items=EXPORT_MODES, default="CURRENT")
    frame_start: bpy.props.IntProperty(
        name="Start", description="First frame of the range (default: the scene's)", default=1
    )
    frame_end: bpy.props.IntProperty(
        name="End", description="Last frame of the range (default: the scene's)", default=250
    )
    frame_step: bpy.props.IntProperty(
        name="Step", description="Frames between exports (default: the scene's)", default=1, min=1
    )
    full_sh: bpy.props.BoolProperty(
        name="Degree-3 SH",
        description="Write the 45 f_rest values (zeros: the same colours) that 3DGS's "
        "reference loader and tools built on its code require; other viewers take the smaller file",
        default=False,
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _export_target(context) is not None

    def _scene_range(self, context: bpy.types.Context) -> None:
        scene = context.scene
        _scene_defaults(self, frame_start=scene.frame_start, frame_end=scene.frame_end,
                        frame_step=scene.frame_step)  # fmt: skip

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        self._scene_range(context)
        p = prefs.preferences()
        proxy = _export_target(context)
        if p is not None and p.export_folder and proxy is not None:
            folder = bpy.path.abspath(p.export_folder)
            self.filepath = os.path.join(folder, bpy.path.clean_name(proxy.name) + ".ply")
            context.window_manager.fileselect_add(self)
            return {"RUNNING_MODAL"}
        return ExportHelper.invoke(self, context, event)

    def execute(self, context: bpy.types.Context) -> set[str]:
        proxy = _export_target(context)
        if proxy is None:
            self.report({"ERROR"}, "select a splatface avatar to export")
            return {"CANCELLED"}
        self._scene_range(context)  # a script that names no range exports the scene's
        path = _file_path(self, self.filepath)
        if path is None:
            return {"CANCELLED"}
        warnings: list[str] = []
        try:
            files = export_frames(
                proxy,
                path,
                self.mode,
                self.frame_start,
                self.frame_end,
                self.frame_step,
                3 if self.full_sh else None,
                warnings,
            )
        except (ProtocolError, ValueError, OSError, zmq.ZMQError) as exc:
            self.report({"ERROR"}, f"export failed: {_error_text(exc)}")
            return {"CANCELLED"}
        for warning in warnings:
            self.report({"WARNING"}, warning)
        self.report({"INFO"}, f"wrote {len(files)} file(s), last {files[-1]}")
        return {"FINISHED"}


def _export_target(context: bpy.types.Context) -> bpy.types.Object | None:
    proxy = avatar.proxy_of(context.active_object)
    if proxy is not None:
        return proxy
    found = avatar.proxies(context.scene.objects)
    return found[0] if len(found) == 1 else None


def menu_export(self: Any, context: bpy.types.Context) -> None:
    self.layout.operator(SPLATFACE_OT_export_ply.bl_idname, text="Gaussian Splat (.ply)")


def menu_import(self: Any, context: bpy.types.Context) -> None:
    self.layout.operator(
        SPLATFACE_OT_import_curves.bl_idname, text="Face curves (Live Link Face .csv)"
    )


classes = (
    SPLATFACE_OT_connect,
    SPLATFACE_OT_refresh,
    SPLATFACE_OT_import_avatar,
    SPLATFACE_OT_delete_avatar,
    SPLATFACE_OT_build,
    SPLATFACE_OT_build_face,
    SPLATFACE_OT_cancel_build,
    SPLATFACE_OT_import_curves,
    SPLATFACE_OT_export_ply,
)
