"""Properties: per-object avatar links and the session's UI state."""

from __future__ import annotations

import bpy

ROLES = [
    ("NONE", "None", "Not part of a splatface avatar"),
    ("PROXY", "Proxy", "The avatar's proxy mesh: its shape keys drive the splats"),
    ("HEAD", "Head", "The avatar's head empty: its world matrix poses the head"),
]


class SPLATFACE_PG_object(bpy.types.PropertyGroup):
    """Links an object to an avatar on the service (saved in the .blend)."""

    avatar_id: bpy.props.StringProperty(name="Avatar id")
    avatar_name: bpy.props.StringProperty(name="Avatar name")
    role: bpy.props.EnumProperty(name="Role", items=ROLES, default="NONE")
    center: bpy.props.FloatVectorProperty(name="Head centre", size=3, subtype="TRANSLATION")


class SPLATFACE_PG_avatar_item(bpy.types.PropertyGroup):
    """One avatar of the service's ``list`` (``name`` is the avatar's name)."""

    avatar_id: bpy.props.StringProperty()
    preset: bpy.props.StringProperty()
    gaussians: bpy.props.IntProperty()
    #: the build's warnings about its photo, a message a line (see SPEC.md, ``list``)
    warnings: bpy.props.StringProperty()


class SPLATFACE_PG_face_item(bpy.types.PropertyGroup):
    """One face a build found (largest first)."""

    box: bpy.props.FloatVectorProperty(size=4)
    score: bpy.props.FloatProperty()


class SPLATFACE_PG_state(bpy.types.PropertyGroup):
    """What the panel shows (on the window manager: not saved with the file)."""

    connected: bpy.props.BoolProperty()
    backend: bpy.props.StringProperty()
    status: bpy.props.StringProperty()
    error: bpy.props.StringProperty()
    building: bpy.props.BoolProperty()
    build_job: bpy.props.StringProperty()
    build_stage: bpy.props.StringProperty()
    build_fraction: bpy.props.FloatProperty(min=0.0, max=1.0, subtype="FACTOR")
    build_image: bpy.props.StringProperty(subtype="FILE_PATH")
    build_preset: bpy.props.StringProperty()
    build_name: bpy.props.StringProperty()
    build_face: bpy.props.IntProperty(default=-1)
    build_enhance: bpy.props.BoolProperty(default=True)
    faces: bpy.props.CollectionProperty(type=SPLATFACE_PG_face_item)
    avatars: bpy.props.CollectionProperty(type=SPLATFACE_PG_avatar_item)
    avatar_index: bpy.props.IntProperty()


classes = (
    SPLATFACE_PG_object,
    SPLATFACE_PG_avatar_item,
    SPLATFACE_PG_face_item,
    SPLATFACE_PG_state,
)


def state() -> SPLATFACE_PG_state:
    return bpy.context.window_manager.splatface


def register_properties() -> None:
    bpy.types.Object.splatface = bpy.props.PointerProperty(type=SPLATFACE_PG_object)
    bpy.types.WindowManager.splatface = bpy.props.PointerProperty(type=SPLATFACE_PG_state)


def unregister_properties() -> None:
    del bpy.types.WindowManager.splatface
    del bpy.types.Object.splatface
