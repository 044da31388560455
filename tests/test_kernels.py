"""Rasterizer backends against the reference: forward to 1e-4, gradients against finite
differences of the reference, and the three implementations against each other."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kernels import Camera, has_cuda, rasterize, warmup
from kernels.reference import rasterize_reference
from kernels.torch_dense import rasterize_torch

from .conftest import REPO

PASSES = ("rgb", "alpha", "depth", "normal")


def scene(n, seed, sh_degree=0, width=48, height=40):
    """Random Gaussians in front of a camera at the origin, with the awkward cases mixed in:
    some behind the camera, some off-screen, degenerate, huge, tiny, opacity ~0 and ~1."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n, 3)) * [0.6, 0.5, 0.5] + [0, 0, 2.5]
    quats = rng.normal(size=(n, 4))
    scales = np.exp(rng.uniform(-5, -2, (n, 3)))
    opac = rng.uniform(0, 1, n)
    k = n // 12  # small scenes stay ordinary
    means[:k, 2] = -rng.uniform(0.1, 2, k)  # behind the camera
    means[k : 2 * k, 0] = rng.choice([-1, 1], k) * rng.uniform(1.0, 1.6, k)  # partly off-screen
    scales[2 * k : 3 * k] = 1e-9  # degenerate
    scales[3 * k : 3 * k + 1] = 0.8  # huge: covers the image
    scales[4 * k : 5 * k] = 1e-4  # tiny
    opac[5 * k : 6 * k] = 1e-4  # ~0
    opac[6 * k : 8 * k] = 0.9999  # ~1
    colors = rng.normal(size=(n, (sh_degree + 1) ** 2, 3)) * 0.4
    w2c = np.eye(4)
    w2c[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)) * 0.05 + np.eye(3))[0]
    if np.linalg.det(w2c[:3, :3]) < 0:
        w2c[:3, 0] *= -1
    cam = Camera(0.9 * width, 0.95 * width, width / 2 + 0.7, height / 2 - 0.4, w2c)
    return (means, quats, scales, opac, colors), cam, width, height


def compare(a, b, tol=1e-4):
    for name in PASSES:
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(np.isinf(x), np.isinf(y)), name
        fin = np.isfinite(y)
        err = np.abs(x[fin] - y[fin]).max() if fin.any() else 0.0
        assert err <= tol, f"{name}: max error {err}"


@pytest.mark.parametrize("n, seed, degree", [(1, 0, 0), (10, 1, 1), (1000, 2, 3), (3000, 3, 2)])
def test_cpu_forward_matches_reference(n, seed, degree):
    args, cam, w, h = scene(n, seed, degree)
    bg = np.array([0.2, 0.3, 0.1])
    ref = rasterize_reference(*args, cam, w, h, PASSES, bg)
    out = rasterize(*args, cam, w, h, PASSES, background=bg, backend="cpu")
    compare(out, ref)
    assert ref.alpha.max() > 0.5  # not an empty scene


def test_cpu_forward_100k_gaussians_and_odd_sizes():
    args, cam, w, h = scene(100_000, 4, 0, width=37, height=23)
    compare(rasterize(*args, cam, w, h, PASSES, backend="cpu"),
            rasterize_reference(*args, cam, w, h, PASSES))  # fmt: skip


def test_empty_scene():
    z = np.zeros((0, 3))
    out = rasterize(
        z, np.zeros((0, 4)), z, np.zeros(0), z, scene(1, 0)[1], 8, 8, PASSES, backend="cpu"
    )
    assert out.alpha.max() == 0 and np.isinf(out.depth).all() and out.normal.max() == 0


def test_cpu_inference_composites_only_the_box_the_gaussians_reach():
    """A small cluster in a large frame (the numpy path composites only its box and fills
    the rest): every pass against the reference, with a background, with the cluster in
    the middle and cut by the frame's edges, and a scene whose Gaussians are all culled."""
    from kernels.cpu import bin_tiles, reach
    from kernels.cpu_projection import project_gaussians

    rng = np.random.default_rng(11)
    n, w, h = 300, 160, 120
    means = rng.normal(size=(n, 3)) * 0.06 + [0, 0, 2.5]
    quats, scales = rng.normal(size=(n, 4)), np.exp(rng.uniform(-5, -3, (n, 3)))
    opac, sh = rng.uniform(0.05, 1, n), rng.normal(size=(n, 4, 3)) * 0.4
    cam = Camera(150.0, 150.0, w / 2 + 0.3, h / 2 - 0.6, np.eye(4))
    bg = np.array([0.2, 0.3, 0.1])
    for shift in ([0.0, 0.0, 0.0], [1.3, -0.9, 0.0], [-1.25, 0.95, 0.0]):  # centre, edges
        args = (means + shift, quats, scales, opac, sh)
        out = rasterize(*args, cam, w, h, PASSES, background=bg, backend="cpu")
        compare(out, rasterize_reference(*args, cam, w, h, PASSES, bg))
        assert all(getattr(out, p).dtype == np.float32 for p in PASSES)
        assert 0.0 < out.alpha.mean() and out.alpha.max() > 0.9
        m2d, _, _, _, rad = project_gaussians(
            args[0], quats, scales, cam.world_to_camera, cam.fx, cam.fy, cam.cx, cam.cy,
            cam.near, cam.far, w, h,
        )  # fmt: skip
        x0, y0, x1, y1 = reach(m2d, rad, w, h)
        assert (x1 - x0) * (y1 - y0) < 0.25 * w * h  # the case this is about
        _, _, boxes = bin_tiles(np.flatnonzero(rad > 0), m2d, rad, w, h, 1)
        box = boxes[rad > 0]  # every drawn Gaussian's own pixels: j0, j1, i0, i1 inclusive
        box = box[(box[:, 0] <= box[:, 1]) & (box[:, 2] <= box[:, 3])]
        assert (x0, y0, x1, y1) == (box[:, 0].min(), box[:, 2].min(), box[:, 1].max() + 1,
                                    box[:, 3].max() + 1)  # fmt: skip
    behind = (means * [1, 1, -1], quats, scales, opac, sh)
    out = rasterize(*behind, cam, w, h, PASSES, background=bg, backend="cpu")
    assert out.alpha.max() == 0 and np.isinf(out.depth).all() and out.normal.max() == 0
    np.testing.assert_allclose(out.rgb, np.broadcast_to(bg, (h, w, 3)), atol=1e-7)


def test_depth_order_is_numpys_stable_argsort():
    """The cpu backend's radix sort against ``np.argsort(kind="stable")``: ties keep their
    order, negatives and zeros sort as floats, magnitudes far apart share no digits."""
    from kernels.cpu import depth_order

    rng = np.random.default_rng(4)
    z = rng.normal(size=5000) * 10.0 ** rng.uniform(-6, 6, 5000)
    z[1::7] = z[::7][: len(z[1::7])]  # ties
    z[::101] = 0.0
    narrow = rng.uniform(0.5, 0.5 + 1e-9, 3000)  # a head's depths: high digits all alike
    for depths in (z, narrow, np.round(narrow, 12), np.zeros(0), np.array([2.0])):
        np.testing.assert_array_equal(depth_order(depths), np.argsort(depths, kind="stable"))


def loss_weights(w, h, seed=9):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(h, w, 3)), rng.normal(size=(h, w))


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_cpu_gradients_match_finite_differences_of_reference(degree):
    rng = np.random.default_rng(degree)
    n, w, h = 8, 18, 14
    means = rng.normal(size=(n, 3)) * [0.3, 0.25, 0.3] + [0, 0, 2]
    quats = rng.normal(size=(n, 4))
    scales = np.exp(rng.uniform(-3.5, -2, (n, 3)))
    opac = rng.uniform(0.2, 0.8, n)  # away from the 0.99 cap, where alpha has no gradient
    sh = rng.normal(size=(n, (degree + 1) ** 2, 3)) * 0.3
    cam = Camera(24.0, 26.0, 9.3, 7.1, np.eye(4))
    bg = np.array([0.2, 0.1, 0.4])
    wr, wa = loss_weights(w, h)
    base = [means, quats, scales, opac, sh]

    tensors = [torch.tensor(a, requires_grad=True) for a in base]
    out = rasterize(
        *tensors, cam, w, h, ("rgb", "alpha"), background=torch.tensor(bg), backend="cpu"
    )
    ((out.rgb * torch.tensor(wr)).sum() + (out.alpha * torch.tensor(wa)).sum()).backward()

    def loss(args):
        o = rasterize_reference(*args, cam, w, h, ("rgb", "alpha"), bg, out_dtype=np.float64)
        return (o.rgb * wr).sum() + (o.alpha * wa).sum()

    eps = 1e-6
    for p, name in enumerate(["means", "quats", "scales", "opacities", "colors"]):
        grad = tensors[p].grad.numpy()
        fd = np.zeros_like(grad)
        for idx in np.ndindex(base[p].shape):
            hi = [b.copy() for b in base]
            lo = [b.copy() for b in base]
            hi[p][idx] += eps
            lo[p][idx] -= eps
            fd[idx] = (loss(hi) - loss(lo)) / (2 * eps)
        # central differences in float64: truncation ~eps^2 * f''' and rounding ~1e-16 / eps
        scale = max(1.0, np.abs(fd).max())
        np.testing.assert_allclose(grad, fd, atol=2e-6 * scale, err_msg=name)
        assert np.abs(fd).max() > 1e-3, f"{name}: the scene does not exercise this parameter"


def masked_weights(w, h):
    """Loss weights that are zero where a loss's mask is (the cpu backward skips pixels
    whose gradient is all zero): zero on the left third, rgb alone zero in a band of
    rows (alpha still counts there), alpha alone zero in another, alpha and red zero in a
    third (green and blue still count)."""
    wr, wa = loss_weights(w, h)
    wr[:, : w // 3] = 0.0
    wa[:, : w // 3] = 0.0
    wr[5:12] = 0.0
    wa[15:20] = 0.0
    wr[24:30, :, 0] = 0.0
    wa[24:30] = 0.0
    return wr, wa


@pytest.mark.parametrize("weights", [loss_weights, masked_weights])
def test_cpu_and_plain_torch_agree_forward_and_backward(weights):
    args, cam, w, h = scene(400, 7, 2, width=45, height=37)
    bg = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    wr, wa = (torch.tensor(x) for x in weights(w, h))
    results = []
    for impl in ("cpu", "torch"):
        ts = [torch.tensor(a, requires_grad=True) for a in args]
        if impl == "cpu":
            o = rasterize(*ts, cam, w, h, ("rgb", "alpha"), background=bg, backend="cpu")
            rgb, alpha = o.rgb, o.alpha
        else:
            d = rasterize_torch(*ts, cam, w, h, bg)
            rgb, alpha = d["rgb"], d["alpha"]
        ((rgb * wr).sum() + (alpha * wa).sum()).backward()
        results.append([rgb.detach(), alpha.detach(), *(t.grad for t in ts)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_float32_in_float32_out_with_gradients():
    args, cam, w, h = scene(200, 5, 1)
    ts = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in args]
    out = rasterize(*ts, cam, w, h, ("rgb", "alpha"), backend="cpu")
    assert out.rgb.dtype == torch.float32 and out.depth is None
    (out.rgb.sum() + out.alpha.sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in ts)
    ref = rasterize_reference(*args, cam, w, h, ("rgb",))
    np.testing.assert_allclose(out.rgb.detach().numpy(), ref.rgb, atol=1e-4)


def test_warmup_runs():
    """The service warms the kernels in a background thread; an error there is silent."""
    warmup("cpu")
    warmup("reference")


def test_cpu_warmup_readies_the_fitting_kernels():
    """In a fresh process, ``warmup("cpu")`` leaves the backward kernels a build's fit
    uses compiled (or loaded from the cache), not only the rendering ones."""
    code = (
        "import kernels; kernels.warmup('cpu');"
        "from kernels import cpu, cpu_projection as p;"
        "print(len(cpu.backward_tiles.signatures), len(p.project_gaussians_backward.signatures))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)  # fmt: skip
    assert [int(v) for v in r.stdout.split()] == [1, 1]


def test_compiled_kernels_are_cached_on_disk(tmp_path):
    """A second process loads the kernels from the cache instead of compiling them."""
    code = (
        "import numpy as np; from kernels import rasterize, Camera; from kernels import cpu;"
        "z=np.zeros((1,3)); z[0,2]=2;"
        "rasterize(z, np.array([[1.,0,0,0]]), np.full((1,3),.1), np.ones(1), np.ones((1,3)),"
        " Camera(10,10,4,4,np.eye(4)), 8, 8, backend='cpu');"
        "s=cpu.forward_tiles.stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def hits_and_misses():
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                           text=True, check=True)  # fmt: skip
        return [int(v) for v in r.stdout.split()]

    assert hits_and_misses() == [0, 1]  # cold cache: compiled once
    assert hits_and_misses() == [1, 0]  # warm cache: loaded, not compiled


@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device (gsplat has no CPU rasterizer)")
def test_cuda_matches_cpu():
    args, cam, w, h = scene(3000, 11, 3, width=64, height=48)
    opac = np.minimum(args[3], 0.98)  # gsplat caps alpha at 0.999, the CPU path at 0.99
    args = (*args[:3], opac, args[4])
    cpu = rasterize(*args, cam, w, h, PASSES, backend="cpu")
    gpu = rasterize(*args, cam, w, h, PASSES, backend="cuda")
    # float32 on the GPU, float64 on the CPU; pixels where the alpha cap binds may differ
    for name in ("rgb", "alpha"):
        err = np.abs(getattr(cpu, name) - getattr(gpu, name))
        assert np.quantile(err, 0.99) < 1e-3 and err.mean() < 1e-4, name


def test_segment_pass_labels_the_front_gaussian():
    # two big discs, label 4 in front of label 1, and a far-off label-0 Gaussian
    means = np.array([[0.0, 0, 2.0], [0.0, 0, 3.0], [5.0, 5, 3.0]])
    quats = np.tile([1.0, 0, 0, 0], (3, 1))
    scales = np.array([[0.05, 0.05, 0.001], [0.8, 0.8, 0.001], [0.1, 0.1, 0.1]])
    opac = np.array([0.9, 0.9, 0.9])
    cam = Camera(20.0, 20.0, 16.0, 16.0, np.eye(4))
    labels = np.array([4, 1, 0])
    for backend in ("cpu", "reference"):
        out = rasterize(means, quats, scales, opac, np.ones((3, 3)), cam, 32, 32,
                        ("segment", "alpha"), backend=backend, labels=labels)  # fmt: skip
        assert out.segment.dtype == np.int32 and out.rgb is None
        assert out.segment[16, 16] == 4  # the front disc
        assert out.segment[16, 28] == 1  # only the back disc reaches here
        assert np.all(out.segment[out.alpha == 0] == -1)
        assert set(np.unique(out.segment)) == {-1, 1, 4}
    with pytest.raises(ValueError, match="labels"):
        rasterize(means, quats, scales, opac, np.ones((3, 3)), cam, 8, 8, ("segment",))


def test_cpu_projection_matches_its_torch_twin_values_and_gradients():
    """The hand-written backward of ``cpu_projection`` against autograd through
    ``projection.project``, including Gaussians whose centres lie beyond the clamp on the
    view's tangents (1.3x) but whose footprints reach into the image."""
    from kernels.cpu_projection import ProjectGaussians
    from kernels.projection import project

    args, cam, w, h = scene(3000, 11)
    means, quats, scales = (a.copy() for a in args[:3])
    rng = np.random.default_rng(12)
    side = rng.choice([-1.0, 1.0], (40, 2))
    means[:40, 2] = rng.uniform(1.5, 2.5, 40)
    means[:40, :2] = side * rng.uniform(0.9, 1.2, (40, 2)) * means[:40, 2:3]
    scales[:40] = rng.uniform(0.3, 0.6, (40, 3))
    ts = [torch.tensor(a, requires_grad=True) for a in (means, quats, scales)]
    twin = project(*ts, torch.zeros(len(means), 3, dtype=torch.float64), cam, w, h)
    m2d, con, depth, normal, radii = ProjectGaussians.apply(*ts, cam, w, h)

    shown = twin.radii.numpy() > 0
    assert np.array_equal(radii.numpy(), twin.radii.numpy())
    torch.testing.assert_close(depth, twin.depths, atol=1e-12, rtol=0)
    for ours, theirs in ((m2d, twin.means2d), (con, twin.conics), (normal, twin.normals)):
        torch.testing.assert_close(ours.detach()[shown], theirs.detach()[shown],
                                   atol=1e-12, rtol=1e-12)  # fmt: skip
    p = means @ cam.world_to_camera[:3, :3].T + cam.world_to_camera[:3, 3]
    clamped = shown & ((np.abs(p[:, 0] / p[:, 2]) > 0.85) | (np.abs(p[:, 1] / p[:, 2]) > 0.85))
    assert clamped.sum() >= 5, "the scene must exercise the clamped tangents"

    g_m2d = torch.tensor(rng.normal(size=(len(means), 2)))
    g_con = torch.tensor(rng.normal(size=(len(means), 3)))
    keep = torch.tensor(shown, dtype=torch.float64)[:, None]  # the compositor's zeros
    want = torch.autograd.grad(
        (twin.means2d * g_m2d * keep).sum() + (twin.conics * g_con * keep).sum(), ts
    )
    got = torch.autograd.grad((m2d * g_m2d).sum() + (con * g_con).sum(), ts)
    for name, a, b in zip(("means", "quats", "scales"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9 * float(b.abs().max()), rtol=1e-9, msg=name)
        assert float(b[torch.from_numpy(clamped)].abs().max()) > 0, name
