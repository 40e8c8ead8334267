"""The real CarRacing-v3 seen through MatrixWorld's action table and observation pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from agents.real_env import RealCarRacingEnv


def test_real_env_observations_actions_and_determinism() -> None:
    env = RealCarRacingEnv(obs_size=(84, 84), render_mode="rgb_array")
    obs, _ = env.reset(seed=3)
    assert obs.shape == (84, 84, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert env.get_action_meanings()[:3] == ["D", "DL", "DR"]
    rollout = [env.step(a)[0] for a in (0, 0, 1, 2)]
    assert env.render().shape == (720, 1280, 3)
    obs2, _ = env.reset(seed=3)
    assert np.array_equal(obs, obs2)
    assert all(np.array_equal(o, env.step(a)[0]) for o, a in zip(rollout, (0, 0, 1, 2), strict=True))
    with pytest.raises(ValueError, match="driving action"):
        env.step(9)
    env.close()
