"""Stable-Baselines3 glue: env check, VecEnv adapter semantics, PPO smoke runs."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecTransposeImage

from agents.features import LatentCNN
from agents.vec_env import MatrixWorldSB3VecEnv
from matrix_env.env import MatrixWorldEnv
from matrix_env.vector import MatrixWorldVectorEnv
from world_model.errors import UsageError

SMALL = (64, 64)


def test_sb3_check_env(tiny_world_dir: Path) -> None:
    check_env(MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL), warn=True)
    # with its render check, which closes the env and then resets it again
    check_env(MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL, render_mode="rgb_array"), skip_render_check=False)


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
    assert venv.reset_infos[0]["action_meanings"][:2] == ["D", "DL"]  # as DummyVecEnv over gym.make
    obs1, rew1, dones, infos = venv.step(np.array([0, 1]))
    assert not dones.any() and "terminal_observation" not in infos[0] and "episode" not in infos[0]
    assert [info["action_meaning"] for info in infos] == ["D", "DL"]
    obs2, rewards, dones, infos = venv.step(np.array([0, 1]))
    assert dones.all() and rewards.dtype == np.float32
    # Monitor's episode statistics, so PPO logs ep_rew_mean without a VecMonitor
    assert [info["episode"]["l"] for info in infos] == [2, 2]
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], rew1 + rewards, atol=1e-5)
    assert all(info["TimeLimit.truncated"] for info in infos)
    assert infos[0]["terminal_observation"].shape == (*SMALL, 3)
    assert not np.array_equal(obs2[0], infos[0]["terminal_observation"])  # obs is the next episode's first
    obs3, _, dones, _ = venv.step(np.array([0, 1]))  # the new episode steps normally (no NEXT_STEP gap)
    assert not dones.any()
    assert venv.get_attr("render_mode") == [None, None]
    assert venv.env_is_wrapped(gym.wrappers.TimeLimit) == [False, False]
    assert venv.env_is_wrapped(Monitor) == [True, True]  # what evaluate_policy asks before trusting "episode"
    assert venv.env_is_wrapped(gym.Wrapper) == [True, True]  # isinstance semantics, as DummyVecEnv

    class SubMonitor(Monitor):
        pass

    assert venv.env_is_wrapped(SubMonitor) == [False, False]  # Monitor is no SubMonitor
    obs4, _, dones, infos = venv.step(np.array([0, 1]))
    assert dones.all() and [info["episode"]["l"] for info in infos] == [2, 2]  # counted from the reset
    venv.close()


def test_adapter_sub_env_attributes_methods_and_options(tiny_world_dir: Path) -> None:
    """get_attr / set_attr / env_method / set_options act per sub-env or refuse, never silently on all."""
    venv = MatrixWorldSB3VecEnv(num_envs=3, world=tiny_world_dir, obs_type="latent", max_episode_steps=50)
    assert venv.get_attr("action_space") == [gym.spaces.Discrete(9)] * 3
    assert venv.metadata["render_fps"] == venv.venv.metadata["render_fps"]  # VecVideoRecorder's rate (SB3: 30)
    assert venv.get_attr("observation_space", indices=[2])[0] == venv.observation_space
    early = venv.get_attr("np_random")  # before any reset: created on access, as gym.Env.np_random
    assert all(isinstance(r, np.random.Generator) for r in early) and len({id(r) for r in early}) == 3
    venv.reset()  # no seed: each sub-env draws from the generator it already has
    assert all(a is b for a, b in zip(early, venv.get_attr("np_random"), strict=True))
    venv.set_options([{"start_index": 0}, {"start_index": 2}, {"start_index": 1}])
    venv.seed(7)
    obs = venv.reset()
    assert [info["start_index"] for info in venv.reset_infos] == [0, 2, 1]
    rngs = venv.get_attr("np_random")
    assert len({id(r) for r in rngs}) == 3 and rngs[0] is not None  # each sub-env its own generator
    stepped, *_ = venv.step(np.zeros(3, dtype=np.int64))
    [(obs1, info1)] = venv.env_method("reset", indices=[1], options={"start_index": 0})
    meanings = venv.env_method("get_action_meanings", indices=[0])[0]
    assert info1 == {"start_index": 0, "action_meanings": meanings} == venv.reset_infos[1]
    single = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    single.reset(seed=8, options={"start_index": 2})  # sub-env 1's first episode (seed 7 + 1) ...
    expected, _ = single.reset(options={"start_index": 0})  # ... and its second
    np.testing.assert_allclose(obs1, expected, atol=1e-5)
    after, *_ = venv.step(np.zeros(3, dtype=np.int64))
    assert not np.allclose(after[0], stepped[0])  # sub-env 0 stepped on, was not reset
    assert venv.env_method("get_action_meanings", indices=[0])[0][:3] == ["D", "DL", "DR"]
    with pytest.raises(UsageError, match=r"set_attr\('render_mode'\) for indices=\[0\]"):
        venv.set_attr("render_mode", "rgb_array", indices=[0])
    venv.set_attr("render_mode", "rgb_array")  # all sub-envs: allowed, and seen by SB3's wrappers
    assert venv.render_mode == "rgb_array" and venv.get_attr("render_mode") == ["rgb_array"] * 3
    with pytest.raises(UsageError, match=r"env_method\('close'\) for indices=\[1\]"):
        venv.env_method("close", indices=[1])
    venv.set_options([{"start_index": 0}, {}, {}])
    with pytest.raises(UsageError, match="start_index for every sub-env or none"):
        venv.reset()
    venv.set_options({"reset_mask": np.array([True, False, True])})
    with pytest.raises(UsageError, match="reset_mask is not an option of reset"):
        venv.reset()
    venv.close()
    assert obs.shape == (3, *venv.observation_space.shape)


def test_adapter_refuses_snapshots_and_context_frames(tiny_world_dir: Path) -> None:
    """Its episode returns and lengths could not follow them: an error that points at adapter.venv."""
    venv = MatrixWorldSB3VecEnv(num_envs=2, world=tiny_world_dir, obs_type="latent")
    venv.reset()
    frames = np.zeros((2, 4, 72, 128, 3), np.uint8)
    for call in (lambda: venv.env_method("clone_state"),
                 lambda: venv.env_method("restore_state", None),
                 lambda: venv.env_method("reset", indices=[0], options={"context_frames": frames[0]})):
        with pytest.raises(UsageError, match="not supported through the SB3 adapter .* adapter.venv"):
            call()
    venv.set_options([{"context_frames": frames[0]}, {"context_frames": frames[1]}])
    with pytest.raises(UsageError, match=r"set_options\(\{'context_frames': ...\}\) is not supported"):
        venv.reset()
    snap = venv.venv.clone_state()  # the native vector env has them
    assert len(snap) == 2


def test_ppo_cnn_learns_a_few_steps(tiny_world_dir: Path) -> None:
    venv = MatrixWorldSB3VecEnv(num_envs=2, world=tiny_world_dir, obs_size=SMALL, max_episode_steps=10)
    model = PPO("CnnPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    assert isinstance(model.get_env(), VecTransposeImage)  # SB3 transposes HWC images itself
    model.learn(32)
    assert model.num_timesteps >= 32
    assert [ep["l"] for ep in model.ep_info_buffer] == [10, 10]  # ep_rew_mean is logged (2 envs x 16 steps)


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


def test_adapter_human_render_once_per_step(tiny_world_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ending sub-env other than 0 does not redraw (or re-wait for) sub-env 0's window."""
    from matrix_env.env import PygameViewer

    shown: list[np.ndarray] = []
    monkeypatch.setattr(PygameViewer, "show", lambda self, frame: shown.append(frame))
    venv = MatrixWorldSB3VecEnv(
        MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_size=SMALL, render_mode="human")
    )
    venv.reset()
    assert len(shown) == 1
    venv.venv.max_episode_steps = 1  # both end on the next step ...
    venv.env_method("reset", indices=[0])  # ... after sub-env 0 is reset alone: one more frame
    assert len(shown) == 2
    venv.step(np.array([0, 0]))  # both end: step draws, the masked reset (sub-env 0 in it) draws
    assert len(shown) == 4
    venv.venv.max_episode_steps = 100
    venv.venv.reset(options={"reset_mask": np.array([False, True])})  # sub-env 1 only: no redraw
    assert len(shown) == 4
    venv.close()
