"""The hazard head: labels, per-step rate, seeded endings in the simulator, and train-hazard end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_world
from tests.synthetic import make_synthetic_dataset
from world_model.errors import UsageError
from world_model.heads import HeadsConfig, RewardTerminationHeads, per_step_hazard


def test_hazard_labels_look_ahead_h_steps_and_leave_out_positions_past_the_step_limit() -> None:
    from world_model.train.hazard import hazard_labels

    term = np.zeros(9, bool)  # 8 transitions, the last ends the episode
    term[8] = True
    ends, known = hazard_labels(term, 3, None)
    assert ends.tolist() == [False] * 5 + [True] * 3 and known.all()  # transitions 6, 7, 8 end within 3
    # cut off at 8 steps: the last 2 positions cannot be labelled, in a truncated and an ended episode alike
    ends, known = hazard_labels(np.zeros(9, bool), 3, 8)
    assert not ends.any() and known.tolist() == [True] * 6 + [False] * 2
    assert hazard_labels(term, 3, 8)[1].tolist() == [True] * 6 + [False] * 2
    assert hazard_labels(term[:6], 3, 8)[1].all()  # ended after 5 steps: its 3-step futures end before the limit
    assert hazard_labels(term, 1, 8)[0].tolist() == [False] * 7 + [True]
    with pytest.raises(UsageError, match=r"--horizon 0: must be >= 1"):
        hazard_labels(term, 0, None)
    with pytest.raises(UsageError, match=r"needs the step limit"):
        hazard_labels(np.zeros(9, bool), 3, None)


def test_per_step_hazard_inverts_the_within_h_probability() -> None:
    logit = torch.tensor([-40.0, -3.0, 0.0, 2.0, 40.0, -float("inf")])
    h = per_step_hazard(logit, 30)
    q = 1 - (1 - h.double()) ** 30
    assert torch.allclose(q[:5], torch.sigmoid(logit[:5]).double(), atol=1e-6)
    assert h[-1] == 0 and h[4] <= 1 and torch.isfinite(h).all()
    assert torch.allclose(per_step_hazard(logit, 1), torch.sigmoid(logit), rtol=1e-6, atol=0)


def test_heads_config_checks_the_hazard_settings() -> None:
    with pytest.raises(ValueError, match=r"termination='hazard' needs a hazard head"):
        HeadsConfig(termination="hazard")
    with pytest.raises(ValueError, match=r"hazard_horizon must be an int >= 0.*got -1"):
        HeadsConfig(hazard_horizon=-1)
    with pytest.raises(ValueError, match=r"hazard_action must be a bool, got 'yes'"):
        HeadsConfig(hazard_horizon=3, hazard_action="yes")
    with pytest.raises(ValueError, match=r"termination must be one of \('threshold', 'hazard'\), got 'sometimes'"):
        HeadsConfig(termination="sometimes")
    heads = RewardTerminationHeads(HeadsConfig(latent_channels=4, text_dim=12, hidden=16))
    z = torch.randn(3, 4, 9, 16)
    assert heads.hazard is None  # nothing allocated
    with pytest.raises(ValueError, match=r"these heads have no hazard head"):
        heads.hazard_logit(heads.transition(z, z), torch.randn(3, 12))
    with_hazard = RewardTerminationHeads(HeadsConfig(latent_channels=4, text_dim=12, hidden=16, hazard_horizon=5))
    assert with_hazard.hazard_logit(with_hazard.transition(z, z), torch.randn(3, 12)).shape == (3,)
    assert len(with_hazard(z, z, torch.randn(3, 12))) == 2  # reward and termination: the hazard is read apart


def test_the_hazard_reads_the_action_only_when_asked() -> None:
    z_prev, z_next = torch.randn(2, 5, 4, 9, 16).unbind(0)
    ctrl, other = torch.randn(2, 5, 12).unbind(0)
    for action in (False, True):
        torch.manual_seed(0)
        heads = RewardTerminationHeads(HeadsConfig(latent_channels=4, text_dim=12, hidden=16, hazard_horizon=5,
                                                   hazard_action=action))
        assert ("ctrl" in heads.hazard) == action
        with torch.no_grad():
            x = heads.transition(z_prev, z_next)
            same = torch.equal(heads.hazard_logit(x, ctrl), heads.hazard_logit(x, other))
        assert same != action


def _hazard_world(bias: float, horizon: int = 10, memory: int = 0):
    """The tiny world with a hazard head whose logits are ~bias: its last layer zeroed, or, for a
    recurrent head (``memory`` > 0), random (it reads the transition's features and the memory)."""
    import dataclasses

    world = build_tiny_world()
    cfg = dataclasses.replace(world.heads.cfg, hazard_horizon=horizon, termination="hazard", hazard_memory=memory)
    torch.manual_seed(0)
    heads = RewardTerminationHeads(cfg)
    heads.load_state_dict(world.heads.state_dict(), strict=False)
    with torch.no_grad():
        last = heads.hazard["mlp"][-1]
        last.weight.zero_()
        last.bias.fill_(bias)
        if memory:  # the hazard also reads what the memory has gathered along the stream
            last.weight.normal_(0.0, 1.0)
    world.heads = heads.eval()
    return world


def test_a_recurrent_hazard_head_steps_as_it_trains_and_remembers() -> None:
    cfg = HeadsConfig(latent_channels=4, text_dim=12, hidden=16, hazard_horizon=5, hazard_memory=6)
    torch.manual_seed(0)
    heads = RewardTerminationHeads(cfg).eval()
    z = torch.randn(3, 7, 4, 9, 16)  # 3 episodes of 7 frames: 6 transitions each
    ctrl = torch.randn(3, 12)
    with torch.no_grad():
        x = torch.stack([heads.transition(z[:, k], z[:, k + 1]) for k in range(6)], 1)  # (3, 6, 3C, h, w)
        feats = heads.hazard_features(x.flatten(0, 1), ctrl.repeat_interleave(6, 0)).unflatten(0, (3, 6))
        seq = heads.hazard_sequence(feats)  # (3, 6): how train-hazard reads an episode
        mem, steps = torch.zeros(3, 6), []
        for k in range(6):  # how the simulator reads it, one transition at a time
            logit, mem = heads.hazard_step(x[:, k], ctrl, mem)
            steps.append(logit)
        assert mem.shape == (3, 6) and mem.abs().sum() > 0
        torch.testing.assert_close(torch.stack(steps, 1), seq, atol=1e-5, rtol=0)
        # the same last transition after another history: another hazard
        other = heads.hazard_step(x[:, 5], ctrl, torch.randn(3, 6))[0]
        assert not torch.allclose(other, steps[-1])
    with pytest.raises(ValueError, match=r"recurrent hazard head .* use hazard_step"):
        heads.hazard_logit(heads.transition(z[:, 0], z[:, 1]), ctrl)
    with pytest.raises(ValueError, match=r"hazard_memory must be an int >= 0.*got 4 with hazard_horizon 0"):
        HeadsConfig(hazard_memory=4)
    per_transition = RewardTerminationHeads(HeadsConfig(latent_channels=4, text_dim=12, hidden=16, hazard_horizon=5))
    empty = torch.zeros(3, 0)
    with torch.no_grad():
        logit, kept = per_transition.hazard_step(x[:, 0], ctrl, empty)
        assert kept is empty and torch.equal(logit, per_transition.hazard_logit(x[:, 0], ctrl))


def test_the_simulator_keeps_a_recurrent_hazard_memory_per_stream() -> None:
    from world_model.simulator import Simulator

    world = _hazard_world(-1.0, horizon=5, memory=4)
    sim = Simulator(world, 4, "cpu")
    keys = torch.arange(4) * 131 + 7
    sim.reset(torch.ones(4, dtype=torch.bool), torch.arange(4) % sim.num_starts, noise_key=keys)
    assert sim.state.memory.shape == (4, 4) and not sim.state.memory.any()
    ptr = sim.state.memory.data_ptr()
    for t in range(3):
        sim.step(torch.full((4,), t))
    assert (sim.state.memory.abs().sum(1) > 0).all() and sim.state.memory.data_ptr() == ptr  # updated in place
    snap = sim.get_state()
    ends = torch.stack([sim.step(torch.full((4,), t % 9))[2] for t in range(20)])  # (20, 4)
    assert 0 < ends.float().mean() < 1
    after = sim.state.memory.clone()
    sim.set_state(snap)  # the memory comes back with the window: the same endings, the same memory after
    assert torch.equal(sim.state.memory, snap.memory) and not torch.equal(snap.memory, after)
    assert torch.equal(torch.stack([sim.step(torch.full((4,), t % 9))[2] for t in range(20)]), ends)
    assert torch.equal(sim.state.memory, after)
    before = sim.state.memory.clone()
    sim.reset(torch.tensor([True, False, False, True]), torch.zeros(4, dtype=torch.long))
    assert not sim.state.memory[[0, 3]].any() and torch.equal(sim.state.memory[[1, 2]], before[[1, 2]])
    per_transition = Simulator(_hazard_world(0.0), 4, "cpu")
    assert per_transition.state.memory.shape == (4, 0)
    with pytest.raises(UsageError, match=r"hazard memory has width \(4,\) but this simulator's has \(0,\)"):
        per_transition.set_state(snap)
    with warnings.catch_warnings():  # bfloat16 may be slow on this CPU (a warning): the memory stays float32
        warnings.simplefilter("ignore")
        half = Simulator(world, 4, "cpu", dtype=torch.bfloat16)
    half.reset(torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), noise_key=keys)
    z_prev = half.latest.clone()
    z_next = half.step(torch.full((4,), 2))[0]
    with torch.no_grad():  # what the float32 head gives on the same latents: the step ran in float32
        x = world.heads.transition(z_prev, z_next)
        _, expect = world.heads.hazard_step(x, half.ctrl_pooled[torch.full((4,), 2)], torch.zeros(4, 4))
    assert half.state.memory.dtype == torch.float32
    torch.testing.assert_close(half.state.memory, expect, atol=1e-6, rtol=0)
    threshold = Simulator(world, 4, "cpu", termination="threshold")  # the head is stored, not used
    threshold.reset(torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), noise_key=keys)
    threshold.step(torch.zeros(4, dtype=torch.long))
    assert not threshold.state.memory.any()


def test_simulator_draws_hazard_endings_at_the_rate_seeded_and_per_stream() -> None:
    from world_model.simulator import Simulator

    def run(world, b: int, keys: torch.Tensor, steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
        sim = Simulator(world, b, "cpu")
        sim.reset(torch.ones(b, dtype=torch.bool), torch.arange(b) % sim.num_starts, noise_key=keys)
        lat, ends = [], []
        for t in range(steps):
            z, _, term = sim.step(torch.full((b,), t % 9))
            lat.append(z)
            ends.append(term)
        return torch.stack(lat, 1), torch.stack(ends, 1)  # (B, T, C, h, w), (B, T)

    keys = torch.arange(64) * 7919 + 3
    # q = sigmoid(0) = 0.5 within H = 10 steps: h = 1 - 0.5 ** 0.1 = 6.7% per step
    lat, ends = run(_hazard_world(0.0), 64, keys)
    rate = ends.float().mean().item()
    assert 0.03 < rate < 0.11, rate
    lat_thr, ends_thr = run(build_tiny_world(), 64, keys)  # the same world without the hazard: no ending
    assert not ends_thr.any() and torch.equal(lat, lat_thr)  # the draws leave every frame unchanged
    assert torch.equal(run(_hazard_world(0.0), 64, keys)[1], ends)  # same keys, same endings
    for i in (0, 5):  # a stream ends as it would alone: make_vec(N) equals N single envs
        assert torch.equal(run(_hazard_world(0.0), 1, keys[i : i + 1])[1][0], ends[i])
    assert run(_hazard_world(400.0), 4, keys[:4])[1].all()  # near-certain within H: every step
    assert not run(_hazard_world(-400.0), 4, keys[:4])[1].any()


def test_train_hazard_learns_the_endings_and_leaves_the_rest_of_the_world(tmp_path: Path,
                                                                          tiny_world_dir: Path) -> None:
    from safetensors.torch import load_file

    from world_model.checkpoint import load_world
    from world_model.data.latents import main as encode
    from world_model.train import hazard as H

    root = make_synthetic_dataset(tmp_path / "toy", episodes=6, steps=12)  # episodes 0, 2, 4 end terminated
    assert encode(["--data", str(root), "--vae", str(tiny_world_dir), "--out", str(tmp_path / "lat")]) == 0
    out = tmp_path / "world"
    args = ["--world", str(tiny_world_dir), "--data", str(root), "--latents", str(tmp_path / "lat"),
            "--out", str(out), "--horizon", "4", "--steps", "150", "--batch-size", "32", "--lr", "3e-3",
            "--threads", "1"]
    assert H.main(args) == 0
    world, base = load_world(out), load_world(tiny_world_dir)
    assert world.heads.cfg.hazard_horizon == 4 and world.heads.cfg.termination == "hazard"
    old = load_file(str(tiny_world_dir / "heads.safetensors"))
    new = load_file(str(out / "heads.safetensors"))
    assert {k for k in new if not k.startswith("hazard.")} == set(old)
    assert all(torch.equal(new[k], old[k]) for k in old)  # reward and termination weights untouched
    for name in ("vae.safetensors", "dit.safetensors", "control.safetensors"):
        assert (out / name).read_bytes() == (tiny_world_dir / name).read_bytes()
    assert torch.equal(world.start_latents, base.start_latents) and world.sampler == base.sampler
    rep, held = world.meta["hazard"]["train"], world.meta["hazard"]["held_out"]
    # every episode loses the 3 positions whose 4-step future passes the 12-step limit (the truncated ones
    # are cut there); an ended episode keeps one positive transition, the 9th
    assert rep["transitions"] + held["transitions"] == 6 * (12 - 3) and rep["episodes"] + held["episodes"] == 6
    n_ended = rep["sets"][0]["recorded_endings"]
    assert n_ended + held["sets"][0]["recorded_endings"] == 3
    assert rep["ending_rate"] == pytest.approx(n_ended / rep["transitions"])
    assert 0 <= rep["sets"][0]["expected_endings"] <= rep["episodes"]
    # the toy frames give no sign of the ending: a calibrated head learns its base rate (it starts near 0.5)
    assert abs(rep["sets"][0]["predicted"] - rep["ending_rate"]) < 0.05
    assert json.loads((out / "manifest.json").read_text())["recipe"]["commands"][-1][:2] == ["matrix-world",
                                                                                            "train-hazard"]
    with pytest.raises(UsageError, match=r"was encoded by another VAE"):
        other = tmp_path / "other"
        from world_model.checkpoint import save_world

        save_world(other, build_tiny_world(seed=1), recipe={})
        H.main([*args[:1], str(other), *args[2:]])
    with pytest.raises(UsageError, match=r"--horizon 0: must be >= 1"):
        H.main([*args, "--horizon", "0"])
    with pytest.raises(UsageError, match=r"a directory is given twice"):
        H.main([*args[:3], str(root), str(root), "--latents", str(tmp_path / "lat"), str(tmp_path / "lat"),
                *args[6:]])
    assert H.main([*args, "--holdout-fraction", "0", "--steps", "2"]) == 0  # no held-out episodes: no report
    assert load_world(out).meta["hazard"]["held_out"] is None


def test_train_hazard_trains_a_recurrent_head_and_reads_episodes_as_the_simulator(tmp_path: Path,
                                                                                   tiny_world_dir: Path) -> None:
    from world_model.checkpoint import load_world
    from world_model.data.latents import main as encode
    from world_model.train import hazard as H

    root = make_synthetic_dataset(tmp_path / "toy", episodes=6, steps=12)  # episodes 0, 2, 4 end terminated
    assert encode(["--data", str(root), "--vae", str(tiny_world_dir), "--out", str(tmp_path / "lat")]) == 0
    out = tmp_path / "world"
    assert H.main(["--world", str(tiny_world_dir), "--data", str(root), "--latents", str(tmp_path / "lat"),
                   "--out", str(out), "--horizon", "4", "--memory", "5", "--sequence-batch", "3", "--steps", "80",
                   "--lr", "3e-3", "--threads", "1"]) == 0
    world = load_world(out)
    assert world.heads.cfg.hazard_memory == 5 and world.heads.cfg.termination == "hazard"
    rep, held = world.meta["hazard"]["train"], world.meta["hazard"]["held_out"]
    # the report reads the uncensored transitions alone, as for a per-transition head
    assert rep["transitions"] + held["transitions"] == 6 * (12 - 3)
    assert abs(rep["sets"][0]["predicted"] - rep["ending_rate"]) < 0.08  # no sign of the ending: the base rate
    # train-hazard's logits along a whole episode are the simulator's, one transition at a time
    t = H.load_transitions((root,), (tmp_path / "lat",), 4, "train", 0.1, 0, keep_censored=True)
    assert len(t) == len(t.names) * 12 and not t.known.all()  # censored transitions feed the memory
    pooled = world.control_pooled.float()
    logits = H.predict(world.heads, t, pooled)
    start, length = t.episode_spans()
    e = 1
    idx = torch.arange(int(start[e]), int(start[e] + length[e]))
    mem, steps = torch.zeros(1, 5), []
    with torch.no_grad():
        for i in idx:
            x = world.heads.transition(t.z_prev[i : i + 1], t.z_next[i : i + 1])
            logit, mem = world.heads.hazard_step(x, pooled[t.actions[i : i + 1]], mem)
            steps.append(logit)
    torch.testing.assert_close(torch.cat(steps), logits[idx], atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match=r"--memory -1: must be >= 0"):
        H.main(["--world", str(tiny_world_dir), "--data", str(root), "--latents", str(tmp_path / "lat"),
                "--out", str(out), "--memory", "-1"])


def test_hazard_envs_equal_single_envs_and_the_termination_argument_is_checked(tmp_path: Path) -> None:
    from matrix_env.env import MatrixWorldEnv
    from tests.test_vector_env import compare_with_singles
    from world_model.checkpoint import save_world

    save_world(tmp_path / "hz", _hazard_world(0.0, horizon=3), recipe={})  # ~21% of the steps end
    compare_with_singles(tmp_path / "hz", "latent", max_steps=50, num_steps=12)  # asserts autoresets happened
    save_world(tmp_path / "gru", _hazard_world(-1.0, horizon=3, memory=4), recipe={})  # memory reset per episode
    compare_with_singles(tmp_path / "gru", "latent", max_steps=50, num_steps=12)
    env = MatrixWorldEnv(world=tmp_path / "hz", obs_type="latent", termination="threshold")
    env.reset(seed=0)
    assert not any(env.step(0)[2] for _ in range(12))  # the head is stored, not used
    with pytest.raises(UsageError, match=r"termination='hazard' needs a world with a hazard head"):
        MatrixWorldEnv(world=build_tiny_world(), obs_type="latent", termination="hazard")
    with pytest.raises(UsageError, match=r"termination must be one of \('threshold', 'hazard'\).*got 'never'"):
        MatrixWorldEnv(world=tmp_path / "hz", obs_type="latent", termination="never")


def test_endings_counts_hazard_endings_only_when_asked(tmp_path: Path) -> None:
    from world_model.eval import endings as N

    root = make_synthetic_dataset(tmp_path / "toy", episodes=4, steps=8)  # episodes 0 and 2 end terminated
    cut = N.cut_endings(N.ending_episodes(root), 2, 3)
    world = _hazard_world(400.0)  # the hazard ends every step; the termination head never fires (bias -10)
    assert N.replay(world, cut, 2, 0)["world_ended"] == 0  # default: what the termination head reads
    row = N.replay(world, cut, 2, 0, termination="hazard")
    assert row["termination"] == "hazard" and row["world_first_end_steps"] == [1, 1]
    recurrent = _hazard_world(400.0, memory=4)  # a recurrent head: the heads' verdict reads no hazard
    assert N.replay(recurrent, cut, 2, 0)["world_ended"] == 0
    assert N.replay(recurrent, cut, 2, 0, termination="hazard")["world_first_end_steps"] == [1, 1]


def test_a_recurrent_head_reads_episodes_of_any_length_as_the_simulator_does() -> None:
    from world_model.train.hazard import Transitions, episode_logits, predict

    torch.manual_seed(0)
    heads = RewardTerminationHeads(HeadsConfig(latent_channels=4, text_dim=12, hidden=16, hazard_horizon=5,
                                               hazard_memory=3)).eval()
    lengths = [3, 1, 5, 2] * 5  # 20 episodes: predict reads 16 at a time
    n = sum(lengths)
    episode = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = Transitions(torch.randn(n, 4, 9, 16), torch.randn(n, 4, 9, 16), torch.randint(0, 9, (n,)),
                    torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), episode,
                    torch.zeros(n, dtype=torch.long), [str(i) for i in range(len(lengths))],
                    torch.zeros(len(lengths), dtype=torch.bool))
    pooled = torch.randn(10, 12)
    logits = predict(heads, t, pooled)  # (N,)
    start, length = t.episode_spans()
    assert start.tolist()[:4] == [0, 3, 4, 9] and length.tolist()[:4] == lengths[:4]
    with torch.no_grad():
        for e in range(len(lengths)):
            mem = torch.zeros(1, 3)
            for i in range(int(start[e]), int(start[e] + length[e])):
                logit, mem = heads.hazard_step(heads.transition(t.z_prev[i : i + 1], t.z_next[i : i + 1]),
                                               pooled[t.actions[i : i + 1]], mem)
                torch.testing.assert_close(logit, logits[i : i + 1], atol=1e-5, rtol=0)
        # a sequence from mid-episode starts with an empty memory there, as an env's reset does
        crop, index = episode_logits(heads, t, pooled, torch.tensor([2]), (start, length), torch.tensor([2]))
        assert index[index >= 0].tolist() == [int(start[2]) + 2, int(start[2]) + 3, int(start[2]) + 4]
        assert (index[0, :3] >= 0).all() and (index[0, 3:] == -1).all()  # padded past the sequence's end
        i = int(start[2]) + 2
        first = heads.hazard_step(heads.transition(t.z_prev[i : i + 1], t.z_next[i : i + 1]),
                                  pooled[t.actions[i : i + 1]], torch.zeros(1, 3))[0]
        torch.testing.assert_close(crop[0, :1], first, atol=1e-5, rtol=0)
        assert not torch.allclose(crop[0, 0], logits[i])  # the whole episode's memory differs there


def test_step_limit_is_the_cut_off_length_and_refuses_two_limits(tmp_path: Path) -> None:
    import shutil

    from world_model.train.hazard import step_limit

    root = make_synthetic_dataset(tmp_path / "toy", episodes=4, steps=12)  # 1 and 3 cut off at 12 steps
    assert step_limit(root) == 12
    ended = make_synthetic_dataset(tmp_path / "ended", episodes=1, steps=6)  # episode 0 ends terminated
    assert step_limit(ended) is None
    shorter = make_synthetic_dataset(tmp_path / "short", episodes=2, steps=8)
    shutil.copytree(shorter / "episodes" / "ep_000001", root / "episodes" / "ep_000004")  # cut off at 8
    with pytest.raises(UsageError, match=r"episodes \['ep_000004'\] do not fit one step limit of 12 steps"):
        step_limit(root)
