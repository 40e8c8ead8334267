"""Sixteen worlds in one batched forward pass, with agent-sized 84x84 observations.

python examples/vector_env.py
"""

import time

import gymnasium as gym
import numpy as np

import matrix_env

gym.register_envs(matrix_env)
envs = gym.make_vec("MatrixWorld-v0", num_envs=16, obs_size=(84, 84))
obs, info = envs.reset(seed=0)
rng = np.random.default_rng(0)
t0 = time.perf_counter()
steps = 20
for _ in range(steps):
    obs, reward, terminated, truncated, info = envs.step(rng.integers(9, size=16))
dt = time.perf_counter() - t0
print(f"obs {obs.shape} {obs.dtype}; {16 * steps / dt:.1f} env steps/s over 16 envs")
