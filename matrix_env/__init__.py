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

import os
from pathlib import Path

from gymnasium.envs.registration import register, registry

ENV_ID = "MatrixWorld-v0"
# The shipped world models (checkpoint directories written by world_model.checkpoint.save_world),
# passed by name as ``world=``: "default" (loaded when no world is given) keeps the road longer than
# "hold"; "hold" is fine-tuned on open-loop holds, so ignoring the road costs what it costs in the
# real game: the world to train agents in (docs/EXPERIMENTS.md, "Data that punishes ignoring the road"
# and "The float32 agent test on a GPU"); "fast" is the default world's DiT distilled into 2x2 latent
# patches, run with 2 frames in flight and a small observation decoder: 4.0-4.4x the default's batched
# env steps/s for agents on a CPU, with a coarser picture (docs/EXPERIMENTS.md, "A loss that looks at the car").
WORLDS_DIR = Path(__file__).resolve().parent / "worlds"
SHIPPED_WORLDS = ("default", "hold", "fast")
DEFAULT_WORLD = WORLDS_DIR / "default"
# CarRacing-v3's step limit; a world step is one frame-skip-4 recorded step, so an episode lasts 4x a
# real one (250 such steps). Long imagined episodes are the point of an infinite-horizon world.
MAX_EPISODE_STEPS = 1000

__all__ = ["DEFAULT_WORLD", "ENV_ID", "MAX_EPISODE_STEPS", "SHIPPED_WORLDS", "WORLDS_DIR", "world_path"]


def world_path(world: str | os.PathLike | None) -> Path:
    """The checkpoint directory of ``world``: None (the default world), a shipped world's name, or a path.

    A name from ``SHIPPED_WORLDS`` wins over a relative directory of the same name; anything else is
    taken as a path (whether it exists is the loader's check).
    """
    if world is None:
        return DEFAULT_WORLD
    if isinstance(world, str) and world in SHIPPED_WORLDS:
        return WORLDS_DIR / world
    return Path(world)

if ENV_ID not in registry:  # re-importing (e.g. via "matrix_env:MatrixWorld-v0") must not warn
    register(
        id=ENV_ID,
        entry_point="matrix_env.env:MatrixWorldEnv",
        vector_entry_point="matrix_env.vector:MatrixWorldVectorEnv",
        max_episode_steps=MAX_EPISODE_STEPS,
    )
