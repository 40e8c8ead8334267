"""Stable-Baselines3 glue: env check, VecEnv adapter semantics, PPO smoke runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import VecTransposeImage

from agents.features import LatentCNN
from agents.vec_env import MatrixWorldSB3VecEnv
from matrix_env.env import MatrixWorldEnv
from matrix_env.vector import MatrixWorldVectorEnv

SMALL = (64, 64)


def test_sb3_check_env(tiny_world_dir: Path) -> None:
    check_env(MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL), warn=True)


def test_adapter_same_step_autoreset(tiny_world_dir: Path) -> None:
    venv = MatrixWorldSB3VecEnv(
        MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_size=SMALL, max_episode_steps=2)
    )
    venv.seed(3)
    obs = venv.reset()
    assert obs.shape == (2, *SMALL, 3) and obs.dtype == np.uint8
    assert [i["start_index"] for i in venv.reset_infos] == [
        MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL).reset(seed=3 + k)[1]["start_index"]
        for k in range(2)
    ]
    obs1, _, dones, infos = venv.step(np.array([0, 1]))
    assert not dones.any() and "terminal_observation" not in infos[0]
    obs2, rewards, dones, infos = venv.step(np.array([0, 1]))
    assert dones.all() and rewards.dtype == np.float32
    assert all(info["TimeLimit.truncated"] for info in infos)
    assert infos[0]["terminal_observation"].shape == (*SMALL, 3)
    assert not np.array_equal(obs2[0], infos[0]["terminal_observation"])  # obs is the next episode's first
    obs3, _, dones, _ = venv.step(np.array([0, 1]))  # the new episode steps normally (no NEXT_STEP gap)
    assert not dones.any()
    assert venv.get_attr("render_mode") == [None, None] and venv.env_is_wrapped(object) == [False, False]
    venv.close()


def test_ppo_cnn_learns_a_few_steps(tiny_world_dir: Path) -> None:
    venv = MatrixWorldSB3VecEnv(num_envs=2, world=tiny_world_dir, obs_size=SMALL, max_episode_steps=10)
    model = PPO("CnnPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    assert isinstance(model.get_env(), VecTransposeImage)  # SB3 transposes HWC images itself
    model.learn(32)
    assert model.num_timesteps >= 32


@pytest.mark.filterwarnings("ignore:.*infinity.*")
def test_ppo_latent_features(tiny_world_dir: Path) -> None:
    venv = MatrixWorldSB3VecEnv(num_envs=2, world=tiny_world_dir, obs_type="latent", max_episode_steps=10)
    model = PPO(
        "MlpPolicy",
        venv,
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={
            "features_extractor_class": LatentCNN,
            "features_extractor_kwargs": {"features_dim": 32},
        },
    )
    model.learn(32)
    assert isinstance(model.policy.features_extractor, LatentCNN)
