"""Fit the ICT head to MediaPipe's 478 landmarks: identity, expression, pose, focal.

Unknowns: the first ``IDENTITY_COMPONENTS`` identity coefficients, the 52 ARKit
expression weights (bounded to [0, 1]), a rotation (axis-angle), a translation and the
focal length. Loss: landmark reprojection error (each landmark weighted by how stable
its correspondence is, normalised by the inter-ocular distance) plus priors: identity
coefficients near 0, expressions sparse, focal near a typical portrait lens. Solved
with L-BFGS from the similarity alignment. The photo's expression is returned apart so
the builder can remove it: the avatar's rest pose is neutral even from a smiling photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..headmodel import Correspondence, HeadModel, eye_distance
from ..torch_threads import one_torch_thread
from .align import Alignment

IDENTITY_COMPONENTS = 50
IDENTITY_PRIOR = 2e-5  # per squared coefficient (coefficients are of order ±3)
EXPRESSION_PRIOR = 2e-6  # per unit of weight (L1: few shapes explain a photo)
FOCAL_PRIOR = 2e-3  # per squared log-ratio to the initial focal
BOUND_PENALTY = 10.0  # per squared unit an expression weight strays outside [0, 1]


@dataclass(frozen=True)
class GeometryFit:
    """Attributes:
    identity: ``[IDENTITY_COMPONENTS]`` coefficients of the ICT identity shapes.
    expression: ``[52]`` ARKit weights of the photo's expression, in [0, 1].
    intrinsics: ``[4]`` (fx, fy, cx, cy) of the photo.
    world_to_camera: ``[4, 4]`` the photo's camera in the canonical head frame.
    rms: landmark residual (all 478) as a fraction of the inter-ocular distance.
    rms_initial: the same at the similarity alignment the fit started from.
    """

    identity: np.ndarray
    expression: np.ndarray
    intrinsics: np.ndarray
    world_to_camera: np.ndarray
    rms: float
    rms_initial: float

    def rest_vertices(self, model: HeadModel) -> np.ndarray:
        """The fitted identity, neutral expression ``[V, 3]``."""
        k = len(self.identity)
        return model.neutral + np.tensordot(self.identity, model.identity_deltas[:k], 1)

    def photo_vertices(self, model: HeadModel) -> np.ndarray:
        """The head as the photo shows it (identity plus expression) ``[V, 3]``."""
        return self.rest_vertices(model) + np.tensordot(self.expression, model.arkit_deltas, 1)


def _axis_angle_to_matrix(r: torch.Tensor) -> torch.Tensor:
    theta = torch.sqrt((r * r).sum() + 1e-20)
    k = r / theta
    kx = torch.zeros(3, 3, dtype=r.dtype)
    kx[0, 1], kx[0, 2], kx[1, 2] = -k[2], k[1], -k[0]
    kx = kx - kx.T
    return torch.eye(3, dtype=r.dtype) + torch.sin(theta) * kx + (1 - torch.cos(theta)) * kx @ kx


def _matrix_to_axis_angle(m: np.ndarray) -> np.ndarray:
    angle = np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    return axis / (2 * np.sin(angle)) * angle


def fit_geometry(
    model: HeadModel,
    corr: Correspondence,
    landmarks: np.ndarray,  # [478, 3] photo pixels (z unused)
    init: Alignment,
    iterations: int = 200,
) -> GeometryFit:
    dt = torch.float64
    k = IDENTITY_COMPONENTS
    tri = model.triangles[corr.triangle]  # [L, 3] vertex ids
    base = torch.tensor(np.einsum("lk,lkc->lc", corr.bary, model.neutral[tri]), dtype=dt)
    ident = torch.tensor(
        np.einsum("lk,ilkc->ilc", corr.bary, model.identity_deltas[:k][:, tri].astype(np.float64)),
        dtype=dt,
    )  # [k, L, 3]
    expr = torch.tensor(
        np.einsum("lk,elkc->elc", corr.bary, model.arkit_deltas[:, tri].astype(np.float64)),
        dtype=dt,
    )  # [52, L, 3]
    target = torch.tensor(landmarks[:, :2], dtype=dt)
    weight = torch.tensor(corr.weight, dtype=dt)
    iod = eye_distance(landmarks)
    f0, cx, cy = float(init.intrinsics[0]), float(init.intrinsics[2]), float(init.intrinsics[3])

    alpha = torch.zeros(k, dtype=dt, requires_grad=True)
    beta = torch.zeros(52, dtype=dt, requires_grad=True)
    rvec = torch.tensor(_matrix_to_axis_angle(init.world_to_camera[:3, :3]), dtype=dt,
                        requires_grad=True)  # fmt: skip
    tvec = torch.tensor(init.world_to_camera[:3, 3], dtype=dt, requires_grad=True)
    log_f = torch.tensor(np.log(f0), dtype=dt, requires_grad=True)
    params = [alpha, beta, rvec, tvec, log_f]

    def residual():
        pts = base + torch.einsum("i,ilc->lc", alpha, ident) + torch.einsum("e,elc->lc", beta, expr)
        cam = pts @ _axis_angle_to_matrix(rvec).T + tvec
        f = torch.exp(log_f)
        uv = torch.stack([f * cam[:, 0] / cam[:, 2] + cx, f * cam[:, 1] / cam[:, 2] + cy], 1)
        return uv - target

    def loss_fn():
        res = residual()
        data = (weight * (res**2).sum(1)).sum() / (weight.sum() * iod**2)
        prior = IDENTITY_PRIOR * (alpha**2).sum() + EXPRESSION_PRIOR * beta.abs().sum()
        bounds = BOUND_PENALTY * ((beta - beta.clamp(0.0, 1.0)) ** 2).sum()
        return data + prior + bounds + FOCAL_PRIOR * (log_f - np.log(f0)) ** 2

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.no_grad():
        rms0 = float(torch.sqrt((residual() ** 2).sum(1).mean()) / iod)
    with one_torch_thread():
        opt.step(closure)
    with torch.no_grad():
        beta.clamp_(0.0, 1.0)
        rms = float(torch.sqrt((residual() ** 2).sum(1).mean()) / iod)
        w2c = np.eye(4)
        w2c[:3, :3] = _axis_angle_to_matrix(rvec).numpy()
        w2c[:3, 3] = tvec.numpy()
        f = float(torch.exp(log_f))
    return GeometryFit(alpha.detach().numpy().copy(), beta.detach().numpy().copy(),
                       np.array([f, f, cx, cy]), w2c, rms, rms0)  # fmt: skip
