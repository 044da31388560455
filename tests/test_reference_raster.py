"""The reference rasterizer against hand-computed cases and a dense brute-force twin."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import Camera, rasterize
from kernels.reference import EPS2D, project
from kernels.sh import C0, eval_sh, rgb_to_sh0, sh_basis

W = H = 32
F = 40.0


def camera(w2c=None, w=W, h=H):
    return Camera(F, F, w / 2, h / 2, np.eye(4) if w2c is None else w2c)


def one(mean, sigma, opacity=0.8, color=(1.0, 0.5, 0.25)):
    return (np.array([mean], float), np.array([[1.0, 0, 0, 0]]), np.full((1, 3), sigma),
            np.array([opacity]), np.array([color]))  # fmt: skip


def test_single_gaussian_matches_closed_form():
    z, sigma, o = 2.0, 0.05, 0.8
    out = rasterize(*one((0, 0, z), sigma, o), camera(), W, H, ("rgb", "alpha", "depth"))
    var = (F * sigma / z) ** 2 + EPS2D  # projected variance in px², with the low-pass
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d2 = (jj - W / 2) ** 2 + (ii - H / 2) ** 2
    expect = o * np.exp(-0.5 * d2 / var)
    radius = np.ceil(3 * np.sqrt(var))
    inside = (np.abs(jj - W / 2) <= radius) & (np.abs(ii - H / 2) <= radius)
    expect = np.where(inside & (expect >= 1 / 255), expect, 0)
    np.testing.assert_allclose(out.alpha, expect, atol=1e-6)
    np.testing.assert_allclose(out.rgb, expect[..., None] * [1.0, 0.5, 0.25], atol=1e-6)
    np.testing.assert_allclose(out.depth[expect > 0], z, rtol=1e-6)
    assert np.all(np.isinf(out.depth[expect == 0]))


def test_nearer_gaussian_wins_whatever_the_input_order():
    near = one((0, 0, 1.0), 0.2, 0.99, (1, 0, 0))
    far = one((0, 0, 3.0), 0.6, 0.99, (0, 0, 1))
    for a, b in ((near, far), (far, near)):
        g = [np.concatenate([x, y]) for x, y in zip(a, b, strict=True)]
        out = rasterize(*g, camera(), W, H, ("rgb", "depth"))
        centre = out.rgb[H // 2, W // 2]
        assert centre[0] > 0.98 and centre[2] < 0.02  # alpha is capped at 0.99
        assert out.depth[H // 2, W // 2] == pytest.approx(1.0, abs=0.03)


def test_behind_camera_and_beyond_far_are_culled():
    g = one((0, 0, -2.0), 0.3)
    out = rasterize(*g, camera(), W, H, ("alpha", "depth"))
    assert out.alpha.max() == 0 and np.all(np.isinf(out.depth))
    out = rasterize(*one((0, 0, 200.0), 5.0), camera(), W, H, ("alpha",))
    assert out.alpha.max() == 0


def test_background_and_premultiplied_alpha():
    g = one((0, 0, 2.0), 0.05, 0.5)
    bg = np.array([0.1, 0.2, 0.3])
    a = rasterize(*g, camera(), W, H, ("rgb", "alpha"))
    b = rasterize(*g, camera(), W, H, ("rgb",), background=bg)
    np.testing.assert_allclose(b.rgb, a.rgb + (1 - a.alpha[..., None]) * bg, atol=1e-6)


def test_normal_pass_is_shortest_axis_facing_camera():
    # a flat disc in the camera's x-y plane: normal along -z in camera space
    g = list(one((0, 0, 2.0), 0.1))
    g[2] = np.array([[0.1, 0.1, 0.001]])
    out = rasterize(*g, camera(), W, H, ("normal", "alpha"))
    n = out.normal[H // 2, W // 2]
    np.testing.assert_allclose(n, [0, 0, -1], atol=1e-6)
    assert np.all(out.normal[out.alpha == 0] == 0)


def test_sh_degree0_is_colour_and_basis_matches_formulas():
    rgb = np.array([[0.2, 0.4, 0.9]])
    sh = rgb_to_sh0(rgb)[:, None, :]
    np.testing.assert_allclose(eval_sh(sh, np.array([[0.3, -0.2, 1.0]])), rgb, atol=1e-12)
    d = np.array([[0.6, 0.0, 0.8]])
    b = sh_basis(d, 3)
    assert b.shape == (1, 16)
    assert b[0, 0] == pytest.approx(C0)
    assert b[0, 3] == pytest.approx(-0.4886025119029199 * 0.6)  # -C1 x
    assert b[0, 6] == pytest.approx(0.31539156525252005 * (2 * 0.64 - 0.36))  # C2[2](2zz-xx-yy)


def brute_force(means, quats, scales, opac, colors, cam, w, h):
    """Every Gaussian on every pixel, sorted by depth: no patches, no early skipping of
    whole Gaussians. Same maths, different loop structure."""
    p, m2d, cov2d, _, radii = project(means, quats, scales, cam, w, h)
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    t = np.ones((h, w))
    rgb = np.zeros((h, w, 3))
    done = np.zeros((h, w), bool)
    for g in np.argsort(p[:, 2], kind="stable"):
        if radii[g] == 0:
            continue
        con = np.linalg.inv(cov2d[g])
        dx, dy = m2d[g, 0] - jj, m2d[g, 1] - ii
        power = -0.5 * (con[0, 0] * dx**2 + con[1, 1] * dy**2) - con[0, 1] * dx * dy
        a = np.minimum(0.99, opac[g] * np.exp(power))
        live = (np.abs(dx) <= radii[g]) & (np.abs(dy) <= radii[g]) & (a >= 1 / 255) & ~done
        stop = live & (t * (1 - a) <= 1e-4)
        done |= stop
        live &= ~stop
        rgb += np.where(live, a * t, 0)[..., None] * colors[g]
        t = np.where(live, t * (1 - a), t)
    return rgb, 1 - t


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    n = 60
    means = rng.normal(size=(n, 3)) * [0.6, 0.6, 0.5] + [0, 0, 2.5]
    means[:3, 2] = -1.0  # some behind the camera
    means[3:6, 0] = 3.0  # some off-screen
    quats = rng.normal(size=(n, 4))
    scales = np.exp(rng.uniform(-4, -1, (n, 3)))
    scales[6] = [1e-9, 1e-9, 1e-9]  # degenerate
    opac = rng.uniform(0, 1, n)
    opac[7:20] = 0.999
    colors = rng.uniform(0, 1, (n, 3))
    w2c = np.eye(4)
    w2c[:3, 3] = [0.05, -0.02, 0.1]
    cam = Camera(F, F * 1.1, 17.0, 14.0, w2c)
    out = rasterize(means, quats, scales, opac, colors, cam, 36, 28, ("rgb", "alpha"))
    rgb, alpha = brute_force(means, quats, scales, opac, colors, cam, 36, 28)
    np.testing.assert_allclose(out.alpha, alpha, atol=1e-6)
    np.testing.assert_allclose(out.rgb, rgb, atol=1e-6)
    assert alpha.max() > 0.5  # the scene is not empty


def test_bad_pass_and_backend_names():
    with pytest.raises(ValueError, match="unknown passes"):
        rasterize(*one((0, 0, 2), 0.1), camera(), W, H, ("beauty",))
    with pytest.raises(ValueError, match="unknown backend"):
        rasterize(*one((0, 0, 2), 0.1), camera(), W, H, backend="metal")
