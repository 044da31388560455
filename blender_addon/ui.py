"""The sidebar panel (3D View > Sidebar > splatface)."""

from __future__ import annotations

import textwrap
from typing import Any

import bpy

from . import avatar, props, runtime
from .ops import (
    SPLATFACE_OT_build,
    SPLATFACE_OT_build_face,
    SPLATFACE_OT_cancel_build,
    SPLATFACE_OT_connect,
    SPLATFACE_OT_delete_avatar,
    SPLATFACE_OT_export_ply,
    SPLATFACE_OT_import_avatar,
    SPLATFACE_OT_import_curves,
    SPLATFACE_OT_refresh,
)


class SPLATFACE_UL_avatars(bpy.types.UIList):
    """Avatars on the service."""

    def draw_item(
        self,
        context: bpy.types.Context,
        layout: bpy.types.UILayout,
        data: Any,
        item: Any,
        icon: int,
        active_data: Any,
        active_propname: str,
        index: int = 0,
        flt_flag: int = 0,
    ) -> None:
        row = layout.row()
        row.label(text=item.name or item.avatar_id, icon="ERROR" if item.warnings else "USER")
        row.label(text=f"{item.preset} · {item.gaussians // 1000}k")


class SPLATFACE_PT_main(bpy.types.Panel):
    """Connection, builds and the avatar list."""

    bl_idname = "SPLATFACE_PT_main"
    bl_label = "splatface"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "splatface"

    def draw(self, context: bpy.types.Context) -> None:
        st = props.state()
        layout = self.layout
        row = layout.row(align=True)
        icon = "LINKED" if st.connected else "UNLINKED"
        text = f"{'Connected' if st.connected else 'Not connected'}"
        if st.connected and st.backend:
            text += f" ({st.backend})"
        row.label(text=text, icon=icon)
        row.operator(SPLATFACE_OT_connect.bl_idname, text="", icon="FILE_REFRESH")
        layout.label(text=runtime.settings().endpoint, icon="URL")
        if st.error:
            layout.label(text=st.error, icon="ERROR")
        elif st.status:
            layout.label(text=st.status, icon="INFO")

        box = layout.box()
        if st.building:
            box.progress(factor=st.build_fraction, type="BAR", text=st.build_stage or "queued")
            box.operator(SPLATFACE_OT_cancel_build.bl_idname, icon="CANCEL")
        else:
            box.operator(SPLATFACE_OT_build.bl_idname, icon="IMAGE_DATA")
        if len(st.faces) > 1:
            box.label(text=f"{len(st.faces)} faces in the photo (0 = largest):")
            flow = box.grid_flow(columns=4, align=True)
            for i, _face in enumerate(st.faces):
                op = flow.operator(SPLATFACE_OT_build_face.bl_idname, text=str(i))
                op.face = i

        layout.label(text="Avatars on the service")
        row = layout.row()
        row.template_list("SPLATFACE_UL_avatars", "", st, "avatars", st, "avatar_index", rows=3)
        col = row.column(align=True)
        col.operator(SPLATFACE_OT_refresh.bl_idname, text="", icon="FILE_REFRESH")
        col.operator(SPLATFACE_OT_delete_avatar.bl_idname, text="", icon="TRASH")
        if 0 <= st.avatar_index < len(st.avatars) and st.avatars[st.avatar_index].warnings:
            box = layout.box()
            box.label(text="Built with warnings:", icon="ERROR")
            chars = max(20, context.region.width // 7) if context.region else 40
            for message in st.avatars[st.avatar_index].warnings.splitlines():
                for i, line in enumerate(textwrap.wrap(message, chars)):
                    box.label(text=line, icon="DOT" if i == 0 else "BLANK1")
        layout.operator(SPLATFACE_OT_import_avatar.bl_idname, icon="ADD")

        proxy = avatar.proxy_of(context.active_object)
        if proxy is not None:
            box = layout.box()
            box.label(text=f"{proxy.name} ({proxy.splatface.avatar_id})", icon="SHAPEKEY_DATA")
            lacking = avatar.missing_shapes(proxy)
            if lacking:
                names = ", ".join(lacking[:3]) + (" ..." if len(lacking) > 3 else "")
                box.label(text=f"No shape key {names}: renders as 0", icon="ERROR")
            box.operator(SPLATFACE_OT_import_curves.bl_idname, icon="IMPORT")
            box.operator(SPLATFACE_OT_export_ply.bl_idname, icon="EXPORT")
        if context.scene.render.engine != "SPLATFACE":
            layout.label(text="Set the render engine to splatface to render", icon="RENDER_STILL")


class SPLATFACE_PT_layer_passes_data(bpy.types.Panel):
    """View Layer > Passes > Data for the splatface engine: Blender's own Data panels
    show only for their engines, which left the Passes panel empty."""

    bl_idname = "SPLATFACE_PT_layer_passes_data"
    bl_label = "Data"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "view_layer"
    bl_parent_id = "VIEWLAYER_PT_layer_passes"
    COMPAT_ENGINES = {"SPLATFACE"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.engine in cls.COMPAT_ENGINES

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(context.view_layer, "use_pass_z")
        col.prop(context.view_layer, "use_pass_normal")


classes = (SPLATFACE_UL_avatars, SPLATFACE_PT_main, SPLATFACE_PT_layer_passes_data)
