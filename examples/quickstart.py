"""Drive the shipped default world for a few steps and save the frames as a PNG strip.

python examples/quickstart.py            # writes quickstart.png
"""

import gymnasium as gym
import imageio
import numpy as np

import matrix_env

gym.register_envs(matrix_env)
env = gym.make("MatrixWorld-v0")  # 1280x720 frames from the shipped world
obs, info = env.reset(seed=0)
print("actions:", env.unwrapped.get_action_meanings())
frames = [obs]
for action in [0, 0, 1, 1, 2, 2, 3, 6]:  # D D DL DL DR DR B N
    obs, reward, terminated, truncated, info = env.step(action)
    print(f"action {action}: reward {reward:+.3f} terminated {terminated}")
    frames.append(obs)
strip = np.concatenate([f[::4, ::4] for f in frames], axis=1)  # (180, 9*320, 3)
imageio.imwrite("quickstart.png", strip)
print("wrote quickstart.png", strip.shape)
