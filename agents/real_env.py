"""The real CarRacing-v3 seen the way MatrixWorld shows it: where imagined agents are evaluated.

An agent trained in MatrixWorld acts through the nine driving actions, one action per recorded step
(``frame_skip`` physics steps), and sees frames rendered at 1280x720, averaged down to the 72x128
training resolution and resized to its ``obs_size`` -- exactly the recorder's pipeline, so the real
observations match what the world model was trained on.

    env = RealCarRacingEnv(obs_size=(84, 84))
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(0)     # "D": drive forward
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.box2d.car_racing import FPS as CARRACING_FPS

from matrix_env.env import as_int
from world_model.actions import CARRACING_CONTROLS, DRIVING_ACTIONS
from world_model.data.record import carracing_canvas, resize_frame, to_train_res
from world_model.eval.suite import decode_latents, encode_frames

HD_W, HD_H = 1280, 720


class RealCarRacingEnv(gym.Env):
    """CarRacing-v3 with MatrixWorld's action table, frame skip and observation pipeline.

    Args:
        obs_size: (H, W) of the uint8 RGB observations (default: the 72x128 training resolution).
        frame_skip: physics steps per env step (the recorder's default, 4).
        domain_randomize: CarRacing's randomised colours (the other domain).
        render_mode: None or "rgb_array" (the last 1280x720 frame).
        vae: a world's frame VAE (``load_world(path).vae``): each 72x128 frame is encoded (posterior
            mean) and decoded by it before the resize, so an agent trained in that world sees the
            real game drawn by the world's own decoder (no kerb stripes, the same textures).
        decoder: with ``vae``, decode with this instead of ``vae.decode``: a world's observation
            decoder (``load_world(path).obs_decoder``), which draws what that world's envs show an agent.

    CarRacing's own time limit (1000 physics steps = 250 env steps at frame_skip 4) truncates episodes.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CARRACING_FPS // 4}

    def __init__(
        self,
        obs_size: tuple[int, int] = (72, 128),
        frame_skip: int = 4,
        domain_randomize: bool = False,
        render_mode: str | None = None,
        vae: torch.nn.Module | None = None,
        decoder: torch.nn.Module | None = None,
    ) -> None:
        if (as_int(frame_skip) or 0) < 1:
            raise ValueError(f"frame_skip must be an int >= 1, got {frame_skip!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.obs_size = (int(obs_size[0]), int(obs_size[1]))
        self.frame_skip = int(frame_skip)
        self.metadata = {**self.metadata, "render_fps": max(1, round(CARRACING_FPS / self.frame_skip))}
        self.render_mode = render_mode
        self.env = gym.make("CarRacing-v3", continuous=True, domain_randomize=domain_randomize, render_mode="rgb_array")
        self.action_space = spaces.Discrete(len(DRIVING_ACTIONS))
        self.observation_space = spaces.Box(0, 255, (*self.obs_size, 3), np.uint8)
        self._hd: np.ndarray | None = None
        if decoder is not None and vae is None:
            raise ValueError("decoder= needs vae= (the encoder of the frames it decodes)")
        self.vae, self.decoder = vae, decoder if decoder is not None else vae

    def get_action_meanings(self) -> list[str]:
        """Names of the nine driving actions, in action-id order."""
        return list(DRIVING_ACTIONS)

    def _observe(self) -> np.ndarray:
        with carracing_canvas(HD_W, HD_H):
            self._hd = np.asarray(self.env.render(), dtype=np.uint8)  # (720, 1280, 3)
        small = to_train_res(self._hd)  # (72, 128, 3), the recorder's training frame
        if self.vae is not None:
            small = decode_latents(self.decoder, encode_frames(self.vae, small[None]))[0]  # (72, 128, 3) uint8
        return resize_frame(small, self.obs_size[1], self.obs_size[0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset CarRacing (seeded) and return the first observation and CarRacing's info."""
        super().reset(seed=seed)
        _, info = self.env.reset(seed=seed, options=options)
        return self._observe(), info

    def _action_id(self, action: object, what: str = "action") -> int:
        """``action`` as a driving action id, or a ValueError naming it (``what``: how to call it)."""
        a = as_int(action)
        if a is None or not 0 <= a < self.action_space.n:
            raise ValueError(f"{what} {action!r} is not a driving action id (an int in [0, {self.action_space.n}))")
        return a

    def step(self, action: int):
        """Hold driving action ``action`` for ``frame_skip`` physics steps (info: CarRacing's last)."""
        a = self._action_id(action)
        reward, terminated, truncated, info = 0.0, False, False, {}
        for _ in range(self.frame_skip):
            _, r, terminated, truncated, info = self.env.step(CARRACING_CONTROLS[a])
            reward += float(r)
            if terminated or truncated:
                break
        return self._observe(), reward, terminated, truncated, info

    def replay(self, seed: int, actions: list[int] | np.ndarray) -> np.ndarray:
        """Reset to ``seed`` and act ``actions`` without drawing their frames: the state an episode reached.

        CarRacing is deterministic given its seed and actions, so this returns the observation that
        episode showed after them (how a planner's candidates are tried from one real state).

        Raises:
            ValueError: an action is not a driving action id, or the episode ends before the last one.
        """
        self.reset(seed=seed)
        for n, action in enumerate(actions):
            a = self._action_id(action, f"actions[{n}] =")
            for _ in range(self.frame_skip):
                _, _, terminated, truncated, _ = self.env.step(CARRACING_CONTROLS[a])
                if terminated or truncated:
                    raise ValueError(f"seed {seed}: the episode ended at action {n} of {len(actions)} in the replay")
        return self._observe()

    def render(self) -> np.ndarray | None:
        """The last 1280x720 frame ("rgb_array")."""
        return self._hd if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        """Close CarRacing."""
        self.env.close()
