"""views.py: depth-tested warping and the mirrored camera, on scenes with a known answer."""

from __future__ import annotations

import numpy as np

from inference_service.build.views import mirror_camera, unproject, warp
from kernels import Camera
from protocol.camera import intrinsics_from_fov, orbit, project

SIZE = 64


def camera(yaw: float, pitch: float = 0.0, distance: float = 1.0) -> Camera:
    return Camera.from_arrays(intrinsics_from_fov(SIZE, SIZE, 40.0),
                              orbit((0, 0, 0), distance, yaw, pitch))  # fmt: skip


def sphere_depth(cam: Camera, radius: float, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera z of the first hit of each pixel-centre ray with a sphere (inf on a miss),
    by the quadratic formula: an obvious reference independent of the warp's maths."""
    j, i = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5)
    d = np.stack([(j - cam.cx) / cam.fx, (i - cam.cy) / cam.fy, np.ones_like(j)], -1)
    r, t = cam.world_to_camera[:3, :3], cam.world_to_camera[:3, 3]
    c = r @ np.asarray(center) + t  # sphere centre in camera space
    a = (d * d).sum(-1)
    b = -2 * (d @ c)
    q = c @ c - radius**2
    disc = b * b - 4 * a * q
    with np.errstate(invalid="ignore"):
        z = (-b - np.sqrt(disc)) / (2 * a)  # ray parameter = camera z, as d_z = 1
    return np.where(disc > 0, z, np.inf).astype(np.float32)


def world_colour(points: np.ndarray) -> np.ndarray:
    """A smooth colour field in space: the warp must carry it from view to view."""
    return np.stack([0.5 + 2 * points[..., 0], 0.5 + 2 * points[..., 1],
                     0.5 + 2 * points[..., 2]], -1)  # fmt: skip


def test_unproject_inverts_project():
    cam = camera(20, 10)
    depth = sphere_depth(cam, 0.2)
    pts = unproject(depth, cam)
    hit = np.isfinite(depth)
    uv, z = project(pts[hit], [cam.fx, cam.fy, cam.cx, cam.cy], cam.world_to_camera)
    i, j = np.nonzero(hit)
    np.testing.assert_allclose(uv, np.stack([j + 0.5, i + 0.5], 1), atol=1e-6)
    np.testing.assert_allclose(z, depth[hit], rtol=1e-6)
    # on the sphere's surface
    np.testing.assert_allclose(np.linalg.norm(pts[hit], axis=1), 0.2, atol=1e-5)


def test_warp_carries_a_sphere_between_two_views():
    src_cam, dst_cam = camera(0), camera(65)
    src_depth, dst_depth = sphere_depth(src_cam, 0.2), sphere_depth(dst_cam, 0.2)
    src_image = np.where(np.isfinite(src_depth)[..., None],
                         world_colour(unproject(src_depth, src_cam)), 0.0)  # fmt: skip
    out, valid = warp(src_image.astype(np.float32), src_depth, src_cam, dst_depth, dst_cam)
    dst_points = unproject(dst_depth, dst_cam)
    reference = world_colour(dst_points)
    # the part the source saw: facing both cameras (yaw 0 and 65) and not at grazing
    # angles in the source (its outline pixels border empty ones, whose depth is inf)
    normal = dst_points / 0.2
    cos_src = normal @ np.array([0.0, -1.0, 0.0])  # the source camera sits on -Y
    clearly = np.isfinite(dst_depth) & (cos_src > 0.55)
    assert valid[clearly].all()
    # bilinear sampling of a linear colour field, with blended silhouette pixels kept away
    # by cos_src > 0.55: errors are a fraction of a pixel's colour change (~0.01)
    assert np.abs(out[clearly] - reference[clearly]).max() < 0.03
    # the sphere's far side, as seen by the destination, is hidden from the source
    hidden = np.isfinite(dst_depth) & (cos_src < -0.1)
    assert hidden.sum() > 50 and not valid[hidden].any()
    assert not valid[~np.isfinite(dst_depth)].any()


def test_warp_rejects_occluded_points():
    """A small sphere in front of a large one hides part of it from the source; the
    destination, looking from the side, sees that part and must not take the colour of
    the occluder."""
    src_cam, dst_cam = camera(0), camera(60)
    big, small = (0.0, 0.0, 0.0), (0.0, -0.3, 0.0)  # small one between the source and big
    src_depth = np.minimum(sphere_depth(src_cam, 0.2, big), sphere_depth(src_cam, 0.06, small))
    dst_big = sphere_depth(dst_cam, 0.2, big)
    dst_small = sphere_depth(dst_cam, 0.06, small)
    dst_depth = np.minimum(dst_big, dst_small)
    label = np.where(np.isfinite(src_depth), 1.0, 0.0)
    label[sphere_depth(src_cam, 0.06, small) <= src_depth] = 2.0  # pixels of the occluder
    out, valid = warp(label.astype(np.float32), src_depth, src_cam, dst_depth, dst_cam)
    on_big = np.isfinite(dst_big) & (dst_big <= dst_small)
    pts = unproject(dst_depth, dst_cam)
    # big-sphere points whose ray to the source passes through the small sphere
    to_src = src_cam.position - pts
    to_src /= np.linalg.norm(to_src, axis=-1, keepdims=True)
    rel = np.asarray(small) - pts
    along = (rel * to_src).sum(-1)
    miss = np.linalg.norm(rel - along[..., None] * to_src, axis=-1)
    shadowed = on_big & (along > 0) & (miss < 0.05)
    assert shadowed.sum() > 20
    assert not valid[shadowed].any()
    # elsewhere the big sphere's front is warped with its own label, never the occluder's
    assert (out[on_big & valid] < 1.5).all() and valid[on_big].sum() > 200


def test_mirror_camera_sees_the_mirror_image_as_the_flipped_photo():
    rng = np.random.default_rng(0)
    cam = Camera.from_arrays([70.0, 72.0, 30.0, 34.0], orbit((0.01, 0, 0.02), 0.8, 25, 10))
    mirrored = mirror_camera(cam, SIZE)
    pts = rng.normal(scale=0.1, size=(50, 3))
    k = [cam.fx, cam.fy, cam.cx, cam.cy]
    uv, z = project(pts, k, cam.world_to_camera)
    uv_m, z_m = project(pts * [-1, 1, 1], [mirrored.fx, mirrored.fy, mirrored.cx, mirrored.cy],
                        mirrored.world_to_camera)  # fmt: skip
    np.testing.assert_allclose(uv_m[:, 0], SIZE - uv[:, 0], atol=1e-9)
    np.testing.assert_allclose(uv_m[:, 1], uv[:, 1], atol=1e-9)
    np.testing.assert_allclose(z_m, z, atol=1e-12)
    # a proper rigid camera (rotation, not a reflection), and mirroring twice is identity
    r = mirrored.world_to_camera[:3, :3]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) > 0
    twice = mirror_camera(mirrored, SIZE)
    np.testing.assert_allclose(twice.world_to_camera, cam.world_to_camera, atol=1e-12)
    assert twice.cx == cam.cx
