"""The fast posing path (numba) against the numpy reference, degenerate triangles included."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from inference_service.avatar import Avatar, BoundGaussians
from inference_service.build.gaussians import sample_surface
from inference_service.geometry import quat_to_rotmat
from inference_service.headmodel import load_head_model
from inference_service.posing import pose, pose_reference
from inference_service.posing_kernels import warmup
from protocol.arkit import index_of


def random_gaussians(tri: np.ndarray, rng: np.random.Generator) -> BoundGaussians:
    n = len(tri)
    q = rng.normal(size=(n, 4))
    q[: n // 4] *= 3.0  # stored rotations need not be unit
    return BoundGaussians(
        triangle=tri.astype(np.int32),
        bary=rng.dirichlet(np.ones(3), n).astype(np.float32),
        offset=rng.normal(0, 2e-3, n).astype(np.float32),
        rotation=q.astype(np.float32),
        log_scale=rng.normal(np.log(3e-3), 0.5, (n, 3)).astype(np.float32),
        opacity_logit=rng.normal(0, 2, n).astype(np.float32),
        sh=rng.normal(size=(n, 4, 3)).astype(np.float32),
        # a third fade in as their triangle grows (lid layer), a sixth fade out (the folds
        # it covers), the rest are ordinary
        appear=np.select(
            [np.arange(n) % 3 == 0, np.arange(n) % 6 == 1],
            [rng.uniform(1.1, 2.0, n), -rng.uniform(1.1, 2.0, n)],
            0,
        ).astype(np.float32),
    )


def make_avatar(verts, tris, deltas, g, **extra) -> Avatar:
    return Avatar("0123456789ab", "t", verts.astype(np.float32), tris.astype(np.int32),
                  deltas.astype(np.float32), g, np.array([100.0, 100, 32, 32]), np.eye(4),
                  **extra)  # fmt: skip


def tiny_avatar(seed: int = 0, n: int = 60) -> Avatar:
    """Four triangles: two ordinary; one with a repeated vertex (zero area always); one
    that jawOpen collapses to a line (zero area when posed)."""
    rng = np.random.default_rng(seed)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [2, 2, 1]]) * 0.1
    tris = np.array([[0, 1, 2], [0, 3, 1], [2, 2, 4], [1, 4, 5]])
    deltas = rng.normal(0, 0.01, (52, len(verts), 3))
    deltas[:, 5] = 0.0
    deltas[index_of("jawOpen"), 5] = [-0.1, -0.1, -0.1]  # vertex 5 onto (1, 1, 0) * 0.1
    deltas[index_of("jawOpen"), [1, 4]] = 0.0
    deltas[:, 2] = 0.0
    return make_avatar(verts, tris, deltas, random_gaussians(np.arange(n) % 4, rng))


@pytest.fixture(scope="module")
def ict_avatar() -> Avatar:
    """The ICT head with Gaussians sampled on its surface, plus some on zero-area
    triangles appended to its mesh."""
    model = load_head_model()
    rng = np.random.default_rng(1)
    tri, _, _ = sample_surface(model, 4000, rng)
    t0 = len(model.triangles)
    tris = np.concatenate([model.triangles, [[5, 5, 9], [7, 7, 7]]])
    tri = np.concatenate([tri, [t0] * 7, [t0 + 1] * 5])
    extra = {"vertex_part": model.vertex_part} if hasattr(model, "vertex_part") else {}
    return make_avatar(model.neutral, tris, model.arkit_deltas, random_gaussians(tri, rng),
                       **extra)  # fmt: skip


def random_head(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=(1, 4))
    m = np.eye(4)
    m[:3, :3] = rng.uniform(0.5, 2.0) * quat_to_rotmat(q)[0]
    m[:3, 3] = rng.normal(0, 1, 3)
    return m


def triangle_area(verts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    v = verts[tris].astype(np.float64)
    return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)


def assert_matches_reference(av: Avatar, weights, head) -> None:
    fast, ref = pose(av, weights, head), pose_reference(av, weights, head)
    for name in ("means", "quats", "scales", "opacities"):
        arr = getattr(fast, name)
        assert arr.dtype == np.float64 and arr.shape == getattr(ref, name).shape, name
        assert np.isfinite(arr).all(), f"{name} has NaN or inf"
    assert fast.sh is av.gaussians.sh
    np.testing.assert_allclose(fast.means, ref.means, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fast.scales, ref.scales, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(fast.opacities, ref.opacities, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(fast.quats, axis=1), 1, atol=1e-12)
    assert np.all(fast.quats[:, 0] >= 0)
    # the frame of a zero-area triangle is arbitrary (and so is the reference's
    # quaternion there); everywhere else the same rotation, up to the sign
    from inference_service.posing import pose_vertices

    tri = av.triangles[av.gaussians.triangle]
    framed = triangle_area(pose_vertices(av, weights), tri) > 1e-12
    sign = np.sign((fast.quats * ref.quats).sum(1))[:, None]
    np.testing.assert_allclose((fast.quats * sign)[framed], ref.quats[framed], atol=1e-7)
    assert (~framed).sum() == 0 or np.all(fast.scales[~framed] == 0)


def weight_sets(rng: np.random.Generator) -> list:
    sparse = np.zeros(52, np.float32)
    sparse[rng.choice(52, 4, replace=False)] = rng.uniform(0, 1, 4)
    gaze = np.zeros(52, np.float32)
    gaze[[index_of("eyeLookOutLeft"), index_of("eyeLookUpRight")]] = 0.7
    return [None, np.zeros(52, np.float32), sparse, gaze,
            rng.uniform(0, 1, 52).astype(np.float32)]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_avatar_matches_reference(seed):
    rng = np.random.default_rng(seed)
    av = tiny_avatar(seed)
    for weights in weight_sets(rng):
        for head in (None, random_head(rng)):
            assert_matches_reference(av, weights, head)


def test_ict_avatar_matches_reference(ict_avatar):
    rng = np.random.default_rng(7)
    for weights in weight_sets(rng):
        for head in (None, random_head(rng), random_head(rng)):
            assert_matches_reference(ict_avatar, weights, head)


def test_degenerate_triangles_give_no_nan():
    av = tiny_avatar()
    g = av.gaussians
    always, posed_flat = g.triangle == 2, g.triangle == 3
    w = np.zeros(52, np.float32)
    w[index_of("jawOpen")] = 1.0
    p = pose(av, w, random_head(np.random.default_rng(3)))
    for arr in (p.means, p.quats, p.scales, p.opacities):
        assert np.isfinite(arr).all()
    assert np.all(p.scales[always] == 0) and np.all(p.scales[posed_flat] == 0)
    rest = pose(av)
    assert np.all(rest.scales[posed_flat] > 0)


def test_cache_follows_the_avatar():
    """Posing keeps per-avatar arrays; a new avatar (even at a reused id()) gets its own."""
    for seed in range(6):
        av = tiny_avatar(seed, n=20 + seed)
        assert_matches_reference(av, None, None)
        del av
        gc.collect()


def test_results_are_fresh_arrays():
    av = tiny_avatar()
    a, expect = pose(av), pose_reference(av)
    for arr in (a.means, a.quats, a.scales, a.opacities):
        arr[:] = -1.0
    b = pose(av)
    np.testing.assert_array_equal(b.opacities, expect.opacities)
    np.testing.assert_allclose(b.scales, expect.scales, rtol=1e-12)


def test_head_transform_composes_with_the_pose(ict_avatar):
    rng = np.random.default_rng(11)
    w = rng.uniform(0, 1, 52).astype(np.float32)
    head = random_head(rng)
    local, world = pose(ict_avatar, w), pose(ict_avatar, w, head)
    s = np.cbrt(np.linalg.det(head[:3, :3]))
    r = head[:3, :3] / s
    np.testing.assert_allclose(world.means, s * local.means @ r.T + head[:3, 3], atol=1e-12)
    np.testing.assert_allclose(world.scales, s * local.scales, rtol=1e-12)
    np.testing.assert_allclose(quat_to_rotmat(world.quats), r @ quat_to_rotmat(local.quats),
                               atol=1e-12)  # fmt: skip


def test_warmup_runs():
    warmup()


def test_fading_gaussians_follow_their_triangles_growth():
    """``appear`` above 1: transparent at rest and up to halfway to the stated growth in
    length, opaque from it on, linear between; below -1 the reverse (fading out);
    ordinary Gaussians keep their opacity."""
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]]) * 0.01
    deltas = np.zeros((52, 3, 3))
    deltas[index_of("eyeBlinkLeft")] = verts  # weight w scales the triangle by (1 + w)
    g = BoundGaussians(
        triangle=np.zeros(3, np.int32), bary=np.full((3, 3), 1 / 3, np.float32),
        offset=np.zeros(3, np.float32), rotation=np.tile(np.float32([1, 0, 0, 0]), (3, 1)),
        log_scale=np.full((3, 3), -6, np.float32), opacity_logit=np.zeros(3, np.float32),
        sh=np.zeros((3, 1, 3), np.float32), appear=np.float32([1.5, 0.0, -1.5]),
    )  # fmt: skip
    av = make_avatar(verts, np.array([[0, 1, 2]]), deltas, g)
    for w, expect in ((0.0, 0.0), (0.2, 0.0), (0.375, 0.5), (0.5, 1.0), (0.9, 1.0)):
        weights = np.zeros(52)
        weights[index_of("eyeBlinkLeft")] = w
        for posed in (pose(av, weights), pose_reference(av, weights)):
            np.testing.assert_allclose(posed.opacities, [0.5 * expect, 0.5, 0.5 * (1 - expect)],
                                       atol=1e-9)  # fmt: skip
