"""Stable-Baselines3 ``VecEnv`` adapter over the batched :class:`MatrixWorldVectorEnv`.

SB3's own ``DummyVecEnv`` would step N single envs in a Python loop (N small forward passes);
this adapter keeps the one batched forward pass and only converts the API:

* Gymnasium's NEXT_STEP autoreset -> SB3's same-step autoreset: when a sub-env's episode ends,
  the adapter resets just those sub-envs at once (``reset(options={"reset_mask": done})``,
  a masked write) and returns their first observation, with the last one in
  ``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]``.
* episode statistics as SB3's ``Monitor`` records them: ``infos[i]["episode"] = {"r": return,
  "l": length, "t": seconds since the adapter was built}`` when sub-env i's episode ends, so
  ``PPO`` logs ``rollout/ep_rew_mean`` and ``evaluate_policy`` counts whole episodes without a
  ``VecMonitor`` (``env_is_wrapped(Monitor)`` is True for that reason; a ``VecMonitor`` on top
  overwrites the same figures).
* observations stay ``(N, H, W, 3)`` uint8; SB3 wraps image envs in ``VecTransposeImage`` for
  ``CnnPolicy`` by itself.
* the sub-envs are streams of one simulator, not objects: ``get_attr`` gives the single-env spaces
  and each sub-env's ``np_random``; ``env_method("reset", indices=...)`` is a masked reset;
  anything else that would touch only some sub-envs is an error rather than a silent change to all.
  Snapshots (``clone_state`` / ``restore_state``) and ``context_frames`` starts are the native
  vector env's (``adapter.venv``): through the adapter they are an error, since its episode
  bookkeeping could not follow them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from matrix_env.vector import MatrixWorldVectorEnv
from world_model.errors import UsageError

# vector-env methods that only read shared state: callable for any subset of sub-envs
SHARED_METHODS = ("get_action_meanings",)
# vector-env features the adapter's episode bookkeeping (returns, lengths, same-step autoreset) cannot
# follow: use the native vector env (``adapter.venv``) for them
NATIVE_ONLY = ("clone_state", "restore_state")


def native_only(what: str) -> None:
    """The error for a vector-env feature the adapter does not pass through."""
    raise UsageError(
        f"{what} is not supported through the SB3 adapter (its episode returns, lengths and same-step "
        "autoreset would not follow); use the native vector env, adapter.venv"
    )


def unbatch_info(info: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's vector info (``key`` arrays with ``_key`` masks) -> SB3's one dict per sub-env,
    each holding the keys its mask marks (numpy scalars as Python ones)."""
    infos: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, values in info.items():
        mask = info.get(f"_{key}")
        if key.startswith("_") or mask is None:
            continue
        for i in np.flatnonzero(mask):  # host dicts: SB3's per-env info format needs this loop
            value = values[i]
            infos[i][key] = value.item() if isinstance(value, np.generic) else value
    return infos


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
        self._ep_return = np.zeros(venv.num_envs, dtype=np.float64)  # (N,) running episode returns
        self._ep_length = np.zeros(venv.num_envs, dtype=np.int64)  # (N,) running episode lengths
        self._t_start = time.time()
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self.metadata["render_fps"] = venv.metadata["render_fps"]  # VecVideoRecorder's frame rate

    def reset(self) -> VecEnvObs:
        """Reset every sub-env (with the seeds / options set by ``seed`` / ``set_options``)."""
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        obs, info = self.venv.reset(seed=seeds, options=self._merged_options())
        self.reset_infos = unbatch_info(info, self.num_envs)  # start_index, action_meanings per env
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._reset_seeds()
        self._reset_options()
        return obs

    def _merged_options(self) -> dict[str, Any] | None:
        """The per-env dicts of ``set_options`` as one vector-env ``options`` (start_index per env)."""
        if not any(self._options):
            return None
        keys = set().union(*self._options)
        if "context_frames" in keys:
            native_only("set_options({'context_frames': ...})")
        if "reset_mask" in keys:
            raise UsageError("set_options: reset_mask is not an option of reset() (it resets every sub-env); "
                             "use env_method('reset', indices=...) for some")
        merged: dict[str, Any] = {}
        for key in sorted(keys):
            values = [opts.get(key) for opts in self._options]
            if key == "start_index" and any(v is not None for v in values):
                if any(v is None for v in values):
                    raise UsageError(f"set_options: give start_index for every sub-env or none, got {values}")
                merged[key] = np.asarray(values)
            elif all(v is values[0] or np.array_equal(v, values[0]) for v in values):
                merged[key] = values[0]
            else:
                raise UsageError(f"set_options: option {key!r} must be the same for every sub-env, got {values}")
        return merged

    def _require_all(self, indices: VecEnvIndices, what: str) -> None:
        """An error if ``indices`` is a subset of the sub-envs: ``what`` changes the shared simulator."""
        if sorted(self._get_indices(indices)) != list(range(self.num_envs)):
            raise UsageError(
                f"{what} for indices={indices!r}: the sub-envs are streams of one simulator and share its "
                f"attributes; call it for all of them (indices=None)"
            )

    def step_async(self, actions: np.ndarray) -> None:
        """Store the actions; the batched step runs in :meth:`step_wait`."""
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """One batched step; ended sub-envs are reset in the same call (SB3 semantics)."""
        obs, reward, terminated, truncated, info = self.venv.step(self._actions)
        done = terminated | truncated
        infos = unbatch_info(info, self.num_envs)  # action_meaning, as DummyVecEnv over single envs
        for i, (te, tr) in enumerate(zip(terminated, truncated, strict=True)):
            infos[i]["TimeLimit.truncated"] = bool(tr and not te)
        self._ep_return += reward
        self._ep_length += 1
        if done.any():
            t = round(time.time() - self._t_start, 6)
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = obs[i].copy()
                infos[i]["episode"] = {"r": round(float(self._ep_return[i]), 6), "l": int(self._ep_length[i]), "t": t}
            self._ep_return[done] = 0.0
            self._ep_length[done] = 0
            obs, info = self.venv.reset(options={"reset_mask": done})
            reset_infos = unbatch_info(info, self.num_envs)
            for i in np.flatnonzero(done):
                self.reset_infos[i] = reset_infos[i]
        return obs, reward.astype(np.float32), done, infos

    def close(self) -> None:
        """Close the underlying env."""
        self.venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """720p frames of every sub-env (needs ``render_mode="rgb_array"``)."""
        frames = self.venv.render()
        return [None] * self.num_envs if frames is None else list(frames)

    # The sub-envs share one simulator: attributes are the vector env's (its get_attr), the same
    # for every index, except the spaces (the single env's) and ``np_random`` (each sub-env's own).
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """A sub-env's attribute, once per requested index."""
        values = self.venv.get_attr(attr_name)
        return [values[i] for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the vector env (its ``set_attr``), shared by all sub-envs (so ``indices``
        must be all)."""
        self._require_all(indices, f"set_attr({attr_name!r})")
        self.venv.set_attr(attr_name, value)
        if attr_name == "render_mode":  # SB3's VecEnv keeps its own copy (VecVideoRecorder reads it)
            self.render_mode = self.venv.render_mode

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a sub-env method: ``reset`` resets just ``indices`` (a masked reset, returning
        ``(obs, info)`` per index); ``get_action_meanings`` for any indices; others for all."""
        idx = list(self._get_indices(indices))
        if method_name in NATIVE_ONLY:
            native_only(f"env_method({method_name!r})")
        if method_name == "reset" and "context_frames" in (method_kwargs.get("options") or {}):
            native_only("env_method('reset', options={'context_frames': ...})")
        if method_name == "reset":
            if method_args or set(method_kwargs) - {"seed", "options"}:
                raise UsageError(
                    f"env_method('reset') takes seed= and options= only, got {method_args}, {method_kwargs}"
                )
            mask = np.zeros(self.num_envs, dtype=np.bool_)
            mask[idx] = True
            seed = method_kwargs.get("seed")  # as DummyVecEnv: each reset sub-env gets this seed
            seeds = None if seed is None else [seed if mask[i] else None for i in range(self.num_envs)]
            options = {**(method_kwargs.get("options") or {}), "reset_mask": mask}
            obs, info = self.venv.reset(seed=seeds, options=options)
            self._ep_return[mask] = 0.0
            self._ep_length[mask] = 0
            reset_infos = unbatch_info(info, self.num_envs)
            for i in idx:
                self.reset_infos[i] = reset_infos[i]
            return [(obs[i], dict(self.reset_infos[i])) for i in idx]
        if method_name not in SHARED_METHODS:
            self._require_all(indices, f"env_method({method_name!r})")
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in idx]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Sub-envs are streams of one vector env, never wrapped; the adapter records ``Monitor``'s
        episode statistics itself, so it answers True for ``Monitor`` (what SB3 asks before it
        trusts ``infos[i]["episode"]``)."""
        wrapped = isinstance(wrapper_class, type) and issubclass(Monitor, wrapper_class)
        return [wrapped for _ in self._get_indices(indices)]
