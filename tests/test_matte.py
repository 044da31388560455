"""The person mask's edge refinement: the guided filter against a per-window reference,
and the refined edge moving to where the photo's edge is."""

from __future__ import annotations

import numpy as np

from inference_service.build.photometric import guided_filter, refine_matte


def guided_filter_reference(guide: np.ndarray, src: np.ndarray, r: int, eps: float):
    """He et al.'s definition, window by window (edges reflected like the fast one)."""
    g = np.pad(guide, r, mode="symmetric")
    s = np.pad(src, r, mode="symmetric")
    h, w = guide.shape
    a, b = np.zeros((h, w)), np.zeros((h, w))
    k = 2 * r + 1
    for i in range(h):
        for j in range(w):
            wg, ws = g[i : i + k, j : j + k], s[i : i + k, j : j + k]
            a[i, j] = ((wg * ws).mean() - wg.mean() * ws.mean()) / (wg.var() + eps)
            b[i, j] = ws.mean() - a[i, j] * wg.mean()
    pa, pb = np.pad(a, r, mode="symmetric"), np.pad(b, r, mode="symmetric")
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = (
                pa[i : i + k, j : j + k].mean() * guide[i, j] + pb[i : i + k, j : j + k].mean()
            )
    return out


def test_guided_filter_matches_the_window_definition():
    rng = np.random.default_rng(0)
    guide, src = rng.random((13, 17)), rng.random((13, 17))
    for r, eps in ((1, 1e-3), (3, 0.1)):
        fast, slow = guided_filter(guide, src, r, eps), guided_filter_reference(guide, src, r, eps)
        np.testing.assert_allclose(fast, slow, atol=1e-10)


def hair_line(h: int, w: int, edge: int, reach: float, blur: float):
    """A dark head left of column ``edge`` on a light, noisy backdrop, and a soft
    segmentation whose 0.5 level lies ``reach`` px out in the backdrop."""
    photo = np.full((h, w, 3), 200, np.int64)
    photo[:, :edge] = (70, 55, 40)
    photo = np.clip(photo + np.random.default_rng(1).integers(-6, 7, photo.shape), 0, 255)
    x = np.arange(w) + 0.5
    soft = np.tile(1 / (1 + np.exp((x - edge - reach) / blur)), (h, 1)).astype(np.float32)
    return photo.astype(np.uint8), soft


def test_a_blurred_mask_snaps_to_the_photo_edge():
    """The segmentation's edge blurred over ~12 px and 3 px out in the backdrop (as
    MediaPipe's is on a hair line); refined, the mask ends within a pixel of the photo's
    edge."""
    photo, soft = hair_line(48, 512, 250, 3, 3.0)
    assert abs((soft > 0.5).sum(1).mean() - 253) < 0.6
    after = (refine_matte(photo, soft) > 0.5).sum(1).mean()
    assert abs(after - 250) < 1.0, after


def test_a_large_photo_is_refined_at_a_bounded_size():
    """Above MATTE_SIDE the filter runs on the photo scaled down: still the photo's
    edge, to within the scaled pixel, and the mask comes back at full size."""
    photo, soft = hair_line(40, 2600, 1300, 8, 8.0)
    refined = refine_matte(photo, soft)
    assert refined.shape == soft.shape and refined.dtype == np.float32
    assert abs((refined > 0.5).sum(1).mean() - 1300) < 3.0
