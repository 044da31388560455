"""Add-on preferences: where the service is and how to start one."""

from __future__ import annotations

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
