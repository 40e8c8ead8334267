"""MatrixWorldEnv: Gymnasium API, registration, seeding, control, play and demo CLIs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import matrix_env
from matrix_env import DEFAULT_WORLD, SHIPPED_WORLDS, WORLDS_DIR, world_path
from matrix_env.env import MatrixWorldEnv
from tests.conftest import TINY_SAMPLER
from world_model.checkpoint import load_world
from world_model.errors import UsageError
from world_model.road_follower import heading_error
from world_model.simulator import Simulator

REPO = Path(__file__).resolve().parents[1]
SMALL = (64, 64)


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def rollout(env: gym.Env, seed: int, actions: list[int]) -> list[np.ndarray]:
    obs, _ = env.reset(seed=seed)
    frames = [obs]
    for a in actions:
        obs, *_ = env.step(a)
        frames.append(obs)
    return frames


@pytest.mark.filterwarnings("ignore:.*infinity.*")  # latent observations are unbounded by design
def test_gymnasium_check_env(tiny_world_dir: Path) -> None:
    check_env(MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL), skip_render_check=True)
    check_env(MatrixWorldEnv(world=tiny_world_dir, obs_type="latent"), skip_render_check=True)


def test_spaces_info_and_meanings(tiny_world_dir: Path) -> None:
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL)
    assert env.action_space == gym.spaces.Discrete(9)
    assert env.observation_space == gym.spaces.Box(0, 255, (*SMALL, 3), np.uint8)
    assert env.get_action_meanings()[:3] == ["D", "DL", "DR"]
    obs, info = env.reset(seed=0)
    assert info["action_meanings"] == env.get_action_meanings() and obs.shape == (*SMALL, 3)
    _, reward, terminated, truncated, info = env.step(1)
    assert info["action_meaning"] == "DL" and isinstance(reward, float)
    assert isinstance(terminated, bool) and truncated is False
    _, info = env.reset(seed=0, options={"start_index": 2})
    assert info["start_index"] == 2
    lat = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    assert lat.observation_space.shape == (4, 9, 16) and lat.observation_space.dtype == np.float32


def test_observation_decoder_serves_agent_frames_only(tiny_world_dir: Path, tiny_obs_world_dir: Path) -> None:
    """A world with an observation decoder: agent-sized observations come from it (obs_decoder=False, or the
    world without it: the VAE's), the generated stream and the 720p frames do not change; make_vec agrees."""
    import torch.nn.functional as F

    from world_model.vae import tensor_to_frames

    actions = [1, 1, 2, 0]
    plain = rollout(MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL), 3, actions)
    off = rollout(MatrixWorldEnv(world=tiny_obs_world_dir, obs_size=SMALL, obs_decoder=False), 3, actions)
    env = MatrixWorldEnv(world=tiny_obs_world_dir, obs_size=SMALL, render_mode="rgb_array")
    on = rollout(env, 3, actions)
    for a, b in zip(plain, off, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(plain, on, strict=True))
    with torch.no_grad():  # what the decoder draws for the env's own latent, resized like the VAE's frames
        x = env.unwrapped.world.obs_decoder(env.unwrapped._latent.float())  # (1, 3, 72, 128)
        want = tensor_to_frames(F.interpolate(x, size=SMALL, mode="bilinear", antialias=True, align_corners=False))
    np.testing.assert_array_equal(on[-1], want[0].numpy())
    hd = MatrixWorldEnv(world=tiny_world_dir, render_mode="rgb_array")
    rollout(hd, 3, actions)
    np.testing.assert_array_equal(env.render(), hd.render())  # 720p: the VAE's, the same stream
    envs = gym.make_vec("MatrixWorld-v0", num_envs=2, world=tiny_obs_world_dir, obs_size=SMALL)
    obs, _ = envs.reset(seed=[3, 4])
    np.testing.assert_array_equal(obs[0], on[0])
    envs.close()


def test_default_is_720p_and_render(tiny_world_dir: Path) -> None:
    env = MatrixWorldEnv(world=tiny_world_dir, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (720, 1280, 3) and obs.dtype == np.uint8
    np.testing.assert_array_equal(env.render(), obs)
    assert obs.flags.c_contiguous  # HWC in memory too, not a view of CHW planes (OpenCV draws on it)
    small = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL, render_mode="rgb_array")
    small.reset(seed=0)
    assert small.render().shape == (720, 1280, 3)


def test_human_render_headless(tiny_world_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL, render_mode="human")
    env.reset(seed=0)
    env.step(0)
    env.close()


def test_same_seed_same_frames_and_actions_matter(tiny_world_dir: Path) -> None:
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL)
    drive = rollout(env, 3, [0] * 5)
    again = rollout(env, 3, [0] * 5)
    for a, b in zip(drive, again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(env.reset(seed=np.int64(3))[0], drive[0])  # a numpy int seeds alike
    other_seed = rollout(env, 4, [0] * 5)
    assert any(not np.array_equal(a, b) for a, b in zip(drive[1:], other_seed[1:], strict=True))
    turn = rollout(env, 3, [2] * 5)
    np.testing.assert_array_equal(drive[0], turn[0])
    diff = [np.abs(a.astype(int) - b).mean() for a, b in zip(drive[2:], turn[2:], strict=True)]
    assert min(diff) > 0.5, diff  # different actions -> different futures


@pytest.mark.parametrize("env_id", ["MatrixWorld-v0", "matrix_env:MatrixWorld-v0"])
def test_registration(tiny_world_dir: Path, env_id: str) -> None:
    env = gym.make(env_id, world=tiny_world_dir, obs_size=SMALL)
    assert env.spec.max_episode_steps == matrix_env.MAX_EPISODE_STEPS
    assert isinstance(env.unwrapped, MatrixWorldEnv)
    env.reset(seed=0)
    env.step(env.action_space.sample())


def test_import_matrix_env_does_not_import_torch() -> None:
    out = run_python(
        "import sys, gymnasium as gym, matrix_env\n"
        "gym.register_envs(matrix_env)\n"
        "print('torch' in sys.modules, 'MatrixWorld-v0' in gym.registry)"
    )
    assert out.split() == ["False", "True"]


def test_env_does_not_import_training_code(tiny_world_dir: Path) -> None:
    out = run_python(
        "import sys, gymnasium as gym, matrix_env\n"
        f"env = gym.make('MatrixWorld-v0', world={str(tiny_world_dir)!r}, obs_size=(64, 64))\n"
        "env.reset(seed=0); env.step(0)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('world_model.train', 'world_model.data'))))"
    )
    assert out.strip() == "[]"


def test_missing_default_world_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "worlds" / "default"
    monkeypatch.setattr("matrix_env.DEFAULT_WORLD", missing)
    with pytest.raises(UsageError, match=str(missing)):
        MatrixWorldEnv()


def test_world_names_and_paths(tmp_path: Path) -> None:
    assert world_path(None) == DEFAULT_WORLD and world_path("default") == DEFAULT_WORLD
    assert world_path("hold") == WORLDS_DIR / "hold" and world_path(tmp_path) == tmp_path
    names = re.escape(str(SHIPPED_WORLDS))  # "('default', 'hold', ...)"
    with pytest.raises(UsageError, match=r"no world model at 'holdd'.*shipped worlds " + names):
        MatrixWorldEnv(world="holdd")


def test_shipped_worlds_share_starts_and_differ_in_dynamics() -> None:
    """Every shipped world has the default world's VAE and start contexts, and its own DiT (a fine-tune or,
    for "fast", a distilled student): the same start latents, then different ones under the same actions."""
    latents = {}
    for name in SHIPPED_WORLDS:
        env = MatrixWorldEnv(world=name, obs_type="latent")
        obs, _ = env.reset(seed=3)
        latents[name] = np.stack([obs] + [env.step(a)[0] for a in (0, 0, 1, 1, 2, 2)])  # (7, C, H, W)
        env.close()
    assert len(SHIPPED_WORLDS) >= 2
    for name in SHIPPED_WORLDS[1:]:
        gap = np.abs(latents["default"] - latents[name]).mean(axis=(1, 2, 3))  # (7,)
        assert gap[0] == 0.0 and (gap[1:] > 0.01).all(), (name, gap)


@pytest.mark.parametrize("name", SHIPPED_WORLDS)
def test_shipped_world_turns_the_road_the_right_way(name: str) -> None:
    """From the same 8 starts and noise, 6 steps of "DL" then of "DR": turning left moves the road ahead
    to the right of the view (the car rotates left), as in the game. Measured when written (seed 11,
    float32): default 8 of 8 streams, mean shift 0.037; hold 8 of 8, 0.044; fast 7 of 8, 0.031."""
    errors = {}
    for act in ("DL", "DR"):
        envs = gym.make_vec("MatrixWorld-v0", num_envs=8, world=name, obs_size=(72, 128), obs_decoder=False)
        try:
            obs, _ = envs.reset(seed=11)
            ids = np.full(8, envs.unwrapped.get_action_meanings().index(act))
            for _ in range(6):
                obs, *_ = envs.step(ids)
        finally:
            envs.close()
        errors[act] = heading_error(obs)[0]  # (8,) road centroid ahead, -1 left .. +1 right
    shift = errors["DL"] - errors["DR"]  # (8,)
    assert shift.mean() > 0.015 and (shift > 0).sum() >= 6, shift


def test_bad_arguments(tiny_world_dir: Path) -> None:
    with pytest.raises(UsageError, match="obs_size"):
        MatrixWorldEnv(world=tiny_world_dir, obs_size=(64,))
    with pytest.raises(UsageError, match="obs_type"):
        MatrixWorldEnv(world=tiny_world_dir, obs_type="depth")
    with pytest.raises(UsageError, match="mode"):
        MatrixWorldEnv(world=tiny_world_dir, sampler_mode="warp")
    with pytest.raises(UsageError, match=r"720p frame or smaller\), got \(800, 1400\)"):
        MatrixWorldEnv(world=tiny_world_dir, obs_size=(800, 1400))  # no silent upsampling
    with pytest.raises(UsageError, match=r"device must be a torch device .* got 'gpu'"):
        MatrixWorldEnv(world=tiny_world_dir, device="gpu")
    assert MatrixWorldEnv(world=tiny_world_dir, obs_size=48).observation_space.shape == (48, 48, 3)  # int: square
    with pytest.raises(UsageError, match=r"obs_size must be \(height, width\) ints .* got \(True, 48\)"):
        MatrixWorldEnv(world=tiny_world_dir, obs_size=(True, 48))
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL)
    env.reset(seed=0)
    for bad in (9, True, 1.0, np.array([1]), torch.tensor(1.0)):  # bools are not actions (as in the vector env)
        with pytest.raises(UsageError, match=r"action must be an int in \[0, 9\), got"):
            env.step(bad)
    with pytest.raises(UsageError, match=r"got tensor\(True\)"):  # the message shows what was passed
        env.step(torch.tensor(True))
    for ok in (np.int64(1), np.array(1), torch.tensor(1)):  # integer scalars of any kind are
        assert env.step(ok)[4]["action_meaning"] == "DL"
    state = env.np_random.bit_generator.state
    with pytest.raises(UsageError, match=r"unknown reset option\(s\) \['start_idx'\]"):
        env.reset(seed=3, options={"start_idx": 1})  # a typo is an error, not a random start
    assert env.np_random.bit_generator.state == state  # ... and the failed reset changed nothing


@pytest.mark.parametrize("mode", ["reconditioned", "immediate"])
def test_sampler_modes(tiny_world_dir: Path, mode: str) -> None:
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL, sampler_mode=mode)
    assert env.sim.cfg.mode == mode
    frames = rollout(env, 0, [0, 1])
    assert frames[-1].shape == (*SMALL, 3)


def test_sampler_overrides(tiny_world_dir: Path) -> None:
    """sampler={...} changes Swin-DPM fields (guidance changes the future); bad fields are named."""
    env = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL, sampler={"guidance": 3.0})
    assert env.sim.cfg.guidance == 3.0 and env.sim.cfg.ctx_noise == TINY_SAMPLER.get("ctx_noise", 0.0)
    plain = MatrixWorldEnv(world=tiny_world_dir, obs_size=SMALL)
    assert not np.array_equal(rollout(env, 0, [1, 1, 1])[-1], rollout(plain, 0, [1, 1, 1])[-1])
    both = MatrixWorldEnv(world=tiny_world_dir, sampler_mode="immediate", sampler={"ctx_noise": 0.2})
    assert both.sim.cfg.mode == "immediate" and both.sim.cfg.ctx_noise == 0.2
    with pytest.raises(UsageError, match="sampler_mode must be None or one of .*got 'fast'"):
        MatrixWorldEnv(world=tiny_world_dir, sampler_mode="fast")
    with pytest.raises(UsageError, match="sampler mode given twice"):
        MatrixWorldEnv(world=tiny_world_dir, sampler_mode="immediate", sampler={"mode": "pipelined"})
    with pytest.raises(UsageError, match="must be a dict"):
        MatrixWorldEnv(world=tiny_world_dir, sampler=[("guidance", 2.0)])
    with pytest.raises(UsageError, match=r"unknown fields \['gudance'\]"):
        MatrixWorldEnv(world=tiny_world_dir, sampler={"gudance": 2.0})
    with pytest.raises(UsageError, match="guidance must be"):
        MatrixWorldEnv(world=tiny_world_dir, sampler={"guidance": -1.0})


def test_play_headless(tiny_world_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_env.play import PlayArgs, keys_to_action, play

    assert keys_to_action(up=True, down=False, left=False, right=False) == 0  # D
    assert keys_to_action(up=True, down=False, left=True, right=False) == 1  # DL
    assert keys_to_action(up=False, down=True, left=False, right=True) == 5  # BR
    assert keys_to_action(up=False, down=False, left=True, right=True) == 6  # N
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    stats = play(PlayArgs(world=str(tiny_world_dir), max_steps=3, fps=1000, scale=0.25))
    assert stats["steps"] == 3


def test_human_windows_survive_closing_another_env(tiny_world_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pygame has one display per process: closing one human env must not break another's window."""
    import pygame

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    first = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent", render_mode="human")
    second = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent", render_mode="human")
    first.reset(seed=0)
    second.reset(seed=1)
    first.close()
    assert pygame.display.get_init()  # the second window is still open
    second.step(0)  # draws without "video system not initialized"
    second.close()
    assert not pygame.display.get_init()  # the last window closed pygame
    third = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent", render_mode="human")
    third.reset(seed=2)  # a new window after all were closed
    fourth = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent", render_mode="human")
    fourth.reset(seed=3)
    assert pygame.display.get_init()
    pygame.quit()  # someone else (CarRacing's human window, HumanRendering) shuts pygame down
    third.step(0)  # reopens the display ...
    fourth.step(0)  # ... and the other viewer draws on the new one, not on its dead surface
    third.close()
    fourth.close()
    assert not pygame.display.get_init()


def test_demo_writes_720p_mp4(tiny_world_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import imageio.v2 as imageio

    from matrix_env.demo import main

    out = tmp_path / "videos" / "demo.mp4"
    assert main(["--world", str(tiny_world_dir), "--steps", "3", "--out", str(out), "--fps", "10"]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.mp4"]  # no temporary left behind
    frames = [f for f in imageio.get_reader(out)]  # list() would ask len(): inf
    assert len(frames) == 4 and frames[0].shape == (720, 1280, 3)
    out2 = tmp_path / "script.mp4"
    argv = ["--world", str(tiny_world_dir), "--steps", "2", "--out", str(out2), "--policy", "script", "--guidance", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "policy script: car on the road in" in printed and "predicted return" in printed
    assert len([f for f in imageio.get_reader(out2)]) == 3
    with pytest.raises(UsageError):
        main(["--world", str(tiny_world_dir), "--steps", "0"])


def test_a_cuda_device_torch_cannot_see_is_a_clear_error(tiny_world_dir: Path, monkeypatch) -> None:
    """device="cuda" without a usable GPU names the device and what to do, before any weights move."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"device='cuda', but this torch .* sees no CUDA device; use device='cpu'"):
        MatrixWorldEnv(world=tiny_world_dir, device="cuda")
    with pytest.raises(UsageError, match=r"device='cuda', but this torch"):  # the vector env loads the same way
        gym.make_vec("MatrixWorld-v0", num_envs=2, world=tiny_world_dir, device="cuda")
    with pytest.raises(UsageError, match=r"device='cuda', but this torch"):  # so does every loader (eval, probe)
        load_world(tiny_world_dir, "cuda")
    world = load_world(tiny_world_dir)
    with pytest.raises(UsageError, match=r"device='cuda', but this torch"):  # and a simulator of a loaded world
        Simulator(world, 1, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"device='cuda:3', but torch sees 1 CUDA device\(s\): cuda:0 .. cuda:0"):
        MatrixWorldEnv(world=tiny_world_dir, device="cuda:3")
