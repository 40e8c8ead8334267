"""MatrixWorldVectorEnv: equal to N single envs, NEXT_STEP autoreset, partial resets, flat memory."""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import matrix_env  # noqa: F401  (registers the env)
from matrix_env.env import MatrixWorldEnv
from matrix_env.vector import MatrixWorldVectorEnv
from tests.conftest import build_tiny_world
from world_model.errors import UsageError

SMALL = (64, 64)
N = 3


def compare_with_singles(world: Path, obs_type: str, max_steps: int, num_steps: int, seed: int = 10) -> None:
    """Roll the vector env and N single envs (seeds seed + i) with the same actions; compare all outputs."""
    kwargs = {"world": world, "obs_type": obs_type, "obs_size": SMALL if obs_type == "rgb" else None}
    envs = gym.make_vec("MatrixWorld-v0", num_envs=N, max_episode_steps=max_steps, **kwargs)
    singles = [gym.make("MatrixWorld-v0", max_episode_steps=max_steps, **kwargs) for _ in range(N)]

    def check(vec: np.ndarray, single: np.ndarray) -> None:
        if obs_type == "rgb":  # batched vs unbatched matmuls may round differently: +-1 grey level
            assert np.abs(vec.astype(int) - single).max() <= 1
        else:
            np.testing.assert_allclose(vec, single, atol=1e-4, rtol=0)

    obs, info = envs.reset(seed=seed)
    for i, env in enumerate(singles):
        single_obs, single_info = env.reset(seed=seed + i)
        check(obs[i], single_obs)
        assert info["start_index"][i] == single_info["start_index"]
    rng = np.random.default_rng(0)
    done = np.zeros(N, dtype=bool)
    resets = 0
    for _ in range(num_steps):
        actions = rng.integers(0, 9, N)
        obs, reward, terminated, truncated, _ = envs.step(actions)
        for i, env in enumerate(singles):
            if done[i]:  # NEXT_STEP autoreset: this step resets sub-env i
                single_obs, _ = env.reset()
                r, te, tr = 0.0, False, False
                resets += 1
            else:
                single_obs, r, te, tr, _ = env.step(actions[i])
            check(obs[i], single_obs)
            assert reward[i] == pytest.approx(r, abs=1e-4)
            assert (terminated[i], truncated[i]) == (te, tr)
            done[i] = te or tr
    assert resets > 0  # the comparison went through autoresets
    envs.close()


@pytest.mark.parametrize("obs_type", ["rgb", "latent"])
def test_make_vec_equals_single_envs(tiny_world_dir: Path, obs_type: str) -> None:
    compare_with_singles(tiny_world_dir, obs_type, max_steps=3, num_steps=8)


def test_make_vec_uses_native_vector_env(tiny_world_dir: Path) -> None:
    envs = gym.make_vec("matrix_env:MatrixWorld-v0", num_envs=2, world=tiny_world_dir, obs_size=SMALL)
    assert isinstance(envs, MatrixWorldVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert envs.max_episode_steps == matrix_env.MAX_EPISODE_STEPS
    assert envs.observation_space.shape == (2, *SMALL, 3) and envs.action_space.shape == (2,)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, *SMALL, 3) and obs.dtype == np.uint8


def test_terminations_autoreset_next_step() -> None:
    world = build_tiny_world()
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = 10.0  # every transition terminates
    envs = MatrixWorldVectorEnv(num_envs=2, world=world, obs_size=SMALL)
    single = MatrixWorldEnv(world=world, obs_size=SMALL)
    envs.reset(seed=5)
    single.reset(seed=6)  # sub-env 1's seed
    _, reward, terminated, truncated, info = envs.step(np.array([0, 1]))
    _, single_reward, single_term, _, single_info = single.step(1)
    assert terminated.all() and not truncated.any() and single_term
    assert info["action_meaning"].tolist() == ["D", "DL"] == ["D", single_info["action_meaning"]]
    assert info["_action_meaning"].all()
    assert "start_index" not in info
    obs, reward, terminated, truncated, info = envs.step(np.array([0, 1]))  # the autoreset step
    assert (reward == 0).all() and not terminated.any() and not truncated.any()
    assert "action_meaning" not in info  # every sub-env reset: no step info, as in SyncVectorEnv
    single_obs, single_info = single.reset()
    assert np.abs(obs[1].astype(int) - single_obs).max() <= 1
    assert info["_start_index"].all() and info["start_index"][1] == single_info["start_index"]
    _, _, terminated, *_ = envs.step(np.array([0, 1]))
    assert terminated.all()


def test_partial_reset_and_seed_list(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=N, world=tiny_world_dir, obs_type="latent")
    envs.reset(seed=[1, 2, 3])
    before, *_ = envs.step(np.zeros(N, dtype=np.int64))
    mask = np.array([False, True, False, False])[::-1][1:]  # a negative-stride view: [False, True, False]
    obs, info = envs.reset(options={"reset_mask": mask})
    np.testing.assert_array_equal(obs[~mask], before[~mask])
    assert info["_start_index"].tolist() == mask.tolist() == info["_action_meanings"].tolist()
    assert info["action_meanings"].tolist() == [None, envs.get_action_meanings(), None]  # as SyncVectorEnv
    single = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    single.reset(seed=2)
    single_obs, _ = single.reset()  # the second episode of sub-env 1
    np.testing.assert_allclose(obs[1], single_obs, atol=1e-5)
    with pytest.raises(UsageError):
        envs.reset(options={"reset_mask": np.array([True, False])})
    with pytest.raises(UsageError, match="int >= 0 or None, got -1 for sub-env 2"):
        envs.reset(seed=[1, 2, -1])


def test_reset_options_seeds_and_time_limit(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=N, world=tiny_world_dir, obs_type="latent")
    assert envs.max_episode_steps == matrix_env.MAX_EPISODE_STEPS  # built directly, as by make_vec
    # as gym.make: None is the registered limit, -1 turns it off
    assert MatrixWorldVectorEnv(num_envs=1, world=tiny_world_dir, max_episode_steps=None).max_episode_steps == 1000
    assert MatrixWorldVectorEnv(num_envs=1, world=tiny_world_dir, max_episode_steps=-1).max_episode_steps is None
    obs, info = envs.reset(seed=np.int64(4), options={"start_index": 2})  # numpy ints are ints
    assert info["start_index"].tolist() == [2] * N
    single = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    single_obs, _ = single.reset(seed=5, options={"start_index": 2})  # sub-env 1: seed 4 + 1
    np.testing.assert_allclose(obs[1], single_obs, atol=1e-5)
    _, info = envs.reset(options={"start_index": np.array([0, 1, 2])})
    assert info["start_index"].tolist() == [0, 1, 2]
    with pytest.raises(UsageError, match=r"unknown reset option\(s\) \['start_idx'\]"):
        envs.reset(options={"start_idx": 1})
    with pytest.raises(UsageError, match=r"start_index.*\[0, 3\), got 7"):
        envs.reset(options={"start_index": 7})
    with pytest.raises(UsageError, match="got list"):
        envs.reset(options={"reset_mask": [True, False, True]})
    with pytest.raises(UsageError, match=r"selects no sub-env"):
        envs.reset(options={"reset_mask": np.zeros(N, dtype=bool)})
    with pytest.raises(UsageError, match=r"got 2.5"):
        MatrixWorldVectorEnv(num_envs=1, world=tiny_world_dir, max_episode_steps=2.5)
    assert MatrixWorldVectorEnv(num_envs=1, world=tiny_world_dir, max_episode_steps=-1).max_episode_steps is None
    unlimited = gym.make_vec("MatrixWorld-v0", num_envs=1, world=tiny_world_dir, max_episode_steps=-1)
    assert unlimited.max_episode_steps is None  # gym.make's spelling of "no limit" works for make_vec too
    with pytest.raises(UsageError, match=r"per-env seed must be an int >= 0 or None, got 1.5 for sub-env 1"):
        envs.reset(seed=[0, 1.5, None])


def test_bad_actions_name_what_was_given(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_type="latent")
    envs.reset(seed=0)
    with pytest.raises(UsageError, match=r"dtype float64: \[0.7 8.9\]"):
        envs.step(np.array([0.7, 8.9]))  # not truncated to [0, 8]
    with pytest.raises(UsageError, match=r"shape \(2,\).*got shape \(1,\)"):
        envs.step([0])
    with pytest.raises(UsageError, match=r"\[0, 9\), got shape \(2,\), dtype int64: \[0 9\]"):
        envs.step(np.array([0, 9]))
    envs.step(np.array([5, 0, 3])[::-2])  # a valid negative-stride view steps like any array


def test_render_rgb_array(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_size=SMALL, render_mode="rgb_array")
    envs.reset(seed=0)
    frames = envs.render()
    assert len(frames) == 2 and frames[0].shape == (720, 1280, 3)
    obs, *_ = envs.step(np.array([0, 1]))
    assert obs.flags.c_contiguous and frames[0].flags.c_contiguous  # OpenCV draws on them in place


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_flat_over_2000_steps(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_type="latent", max_episode_steps=50)
    envs.reset(seed=0)
    state = envs.sim.state
    ptrs = [t.data_ptr() for t in state.fields()]
    rng = np.random.default_rng(0)
    for _ in range(200):  # warm-up: allocator pools, autoresets
        envs.step(rng.integers(0, 9, 2))
    rss_warm = _rss_bytes()
    for _ in range(1800):
        obs, *_ = envs.step(rng.integers(0, 9, 2))
    growth = _rss_bytes() - rss_warm
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB between step 200 and step 2000"
    assert envs.sim.state is state
    assert [t.data_ptr() for t in state.fields()] == ptrs
    assert np.isfinite(obs).all()


def test_sync_vector_env_api(tiny_world_dir: Path) -> None:
    """get_attr / set_attr / call as in SyncVectorEnv where one shared simulator allows it."""
    envs = gym.make_vec("MatrixWorld-v0", num_envs=N, world=tiny_world_dir, obs_type="latent")
    sync = gym.make_vec("MatrixWorld-v0", num_envs=N, world=tiny_world_dir, obs_type="latent",
                        vectorization_mode="sync")
    meanings = ["D", "DL", "DR", "B", "BL", "BR", "N", "NL", "NR"]
    for venv in (envs, sync):
        assert venv.call("get_action_meanings") == (meanings,) * N
        assert venv.get_attr("action_space") == venv.call("action_space") == (gym.spaces.Discrete(9),) * N
        venv.reset(seed=5)
        assert venv.get_attr("np_random_seed") == (5, 6, 7)
        rngs = venv.get_attr("np_random")
        assert len({id(r) for r in rngs}) == N and venv.call("np_random") == rngs
    envs.set_attr("render_mode", ["rgb_array"] * N)
    assert envs.get_attr("render_mode") == ("rgb_array",) * N and envs.render_mode == "rgb_array"
    envs.set_attr("max_episode_steps", -1)  # checked as the constructor checks it
    assert envs.max_episode_steps is None
    generators = [np.random.default_rng(i) for i in range(N)]
    envs.set_attr("np_random", generators)
    assert list(envs.get_attr("np_random")) == generators
    with pytest.raises(UsageError, match=r"share one simulator.*got \[None, 'rgb_array', None\]"):
        envs.set_attr("render_mode", [None, "rgb_array", None])
    with pytest.raises(UsageError, match=r"render_mode must be None or one of"):
        envs.set_attr("render_mode", "rgb")
    with pytest.raises(UsageError, match=r"set_attr\('reward_fn'\): only \['render_mode', 'max_episode_steps'\]"):
        envs.set_attr("reward_fn", lambda *a: None)  # would be silently ignored by the simulator
    with pytest.raises(UsageError, match=r"call\('step'\)"):
        envs.call("step", np.zeros(N))


def test_latent_obs_are_copies_and_closed_vector_envs_refuse(tiny_world_dir: Path) -> None:
    """Editing a returned observation changes neither the stream nor render(); a closed vector env
    refuses (as AsyncVectorEnv), a closed single env runs on (as Gymnasium's own envs)."""
    envs = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_type="latent", render_mode="rgb_array")
    single = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent", render_mode="rgb_array")
    for env, action in ((envs, np.zeros(2, dtype=np.int64)), (single, 0)):
        env.reset(seed=0)
        obs = env.step(action)[0]
        before = np.array(env.render())
        obs *= 0.0
        np.testing.assert_array_equal(np.array(env.render()), before)
        env.close()
        env.close()  # idempotent
    for call in (lambda: envs.step(np.zeros(2, dtype=np.int64)), envs.reset, envs.render):
        with pytest.raises(gym.error.ClosedEnvironmentError, match="closed MatrixWorldVectorEnv"):
            call()
    assert single.reset(seed=0)[0].shape == single.observation_space.shape and single.step(0)[0].dtype == np.float32
