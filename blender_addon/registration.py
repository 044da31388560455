"""Register everything in order, unregister in reverse; start the queue-draining timer."""

from __future__ import annotations

import atexit

import bpy

from . import engine, ops, prefs, props, runtime, ui

_classes = (
    prefs.SPLATFACE_AddonPreferences,
    *props.classes,
    *ops.classes,
    engine.SPLATFACE_RenderEngine,
    *ui.classes,
)

# Panels that list the engines they support; ours is added so the settings the engine
# follows show: output and format, Film > Transparent (Workbench's Film panel draws that
# alone), Stereoscopy, an object's Visibility (holdout), the camera, the shape keys and
# View Layer > Passes (whose Data child is ours: ``ui.SPLATFACE_PT_layer_passes_data``).
_COMPAT_PANELS = (
    "RENDER_PT_format",
    "RENDER_PT_frame_range",
    "RENDER_PT_output",
    "RENDER_PT_color_management",
    "RENDER_PT_opengl_film",
    "RENDER_PT_stereoscopy",
    "OBJECT_PT_visibility",
    "DATA_PT_camera",
    "DATA_PT_lens",
    "DATA_PT_camera_display",
    "DATA_PT_shape_keys",
    "VIEWLAYER_PT_layer_passes",
)


_registered = False


def register() -> None:
    global _registered
    _registered = True
    # bpy as a Python module (no Blender binary) never exits while anything of an add-on
    # is still registered (4.5: a script that called register() itself and ended hung for
    # ever); Blender, and addon_utils in the module, unregister add-ons themselves
    if not bpy.app.binary_path:
        atexit.register(unregister)
    for cls in _classes:
        bpy.utils.register_class(cls)
    props.register_properties()
    bpy.types.TOPBAR_MT_file_export.append(ops.menu_export)
    bpy.types.TOPBAR_MT_file_import.append(ops.menu_import)
    for name in _COMPAT_PANELS:
        panel = getattr(bpy.types, name, None)
        if panel is not None and hasattr(panel, "COMPAT_ENGINES"):
            panel.COMPAT_ENGINES.add(engine.SPLATFACE_RenderEngine.bl_idname)
    if not bpy.app.timers.is_registered(runtime.drain):
        bpy.app.timers.register(runtime.drain, first_interval=0.1, persistent=True)
    for handlers in _render_end_handlers():
        handlers.append(engine.render_ended)


def _render_end_handlers() -> tuple[list, list]:
    return bpy.app.handlers.render_complete, bpy.app.handlers.render_cancel


def unregister() -> None:
    global _registered
    if not _registered:  # at exit, after a script's own unregister()
        return
    _registered = False
    atexit.unregister(unregister)
    if bpy.app.timers.is_registered(runtime.drain):
        bpy.app.timers.unregister(runtime.drain)
    runtime.shutdown()
    for handlers in _render_end_handlers():
        if engine.render_ended in handlers:
            handlers.remove(engine.render_ended)
    engine.frame_memory.release()
    for name in _COMPAT_PANELS:
        panel = getattr(bpy.types, name, None)
        if panel is not None and hasattr(panel, "COMPAT_ENGINES"):
            panel.COMPAT_ENGINES.discard(engine.SPLATFACE_RenderEngine.bl_idname)
    bpy.types.TOPBAR_MT_file_import.remove(ops.menu_import)
    bpy.types.TOPBAR_MT_file_export.remove(ops.menu_export)
    props.unregister_properties()
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
