"""Snapshots: Simulator.get_state / set_state and the envs' clone_state / restore_state replay exactly,
branch one state into many futures, and reject states that do not fit."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import matrix_env  # noqa: F401  (registers the env)
from matrix_env.env import MatrixWorldEnv
from matrix_env.state import EnvState
from matrix_env.vector import MatrixWorldVectorEnv
from tests.conftest import build_tiny_world
from world_model.errors import UsageError
from world_model.simulator import Simulator, sampler_config

B = 4
SMALL = (32, 32)


@pytest.fixture(scope="module")
def world():
    return build_tiny_world()


def started(world, num_envs: int = B) -> Simulator:
    sim = Simulator(world, num_envs)
    sim.reset(torch.ones(num_envs, dtype=torch.bool), torch.arange(num_envs) % sim.num_starts,
              noise_key=torch.arange(100, 100 + num_envs))  # fmt: skip
    return sim


def roll(sim: Simulator, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """actions (T, B) -> latents (T, B, C, H, W), rewards (T, B)."""
    out = [sim.step(a) for a in actions]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def test_simulator_restore_replays_exactly_and_snapshot_is_a_copy(world) -> None:
    sim = started(world)
    roll(sim, torch.randint(0, 9, (3, B), generator=torch.Generator().manual_seed(0)))
    snap = sim.get_state()
    before = snap.latents.clone()
    actions = torch.randint(0, 9, (5, B), generator=torch.Generator().manual_seed(1))
    z1, r1 = roll(sim, actions)
    assert torch.equal(snap.latents, before)  # stepping did not touch the snapshot
    assert not torch.equal(sim.get_state().latents, before)

    latest = sim.set_state(snap)
    torch.testing.assert_close(latest, snap.latents[:, sim.cfg.context - 1], rtol=0, atol=0)
    z2, r2 = roll(sim, actions)
    assert torch.equal(z1, z2) and torch.equal(r1, r2)  # same device, same batch: bit-identical

    sim.set_state(snap)
    other = (actions + 1) % 9
    z3, _ = roll(sim, other)
    assert (z3[-1] - z1[-1]).abs().mean() > 1e-3  # other actions, another future


def test_simulator_branches_one_row_into_all_streams(world) -> None:
    sim = started(world)
    roll(sim, torch.full((2, B), 1))
    row = sim.get_state(torch.tensor([2]))
    assert row.batch_size == 1
    sim.set_state(row)  # one row into every stream: they share its noise stream
    z, _ = roll(sim, torch.full((4, B), 0))
    for i in range(1, B):
        torch.testing.assert_close(z[:, i], z[:, 0], rtol=0, atol=1e-5)  # same actions, same future
    sim.set_state(row)
    z_diff, _ = roll(sim, torch.arange(B).repeat(4, 1))  # a different action per stream
    assert (z_diff[-1, 1:] - z_diff[-1, :1]).flatten(1).abs().mean(1).min() > 1e-3

    sim.set_state(row, noise_key=torch.arange(B) + 7)  # same actions, new noise: different futures
    z_noise, _ = roll(sim, torch.full((4, B), 0))
    assert (z_noise[-1, 1:] - z_noise[-1, :1]).flatten(1).abs().mean(1).min() > 1e-3


def test_simulator_set_state_rows_leave_the_others_alone(world) -> None:
    sim = started(world)
    roll(sim, torch.full((2, B), 3))
    snap = sim.get_state(torch.tensor([0, 1]))
    roll(sim, torch.full((2, B), 5))
    keep = sim.get_state(torch.tensor([2, 3]))
    sim.set_state(snap, torch.tensor([3, 2]))  # rows written in the given order
    now = sim.get_state()
    assert torch.equal(now.latents[3], snap.latents[0]) and torch.equal(now.latents[2], snap.latents[1])
    assert not torch.equal(now.latents[2], keep.latents[0])
    assert torch.equal(now.noise_key[[3, 2]], snap.noise_key)


def test_simulator_bad_states_and_rows_are_named(world) -> None:
    sim = started(world)
    with pytest.raises(UsageError, match=r"rows must be a 1-d tensor of distinct stream indices in \[0, 4\)"):
        sim.get_state(torch.tensor([0, 4]))
    with pytest.raises(UsageError, match="distinct"):
        sim.set_state(sim.get_state(torch.tensor([0, 1])), torch.tensor([1, 1]))
    with pytest.raises(UsageError, match="a state of 2 rows cannot fill 3 streams"):
        sim.set_state(sim.get_state(torch.tensor([0, 1])), torch.tensor([0, 1, 2]))
    with pytest.raises(UsageError, match="needs a SwinDPMState .* got dict"):
        sim.set_state({"latents": 0})
    with pytest.raises(UsageError, match="noise_key must be 4 integer keys"):
        sim.set_state(sim.get_state(), noise_key=torch.zeros(4))
    wide = Simulator(world, 2, sampler=sampler_config(world, overrides={"groups": 3}))
    with pytest.raises(UsageError, match=r"window is \(5, .* this simulator's is \(4, .*another sampler window"):
        sim.set_state(wide.get_state())


def test_vector_env_restore_replays_obs_rewards_and_time_limit(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=B, world=tiny_world_dir, obs_size=SMALL, max_episode_steps=4)
    envs.reset(seed=3)
    rng = np.random.default_rng(0)
    envs.step(rng.integers(0, 9, B))
    envs.step(rng.integers(0, 9, B))
    snap = envs.clone_state()
    assert len(snap) == B and snap.elapsed.tolist() == [2] * B
    actions = rng.integers(0, 9, (4, B))
    first = [envs.step(a) for a in actions]  # steps 3, 4 (truncated), then autoreset, then a new step
    assert first[1][3].all() and first[2][1].tolist() == [0.0] * B  # truncation, then the reset step

    obs = envs.restore_state(snap)
    assert obs.shape == (B, *SMALL, 3)
    for a, (o, r, te, tr, _info) in zip(actions[:2], first[:2], strict=True):  # replay up to the time limit
        o2, r2, te2, tr2, _ = envs.step(a)
        np.testing.assert_array_equal(o2, o)
        np.testing.assert_array_equal(r2, r)
        np.testing.assert_array_equal(tr2, tr)
        np.testing.assert_array_equal(te2, te)
    _, _, _, _, info = envs.step(actions[2])
    assert info["_start_index"].all()  # the restored truncation autoresets on the next step, as before
    envs.close()


def test_single_env_state_branches_in_a_vector_env(tiny_world_dir: Path) -> None:
    """A planner's use: clone the acting env, restore into every sub-env, try one action per sub-env."""
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL)
    env.reset(seed=5)
    for a in (1, 1, 2):
        env.step(a)
    snap = env.clone_state()
    assert len(snap) == 1 and snap.elapsed.tolist() == [3]
    plan = MatrixWorldVectorEnv(num_envs=B, world=tiny_world_dir, obs_size=SMALL)
    obs = plan.restore_state(snap)  # never reset: a full restore is a start too
    assert obs.shape == (B, *SMALL, 3)
    np.testing.assert_array_equal(obs[0], env.unwrapped._obs)  # the restored frame is the acting env's
    ahead = [env.step(0)[0] for _ in range(3)]
    frames = [plan.step(np.array([0, 1, 4, 8]))[0] for _ in range(3)]  # sub-env 0 takes the single env's actions
    for f, single in zip(frames, ahead, strict=True):
        assert np.abs(f[0].astype(int) - single).max() <= 1  # batched vs unbatched rounding
    last = frames[-1].astype(int)
    assert min(np.abs(last[i] - last[0]).mean() for i in range(1, B)) > 0.5  # other actions, other futures

    env.restore_state(plan.clone_state(2))  # and back: sub-env 2's branch into the single env
    assert np.abs(env.step(4)[0].astype(int) - plan.step(np.array([0, 1, 4, 8]))[0][2]).max() <= 1
    env.close()
    plan.close()


def test_env_state_indexing_and_errors(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=B, world=tiny_world_dir, obs_type="latent")
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        envs.clone_state()
    envs.reset(seed=0)
    snap = envs.clone_state([1, 3])
    assert isinstance(snap, EnvState) and len(snap) == 2 and len(snap[1]) == 1 and len(snap[[1, 0]]) == 2
    assert torch.equal(snap[1].stream.latents, envs.clone_state(3).stream.latents)
    with pytest.raises(UsageError, match=r"indices must be distinct sub-env indices in \[0, 4\), got \[0, 0\]"):
        envs.restore_state(snap, [0, 0])
    with pytest.raises(UsageError, match="a state of 2 episodes cannot fill 3 sub-envs"):
        envs.restore_state(snap, [0, 1, 2])
    with pytest.raises(UsageError, match="needs an EnvState"):
        envs.restore_state(snap.stream)
    fresh = MatrixWorldVectorEnv(num_envs=B, world=tiny_world_dir, obs_type="latent")
    with pytest.raises(gym.error.ResetNeeded, match="restoring only some"):
        fresh.restore_state(snap, [0, 1])
    single = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    with pytest.raises(UsageError, match="this env runs one episode, the state holds 2; pass state"):
        single.restore_state(snap)
    obs = single.restore_state(snap[0])
    np.testing.assert_array_equal(obs, envs.restore_state(snap[0], [2])[2])
    other = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent", sampler={"groups": 3})
    with pytest.raises(UsageError, match="another sampler window"):
        other.restore_state(snap[0])


def test_vector_env_restores_ended_flags_and_step_counts_per_sub_env(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=B, world=tiny_world_dir, obs_type="latent", max_episode_steps=2)
    envs.reset(seed=0)
    envs.step(np.zeros(B, dtype=int))
    mid = envs.clone_state()  # elapsed 1, not ended
    *_, truncated, _ = envs.step(np.zeros(B, dtype=int))
    assert truncated.all()
    ended = envs.clone_state()
    assert ended.ended.all() and ended.elapsed.tolist() == [2] * B and not mid.ended.any()

    envs.restore_state(mid[[0, 1]], [0, 1])  # sub-envs 0, 1 rewound; 2, 3 still ended
    after = envs.clone_state()
    assert after.elapsed.tolist() == [1, 1, 2, 2] and after.ended.tolist() == [False, False, True, True]
    _, reward, _, truncated, info = envs.step(np.zeros(B, dtype=int))
    assert info["_start_index"].tolist() == [False, False, True, True]  # only the ended ones autoreset
    assert truncated.tolist() == [True, True, False, False] and reward[2:].tolist() == [0.0, 0.0]

    envs.restore_state(mid[0], [0])  # a running episode (sub-env 0's had just been truncated)
    envs.restore_state(ended[3], [1])  # an ended episode restored: its next step is the autoreset
    _, _, _, _, info = envs.step(np.zeros(B, dtype=int))
    assert info["_start_index"].tolist() == [False, True, False, False]


def test_restore_order_copies_and_single_env_bookkeeping(tiny_world_dir: Path) -> None:
    envs = MatrixWorldVectorEnv(num_envs=B, world=tiny_world_dir, obs_type="latent")
    obs0, _ = envs.reset(seed=1)
    held = obs0.copy()
    snap = envs.clone_state([2, 0])
    assert torch.equal(snap[[1, 0]].stream.latents, envs.clone_state([0, 2]).stream.latents)  # order kept
    obs = envs.restore_state(snap, [0, 2])  # swap sub-envs 0 and 2
    np.testing.assert_array_equal(obs0, held)  # observations returned earlier are not changed in place
    np.testing.assert_array_equal(obs[[0, 2]], held[[2, 0]])
    np.testing.assert_array_equal(obs[[1, 3]], held[[1, 3]])

    env = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    env.reset(seed=0)
    for _ in range(3):
        env.step(0)
    snap = env.clone_state()
    env.reset(seed=1)
    env.restore_state(snap)
    again = env.clone_state()
    assert again.elapsed.tolist() == [3] and again.ended.tolist() == [False]
    assert torch.equal(again.stream.latents, snap.stream.latents)
