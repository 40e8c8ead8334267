"""``MatrixWorldEnv``: one stream of the learned world model as a ``gymnasium.Env``.

The helpers here (world loading, observation spaces, the per-episode draw from ``np_random``, the
pygame viewer) are shared with :mod:`matrix_env.vector`, so a vector env and N single envs make
exactly the same random choices.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from matrix_env import SHIPPED_WORLDS, WORLDS_DIR, world_path
from matrix_env.state import EnvState
from world_model.checkpoint import CheckpointError, WorldModel, load_world
from world_model.errors import UsageError
from world_model.simulator import RewardFn, Simulator, sampler_config
from world_model.swin_dpm import KEY_HIGH

ObsType = Literal["rgb", "latent"]
OBS_TYPES: tuple[str, ...] = ("rgb", "latent")
HD_SIZE = (720, 1280)  # default observation / render size (H, W)
DEFAULT_FPS = 15
RESET_OPTIONS = ("start_index", "context_frames")  # what reset(options=...) of the single env takes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------- shared helpers
def resolve_world(world: str | os.PathLike | WorldModel | None, device: torch.device | str) -> WorldModel:
    """Load a world model: None (the shipped default), a shipped world's name (``SHIPPED_WORLDS``), a
    checkpoint directory, or a loaded ``WorldModel`` (passed through).

    Raises:
        UsageError: ``device`` is not a torch device, or a CUDA device this torch cannot see
            (``load_world``'s check; a passed-through ``WorldModel`` meets it in ``Simulator``).
        CheckpointError: the directory is missing or the checkpoint does not load.
    """
    if isinstance(world, WorldModel):
        return world
    path = world_path(world)
    if not os.path.isdir(path):
        hint = (
            f"the shipped world {path.name!r} is not installed; train one (matrix-world train-dit ...) "
            "and save it there, or pass world=<checkpoint directory>"
            if world is None or path.parent == WORLDS_DIR
            else f"pass world= one of the shipped worlds {SHIPPED_WORLDS} or a checkpoint directory "
            "written by world_model.checkpoint.save_world"
        )
        raise CheckpointError(f"no world model at {os.fspath(path)!r}: {hint}")
    return load_world(path, device)


def parse_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu", num_envs: int = 1,
                backend: str = "torch") -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the torch dtype) -> torch dtype; 'auto': the faster one for
    ``num_envs`` streams on ``device`` (``world_model.device.fast_dtype``), float32 for the exported
    backends (they run float32 graphs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from world_model.device import check_device, fast_dtype

        return fast_dtype(check_device(device), num_envs) if backend == "torch" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {sorted(DTYPES) + ['auto']}, got {dtype!r}")
    return DTYPES[dtype]


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (int, numpy integer, or a 0-d integer array or
    tensor such as SB3's ``predict`` returns for one observation; not bool), else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d array or tensor: its Python scalar
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        return None
    return int(value)


def reject_unknown_options(options: dict[str, Any] | None, known: tuple[str, ...], env: str) -> None:
    """A clear error for reset options ``env`` does not take (a typo must not pass silently)."""
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise UsageError(f"unknown reset option(s) {unknown}; the {env} takes {list(known)}")


def check_obs(obs_type: str, obs_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """Validate the observation settings; returns the (H, W) of rgb observations (None for latents)."""
    if obs_type not in OBS_TYPES:
        raise UsageError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
    if obs_type == "latent":
        if obs_size is not None:
            raise UsageError("obs_size applies to obs_type='rgb' only; latent observations are (C, H, W)")
        return None
    if obs_size is None:
        return HD_SIZE
    if as_int(obs_size) is not None:
        size: tuple = (obs_size, obs_size)  # an int n: (n, n)
    else:
        size = tuple(obs_size) if isinstance(obs_size, list | tuple | np.ndarray) else (obs_size,)
    ints = len(size) == 2 and all(as_int(s) is not None for s in size)
    if not ints or not (0 < size[0] <= HD_SIZE[0] and 0 < size[1] <= HD_SIZE[1]):
        raise UsageError(
            f"obs_size must be (height, width) ints in [1, {HD_SIZE[0]}] x [1, {HD_SIZE[1]}] "
            f"(the 720p frame or smaller), got {obs_size!r}"
        )
    return int(size[0]), int(size[1])


def make_observation_space(sim: Simulator, obs_hw: tuple[int, int] | None) -> spaces.Box:
    """Box(0, 255, (H, W, 3), uint8) for rgb, Box(-inf, inf, (C, H, W), float32) for latents."""
    if obs_hw is None:
        return spaces.Box(-np.inf, np.inf, sim.latent_shape, np.float32)
    return spaces.Box(0, 255, (*obs_hw, 3), np.uint8)


def draw_episode(rng: np.random.Generator, num_starts: int) -> tuple[int, int]:
    """The random choices of one episode, drawn from the env's ``np_random``.

    Returns:
        ``(start_index, noise_key)``: which recorded start context, and the key of the episode's
        counter-based noise stream (all sampling noise of the episode derives from it).
    """
    start = int(rng.integers(num_starts))
    key = int(rng.integers(0, KEY_HIGH, dtype=np.int64))
    return start, key


def context_frames_option(options: dict[str, Any] | None, sim: Simulator, lead: tuple[int, ...]) -> np.ndarray | None:
    """``options["context_frames"]``, validated: uint8 RGB frames (*lead, T, H, W, 3), T >= the sampler's context.

    ``lead`` is () for the single env, (N,) for the vector env. (H, W) is the model's 72x128 or an
    integer multiple, e.g. a 720x1280 render (see ``Simulator.encode``). Returns the last T = context
    frames.
    """
    frames = (options or {}).get("context_frames")
    if frames is None:
        return None
    if options.get("start_index") is not None:
        raise UsageError("options 'start_index' and 'context_frames' exclude each other: give one start")
    try:
        arr = np.asarray(frames)
    except ValueError:  # a ragged list
        arr = np.zeros(0)
    n_ctx, (th, tw) = sim.cfg.context, sim.native_hw
    hw = arr.shape[-3:-1] if arr.ndim >= 3 else (0, 0)
    k = hw[0] // th
    ok = arr.dtype == np.uint8 and arr.ndim == len(lead) + 4 and arr.shape[: len(lead)] == lead
    if not ok or arr.shape[-1] != 3 or arr.shape[len(lead)] < n_ctx or k < 1 or hw != (k * th, k * tw):
        want = ", ".join([*map(str, lead), f"T>={n_ctx}", "H", "W", "3"])
        got = f"{arr.shape} {arr.dtype}" if arr.size else repr(frames)[:200]
        raise UsageError(
            f"options['context_frames'] must be uint8 RGB frames of shape ({want}), the newest last, with "
            f"(H, W) = k * {sim.native_hw} (72x128 training frames or a 720x1280 render), got {got}"
        )
    return arr[..., -n_ctx:, :, :, :]


def start_index_option(options: dict[str, Any] | None, num_starts: int) -> int | None:
    """``options["start_index"]`` (a recorded start context to begin from), validated."""
    reject_unknown_options(options, RESET_OPTIONS, "env")
    if not options or options.get("start_index") is None:
        return None
    idx = options["start_index"]
    if as_int(idx) is None or not 0 <= idx < num_starts:
        raise UsageError(f"options['start_index'] must be an int in [0, {num_starts}), got {idx!r}")
    return int(idx)


class PygameViewer:
    """A pygame window showing uint8 (H, W, 3) frames at a fixed rate (render_mode="human")."""

    open_viewers = 0  # viewers with a window in this process (pygame has one display, shared)

    def __init__(self, title: str, fps: int) -> None:
        self.title, self.fps = title, fps
        self.screen = None
        self.clock = None

    def show(self, frame: np.ndarray) -> None:
        """Draw one frame and keep the window responsive."""
        import pygame

        h, w = frame.shape[:2]
        # first frame, or the one display was closed (another env, CarRacing's own window) or reopened
        stale = self.screen is not None and (not pygame.display.get_init() or
                                             self.screen is not pygame.display.get_surface())
        if self.screen is None or stale:
            pygame.init()
            pygame.display.init()
            pygame.display.set_caption(self.title)
            screen = pygame.display.set_mode((w, h))
            if self.screen is None:  # counted once per viewer, after the window exists
                PygameViewer.open_viewers += 1
            self.screen, self.clock = screen, self.clock or pygame.time.Clock()
        pygame.event.pump()
        surface = pygame.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))  # (W, H, 3)
        self.screen.blit(surface, (0, 0))
        pygame.display.flip()
        self.clock.tick(self.fps)

    def close(self) -> None:
        """Close the window (pygame itself only when no other viewer still shows one)."""
        if self.screen is not None:
            import pygame

            self.screen = None
            PygameViewer.open_viewers -= 1
            if PygameViewer.open_viewers == 0:
                pygame.display.quit()
                pygame.quit()


# --------------------------------------------------------------------------------------- the env
class MatrixWorldEnv(gym.Env[np.ndarray, np.int64]):
    """A driving world dreamt by a learned video model (The Matrix / Swin-DPM DiT of CarRacing).

    ## Description
    Each step, a video diffusion transformer generates the next frame of a CarRacing-style drive,
    conditioned on the recent frames and on the chosen action's sentence ("The car is driving
    forward and turning left."). Frames are produced in a compact latent space by the Swin-DPM
    sliding-window sampler and decoded to pixels (720p by default, or any smaller size).

    ## Action Space
    ``Discrete(A)``; for the driving table A = 9: 0 D (drive), 1 DL, 2 DR, 3 B (brake), 4 BL,
    5 BR, 6 N (coast), 7 NL, 8 NR (L / R: steer left / right). ``get_action_meanings()`` and the
    ``info["action_meanings"]`` of ``reset`` give the names.

    ## Observation Space
    ``obs_type="rgb"``: ``Box(0, 255, (H, W, 3), uint8)``, (H, W) = ``obs_size`` (an int n is
    (n, n); default (720, 1280); sizes up to twice the model's native 72x128 per side, e.g. 84x84, skip the 720p
    decoder).
    ``obs_type="latent"``: ``Box(-inf, inf, (C, h, w), float32)``, the model's normalised latent.

    ## Rewards
    Predicted by the checkpoint's reward head from (previous frame, new frame, action), trained on
    CarRacing's rewards (-0.1 per frame, +1000/N per new track tile); on a terminated step, the
    game's reward for that ending stored with the world (``heads.cfg.terminal_reward``: -100, as
    CarRacing gives for leaving the playfield, in the shipped worlds); or, if given,
    ``reward_fn(latents_prev, latents, actions)``: (B, C, h, w), (B, C, h, w) latents and (B,) long
    actions on the device -> a (B,) tensor (B = 1 here, num_envs in the vector env).

    ## Starting State
    A real recorded context (a few encoded frames shipped with the checkpoint), chosen with the
    env's ``np_random``; ``reset(options={"start_index": i})`` picks one. The first observation is
    the newest recorded frame. ``reset(options={"context_frames": frames})`` starts from your own
    frames instead ((T, H, W, 3) uint8 RGB, T >= the sampler's context of 4, the newest last;
    72x128 or an integer multiple such as a 720x1280 render, reduced as the recorder reduces them
    and encoded by the world's VAE): e.g. the last frames an agent saw
    in the real game, to imagine onwards from there (``info["start_index"]`` is then -1).

    ## Episode End
    Terminated when the termination head's logit exceeds its ``term_threshold`` (0 in the shipped
    world), i.e. when the model sees the car cross the playfield edge into the void; with
    ``termination="hazard"`` (a world with a hazard head, ``matrix-world train-hazard``) also at
    random, at the per-step rate the hazard head predicts for the frames (a car crossing open
    grass away from the road reaches the edge, though no world draws it coming; the draws come
    from the stream's seeded random stream and leave the frames unchanged; a recurrent hazard head
    reads every frame since the reset, so after a reset, ``context_frames`` included, it starts
    knowing nothing of what came before);
    truncated after ``max_episode_steps`` (1000 when made with ``gym.make``;
    ``gym.make(..., max_episode_steps=-1)`` for no limit).

    ## Arguments
    ```python
    gym.make("MatrixWorld-v0", world=None, render_mode=None, obs_size=None, obs_type="rgb",
             sampler_mode=None, device="cpu", dtype="float32", reward_fn=None, compile_model=False,
             sampler=None, backend="torch", termination=None, obs_decoder=True)
    ```
    * ``world``: a shipped world's name, ``"default"`` (used when None), ``"hold"`` (the world for
      training agents that go to the real game; README) or ``"fast"`` (batched agents on a CPU: 4.0-4.4x
      the default's env steps/s, a coarser picture; README), a checkpoint directory, or a loaded
      :class:`~world_model.checkpoint.WorldModel`.
    * ``render_mode``: None, "rgb_array" (720p frames) or "human" (a pygame window).
    * ``obs_size`` / ``obs_type``: see Observation Space.
    * ``sampler_mode``: "pipelined", "reconditioned" or "immediate" (default: the checkpoint's).
    * ``sampler``: other Swin-DPM settings to change (``world_model.swin_dpm.SwinDPMConfig``
      fields), e.g. ``{"guidance": 2.0}`` (classifier-free guidance on the actions) or
      ``{"ctx_noise": 0.25}``.
    * ``device`` / ``dtype``: where and in which precision the networks run; ``dtype="auto"`` picks
      the faster of float32 and bfloat16 by this project's measurements: bfloat16 on a CPU with
      AVX512-BF16 or AMX and on a GPU of compute capability >= 8.0 from 64 envs on, float32
      elsewhere (and with an exported ``backend``); ``env.unwrapped.sim.dtype`` says which ran.
    * ``reward_fn``: replaces the reward head.
    * ``compile_model``: ``torch.compile`` the full-window DiT calls (a slow first step; see
      ``Simulator``). With ``dtype="bfloat16"`` it is the fastest torch setting on a CPU with
      AVX512-BF16 (README, "Env speed"). A torch.compile mode name instead of True, e.g.
      ``"reduce-overhead"``, replays the DiT call as a CUDA graph on a GPU (README, "On a GPU").
    * ``backend``: "torch", or run the full-window DiT calls as an exported ONNX graph with
      "onnxruntime" (CPU or CUDA, float32, equal to torch to ~1e-5; the export is cached on disk
      and the first use pays it) or "tensorrt" (CUDA). See ``world_model.export.onnx``.
    * ``termination``: "threshold" or "hazard" (see Episode End); None: the world's own setting.
    * ``obs_decoder``: agent-sized RGB observations (``obs_size`` up to twice 72x128 per side) come
      from the world's narrow observation decoder when it has one (``matrix-world
      train-obs-decoder``: a few times cheaper, trained to match the VAE's decode); False decodes
      them with the VAE, as in a world without one. 720p frames always come from the VAE.

    Same seed, same actions -> identical frames on the same machine and dtype (all sampling noise
    comes from a stream keyed by ``np_random``; float32, the default, is what this is tested in; in
    bfloat16 the streams part from float32's after a few steps, and ``dtype="auto"`` resolves per
    machine).

    ## Version History
    * v0: initial release.

    ## Example
    >>> import gymnasium as gym, matrix_env
    >>> env = gym.make("MatrixWorld-v0", obs_size=(84, 84))  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    >>> obs.shape  # doctest: +SKIP
    (84, 84, 3)
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": DEFAULT_FPS}

    def __init__(
        self,
        world: str | os.PathLike | WorldModel | None = None,
        render_mode: str | None = None,
        obs_size: int | tuple[int, int] | None = None,
        obs_type: ObsType = "rgb",
        sampler_mode: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        reward_fn: RewardFn | None = None,
        compile_model: bool | str = False,
        sampler: dict | None = None,
        backend: str = "torch",
        termination: str | None = None,
        obs_decoder: bool = True,
    ) -> None:
        """Load the world model and allocate one stream. See the class docstring for arguments."""
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UsageError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.render_mode = render_mode
        self.obs_type = obs_type
        self.obs_hw = check_obs(obs_type, obs_size)
        self.world = resolve_world(world, device)
        self.sim = Simulator(
            self.world,
            1,
            device,
            sampler_config(self.world, sampler_mode, sampler),
            parse_dtype(dtype, device, 1, backend),
            reward_fn,
            compile_model,
            backend=backend,
            termination=termination,
            obs_decoder=obs_decoder,
        )
        self.metadata = {**self.metadata, "render_fps": int(self.world.meta.get("fps", DEFAULT_FPS))}
        self.action_meanings = list(self.world.action_names)
        self.action_space = spaces.Discrete(self.world.num_actions)
        self.observation_space = make_observation_space(self.sim, self.obs_hw)
        self._all = torch.ones(1, dtype=torch.bool)
        self._latent: torch.Tensor | None = None  # (1, C, H, W) newest frame
        self._elapsed = 0  # steps of the current episode
        self._ended = False  # the last step terminated the episode
        self._obs: np.ndarray | None = None
        self._viewer: PygameViewer | None = None

    def get_action_meanings(self) -> list[str]:
        """Names of the actions, indexed by action id (e.g. "D", "DL", ...)."""
        return list(self.action_meanings)

    def _observe(self, latent: torch.Tensor) -> np.ndarray:
        if self.obs_hw is None:
            return latent[0].to("cpu", copy=True).numpy()  # (C, H, W) float32, not a view of the stream
        return self.sim.decode(latent, self.obs_hw)[0].cpu().numpy()  # (H, W, 3) uint8

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new episode from a recorded context chosen by ``np_random``.

        Args:
            seed: reseeds ``np_random`` (and so every later random choice).
            options: ``{"start_index": i}`` picks recorded start context i;
                ``{"context_frames": frames}`` starts from (T, H, W, 3) uint8 frames instead.

        Returns:
            ``(obs, info)``; info has ``start_index`` and ``action_meanings``.
        """
        chosen = start_index_option(options, self.sim.num_starts)  # before any state changes
        frames = context_frames_option(options, self.sim, ())  # (C_ctx, H, W, 3) or None
        seed_int = as_int(seed)  # numpy ints are ints (as in the vector env); gym.Env's check names others
        seed = seed if seed_int is None else seed_int
        super().reset(seed=seed)
        start, key = draw_episode(self.np_random, self.sim.num_starts)
        start = start if chosen is None else chosen
        context = None
        if frames is not None:  # the episode starts from the given frames, not a recorded start
            context, start = self.sim.encode(frames)[None], -1  # (1, C_ctx, C, h, w)
        self._latent = self.sim.reset(
            self._all,
            None if context is not None else torch.tensor([start], dtype=torch.long),
            noise_key=torch.tensor([key], dtype=torch.long),
            context=context,
        )
        self._obs = self._observe(self._latent)
        self._elapsed, self._ended = 0, False
        if self.render_mode == "human":
            self.render()
        return self._obs, {"start_index": start, "action_meanings": self.get_action_meanings()}

    def step(self, action: int | np.integer) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Generate the next frame under ``action``.

        Returns:
            ``(obs, reward, terminated, truncated, info)``; info has ``action_meaning``.
        """
        if self._latent is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        a = as_int(action)
        if a is None or not 0 <= a < self.action_space.n:
            raise UsageError(f"action must be an int in [0, {self.action_space.n}), got {action!r}")
        latent, reward, terminated = self.sim.step(torch.tensor([a], dtype=torch.long))
        self._latent = latent
        self._obs = self._observe(latent)
        if self.render_mode == "human":
            self.render()
        info = {"action_meaning": self.action_meanings[a]}
        reward_term = torch.stack([reward[0].float(), terminated[0].float()]).tolist()  # one small copy
        self._elapsed, self._ended = self._elapsed + 1, reward_term[1] > 0.5
        return self._obs, reward_term[0], self._ended, False, info

    def clone_state(self) -> EnvState:
        """A snapshot of this episode, to rewind it or to branch it in a vector env (``matrix_env.state``).

        Call it on ``env.unwrapped``: wrappers' counters (``gym.make``'s time limit) are not in it.
        """
        if self._latent is None:
            raise gym.error.ResetNeeded("call reset() before clone_state()")
        return EnvState(self.sim.get_state(), np.array([self._elapsed]), np.array([self._ended]))

    def restore_state(self, state: EnvState) -> np.ndarray:
        """Put a one-episode snapshot back (from this env, another of the same world and sampler, or
        ``state[i]`` of a vector env's); the next ``step`` continues it exactly. Returns the observation."""
        if not isinstance(state, EnvState):
            raise UsageError(f"restore_state needs an EnvState (from clone_state), got {type(state).__name__}")
        if len(state) != 1:
            raise UsageError(f"restore_state: this env runs one episode, the state holds {len(state)}; pass state[i]")
        self._latent = self.sim.set_state(state.stream)
        self._obs = self._observe(self._latent)
        self._elapsed, self._ended = int(state.elapsed[0]), bool(state.ended[0])
        if self.render_mode == "human":
            self.render()
        return self._obs

    def render(self) -> np.ndarray | None:
        """A 720p uint8 frame ("rgb_array"), or draw it in a window ("human")."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array' or 'human'")
            return None
        if self._latent is None:
            raise gym.error.ResetNeeded("call reset() before render()")
        if self.obs_hw == self.sim.hr_hw and self._obs is not None:
            frame = self._obs if self.render_mode == "human" else self._obs.copy()  # not the obs returned
        else:
            frame = self.sim.decode(self._latent, "720p")[0].cpu().numpy()  # (720, 1280, 3)
        if self.render_mode == "rgb_array":
            return frame
        if self._viewer is None:
            self._viewer = PygameViewer("MatrixWorld", self.metadata["render_fps"])
        self._viewer.show(frame)
        return None

    def close(self) -> None:
        """Close the window, if any (as Gymnasium's own envs, the env still resets and steps after it,
        reopening the window in "human" mode)."""
        if self._viewer is not None:
            self._viewer.close()
            self._viewer = None
