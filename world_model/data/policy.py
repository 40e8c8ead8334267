"""Recording policies: what drives the real env while we record.

``TrackFollower`` (CarRacing): a pure-pursuit steering controller on the track's centre line with a
speed target, plus epsilon action noise and random held bursts. The bursts push the car onto the
grass and the controller then drives it back, so the data holds recoveries as well as clean laps,
and all nine driving actions occur (the noise and bursts draw uniformly from the table).
``TrackExit`` (CarRacing): the track follower for a random while, then it heads outwards from the
map centre and drives on until the car crosses the playfield edge, where CarRacing terminates the
episode (-100).
Its episodes are the only ones that end in ``terminated``, so they teach the termination head what
the edge looks like (the black void beyond the grass).
``TrackHold`` (CarRacing): the track follower, interrupted by long open-loop holds of one action
(mostly "D", straight on the gas) that do not react to the road. The follower's own data pairs "D"
with a straight road ahead (it only goes straight where the road does), so a world trained on it
alone learns that "D" keeps the car on the road; the holds break that pairing: a held "D" at a curve
runs the car off the road and onto the grass, as it would in the real game.
``RandomPolicy``: uniform random actions for any Discrete env (the generic recorder's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from world_model.actions import action_id


def heading_error(hull, direction: np.ndarray) -> float:  # noqa: ANN001 - a Box2D body
    """Angle (radians) from the car's heading to the world-frame ``direction``; > 0: to the right."""
    forward, right = np.array(hull.GetWorldVector((0, 1))), np.array(hull.GetWorldVector((1, 0)))
    return math.atan2(float(direction @ right), float(direction @ forward))


def hull_speed(hull) -> float:  # noqa: ANN001 - a Box2D body
    """The car's speed (Box2D units)."""
    return float(np.linalg.norm(np.array(hull.linearVelocity)))


class RandomPolicy:
    """Uniform random actions held for a random number of steps (1-4)."""

    name = "random-hold"

    def __init__(self, num_actions: int, rng: np.random.Generator) -> None:
        self.num_actions, self.rng = num_actions, rng
        self._action, self._left = 0, 0

    def __call__(self, env) -> int:  # noqa: ANN001 - any gym env
        if self._left <= 0:
            self._action, self._left = int(self.rng.integers(self.num_actions)), int(self.rng.integers(1, 5))
        self._left -= 1
        return self._action


@dataclass
class TrackFollowerConfig:
    """Knobs of the CarRacing recording policy; each episode samples its own within these ranges."""

    lookahead: tuple[int, int] = (4, 8)  # track tiles ahead of the nearest one to steer at
    target_speed: tuple[float, float] = (35.0, 70.0)  # hull speed (m/s in Box2D units) to hold
    steer_deadzone: float = 0.08  # radians of heading error treated as "straight"
    epsilon: tuple[float, float] = (0.1, 0.3)  # probability of a uniform random action per step
    burst_prob: float = 0.03  # probability per step of starting a held random burst
    burst_len: tuple[int, int] = (4, 14)  # steps a burst holds its action


class TrackFollower:
    """Pure-pursuit controller for CarRacing-v3 over the nine driving actions, with exploration noise."""

    name = "track-follower+noise"

    def __init__(self, rng: np.random.Generator, cfg: TrackFollowerConfig | None = None) -> None:
        self.cfg = cfg or TrackFollowerConfig()
        self.rng = rng
        c = self.cfg
        self.lookahead = int(rng.integers(c.lookahead[0], c.lookahead[1] + 1))
        self.target_speed = float(rng.uniform(*c.target_speed))
        self.epsilon = float(rng.uniform(*c.epsilon))
        self._burst_action, self._burst_left = 0, 0
        self._track_xy: np.ndarray | None = None

    def params(self) -> dict[str, float]:
        """This episode's sampled parameters (stored in the episode's meta)."""
        return {"lookahead": self.lookahead, "target_speed": self.target_speed, "epsilon": self.epsilon}

    def tile_ahead(self, env, tiles: int) -> np.ndarray:  # noqa: ANN001 - CarRacing (unwrapped)
        """(2,) position of the track tile ``tiles`` after the one nearest to the car."""
        if self._track_xy is None:
            self._track_xy = np.array([(t[2], t[3]) for t in env.track], dtype=np.float64)  # (n, 2)
        pos = np.array(env.car.hull.position, dtype=np.float64)
        nearest = int(np.argmin(((self._track_xy - pos) ** 2).sum(1)))
        return self._track_xy[(nearest + tiles) % len(self._track_xy)]

    def controller(self, env) -> int:  # noqa: ANN001 - CarRacing (unwrapped)
        """The noiseless action: steer towards a point ``lookahead`` tiles ahead, hold the target speed."""
        hull = env.car.hull
        target = self.tile_ahead(env, self.lookahead)
        heading_err = heading_error(hull, target - np.array(hull.position, dtype=np.float64))
        steer = 0 if abs(heading_err) < self.cfg.steer_deadzone else (1 if heading_err > 0 else -1)
        speed = hull_speed(hull)
        # brake into sharp corners, drive below the target speed, coast above it
        if abs(heading_err) > 0.6 and speed > 0.6 * self.target_speed:
            throttle = 1
        elif speed < self.target_speed:
            throttle = 0
        else:
            throttle = 2
        return action_id(steer, throttle)

    def __call__(self, env) -> int:  # noqa: ANN001
        if self._burst_left > 0:
            self._burst_left -= 1
            return self._burst_action
        if self.rng.random() < self.cfg.burst_prob:
            self._burst_action = int(self.rng.integers(9))
            self._burst_left = int(self.rng.integers(self.cfg.burst_len[0], self.cfg.burst_len[1] + 1)) - 1
            return self._burst_action
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(9))
        return self.controller(env)


class TrackExit:
    """Follow the track for ``follow`` steps (sampled per episode), then drive off it to the playfield edge.

    After the following phase the policy heads outwards from the map centre (the track loops around
    it) with a random angular offset per episode, coasting while it turns (driving with held
    steering spins the car on grass) and driving forward ("D") once aligned: the car leaves the road,
    crosses the grass and reaches the black void beyond the playfield, where CarRacing-v3 terminates
    the episode with reward -100.
    """

    name = "track-exit"

    def __init__(self, rng: np.random.Generator, follow: tuple[int, int] = (10, 100)) -> None:
        self.rng = rng
        self.follower = TrackFollower(rng)
        self.follow = int(rng.integers(follow[0], follow[1] + 1))
        self.offset = float(rng.uniform(-0.6, 0.6))  # radians between the exit heading and the radial
        self._t = 0

    def params(self) -> dict[str, float]:
        """This episode's sampled parameters (stored in the episode's meta)."""
        return {**self.follower.params(), "follow": self.follow, "offset": self.offset}

    def __call__(self, env) -> int:  # noqa: ANN001 - CarRacing (unwrapped)
        self._t += 1
        if self._t <= self.follow:
            return self.follower(env)
        hull = env.car.hull
        pos = np.array(hull.position, dtype=np.float64)
        angle = math.atan2(pos[1], pos[0]) + self.offset
        err = heading_error(hull, np.array([math.cos(angle), math.sin(angle)]))  # > 0: exit is to the right
        if abs(err) < 0.25:
            return action_id(0, 0)
        return action_id(1 if err > 0 else -1, 2)


class TrackHold:
    """The track follower with long open-loop holds: the data where ignoring the road has consequences.

    Each episode alternates following phases with holds of one action for ``hold`` steps (sampled per
    hold). A following phase lasts until the car has been on the road (a wheel on a track tile) for
    ``follow`` steps, sampled per phase, or ``max_follow`` steps if it cannot get back; so every hold
    starts from the road. A hold draws "D" with probability ``p_straight`` and otherwise any of the
    nine actions uniformly; it ignores the road, so a hold that meets a curve leaves the road.
    """

    name = "track-hold"

    def __init__(
        self,
        rng: np.random.Generator,
        follow: tuple[int, int] = (5, 30),
        hold: tuple[int, int] = (8, 30),
        p_straight: float = 0.5,
        max_follow: int = 120,
    ) -> None:
        if not (follow[0] >= 1 and follow[1] >= follow[0] and hold[0] >= 1 and hold[1] >= hold[0]):
            raise ValueError(f"TrackHold: follow={follow}, hold={hold}; expected ranges (lo, hi) with 1 <= lo <= hi")
        if not 0.0 <= p_straight <= 1.0:
            raise ValueError(f"TrackHold: p_straight={p_straight}; expected a probability in [0, 1]")
        self.rng, self.follow, self.hold = rng, follow, hold
        self.p_straight, self.max_follow = p_straight, max_follow
        self.follower = TrackFollower(rng)
        self._action, self.holding = 0, False  # holding: this step's action is a hold's
        self._left, self._waited = self._draw(follow), 0  # on-road steps still to follow, steps followed
        self.holds: list[tuple[int, int]] = []  # (action, length) of every hold started so far

    def _draw(self, lo_hi: tuple[int, int]) -> int:
        return int(self.rng.integers(lo_hi[0], lo_hi[1] + 1))

    def params(self) -> dict[str, float]:
        """This episode's sampled parameters (stored in the episode's meta)."""
        return {**self.follower.params(), "p_straight": self.p_straight}

    def __call__(self, env) -> int:  # noqa: ANN001 - CarRacing (unwrapped)
        if self.holding:
            self._left -= 1
            if self._left <= 0:
                self.holding, self._left, self._waited = False, self._draw(self.follow), 0
            return self._action
        self._waited += 1
        on_road = any(len(w.tiles) > 0 for w in env.car.wheels)
        self._left -= int(on_road)  # count on-road steps only
        if self._left <= 0 or self._waited >= self.max_follow:
            straight = self.rng.random() < self.p_straight
            self._action = action_id(0, 0) if straight else int(self.rng.integers(9))
            self.holding, self._left = True, self._draw(self.hold)
            self.holds.append((self._action, self._left))
            self._left -= 1  # this step is the hold's first
            return self._action
        return self.follower.controller(env) if on_road else self.recover(env)

    def recover(self, env) -> int:  # noqa: ANN001 - CarRacing (unwrapped)
        """Off the road: head for the nearest track tile, slowly (the follower's far lookahead and
        speed target overshoot from the grass)."""
        hull = env.car.hull
        target = self.follower.tile_ahead(env, 1)
        err = heading_error(hull, target - np.array(hull.position, dtype=np.float64))  # > 0: road to the right
        steer = 0 if abs(err) < 0.15 else (1 if err > 0 else -1)
        speed = hull_speed(hull)
        throttle = 1 if speed > 30 else (0 if speed < 15 or abs(err) < 0.5 else 2)
        return action_id(steer, throttle)
