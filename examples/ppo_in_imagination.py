"""Train a PPO agent only in MatrixWorld, then evaluate it in the real CarRacing-v3.

The agent sees 84x84 frames in both worlds: MatrixWorld decodes at 72x128 and resizes; the real env
renders 1280x720, averages down to 72x128 (the recorder's pipeline) and resizes the same way.

    python examples/ppo_in_imagination.py --timesteps 4096 --episodes 3
"""

import argparse

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy

from agents.real_env import RealCarRacingEnv
from agents.vec_env import MatrixWorldSB3VecEnv

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--timesteps", type=int, default=4096, help="PPO timesteps in imagination")
parser.add_argument("--num-envs", type=int, default=8, help="imagined envs, one batched forward")
parser.add_argument("--episodes", type=int, default=3, help="real CarRacing-v3 evaluation episodes")
args = parser.parse_args()

imagined = MatrixWorldSB3VecEnv(num_envs=args.num_envs, obs_size=(84, 84), max_episode_steps=250)
imagined.seed(0)
model = PPO("CnnPolicy", imagined, n_steps=128, batch_size=256, seed=0, verbose=1)
model.learn(total_timesteps=args.timesteps)

real = RealCarRacingEnv(obs_size=(84, 84))
mean, std = evaluate_policy(model, real, n_eval_episodes=args.episodes, deterministic=False)
rng = np.random.default_rng(0)
returns = []
for ep in range(args.episodes):  # the random-policy baseline in the same real env
    real.reset(seed=1000 + ep)
    total, done = 0.0, False
    while not done:
        _, r, term, trunc, _ = real.step(int(rng.integers(9)))
        total, done = total + r, term or trunc
    returns.append(total)
print(
    f"real CarRacing-v3 return: PPO trained in imagination {mean:.1f} +- {std:.1f}; "
    f"random policy {np.mean(returns):.1f} +- {np.std(returns):.1f} ({args.episodes} episodes)"
)
