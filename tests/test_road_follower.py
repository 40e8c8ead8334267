"""The pixel road follower: steers towards the road, searches without one, and drives real CarRacing."""

from __future__ import annotations

import numpy as np
import pytest

from world_model.actions import DRIVING_ACTIONS
from world_model.road_follower import RoadFollower, on_road, road_mask

GRASS, ROAD = (102, 204, 102), (102, 102, 102)
NAMES = list(DRIVING_ACTIONS)


def scene(road_x0: int, road_x1: int, h: int = 72, w: int = 128) -> np.ndarray:
    """A vertical grey road over [road_x0, road_x1) on grass, with CarRacing's black dashboard."""
    f = np.empty((h, w, 3), np.uint8)
    f[:] = GRASS
    f[:, road_x0:road_x1] = ROAD
    f[int(h * 7 / 8) :] = 0
    return f


def test_steers_towards_the_road_drives_when_centred_and_searches_without_road() -> None:
    follower = RoadFollower(NAMES)
    frames = np.stack([scene(0, 30), scene(50, 78), scene(98, 128), scene(0, 0)])  # left, centre, right, none
    got = [NAMES[a] for a in follower(frames)]
    assert got[0] in ("DL", "NL") and got[2] in ("DR", "NR")
    assert got[1] == "D"
    assert got[3] == "NL"
    # resolution-independent: the same scenes at 720p give the same actions
    big = np.stack([scene(0, 300, 720, 1280), scene(500, 780, 720, 1280), scene(980, 1280, 720, 1280)])
    assert [NAMES[a] for a in follower(big)] == got[:3]


def test_road_mask_and_on_road() -> None:
    f = scene(50, 78)
    assert road_mask(f)[:, 50:78][:60].all() and not road_mask(f)[:, :50].any()
    assert on_road(np.stack([scene(50, 78), scene(0, 20)])).tolist() == [True, False]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="driving actions"):
        RoadFollower(["LEFT", "RIGHT"])
    with pytest.raises(ValueError, match="uint8 frames"):
        RoadFollower(NAMES)(np.zeros((72, 128, 3), np.uint8))


def test_follows_the_real_carracing_road_better_than_random() -> None:
    """Closed loop on the real CarRacing-v3 (MatrixWorld's pipeline): the follower collects track tiles."""
    from agents.real_env import RealCarRacingEnv

    env = RealCarRacingEnv()
    follower, rng = RoadFollower(NAMES), np.random.default_rng(0)
    returns = {}
    for name in ("road", "random"):
        obs, _ = env.reset(seed=3)
        total = 0.0
        for _ in range(120):
            a = int(follower(obs[None])[0]) if name == "road" else int(rng.integers(9))
            obs, r, term, trunc, _ = env.step(a)
            total += r
            if term or trunc:
                break
        returns[name] = total
    env.close()
    assert returns["road"] > 50 and returns["road"] > returns["random"] + 50, returns
