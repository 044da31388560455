"""The CPU backend: tiled compositing in numba, forward and backward.

Pipeline (per image): numba projects the Gaussians (``cpu_projection.py``); here they are
sorted front to back once, binned into 16x16 tiles by a counting sort (so every tile's
list stays in depth order), and composited per tile in parallel. Each Gaussian touches
only the pixels of its 3-sigma box inside the tile, and a pixel stops once its
transmittance would reach 1e-4; a tile stops when all its pixels have. The backward pass
walks each tile's list back to front, rebuilding transmittance from the final value, and
skips pixels whose loss gradient is zero (outside a masked loss: a quarter of the build's
photo-view backward). Each worker thread adds its tiles' gradients into rows of its own,
so threads never write the same memory, and the workers' rows are summed at the end.

The maths is exactly ``reference.rasterize_reference`` (tests hold them to 1e-4).
Kernels compile on first use and are cached on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from .cpu_projection import ProjectGaussians, _np, project_gaussians
from .reference import ALPHA_MAX, ALPHA_MIN, T_MIN

TILE = 16


@njit(cache=True)
def _pixel_box(mx, my, r, width, height):
    j0 = max(0, math.ceil(mx - r - 0.5))
    j1 = min(width - 1, math.floor(mx + r - 0.5))
    i0 = max(0, math.ceil(my - r - 0.5))
    i1 = min(height - 1, math.floor(my + r - 0.5))
    return j0, j1, i0, i1


@njit(cache=True)
def depth_order(depths):
    """``np.argsort(depths, kind="stable")`` for float64 ``depths`` without NaNs, as a
    radix sort (11-bit digits of the float's bits, made to order as the floats do; digits
    every depth shares are skipped): 0.9 ms for 41k depths where argsort takes 3.7. The
    one difference: -0.0 sorts before 0.0 instead of tying with it (camera depths are
    beyond the near plane, so neither occurs here)."""
    n = depths.shape[0]
    bits = depths.view(np.uint64)
    keys = np.empty(n, np.uint64)
    sign = np.uint64(1) << np.uint64(63)
    for i in range(n):  # negative: all bits flipped; positive: the sign bit set
        keys[i] = ~bits[i] if bits[i] & sign else bits[i] | sign
    order = np.arange(n)
    spare = np.empty(n, np.int64)
    counts = np.empty(2048, np.int64)
    for shift in range(0, 64, 11):
        counts[:] = 0
        for i in range(n):
            counts[(keys[i] >> np.uint64(shift)) & np.uint64(2047)] += 1
        if counts.max() == n:
            continue
        total = 0
        for d in range(2048):
            c = counts[d]
            counts[d] = total
            total += c
        for i in range(n):
            g = order[i]
            d = (keys[g] >> np.uint64(shift)) & np.uint64(2047)
            spare[counts[d]] = g
            counts[d] += 1
        order, spare = spare, order
    return order


@njit(parallel=True, cache=True)
def bin_tiles(order, means2d, radii, width, height, workers):
    """Tile lists in depth order. Returns offsets [n_tiles + 1], entries [E] (Gaussian
    ids), boxes [N, 4] (inclusive pixel ranges j0, j1, i0, i1).

    Each worker bins one run of ``order``: it counts its entries per tile, then writes
    them after those of the runs before it, so each tile's list stays in depth order."""
    tiles_x = (width + TILE - 1) // TILE
    n_tiles = tiles_x * ((height + TILE - 1) // TILE)
    n, m = means2d.shape[0], order.shape[0]
    boxes = np.full((n, 4), -1, np.int64)
    counts = np.zeros((workers, n_tiles), np.int64)
    for w in prange(workers):
        for k in range(w * m // workers, (w + 1) * m // workers):
            g = order[k]
            j0, j1, i0, i1 = _pixel_box(means2d[g, 0], means2d[g, 1], radii[g], width, height)
            boxes[g, 0], boxes[g, 1], boxes[g, 2], boxes[g, 3] = j0, j1, i0, i1
            if j0 > j1 or i0 > i1:
                continue
            for ty in range(i0 // TILE, i1 // TILE + 1):
                for tx in range(j0 // TILE, j1 // TILE + 1):
                    counts[w, ty * tiles_x + tx] += 1
    offsets = np.zeros(n_tiles + 1, np.int64)
    fill = np.empty((workers, n_tiles), np.int64)
    total = 0
    for t in range(n_tiles):
        offsets[t] = total
        for w in range(workers):
            fill[w, t] = total
            total += counts[w, t]
    offsets[n_tiles] = total
    entries = np.empty(total, np.int64)
    for w in prange(workers):
        for k in range(w * m // workers, (w + 1) * m // workers):
            g = order[k]
            j0, j1, i0, i1 = boxes[g, 0], boxes[g, 1], boxes[g, 2], boxes[g, 3]
            if j0 > j1 or i0 > i1:
                continue
            for ty in range(i0 // TILE, i1 // TILE + 1):
                for tx in range(j0 // TILE, j1 // TILE + 1):
                    t = ty * tiles_x + tx
                    entries[fill[w, t]] = g
                    fill[w, t] += 1
    return offsets, entries, boxes


@njit(cache=True, inline="always", fastmath={"contract", "afn"})
def _row_span(dy, mx, ca, cb, cc, cutoff, jlo, jhi):
    """Columns of one pixel row where the Gaussian's power can reach ``cutoff``: the
    roots of a quadratic in dx, widened by a pixel (the exact test is still made per
    pixel; this only skips pixels that cannot pass it)."""
    disc = cb * cb * dy * dy - ca * (cc * dy * dy + 2.0 * cutoff)
    if disc < 0.0:
        return 1, 0
    root = math.sqrt(disc)
    lo = mx - 0.5 + (-cb * dy - root) / ca
    hi = mx - 0.5 + (-cb * dy + root) / ca
    return max(jlo, math.floor(lo) - 1), min(jhi, math.ceil(hi) + 1)


@njit(parallel=True, cache=True, fastmath={"contract", "afn"})
def forward_tiles(offsets, entries, boxes, means2d, conics, colors, opacities, depths,
                  normals, background, width, height, want_depth, want_normal,
                  workers):  # fmt: skip
    """Composite every tile. Returns rgb [H,W,3] (premultiplied, plus background times
    the final transmittance), alpha [H,W], transmittance [H,W], depth [H,W] (expected z
    over alpha, inf where empty), normal [H,W,3] (unit, 0 where empty), and per pixel the
    entry index after the last Gaussian blended (for the backward pass)."""
    tiles_x = (width + TILE - 1) // TILE
    n_tiles = offsets.shape[0] - 1
    rgb = np.empty((height, width, 3))
    alpha_out = np.empty((height, width))
    trans = np.ones((height, width))
    depth = np.empty((height, width) if want_depth else (0, 0))
    normal = np.empty((height, width, 3) if want_normal else (0, 0, 0))
    last = np.zeros((height, width), np.int64)
    # one scratch buffer per thread, tiles dealt round-robin: allocating inside the
    # parallel loop costs more than the compositing of a small tile
    for worker in prange(workers):
        done = np.empty((TILE, TILE), np.bool_)
        live = np.empty(TILE, np.int64)  # per row of the tile, pixels not yet done
        acc = np.empty((TILE, TILE, 7))  # r, g, b, depth, normal x, y, z
        for t in range(worker, n_tiles, workers):
            _forward_tile(
                t, tiles_x, offsets, entries, boxes, means2d, conics, colors, opacities,
                depths, normals, background, width, height, want_depth, want_normal, done,
                live, acc, rgb, alpha_out, trans, depth, normal, last,
            )  # fmt: skip
    return rgb, alpha_out, trans, depth, normal, last


@njit(cache=True, fastmath={"contract", "afn"})
def _forward_tile(t, tiles_x, offsets, entries, boxes, means2d, conics, colors, opacities,
                  depths, normals, background, width, height, want_depth, want_normal, done,
                  live, acc, rgb, alpha_out, trans, depth, normal, last):  # fmt: skip
    x0 = (t % tiles_x) * TILE
    y0 = (t // tiles_x) * TILE
    x1 = min(x0 + TILE, width)
    y1 = min(y0 + TILE, height)
    done[:] = False
    live[:] = x1 - x0
    acc[:] = 0.0
    active = (x1 - x0) * (y1 - y0)
    for k in range(offsets[t], offsets[t + 1]):
        g = entries[k]
        o = opacities[g]
        if o < ALPHA_MIN:
            continue
        cutoff = math.log(ALPHA_MIN / o)
        jlo, jhi = max(x0, boxes[g, 0]), min(x1 - 1, boxes[g, 1])
        ilo, ihi = max(y0, boxes[g, 2]), min(y1 - 1, boxes[g, 3])
        mx, my = means2d[g, 0], means2d[g, 1]
        ca, cb, cc = conics[g, 0], conics[g, 1], conics[g, 2]
        for i in range(ilo, ihi + 1):
            if live[i - y0] == 0:  # a saturated row: nothing left to blend in it
                continue
            dy = i + 0.5 - my
            ja, jb = _row_span(dy, mx, ca, cb, cc, cutoff, jlo, jhi)
            for j in range(ja, jb + 1):
                li, lj = i - y0, j - x0
                if done[li, lj]:
                    continue
                dx = j + 0.5 - mx
                power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
                if power > 0.0 or power < cutoff:  # cutoff: o * exp(power) < 1/255
                    continue
                alpha = min(ALPHA_MAX, o * math.exp(power))
                if alpha < ALPHA_MIN:
                    continue
                tc = trans[i, j]
                tn = tc * (1.0 - alpha)
                if tn <= T_MIN:
                    done[li, lj] = True
                    live[li] -= 1
                    active -= 1
                    continue
                w = alpha * tc
                for ch in range(3):
                    acc[li, lj, ch] += w * colors[g, ch]
                if want_depth:
                    acc[li, lj, 3] += w * depths[g]
                if want_normal:
                    for ch in range(3):
                        acc[li, lj, 4 + ch] += w * normals[g, ch]
                trans[i, j] = tn
                last[i, j] = k + 1
        if active == 0:
            break
    for i in range(y0, y1):
        for j in range(x0, x1):
            li, lj = i - y0, j - x0
            tf = trans[i, j]
            a = 1.0 - tf
            alpha_out[i, j] = a
            for ch in range(3):
                rgb[i, j, ch] = acc[li, lj, ch] + tf * background[ch]
            if want_depth:
                depth[i, j] = acc[li, lj, 3] / a if a > 0.0 else np.inf
            if want_normal:
                n = math.sqrt(acc[li, lj, 4] ** 2 + acc[li, lj, 5] ** 2 + acc[li, lj, 6] ** 2)
                for ch in range(3):
                    normal[i, j, ch] = acc[li, lj, 4 + ch] / n if n > 0.0 else 0.0


@njit(parallel=True, cache=True, fastmath={"contract", "afn"})
def backward_tiles(offsets, entries, boxes, means2d, conics, colors, opacities, trans_final,
                   last, background, grad_rgb, grad_alpha, width, height, workers):  # fmt: skip
    """Gradients per Gaussian and worker: [workers, N, 9] = d/d(mean2d x, y),
    d/d(conic a, b, c), d/d(opacity), d/d(colour r, g, b), for loss gradients on rgb and
    alpha. Each worker adds into its own rows; the caller sums over workers."""
    tiles_x = (width + TILE - 1) // TILE
    n_tiles = offsets.shape[0] - 1
    grads = np.zeros((workers, means2d.shape[0], 9))
    for worker in prange(workers):
        out = grads[worker]
        tcur = np.empty((TILE, TILE))
        behind = np.empty((TILE, TILE, 3))  # colour of what lies behind, / T after
        prev_alpha = np.empty((TILE, TILE))
        prev_color = np.empty((TILE, TILE, 3))
        row_last = np.empty(TILE, np.int64)  # per row of the tile, the largest ``stop``
        stop = np.empty((TILE, TILE), np.int64)
        for t in range(worker, n_tiles, workers):
            _backward_tile(t, tiles_x, offsets, entries, boxes, means2d, conics, colors,
                           opacities, trans_final, last, background, grad_rgb, grad_alpha,
                           width, height, tcur, behind, prev_alpha, prev_color, row_last,
                           stop, out)  # fmt: skip
    return grads


@njit(cache=True, fastmath={"contract", "afn"})
def _backward_tile(t, tiles_x, offsets, entries, boxes, means2d, conics, colors, opacities,
                   trans_final, last, background, grad_rgb, grad_alpha, width, height, tcur,
                   behind, prev_alpha, prev_color, row_last, stop, out):  # fmt: skip
    x0 = (t % tiles_x) * TILE
    y0 = (t // tiles_x) * TILE
    x1 = min(x0 + TILE, width)
    y1 = min(y0 + TILE, height)
    behind[:] = 0.0
    prev_alpha[:] = 0.0
    prev_color[:] = 0.0
    row_last[:] = 0
    # a pixel whose loss gradient is zero (outside a loss's mask) adds exactly nothing:
    # it stops before its first entry
    for i in range(y0, y1):
        for j in range(x0, x1):
            li, lj = i - y0, j - x0
            tcur[li, lj] = trans_final[i, j]
            zero = grad_alpha[i, j] == 0.0
            for ch in range(3):
                zero = zero and grad_rgb[i, j, ch] == 0.0
            stop[li, lj] = 0 if zero else last[i, j]
            row_last[li] = max(row_last[li], stop[li, lj])
    # entries after the last one any pixel blended (behind saturated pixels) add nothing
    start = offsets[t]
    for li in range(y1 - y0):
        start = max(start, row_last[li])
    for k in range(start - 1, offsets[t] - 1, -1):
        g = entries[k]
        jlo, jhi = max(x0, boxes[g, 0]), min(x1 - 1, boxes[g, 1])
        ilo, ihi = max(y0, boxes[g, 2]), min(y1 - 1, boxes[g, 3])
        mx, my = means2d[g, 0], means2d[g, 1]
        ca, cb, cc = conics[g, 0], conics[g, 1], conics[g, 2]
        o = opacities[g]
        if o < ALPHA_MIN:
            continue
        cutoff = math.log(ALPHA_MIN / o)
        for i in range(ilo, ihi + 1):
            if k >= row_last[i - y0]:
                continue
            dy = i + 0.5 - my
            ja, jb = _row_span(dy, mx, ca, cb, cc, cutoff, jlo, jhi)
            for j in range(ja, jb + 1):
                li, lj = i - y0, j - x0
                if k >= stop[li, lj]:
                    continue
                dx = j + 0.5 - mx
                power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
                if power > 0.0 or power < cutoff:
                    continue
                gauss = math.exp(power)
                raw = o * gauss
                alpha = min(ALPHA_MAX, raw)
                if alpha < ALPHA_MIN:
                    continue
                t_before = tcur[li, lj] / (1.0 - alpha)
                tcur[li, lj] = t_before
                d_alpha = 0.0
                bg_dot = 0.0
                for ch in range(3):
                    gc = grad_rgb[i, j, ch]
                    out[g, 6 + ch] += alpha * t_before * gc
                    behind[li, lj, ch] = (
                        prev_alpha[li, lj] * prev_color[li, lj, ch]
                        + (1.0 - prev_alpha[li, lj]) * behind[li, lj, ch]
                    )
                    d_alpha += (colors[g, ch] - behind[li, lj, ch]) * gc
                    bg_dot += background[ch] * gc
                    prev_color[li, lj, ch] = colors[g, ch]
                prev_alpha[li, lj] = alpha
                d_alpha *= t_before
                tail = trans_final[i, j] / (1.0 - alpha)
                d_alpha += (grad_alpha[i, j] - bg_dot) * tail
                if raw > ALPHA_MAX:
                    continue  # clamped: no gradient to opacity or shape
                out[g, 5] += d_alpha * gauss
                d_power = d_alpha * alpha
                out[g, 0] += d_power * (ca * dx + cb * dy)
                out[g, 1] += d_power * (cc * dy + cb * dx)
                out[g, 2] += -0.5 * dx * dx * d_power
                out[g, 3] += -dx * dy * d_power
                out[g, 4] += -0.5 * dy * dy * d_power


def composite(means2d, conics, colors, opacities, depths, normals, radii, width, height,
              background, want_depth, want_normal):  # fmt: skip
    """Sort, bin and composite screen-space Gaussians (numpy float64 arrays).

    Returns the forward kernel's outputs and the binning (for the backward pass)."""
    visible = np.flatnonzero(radii > 0)
    order = visible[depth_order(np.ascontiguousarray(depths[visible]))]
    offsets, entries, boxes = bin_tiles(order, means2d, radii, width, height, get_num_threads())
    outs = forward_tiles(offsets, entries, boxes, means2d, conics, colors, opacities, depths,
                         normals, background, width, height, want_depth, want_normal,
                         get_num_threads())  # fmt: skip
    return outs, (offsets, entries, boxes)


def reach(means2d, radii, width, height) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), ends exclusive: the pixels that any drawn Gaussian's box reaches
    (as ``_pixel_box`` clips it), or None when none is drawn."""
    drawn = radii > 0
    if not drawn.any():
        return None
    m, r = means2d[drawn], radii[drawn]
    x0 = max(0, int(np.ceil(m[:, 0] - r - 0.5).min()))
    y0 = max(0, int(np.ceil(m[:, 1] - r - 0.5).min()))
    x1 = min(width, int(np.floor(m[:, 0] + r - 0.5).max()) + 1)
    y1 = min(height, int(np.floor(m[:, 1] + r - 0.5).max()) + 1)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def rasterize_numpy(means, quats, scales, opacities, colors, camera, width, height,
                    background=None, passes=("rgb", "alpha", "depth", "normal"),
                    ) -> dict[str, np.ndarray | None]:  # fmt: skip
    """The inference path: no torch, no gradients. ``rasterize_cpu``'s results, float32,
    for the ``passes`` asked (the others None).

    Only the box that the Gaussians reach is composited; the rest of the frame is what no
    Gaussian covers (background, alpha 0, depth inf, normal 0). Through the service, a
    head covering 2 % of a 1920x1080 frame rendered its four passes in half the time of
    compositing every tile in float64 and converting."""
    from .sh import eval_sh

    f64 = [np.ascontiguousarray(a, np.float64) for a in (means, quats, scales, opacities, colors)]
    means, quats, scales, opacities, colors = f64
    m2d, con, z, nrm, rad = project_gaussians(
        means, quats, scales, np.ascontiguousarray(camera.world_to_camera, np.float64),
        camera.fx, camera.fy, camera.cx, camera.cy, camera.near, camera.far, width, height,
    )  # fmt: skip
    if colors.ndim == 3:
        colors = eval_sh(colors, means - camera.position)
    bg = np.zeros(3) if background is None else np.asarray(background, np.float64)
    fills = {"rgb": bg, "alpha": 0.0, "depth": np.inf, "normal": np.zeros(3)}
    box = reach(m2d, rad, width, height)
    parts: dict[str, np.ndarray] = {}
    if box is not None:
        x0, y0, x1, y1 = box
        (rgb, alpha, _, depth, normal, _), _ = composite(
            m2d - np.array([x0, y0], np.float64), con, np.ascontiguousarray(colors), opacities,
            z, nrm, rad, x1 - x0, y1 - y0, bg, "depth" in passes, "normal" in passes,
        )  # fmt: skip
        parts = {"rgb": rgb, "alpha": alpha, "depth": depth, "normal": normal}
    return {
        name: _framed(parts.get(name), box or (0, 0, 0, 0), width, height, fill)
        if name in passes else None
        for name, fill in fills.items()
    }  # fmt: skip


def _framed(part, box, width, height, fill) -> np.ndarray:
    """A float32 frame: ``part`` (None: nothing) in ``box``, ``fill`` around it; each
    pixel written once, as a conversion of the whole frame would."""
    x0, y0, x1, y1 = box
    out = np.empty((height, width, *np.shape(fill)), np.float32)
    out[:y0] = fill
    out[y1:] = fill
    out[y0:y1, :x0] = fill
    out[y0:y1, x1:] = fill
    if part is not None:
        out[y0:y1, x0:x1] = part
    return out


class RasterizeTiles(torch.autograd.Function):
    """(means2d, conics, colors, opacities) → rgb, alpha (differentiable); depth and
    normal accumulations come out too but carry no gradient."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, depths, normals, radii, width, height,
                background, want_depth, want_normal):  # fmt: skip
        m2d, con, col, op = _np(means2d), _np(conics), _np(colors), _np(opacities)
        rad = radii.detach().cpu().numpy().astype(np.int64)
        bg = _np(background)
        (rgb, alpha, trans, depth, normal, last), (offsets, entries, boxes) = composite(
            m2d, con, col, op, _np(depths), _np(normals), rad, width, height, bg, want_depth,
            want_normal,
        )  # fmt: skip
        ctx.saved = (offsets, entries, boxes, m2d, con, col, op, trans, last, bg, width, height)
        ctx.dtypes = (means2d.dtype, conics.dtype, colors.dtype, opacities.dtype)
        dt = means2d.dtype
        outs = [torch.from_numpy(a).to(dt) for a in (rgb, alpha, depth, normal)]
        ctx.mark_non_differentiable(outs[2], outs[3])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_rgb, g_alpha, g_depth, g_normal):
        offsets, entries, boxes, m2d, con, col, op, trans, last, bg, width, height = ctx.saved
        h, w = trans.shape
        g_rgb = np.zeros((h, w, 3)) if g_rgb is None else _np(g_rgb)
        g_alpha = np.zeros((h, w)) if g_alpha is None else _np(g_alpha)
        rows = backward_tiles(offsets, entries, boxes, m2d, con, col, op, trans, last, bg,
                              g_rgb, g_alpha, width, height, get_num_threads())  # fmt: skip
        grads = torch.from_numpy(rows.sum(axis=0))
        d_m, d_c, d_col, d_o = ctx.dtypes
        return (grads[:, 0:2].to(d_m), grads[:, 2:5].to(d_c), grads[:, 6:9].to(d_col),
                grads[:, 5].to(d_o), None, None, None, None, None, None, None, None)  # fmt: skip


def rasterize_cpu(means, quats, scales, opacities, colors, camera, width, height,
                  background=None, passes=("rgb", "alpha", "depth", "normal"),
                  ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Passes as tensors [H,W,...]; rgb and alpha are differentiable with respect to
    means, quats, scales, opacities and colours/SH. Passes not asked for are skipped."""
    means2d, conics, depths, normals, radii = ProjectGaussians.apply(
        means, quats, scales, camera, width, height
    )
    if colors.dim() == 3:
        from .projection import eval_sh

        colors = eval_sh(colors, means - torch.as_tensor(camera.position, dtype=means.dtype))
    bg = (
        torch.zeros(3, dtype=means.dtype)
        if background is None
        else torch.as_tensor(background, dtype=means.dtype)
    )
    rgb, alpha, depth, normal = RasterizeTiles.apply(
        means2d, conics, colors, opacities, depths, normals, radii, width, height, bg,
        "depth" in passes, "normal" in passes,
    )  # fmt: skip
    return {"rgb": rgb, "alpha": alpha, "depth": depth, "normal": normal}
