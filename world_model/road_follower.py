"""A pixel road follower for CarRacing-looking frames: a closed-loop driver for real and imagined roads.

It reads only the RGB frame, so the same policy drives the real CarRacing-v3 (through
:class:`agents.real_env.RealCarRacingEnv`) and MatrixWorld, which makes it a probe of a world
model: in a world that obeys its controls the road stays in front of the car for as long as it does
in the real game; in a world that ignores them (or forgets the road) the car ends up on grass.

Rule (per frame, vectorised over a batch): road pixels are grey (R ~ G ~ B, mid brightness); the
centroid of the road in a look-ahead band above the car gives the heading error; steer towards it
when it is off-centre, drive straight and accelerate when centred, and turn left while coasting
when no road is visible (a search, as a human would). The car sits at a fixed place in CarRacing's
car-centred view (horizontal centre, ~3/4 of the way down the frame above the dashboard).

    follower = RoadFollower(action_names)          # the env's action names, e.g. env.get_action_meanings()
    actions = follower(frames)                     # frames (B, H, W, 3) uint8 -> (B,) int64
"""

from __future__ import annotations

import numpy as np

# Fractions of the frame height / width (CarRacing at any resolution; the dashboard is the bottom 1/8).
BAND = (0.35, 0.68)
"""Rows (top, bottom) of the look-ahead band, as fractions of the frame height."""
CAR_BOX = ((0.55, 0.72), (0.42, 0.58))
"""Rows and columns just around the car, for :func:`on_road`."""
DEADBAND = 0.1
"""Heading errors (fraction of the half-width) below this drive straight."""
SEARCH_BELOW = 0.02
"""Road fraction of the look-ahead band below which no road is in view (the follower searches)."""


def road_mask(frames: np.ndarray) -> np.ndarray:
    """Grey road pixels of uint8 frames (..., H, W, 3) -> bool (..., H, W).

    Road is grey (channels within 24 of each other, green 60..170); grass is green (G >> R, B), kerbs
    are red/white, the dashboard is black.
    """
    f = frames.astype(np.int16)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    return (np.abs(r - g) < 24) & (np.abs(g - b) < 24) & (g > 60) & (g < 170)


def on_road(frames: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Whether the car is on (or right beside) the road: (B, H, W, 3) uint8 -> (B,) bool.

    True when at least ``threshold`` of the pixels in a small box around the car are road.
    """
    h, w = frames.shape[-3:-1]
    (r0, r1), (c0, c1) = CAR_BOX
    box = road_mask(frames[..., int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w), :])  # (B, h', w')
    return box.mean(axis=(-2, -1)) >= threshold


def heading_error(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Road centroid offset in the look-ahead band: (B, H, W, 3) -> (error (B,) in [-1, 1], road fraction (B,))."""
    h, w = frames.shape[-3:-1]
    band = road_mask(frames[:, int(BAND[0] * h) : int(BAND[1] * h)])  # (B, rows, W)
    cols = band.sum(axis=1).astype(np.float64)  # (B, W) road pixels per column
    total = cols.sum(axis=1)  # (B,)
    x = (np.arange(w) + 0.5 - w / 2) / (w / 2)  # (W,) column position in [-1, 1]
    err = (cols * x).sum(axis=1) / np.maximum(total, 1.0)
    return err, total / band[0].size


class RoadFollower:
    """Steer towards the grey road seen in the frame.

    Args:
        action_names: the env's action names (the driving table: "D", "DL", "DR", "B", ..., "NR").
        deadband: heading error below which the car drives straight.
    """

    def __init__(self, action_names: list[str] | tuple[str, ...], deadband: float = DEADBAND) -> None:
        missing = [n for n in ("D", "DL", "DR", "N", "NL", "NR") if n not in action_names]
        if missing:
            raise ValueError(f"RoadFollower needs the driving actions {missing}; the env has {list(action_names)}")
        idx = {n: i for i, n in enumerate(action_names)}
        # rows: no road / left / straight / right; columns: coast, drive
        self.table = np.array(
            [[idx["NL"], idx["NL"]], [idx["NL"], idx["DL"]], [idx["N"], idx["D"]], [idx["NR"], idx["DR"]]], np.int64
        )
        self.deadband = deadband

    def heading_error(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`heading_error` of ``frames``."""
        return heading_error(frames)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Actions (B,) int64 for uint8 frames (B, H, W, 3)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"RoadFollower expects uint8 frames (B, H, W, 3), got {frames.dtype} {frames.shape}")
        err, frac = self.heading_error(frames)
        row = np.where(err < -self.deadband, 1, np.where(err > self.deadband, 3, 2))  # left / straight / right
        row = np.where(frac < SEARCH_BELOW, 0, row)  # no road in view: search
        drive = (np.abs(err) < 2.5 * self.deadband).astype(np.int64)  # accelerate only when nearly centred
        return self.table[row, drive]
