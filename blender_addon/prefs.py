"""Add-on preferences: where the service is and how to start one."""

from __future__ import annotations

import os

import bpy

from .core.service import ConnectionSettings

ADDON_ID = __package__


class SPLATFACE_AddonPreferences(bpy.types.AddonPreferences):
    """Stored in Blender's user preferences, per installation."""

    bl_idname = __package__

    endpoint: bpy.props.StringProperty(
        name="Service endpoint",
        description="ZeroMQ endpoint of the splatface service (SPLATFACE_ENDPOINT overrides)",
        default="tcp://127.0.0.1:5555",
    )
    timeout: bpy.props.FloatProperty(
        name="Timeout (s)",
        description="Seconds to wait for a reply before reporting the service as down",
        default=30.0,
        min=0.5,
        max=3600.0,
    )
    auto_start: bpy.props.BoolProperty(
        name="Start a local service",
        description="Start a service on the endpoint when none answers (loopback only)",
        default=False,
    )
    service_python: bpy.props.StringProperty(
        name="Service Python",
        description="Python executable of an environment with splatface[service] installed",
        subtype="FILE_PATH",
    )
    store: bpy.props.StringProperty(
        name="Avatar store",
        description="Avatar folder of a started service (empty: the service's default)",
        subtype="DIR_PATH",
    )
    curve_keys: bpy.props.StringProperty(
        name="CurveZMQ keys",
        description="Folder with server.key and client.key_secret for a remote service",
        subtype="DIR_PATH",
    )
    export_folder: bpy.props.StringProperty(
        name="Export folder",
        description="Default folder of File > Export > Gaussian Splat",
        subtype="DIR_PATH",
    )
    enhance_model: bpy.props.StringProperty(
        name="Diffusion model",
        description="Stable Diffusion inpainting folder on the service's machine (diffusers "
        "layout, safetensors): paints the parts of the head the photo never saw. Empty: "
        "the service's own, if it has one",
        subtype="DIR_PATH",
    )
    enhance_controlnet: bpy.props.StringProperty(
        name="Depth ControlNet",
        description="Optional depth ControlNet folder for the same base model, so the "
        "painting follows the head's shape",
        subtype="DIR_PATH",
    )
    viewport_scale: bpy.props.FloatProperty(
        name="Viewport resolution",
        description="Fraction of the 3D View's size rendered in Rendered shading",
        default=0.5,
        min=0.1,
        max=1.0,
    )

    def draw(self, context: bpy.types.Context) -> None:
        col = self.layout.column()
        col.prop(self, "endpoint")
        col.prop(self, "timeout")
        col.prop(self, "curve_keys")
        col.separator()
        col.prop(self, "auto_start")
        sub = col.column()
        sub.active = self.auto_start
        sub.prop(self, "service_python")
        sub.prop(self, "store")
        col.separator()
        col.prop(self, "export_folder")
        col.prop(self, "viewport_scale")
        col.separator()
        col.label(text="Diffusion fill (optional, needs splatface[enhance] in the service)")
        col.prop(self, "enhance_model")
        sub = col.column()
        sub.active = bool(self.enhance_model)
        sub.prop(self, "enhance_controlnet")


def preferences() -> SPLATFACE_AddonPreferences | None:
    """This add-on's preferences, or None when it was registered without addon_utils."""
    addon = bpy.context.preferences.addons.get(ADDON_ID)
    return None if addon is None else addon.preferences


def connection_settings() -> ConnectionSettings:
    p = preferences()
    if p is None:
        return ConnectionSettings()
    return ConnectionSettings(
        endpoint=p.endpoint,
        timeout=p.timeout,
        curve_keys=bpy.path.abspath(p.curve_keys) if p.curve_keys else "",
        auto_start=p.auto_start,
        service_python=bpy.path.abspath(p.service_python) if p.service_python else "",
        store=bpy.path.abspath(p.store) if p.store else "",
    )


def enhance_folders(enabled: bool) -> list[str] | None:
    """The build request's ``enhance``: the preferences' folders (absolute), ``[]`` when
    the user turned the fill off for this build, None to leave it to the service."""
    if not enabled:
        return []
    p = preferences()
    if p is None or not p.enhance_model:
        return None
    folders = [bpy.path.abspath(p.enhance_model)]
    if p.enhance_controlnet:
        folders.append(bpy.path.abspath(p.enhance_controlnet))
    return [os.path.normpath(f) for f in folders]
