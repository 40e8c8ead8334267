"""Stable-Baselines3 ``VecEnv`` adapter over the batched :class:`MatrixWorldVectorEnv`.

SB3's own ``DummyVecEnv`` would step N single envs in a Python loop (N small forward passes);
this adapter keeps the one batched forward pass and only converts the API:

* Gymnasium's NEXT_STEP autoreset -> SB3's same-step autoreset: when a sub-env's episode ends,
  the adapter resets just those sub-envs at once (``reset(options={"reset_mask": done})``,
  a masked write) and returns their first observation, with the last one in
  ``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]``.
* observations stay ``(N, H, W, 3)`` uint8; SB3 wraps image envs in ``VecTransposeImage`` for
  ``CnnPolicy`` by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from matrix_env.vector import MatrixWorldVectorEnv


class MatrixWorldSB3VecEnv(VecEnv):
    """SB3 view of a :class:`MatrixWorldVectorEnv` (or of the kwargs to build one).

    Example::

        venv = MatrixWorldSB3VecEnv(MatrixWorldVectorEnv(num_envs=16, obs_size=(84, 84)))
        model = PPO("CnnPolicy", venv).learn(100_000)
    """

    def __init__(self, venv: MatrixWorldVectorEnv | None = None, **env_kwargs: Any) -> None:
        """Wrap ``venv``, or build ``MatrixWorldVectorEnv(**env_kwargs)``."""
        if venv is None:
            venv = MatrixWorldVectorEnv(**env_kwargs)
        elif env_kwargs:
            raise TypeError("pass either a venv or the kwargs to build one, not both")
        self.venv = venv
        self._actions: np.ndarray | None = None
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    def reset(self) -> VecEnvObs:
        """Reset every sub-env (with the seeds / options set by ``seed`` / ``set_options``)."""
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        options = self._options[0] if self._options[0] else None
        obs, info = self.venv.reset(seed=seeds, options=options)
        self.reset_infos = [{"start_index": int(s)} for s in info["start_index"]]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Store the actions; the batched step runs in :meth:`step_wait`."""
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """One batched step; ended sub-envs are reset in the same call (SB3 semantics)."""
        obs, reward, terminated, truncated, _ = self.venv.step(self._actions)
        done = terminated | truncated
        infos: list[dict[str, Any]] = [
            {"TimeLimit.truncated": bool(tr and not te)} for te, tr in zip(terminated, truncated, strict=True)
        ]
        if done.any():
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = obs[i].copy()
            obs, info = self.venv.reset(options={"reset_mask": done})
            for i in np.flatnonzero(done):
                self.reset_infos[i] = {"start_index": int(info["start_index"][i])}
        return obs, reward.astype(np.float32), done, infos

    def close(self) -> None:
        """Close the underlying env."""
        self.venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """720p frames of every sub-env (needs ``render_mode="rgb_array"``)."""
        frames = self.venv.render()
        return [None] * self.num_envs if frames is None else list(frames)

    # The sub-envs share one simulator: attributes are the vector env's, the same for every index.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The vector env's attribute, once per requested index."""
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the vector env (shared by all sub-envs)."""
        setattr(self.venv, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of the vector env once, returning its result for each requested index."""
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Sub-envs are streams of one vector env, never wrapped."""
        return [False for _ in self._get_indices(indices)]
