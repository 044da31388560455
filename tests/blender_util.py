"""Helpers for the add-on's tests in headless ``bpy`` (not fixtures: see test modules)."""

from __future__ import annotations

import math

import numpy as np

#: OpenCV camera axes → Blender camera axes (and back: the matrix is its own inverse).
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def clear_scene(bpy) -> None:
    """Remove every object and the data blocks tests create, keep the add-on registered."""
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob)
    for coll in (
        bpy.data.meshes,
        bpy.data.cameras,
        bpy.data.armatures,
        bpy.data.actions,
        bpy.data.shape_keys,
    ):
        for block in list(coll):
            if block.users == 0:
                coll.remove(block)


def add_camera_from_opencv(bpy, scene, world_to_camera: np.ndarray, fov_deg: float, size: int):
    """A Blender camera equal to an OpenCV camera with ``intrinsics_from_fov(size, size,
    fov_deg)``, written from first principles (not the add-on's conversion)."""
    from mathutils import Matrix

    data = bpy.data.cameras.new("cam")
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = 36.0
    data.lens = 18.0 / math.tan(math.radians(fov_deg) / 2)
    ob = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(ob)
    # a Matrix: a nested list would be read column-major by RNA
    ob.matrix_world = Matrix((np.linalg.inv(world_to_camera) @ FLIP_YZ).tolist())
    scene.camera = ob
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.pixel_aspect_x = scene.render.pixel_aspect_y = 1.0
    return ob
