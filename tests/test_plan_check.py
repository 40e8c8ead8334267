"""``matrix-world plan-check``: a world's ranking of action sequences against the real game's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.real_env import RealCarRacingEnv
from world_model.errors import UsageError
from world_model.eval import plan_check as P


def test_spearman_ranks_with_ties_and_constant_inputs() -> None:
    assert P.spearman(np.array([1.0, 2.0, 3.0]), np.array([30.0, 20.0, 10.0])) == pytest.approx(-1.0)
    assert P.spearman(np.array([1.0, 5.0, 9.0, 20.0]), np.array([0.1, 0.2, 0.3, 100.0])) == pytest.approx(1.0)
    # ties share their mean rank: a -> ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert P.spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.arange(4.0)) == pytest.approx(expected)
    assert P.spearman(np.array([0.1 + 0.2, 0.3, 1.0]), np.arange(3.0)) == pytest.approx(0.75**0.5)  # 0.1+0.2 ties 0.3
    assert math.isnan(P.spearman(np.ones(4), np.arange(4.0)))


def test_candidate_sequences_try_every_first_action_and_half_hold() -> None:
    seqs = P.candidate_sequences(np.random.default_rng(0), 18, 6, 9)
    assert seqs.shape == (18, 6) and seqs.min() >= 0 and seqs.max() < 9
    assert sorted(seqs[:, 0]) == sorted(list(range(9)) * 2)
    assert (seqs[:9] == seqs[:9, :1]).all()  # the first half hold their first action
    assert not (seqs[9:] == seqs[9:, :1]).all()  # the rest do not (all)


def test_imagined_returns_score_by_reward_and_stop_at_termination(tiny_world_dir: Path) -> None:
    from matrix_env.vector import MatrixWorldVectorEnv
    from tests.conftest import build_tiny_world

    reward = lambda z0, z1, a: (a == 5).float()  # noqa: E731
    envs = MatrixWorldVectorEnv(9, world=tiny_world_dir, obs_size=(72, 128), max_episode_steps=-1, reward_fn=reward)
    envs.reset(seed=0)
    seqs = np.repeat(np.arange(9)[:, None], 3, axis=1)  # (9, 3): each holds one action
    score, road = P.imagined_returns(envs, seqs)
    assert score.tolist() == [3.0 if a == 5 else 0.0 for a in range(9)]
    assert road.shape == (9,) and ((road >= 0) & (road <= 1)).all()
    latent = MatrixWorldVectorEnv(9, world=tiny_world_dir, obs_type="latent", max_episode_steps=-1)
    latent.reset(seed=0)
    assert P.imagined_returns(latent, seqs)[1] is None  # no frames, no on-road share
    world = build_tiny_world()
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = 10.0  # the termination head ends every candidate at once
    ending = MatrixWorldVectorEnv(9, world=world, obs_type="latent", max_episode_steps=-1, reward_fn=reward)
    ending.reset(seed=0)
    score, _ = P.imagined_returns(ending, seqs)
    assert score.tolist() == [(1.0 if a == 5 else 0.0) + P.LEAVE_PENALTY for a in range(9)]  # one step, then -100
    world.heads.cfg.terminal_reward = -100.0  # the world's own ending reward: counted once, not twice
    own = MatrixWorldVectorEnv(9, world=world, obs_type="latent", max_episode_steps=-1)
    own.reset(seed=0)
    assert P.imagined_returns(own, seqs)[0].tolist() == [-100.0] * 9


def test_real_replay_reaches_the_recorded_state_and_names_bad_actions() -> None:
    env = RealCarRacingEnv()
    env.reset(seed=5)
    actions = [0, 0, 1, 1, 2, 0]
    frames = [env.step(a)[0] for a in actions]
    assert np.array_equal(env.replay(5, actions), frames[-1])
    assert np.array_equal(env.replay(5, actions[:3]), frames[2])
    assert not np.array_equal(env.replay(6, actions), frames[-1])  # another track
    with pytest.raises(ValueError, match=r"actions\[1\] = 9 is not a driving action id"):
        env.replay(5, [0, 9])
    env.close()


@pytest.fixture(scope="module")
def tiny_carracing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random world, labelled as recorded from CarRacing-v3 (plan-check drives that game)."""
    from tests.conftest import build_tiny_world
    from world_model.checkpoint import save_world

    world = build_tiny_world()
    world.meta["env_id"] = "CarRacing-v3"
    directory = tmp_path_factory.mktemp("worlds") / "tiny_carracing"
    save_world(directory, world, recipe={"command": "tests/test_plan_check.py:tiny_carracing_dir"})
    return directory


def test_plan_check_runs_on_real_states_and_writes_json(tiny_carracing_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pc.json"
    args = P.Args(world=str(tiny_carracing_dir), seeds=(1,), at=(2, 4), candidates=9, horizon=3, out=out)
    rows = P.check(args)
    assert [(r["seed"], r["t"]) for r in rows] == [(1, 2), (1, 4)]
    for r in rows:
        assert np.array(r["actions"]).shape == (9, 3)
        for key in ("pred_return", "imagined_on_road", "real_return", "real_on_road"):
            assert len(r[key]) == 9 and all(math.isfinite(v) for v in r[key])
        assert r["gain_best"] >= max(r["gain_head"], r["gain_road"]) - 1e-9
        assert r["real_road_mean"] == pytest.approx(np.mean(r["real_on_road"]))
        assert r["real_road_pick"] == r["real_on_road"][int(np.argmax(r["pred_return"]))]
    assert [s["t"] for s in json.loads(out.read_text())["states"]] == [2, 4]
    assert P.format_row("x", rows).startswith("| x | 2 | ")


def test_plan_check_names_bad_settings(tiny_world_dir: Path, tiny_carracing_dir: Path) -> None:
    with pytest.raises(UsageError, match=r"recorded from 'no env_id'; plan-check drives the real CarRacing-v3 only"):
        P.check(P.Args(world=str(tiny_world_dir), seeds=(0,), at=(1,)))
    with pytest.raises(UsageError, match="--candidates 8 must be >= 9"):
        P.check(P.Args(world=str(tiny_world_dir), candidates=8))
    with pytest.raises(UsageError, match=r"--at \[0\]"):
        P.check(P.Args(world=str(tiny_world_dir), at=(0,)))
    with pytest.raises(UsageError, match="--horizon 1 cannot see a first action"):
        P.check(P.Args(world=str(tiny_carracing_dir), horizon=1, seeds=(0,), at=(1,)))
