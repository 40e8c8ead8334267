"""reset(options={"context_frames": ...}): episodes that start from the caller's frames (e.g. the real
game's), in the single and the vector env, and Simulator.encode, their encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matrix_env.env import MatrixWorldEnv
from matrix_env.vector import MatrixWorldVectorEnv
from world_model.errors import UsageError

NATIVE = (72, 128)


def recorded_frames(world: Path, seed: int, steps: int = 5) -> np.ndarray:
    """(steps + 1, 72, 128, 3) uint8 frames of a drive in the world: stand-ins for real ones."""
    env = MatrixWorldEnv(world=world, obs_size=NATIVE)
    obs, _ = env.reset(seed=seed)
    frames = [obs] + [env.step(a)[0] for a in np.arange(steps) % 9]
    return np.stack(frames)


def test_single_env_starts_from_given_frames(tiny_world_dir: Path) -> None:
    frames = recorded_frames(tiny_world_dir, seed=1)
    env = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    obs, info = env.reset(seed=0, options={"context_frames": frames})
    assert info["start_index"] == -1
    want = env.sim.encode(frames[-1:])[0].numpy()  # the first observation: the newest given frame's latent
    np.testing.assert_allclose(obs, want, rtol=0, atol=1e-5)  # (encoded in a batch of 2: matmul rounding)
    ctx = env.clone_state().stream.latents[0, : env.sim.cfg.context]
    torch.testing.assert_close(ctx, env.sim.encode(frames[-env.sim.cfg.context :]))  # the last C_ctx frames

    run = [env.step(a)[0] for a in (0, 1, 2)]
    env.reset(seed=0, options={"context_frames": frames})  # same seed, same frames: same future
    np.testing.assert_array_equal(np.stack(run), np.stack([env.step(a)[0] for a in (0, 1, 2)]))
    other = recorded_frames(tiny_world_dir, seed=2)
    obs_other, _ = env.reset(seed=0, options={"context_frames": other})
    assert np.abs(obs_other - obs).mean() > 1e-3  # other frames, another start


def test_720p_frames_are_reduced_as_the_recorder_reduces_them(tiny_world_dir: Path) -> None:
    from world_model.data.record import to_train_res

    env = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    hd = np.random.default_rng(0).integers(0, 256, (3, 720, 1280, 3), dtype=np.uint8)  # no flat blocks
    small = np.stack([to_train_res(f) for f in hd])  # the recorder's 10x10 rounded block means
    torch.testing.assert_close(env.sim.encode(hd), env.sim.encode(small), rtol=0, atol=0)
    hd.setflags(write=False)  # read-only input (e.g. a memory-mapped recording) is fine
    obs_hd, _ = env.reset(seed=0, options={"context_frames": hd})
    obs, _ = env.reset(seed=0, options={"context_frames": small})
    np.testing.assert_array_equal(obs_hd, obs)


def test_vector_env_context_frames_match_single_envs_and_respect_the_mask(tiny_world_dir: Path) -> None:
    n = 3
    frames = np.stack([recorded_frames(tiny_world_dir, seed=s) for s in range(n)])  # (3, 6, 72, 128, 3)
    envs = MatrixWorldVectorEnv(num_envs=n, world=tiny_world_dir, obs_size=(32, 32))
    envs.reset(seed=7)
    before = envs.clone_state()
    mask = np.array([True, False, True])
    obs, info = envs.reset(options={"reset_mask": mask, "context_frames": frames})
    assert info["start_index"].tolist() == [-1, 0, -1] and info["_start_index"].tolist() == mask.tolist()
    torch.testing.assert_close(envs.clone_state(1).stream.latents, before[1].stream.latents, rtol=0, atol=0)

    envs.reset(seed=20, options={"context_frames": frames})
    steps = [envs.step(np.array([0, 4, 8]))[0] for _ in range(3)]
    for i in range(n):
        single = MatrixWorldEnv(world=tiny_world_dir, obs_size=(32, 32))
        single.reset(seed=20 + i, options={"context_frames": frames[i]})
        for vec_obs, a in zip(steps, (0, 4, 8)[i : i + 1] * 3, strict=True):
            assert np.abs(vec_obs[i].astype(int) - single.step(a)[0]).max() <= 1  # batched rounding


def test_bad_context_frames_are_named(tiny_world_dir: Path) -> None:
    env = MatrixWorldEnv(world=tiny_world_dir, obs_type="latent")
    frames = recorded_frames(tiny_world_dir, seed=0)
    with pytest.raises(UsageError, match=r"must be uint8 RGB frames of shape \(T>=2, H, W, 3\).*float32"):
        env.reset(options={"context_frames": frames.astype(np.float32)})
    with pytest.raises(UsageError, match=r"\(H, W\) = k \* \(72, 128\).*got \(4, 96, 96, 3\) uint8"):
        env.reset(options={"context_frames": np.zeros((4, 96, 96, 3), np.uint8)})  # CarRacing's own 96x96 view
    with pytest.raises(UsageError, match="got \\[array"):
        env.reset(options={"context_frames": [frames[0], frames[1, :10]]})  # ragged
    with pytest.raises(UsageError, match=r"\(T>=2, H, W, 3\), the newest last, .* got \(1, 72, 128, 3\)"):
        env.reset(options={"context_frames": frames[:1]})
    with pytest.raises(UsageError, match="exclude each other"):
        env.reset(options={"context_frames": frames, "start_index": 0})
    with pytest.raises(UsageError, match=r"unknown reset option\(s\) \['context_frame'\]"):
        env.reset(options={"context_frame": frames})
    envs = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_type="latent")
    with pytest.raises(UsageError, match=r"shape \(2, T>=2, H, W, 3\).*got \(6, 72, 128, 3\)"):
        envs.reset(options={"context_frames": frames})
    with pytest.raises(UsageError, match=r"frames must be uint8 RGB of shape \(B, H, W, 3\) .*got \(72, 128, 3\)"):
        env.sim.encode(frames[0])
