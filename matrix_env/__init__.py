"""MatrixWorld Gymnasium environments: a learned, action-conditioned video world of CarRacing.

Importing this package only registers the environments (string entry points), so it does not
import torch::

    import gymnasium as gym
    import matrix_env

    gym.register_envs(matrix_env)
    env = gym.make("MatrixWorld-v0")                     # or gym.make("matrix_env:MatrixWorld-v0")
    envs = gym.make_vec("MatrixWorld-v0", num_envs=16)   # one batched forward pass for all 16
"""

from __future__ import annotations

from pathlib import Path

from gymnasium.envs.registration import register, registry

ENV_ID = "MatrixWorld-v0"
# The shipped world model (a checkpoint directory written by world_model.checkpoint.save_world).
DEFAULT_WORLD = Path(__file__).resolve().parent / "worlds" / "default"
MAX_EPISODE_STEPS = 1000  # CarRacing-v3's episode length

__all__ = ["DEFAULT_WORLD", "ENV_ID", "MAX_EPISODE_STEPS"]

if ENV_ID not in registry:  # re-importing (e.g. via "matrix_env:MatrixWorld-v0") must not warn
    register(
        id=ENV_ID,
        entry_point="matrix_env.env:MatrixWorldEnv",
        vector_entry_point="matrix_env.vector:MatrixWorldVectorEnv",
        max_episode_steps=MAX_EPISODE_STEPS,
    )
