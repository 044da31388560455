"""The closed eye's seam that ``gaussians.lash_line`` draws its lashes along."""

from __future__ import annotations

import numpy as np

from inference_service.build.gaussians import lid_seams
from inference_service.headmodel import load_head_model


def test_seams_run_corner_to_corner_where_the_closed_lids_meet():
    model = load_head_model()
    rest = model.neutral.astype(np.float64)
    seams = lid_seams(model, rest)
    assert len(seams) == 2
    for (ids, seam), (a, b) in zip(seams, ((36, 39), (42, 45)), strict=True):
        corners = rest[model.landmarks68[[a, b]]]
        width = abs(corners[1, 0] - corners[0, 0])
        assert np.ptp(seam[:, 0]) > 0.7 * width  # across most of the eye
        # the upper lid's margin came down by most of the eye's height in the middle...
        middle = np.abs(seam[:, 0] - corners[:, 0].mean()) < width / 6
        assert (rest[ids[middle], 2] - seam[middle, 2]).mean() > 0.006
        # ...to about the height of the eye corners, where the lower lid is
        assert np.abs(seam[:, 2] - corners[:, 2].mean()).max() < 0.004
        assert np.abs(np.diff(seam[:, 2])).max() < 0.003  # one line, no folds (they rise 3-6 mm)
    # ICT's neutral head is symmetric: so are its seams
    left, right = seams[0][1], seams[1][1] * [-1, 1, 1]
    far = np.min(np.linalg.norm(left[:, None] - right[None], axis=2), axis=1)
    assert far.max() < 0.0025  # columns 1 mm apart on each side


def test_seams_end_on_the_margin_not_on_a_fold():
    """ICT's mesh is exactly symmetric, but its blink shapes are not: at the subject's
    left outer corner the vertex the blink moves furthest is a fold 1.3 mm above the
    margin, where the right eye's is on the margin. Mirrored, each seam stays within
    1.2 mm of the other's height, held level up to 2 mm past its end."""
    model = load_head_model()
    seams = [seam for _, seam in lid_seams(model, model.neutral.astype(np.float64))]
    for seam, other in ((seams[0], seams[1]), (seams[1], seams[0])):
        x, z = -other[:, 0], other[:, 2]
        order = np.argsort(x)
        near = (seam[:, 0] > x.min() - 0.002) & (seam[:, 0] < x.max() + 0.002)
        gap = seam[near, 2] - np.interp(seam[near, 0], x[order], z[order])
        assert near.sum() >= len(seam) - 1 and gap.max() < 0.0012
