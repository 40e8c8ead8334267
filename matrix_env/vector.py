"""``MatrixWorldVectorEnv``: N world-model streams stepped by ONE batched forward pass.

Gymnasium 1.x ``NEXT_STEP`` autoreset: the step after an episode ends resets that sub-env
(returning its first observation, reward 0, not done, and its ``start_index`` in ``info``); the
other sub-envs step as usual. The batched forward still runs over every stream (no Python loop,
no gather); the finished streams' outputs are then overwritten by their reset, a masked tensor
write in the simulator.

Seeding: every sub-env i has its own ``np_random`` (seeded with ``seed + i``, as
``SyncVectorEnv`` seeds its sub-envs) from which it draws exactly what a single
:class:`~matrix_env.env.MatrixWorldEnv` draws per episode: the start context and the key of the
episode's noise stream (:func:`~matrix_env.env.draw_episode`). The sampler's noise is
counter-based per stream, so ``make_vec(..., num_envs=N)`` reset with seed s produces the frames of
N single envs reset with seeds s, s+1, ..., s+N-1 (up to float rounding of batched vs. unbatched
matmuls). The only per-env Python work is that draw, on the host, for the sub-envs that reset
(two integers each); the step itself has no loop over envs.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from matrix_env import MAX_EPISODE_STEPS
from matrix_env.env import (
    DEFAULT_FPS,
    ObsType,
    PygameViewer,
    as_int,
    check_obs,
    context_frames_option,
    draw_episode,
    make_observation_space,
    parse_dtype,
    reject_unknown_options,
    resolve_world,
)
from matrix_env.state import EnvState
from world_model.checkpoint import WorldModel
from world_model.errors import UsageError
from world_model.simulator import RewardFn, Simulator, sampler_config

RESET_OPTIONS = ("reset_mask", "start_index", "context_frames")
SETTABLE = ("render_mode", "max_episode_steps")  # what set_attr may change on a running vector env


def is_id_vector(values: np.ndarray, n: int, high: int) -> bool:
    """Whether ``values`` is an (n,) integer array of ids in [0, high)."""
    return (
        values.shape == (n,)
        and np.issubdtype(values.dtype, np.integer)
        and bool(((values >= 0) & (values < high)).all())
    )


class MatrixWorldVectorEnv(VectorEnv):
    """N independent MatrixWorld episodes in one batched simulator (see the module docstring).

    Arguments are those of :class:`~matrix_env.env.MatrixWorldEnv` plus ``num_envs`` and
    ``max_episode_steps`` (truncation after that many steps, 1000 as registered, as CarRacing-v3;
    -1: no time limit, episodes end only when the termination head fires; None: the registered 1000,
    both as in ``gym.make``). ``get_attr`` / ``set_attr`` / ``call`` are the subset of ``SyncVectorEnv``'s that fits
    one shared simulator (see their docstrings).

    Example::

        envs = gym.make_vec("MatrixWorld-v0", num_envs=16, obs_size=(84, 84))
        obs, info = envs.reset(seed=0)                        # (16, 84, 84, 3)
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())

    ``reset(options={"reset_mask": mask})`` resets only the masked sub-envs (Gymnasium 1.1+);
    ``options={"start_index": i}`` (an int, or one per sub-env) picks the recorded start contexts.
    """

    metadata = {
        "render_modes": ["human", "rgb_array"],
        "render_fps": DEFAULT_FPS,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        num_envs: int = 1,
        world: str | os.PathLike | WorldModel | None = None,
        render_mode: str | None = None,
        obs_size: int | tuple[int, int] | None = None,
        obs_type: ObsType = "rgb",
        sampler_mode: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        reward_fn: RewardFn | None = None,
        max_episode_steps: int | None = MAX_EPISODE_STEPS,
        compile_model: bool | str = False,
        sampler: dict | None = None,
        backend: str = "torch",
        termination: str | None = None,
        obs_decoder: bool = True,
    ) -> None:
        """Load the world model and allocate ``num_envs`` streams."""
        if not (as_int(num_envs) or 0) >= 1:
            raise UsageError(f"num_envs must be an int >= 1, got {num_envs!r}")
        num_envs = int(num_envs)
        self.num_envs = num_envs
        self.render_mode = self._check_render_mode(render_mode)
        self.max_episode_steps = self._check_max_episode_steps(max_episode_steps)
        self.obs_type = obs_type
        self.obs_hw = check_obs(obs_type, obs_size)
        self.world = resolve_world(world, device)
        self.sim = Simulator(
            self.world,
            num_envs,
            device,
            sampler_config(self.world, sampler_mode, sampler),
            parse_dtype(dtype, device, num_envs, backend),
            reward_fn,
            compile_model,
            backend=backend,
            termination=termination,
            obs_decoder=obs_decoder,
        )
        self.metadata = {**self.metadata, "render_fps": int(self.world.meta.get("fps", DEFAULT_FPS))}
        self.action_meanings = list(self.world.action_names)
        self._meanings = np.array(self.action_meanings, dtype=object)  # (A,) for step()'s info
        self.single_action_space = spaces.Discrete(self.world.num_actions)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.single_observation_space = make_observation_space(self.sim, self.obs_hw)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

        self._rngs: list[np.random.Generator | None] = [None] * num_envs  # per sub-env np_random
        self._rng_seeds: list[int | None] = [None] * num_envs  # ... and the seed it was made from
        self._prev_done = np.zeros(num_envs, dtype=np.bool_)
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._obs: np.ndarray | None = None  # last observations (filled by reset)
        self._viewer: PygameViewer | None = None

    def get_action_meanings(self) -> list[str]:
        """Names of the actions, indexed by action id."""
        return list(self.action_meanings)

    def _check_render_mode(self, render_mode: str | None) -> str | None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UsageError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        return render_mode

    @staticmethod
    def _check_max_episode_steps(value: int | None) -> int | None:
        if value is None:  # as gym.make: None is the registered limit, -1 turns it off
            return MAX_EPISODE_STEPS
        if as_int(value) == -1:
            return None
        if not (as_int(value) or 0) >= 1:
            raise UsageError(
                f"max_episode_steps must be an int >= 1, -1 for no limit or None for the registered "
                f"{MAX_EPISODE_STEPS}, got {value!r}"
            )
        return int(value)

    # A subset of SyncVectorEnv's get_attr / set_attr / call. The sub-envs share one simulator, so an
    # attribute is the vector env's, the same for every sub-env, except the spaces (the single
    # env's) and ``np_random`` / ``np_random_seed`` (each sub-env's own).
    def get_attr(self, name: str) -> tuple[Any, ...]:
        """A sub-env attribute, once per sub-env."""
        if name == "np_random":
            return self.np_randoms
        if name == "np_random_seed":
            self._make_missing_rngs()  # as gym.Env.np_random_seed, which creates its generator
            return tuple(self._rng_seeds)
        if name in ("action_space", "observation_space"):
            name = f"single_{name}"
        return (getattr(self, name),) * self.num_envs

    def set_attr(self, name: str, values: Any) -> None:
        """Set ``render_mode`` or ``max_episode_steps`` (shared by all sub-envs: one value, or a list
        of equal ones), or ``np_random`` (a list of one generator per sub-env)."""
        n = self.num_envs
        if name == "np_random":
            if not (isinstance(values, list | tuple) and len(values) == n
                    and all(isinstance(g, np.random.Generator) for g in values)):
                raise UsageError(f"set_attr('np_random'): values must be {n} numpy Generators, got {values!r}")
            self._rngs, self._rng_seeds = list(values), [-1] * n  # -1: unknown seed, as gym.Env
            return
        if name not in SETTABLE:
            raise UsageError(
                f"set_attr({name!r}): only {list(SETTABLE)} and 'np_random' can be set on the running vector "
                "env; build a new one for other settings"
            )
        if isinstance(values, list | tuple):
            if len(values) != n or not all(np.array_equal(v, values[0]) for v in values):
                raise UsageError(
                    f"set_attr({name!r}): the sub-envs share one simulator, so values must be one value or "
                    f"{n} equal ones, got {values!r}"
                )
            values = values[0]
        check = self._check_render_mode if name == "render_mode" else self._check_max_episode_steps
        setattr(self, name, check(values))

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call a method of the vector env (shared by all sub-envs) once, returning its result once
        per sub-env; a name that is not a method is read as ``get_attr`` reads it."""
        if name in ("reset", "step", "close", "render"):
            raise UsageError(f"call({name!r}): use the vector env's own {name}()")
        attr = getattr(self, name)
        if not callable(attr):
            return self.get_attr(name)
        return (attr(*args, **kwargs),) * self.num_envs

    @property
    def np_randoms(self) -> tuple[np.random.Generator, ...]:
        """Each sub-env's ``np_random``; like ``gym.Env.np_random``, one not yet seeded by a reset
        is created (from OS entropy) on first access."""
        self._make_missing_rngs()
        return tuple(self._rngs)  # type: ignore[arg-type]

    def _make_missing_rngs(self) -> None:
        for i, rng in enumerate(self._rngs):
            if rng is None:
                self._rngs[i], self._rng_seeds[i] = seeding.np_random()

    # ------------------------------------------------------------------------------ helpers
    def _observe(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) latents -> observations, one batched decode and one host copy."""
        if self.obs_hw is None:
            return latents.to("cpu", copy=True).numpy()  # (B, C, H, W) float32, not a view of the streams
        return self.sim.decode(latents, self.obs_hw).cpu().numpy()  # (B, H, W, 3) uint8

    def _check_open(self, what: str) -> None:
        if self.closed:  # set by VectorEnv.close()
            raise gym.error.ClosedEnvironmentError(  # as AsyncVectorEnv
                f"{what}() on a closed MatrixWorldVectorEnv; make a new one")

    def _meanings_info(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The single env's reset info ``action_meanings`` in vector form (as SyncVectorEnv): the
        list of names for the sub-envs in ``mask``, None elsewhere."""
        meanings = np.full(self.num_envs, None, dtype=object)
        for i in np.flatnonzero(mask):  # host only, on resets
            meanings[i] = list(self.action_meanings)
        return {"action_meanings": meanings, "_action_meanings": mask.copy()}

    def _seeds(self, seed: Any) -> list[int | None]:
        """Per-sub-env seeds of ``reset(seed=...)``: s -> s, s+1, ...; a list as given; None -> None."""
        n = self.num_envs
        if seed is None or as_int(seed) is not None:
            return [None if seed is None else int(seed) + i for i in range(n)]
        if not isinstance(seed, list | tuple | np.ndarray) or len(seed) != n:
            raise UsageError(f"seed must be an int, None or a list of num_envs={n} ints/None, got {seed!r}")
        seeds = [None if s is None else as_int(s) for s in seed]
        bad = [(i, s) for i, (s, parsed) in enumerate(zip(seed, seeds, strict=True))
               if s is not None and (parsed is None or parsed < 0)]
        if bad:
            raise UsageError(
                f"each per-env seed must be an int >= 0 or None, got {bad[0][1]!r} for sub-env {bad[0][0]} "
                f"in {list(seed)!r}"
            )
        return seeds

    def _reset_options(self, options: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(reset_mask, start_index or None)`` of ``reset(options=...)``, validated."""
        n, options = self.num_envs, options or {}
        reject_unknown_options(options, RESET_OPTIONS, "vector env")
        mask = options.get("reset_mask")
        if mask is None:
            mask = np.ones(n, dtype=np.bool_)
        elif not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == (n,)):
            got = type(mask).__name__
            if isinstance(mask, np.ndarray):
                got += f" of dtype {mask.dtype}, shape {mask.shape}"
            raise UsageError(f"options['reset_mask'] must be a bool numpy array of shape ({n},), got {got}")
        mask = np.ascontiguousarray(mask)  # torch.from_numpy refuses negative strides (mask[::-1])
        chosen = options.get("start_index")
        if chosen is None:
            return mask, None
        chosen = np.asarray(chosen)
        if chosen.ndim == 0:
            chosen = np.full(n, chosen)
        num_starts = self.sim.num_starts
        if not is_id_vector(chosen, n, num_starts):
            raise UsageError(
                f"options['start_index'] must be an int or {n} ints in [0, {num_starts}), "
                f"got {options['start_index']!r}"
            )
        return mask, chosen.astype(np.int64)

    def _draw(self, mask: np.ndarray, seeds: list[int | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-episode draws of the masked sub-envs from their own ``np_random`` (host only)."""
        start = np.zeros(self.num_envs, dtype=np.int64)
        key = np.zeros(self.num_envs, dtype=np.int64)
        for i in np.flatnonzero(mask):  # only the sub-envs that reset: two integers each
            seed = None if seeds is None else seeds[i]
            if seed is not None or self._rngs[i] is None:
                self._rngs[i], self._rng_seeds[i] = seeding.np_random(seed)
            start[i], key[i] = draw_episode(self._rngs[i], self.sim.num_starts)
        return start, key

    def _restart(
        self, mask: np.ndarray, start: np.ndarray, key: np.ndarray, frames: np.ndarray | None = None
    ) -> torch.Tensor:
        """Masked restart of the streams (from recorded starts, or from ``frames`` (N, C_ctx, H, W, 3)
        where given); returns (B, C, H, W) newest frames of all streams."""
        context = None
        if frames is not None:
            idx = np.flatnonzero(mask)  # encode only the restarted sub-envs' frames
            z = self.sim.encode(frames[idx].reshape(-1, *frames.shape[2:]))  # (R * C_ctx, C, h, w)
            context = torch.zeros(self.num_envs, frames.shape[1], *self.sim.latent_shape, device=z.device)
            context[torch.from_numpy(idx).to(z.device)] = z.reshape(len(idx), frames.shape[1], *z.shape[1:])
        return self.sim.reset(
            torch.from_numpy(mask),
            None if context is not None else torch.from_numpy(start),
            noise_key=torch.from_numpy(key),
            context=context,
        )

    # --------------------------------------------------------------------------------- API
    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset all sub-envs, or those in ``options["reset_mask"]``.

        Args:
            seed: int s (sub-env i gets s + i), a list of per-env seeds, or None (continue each
                sub-env's ``np_random``).
            options: ``{"reset_mask": (N,) bool array}`` for a partial reset;
                ``{"start_index": i}`` (int or (N,) ints) to begin from given recorded start
                contexts instead of drawn ones (the draw still happens, as in the single env);
                ``{"context_frames": frames}`` ((N, T, H, W, 3) uint8; rows outside the reset mask
                are ignored) to begin from given frames, as in the single env (start_index -1).

        Returns:
            ``(obs, info)``; info has ``start_index`` and ``action_meanings``, each with its ``_`` mask.
        """
        self._check_open("reset")
        seeds = self._seeds(seed)
        super().reset(seed=None if as_int(seed) is None else int(seed))
        mask, chosen = self._reset_options(options)
        frames = context_frames_option(options, self.sim, (self.num_envs,))  # (N, C_ctx, H, W, 3) or None
        if not mask.any():
            raise UsageError(f"options['reset_mask'] selects no sub-env (all False: {mask.tolist()})")
        partial = not mask.all()
        if partial and self._obs is None:
            raise UsageError("the first reset must reset every sub-env (no reset_mask)")

        start, key = self._draw(mask, seeds)
        if chosen is not None:
            start = np.where(mask, chosen, start)
        if frames is not None:
            start = np.where(mask, -1, start)  # -1: started from given frames
        latents = self._restart(mask, start, key, frames)
        if partial:  # decode only the restarted sub-envs
            idx = np.flatnonzero(mask)
            obs = self._obs.copy()
            obs[idx] = self._observe(latents[torch.from_numpy(idx)])
        else:
            obs = self._observe(latents)
        self._obs = obs
        self._prev_done[mask] = False
        self._steps[mask] = 0
        if self.render_mode == "human" and mask[0]:  # the window shows sub-env 0
            self.render()
        return obs, {"start_index": np.where(mask, start, 0), "_start_index": mask.copy(), **self._meanings_info(mask)}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every sub-env; sub-envs whose episode ended last step are reset instead.

        Args:
            actions: (N,) int action ids.

        Returns:
            ``(obs, reward, terminated, truncated, info)`` with batched arrays; info has
            ``action_meaning`` (the single env's, None for sub-envs reset this step) and, on an
            autoreset step, ``start_index`` and ``action_meanings``, each with its ``_`` mask.
        """
        self._check_open("step")
        if self._obs is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        actions = np.asarray(actions)
        n, num_actions = self.num_envs, self.single_action_space.n
        if not is_id_vector(actions, n, num_actions):
            raise UsageError(
                f"actions must be an int array of shape ({n},) with values in [0, {num_actions}), got "
                f"shape {actions.shape}, dtype {actions.dtype}: {np.array2string(actions, threshold=16)}"
            )
        latents, reward, terminated = self.sim.step(torch.as_tensor(np.ascontiguousarray(actions), dtype=torch.long))
        done = self._prev_done  # host array: known without a device sync
        stepped = ~done  # the sub-envs that took their action (the others reset this step)
        info: dict[str, Any] = {}  # the single env's info in Gymnasium's vector form (as SyncVectorEnv)
        if stepped.any():
            info = {"action_meaning": np.where(stepped, self._meanings[actions], None), "_action_meaning": stepped}
        if done.any():
            start, key = self._draw(done)
            info |= {"start_index": np.where(done, start, 0), "_start_index": done.copy(), **self._meanings_info(done)}
            latents = self._restart(done, start, key)
            done_t = torch.from_numpy(done).to(reward.device)
            reward = torch.where(done_t, torch.zeros_like(reward), reward)
            terminated = terminated & ~done_t
        obs = self._observe(latents)
        reward_term = torch.stack([reward.float(), terminated.float()]).cpu().numpy()  # (2, N): one small copy
        reward_np, terminated_np = reward_term[0].astype(np.float64), reward_term[1] > 0.5

        self._steps = np.where(done, 0, self._steps + 1)
        if self.max_episode_steps is None:
            truncated = np.zeros(self.num_envs, dtype=np.bool_)
        else:
            truncated = (self._steps >= self.max_episode_steps) & ~done
        self._prev_done = terminated_np | truncated
        self._obs = obs
        if self.render_mode == "human":
            self.render()
        return obs, reward_np, terminated_np, truncated, info

    # ----------------------------------------------------------------------------- snapshots
    def _env_indices(self, indices: Any, what: str) -> np.ndarray:
        """(R,) int64 distinct sub-env indices (None: all), validated."""
        n = self.num_envs
        if indices is None:
            return np.arange(n)
        idx = np.atleast_1d(np.asarray(indices))
        if not (idx.ndim == 1 and len(idx) >= 1 and np.issubdtype(idx.dtype, np.integer)
                and ((idx >= 0) & (idx < n)).all() and len(np.unique(idx)) == len(idx)):
            raise UsageError(f"{what}: indices must be distinct sub-env indices in [0, {n}), got {indices!r}")
        return idx.astype(np.int64)

    def clone_state(self, indices: Any = None) -> EnvState:
        """A snapshot of the episodes of all sub-envs, or of ``indices`` (see ``matrix_env.state``)."""
        if self._obs is None:
            raise gym.error.ResetNeeded("call reset() before clone_state()")
        idx = self._env_indices(indices, "clone_state")
        stream = self.sim.get_state(torch.from_numpy(idx))
        return EnvState(stream, self._steps[idx].copy(), self._prev_done[idx].copy())

    def restore_state(self, state: EnvState, indices: Any = None) -> np.ndarray:
        """Put the episodes of ``state`` back into all sub-envs, or into ``indices``.

        ``state`` has one episode per restored sub-env, or one for them all (each then replays it:
        their futures differ only through their actions, as they share its noise). The other
        sub-envs are untouched. A state cloned from a single ``MatrixWorldEnv`` or another vector env
        of the same world and sampler restores here too.

        Returns:
            The observations of all sub-envs, as ``reset`` returns them.
        """
        if not isinstance(state, EnvState):
            raise UsageError(f"restore_state needs an EnvState (from clone_state), got {type(state).__name__}")
        idx = self._env_indices(indices, "restore_state")
        if len(state) not in (1, len(idx)):
            raise UsageError(
                f"restore_state: a state of {len(state)} episodes cannot fill {len(idx)} sub-envs "
                f"(it needs 1 or {len(idx)})"
            )
        if self._obs is None and len(idx) < self.num_envs:
            raise gym.error.ResetNeeded("call reset() before restoring only some sub-envs")
        latents = self.sim.set_state(state.stream, torch.from_numpy(idx))
        obs = self._observe(latents[torch.from_numpy(idx)])
        if self._obs is None:  # a full restore of a never-reset env (idx may be in any order)
            self._obs = np.empty((self.num_envs, *obs.shape[1:]), dtype=obs.dtype)
        else:
            self._obs = self._obs.copy()
        self._obs[idx] = obs
        self._steps[idx] = state.elapsed
        self._prev_done[idx] = state.ended
        if self.render_mode == "human" and 0 in idx:  # the window shows sub-env 0
            self.render()
        return self._obs

    def render(self) -> tuple[np.ndarray, ...] | None:
        """720p frames of every sub-env ("rgb_array"), or sub-env 0 in a window ("human")."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array' or 'human'")
            return None
        self._check_open("render")
        if self._obs is None:
            raise gym.error.ResetNeeded("call reset() before render()")
        if self.render_mode == "human":
            if self._viewer is None:
                self._viewer = PygameViewer("MatrixWorld (env 0)", self.metadata["render_fps"])
            self._viewer.show(self._frames_720p(self.sim.latest[:1], copy=False)[0])
            return None
        return tuple(self._frames_720p(self.sim.latest))

    def _frames_720p(self, latents: torch.Tensor, copy: bool = True) -> np.ndarray:
        if self.obs_hw == self.sim.hr_hw:  # the observations: a copy unless only drawn
            return self._obs[: latents.shape[0]].copy() if copy else self._obs[: latents.shape[0]]
        return self.sim.decode(latents, "720p").cpu().numpy()  # (B, 720, 1280, 3)

    def close_extras(self, **kwargs: Any) -> None:
        """Close the window, if any."""
        if self._viewer is not None:
            self._viewer.close()
            self._viewer = None
