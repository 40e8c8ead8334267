"""The examples run as a user runs them (a fresh process, the shipped default world)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: Path, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_quickstart_writes_a_strip(tmp_path: Path) -> None:
    out = run_example("quickstart.py", tmp_path)
    assert "wrote quickstart.png (180, 2880, 3)" in out
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000


def test_train_world_script_records_trains_builds_and_resumes(tmp_path: Path) -> None:
    """examples/train_world.sh end to end on a tiny budget: a DEADLINE already past stops train-dit
    after one step (world built from it), a rerun continues to STEPS, a third run redoes nothing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PY": sys.executable,
           "EPISODES": "2 1 1 1", "EP_STEPS": "24", "WORKERS": "1", "STEPS": "2", "BATCH": "2", "DEVICE": "cpu"}
    cmd = ["bash", str(ROOT / "examples" / "train_world.sh"), str(tmp_path / "tw")]

    def run(**extra: str) -> str:
        proc = subprocess.run(cmd, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout

    out = run(DEADLINE="1", BUILD_SECONDS="0")
    assert "--max-minutes 0.001: stopped at step 1 of 2" in out and "saved world model" in out
    assert not list((tmp_path / "tw" / "data").glob("*/episodes/*/video_720p.mp4"))  # NO_VIDEO=1 by default
    world = tmp_path / "tw" / "world"
    first = (world / "dit.safetensors").read_bytes()
    out = run()
    assert out.count("(0 encoded now, ") == 4 and "at step 1" in out and "saved world model" in out
    assert (world / "dit.safetensors").read_bytes() != first  # rebuilt from the finished run
    out = run()
    assert "has trained its 2 steps already" in out and "already built from this run's model" in out
    import gymnasium as gym

    import matrix_env  # noqa: F401

    e = gym.make("MatrixWorld-v0", world=str(world), obs_size=(32, 32))
    obs, _ = e.reset(seed=0)
    obs, *_ = e.step(3)
    assert obs.shape == (32, 32, 3) and obs.dtype.name == "uint8"
    e.close()


def test_vector_env_example(tmp_path: Path) -> None:
    out = run_example("vector_env.py", tmp_path)
    assert "obs (16, 84, 84, 3) uint8" in out


def test_ppo_in_imagination_trains_only_with_episodes_0(tmp_path: Path) -> None:
    out = run_example("ppo_in_imagination.py", tmp_path, "--timesteps", "32", "--num-envs", "2", "--n-steps", "16",
                      "--sampler-mode", "immediate", "--ctx-noise", "0.25", "--episodes", "0")
    assert "sampler immediate, ctx_noise 0.25" in out
    assert "32 imagined steps; no real evaluation (--episodes 0)" in out


def test_ppo_in_imagination_real_baseline_trains_in_the_real_game(tmp_path: Path) -> None:
    """``--train-in real``: the same PPO on real CarRacing-v3 envs, the step-matched baseline."""
    out = run_example("ppo_in_imagination.py", tmp_path, "--train-in", "real", "--timesteps", "32", "--num-envs",
                      "2", "--n-steps", "16", "--episodes", "0", "--run-dir", "run", "--save-every", "32")
    assert "training in 2 real CarRacing-v3 envs (no world)" in out and "imagining" not in out
    assert "32 real steps; no real evaluation (--episodes 0)" in out
    assert set(json.loads((tmp_path / "run" / "progress.jsonl").read_text())) == {"timesteps", "real_return"}


def test_ppo_in_imagination_rejects_negative_episodes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ppo_in_imagination.py"), "--episodes", "-1"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "--episodes must be >= 0, got -1" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ppo_in_imagination.py"), "--train-in", "real",
                           "--sampler-mode", "immediate", "--compile"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "--sampler-mode, --compile would be ignored" in proc.stderr


@pytest.mark.slow
def test_ppo_in_imagination_example_resumes(tmp_path: Path) -> None:
    common = ("--num-envs", "4", "--n-steps", "64", "--frame-stack", "2", "--episodes", "1", "--run-dir", "run")
    out = run_example("ppo_in_imagination.py", tmp_path, "--timesteps", "256", "--save-every", "256", *common)
    for row in ("PPO trained in imagination", "random policy", "pixel road follower (scripted reference)"):
        assert f"  {row}: return " in out
    assert set(re.findall(r"; left the playfield in (\d+)/1\n", out)) <= {"0", "1"}  # one episode each
    assert len(re.findall(r"; left the playfield in \d+/1\n", out)) == 5  # each row: agent x3, random, follower
    assert "256 imagined steps" in out and (tmp_path / "run" / "ppo.zip").exists()
    out = run_example("ppo_in_imagination.py", tmp_path, "--timesteps", "512", "--save-every", "256", *common)
    assert "resumed run/ppo.zip at 256 timesteps" in out and "512 imagined steps" in out
    progress = (tmp_path / "run" / "progress.jsonl").read_text().splitlines()
    assert [json.loads(line)["timesteps"] for line in progress] == [256, 512]


@pytest.mark.parametrize(("act_in", "mode", "horizon"), [("world", "pipelined", "4"), ("real", "immediate", "1")])
def test_plan_in_imagination_runs_mpc(tmp_path: Path, act_in: str, mode: str, horizon: str) -> None:
    """MPC by branching states: in the world (clone/restore), and in the real game (context frames)."""
    out = run_example("plan_in_imagination.py", tmp_path, "--act-in", act_in, "--steps", "2", "--candidates", "9",
                      "--horizon", horizon, "--sampler-mode", mode)
    assert f"acting in the {act_in} (default world plans, {mode} sampler)" in out
    rows = [line for line in out.splitlines() if line.startswith(f"| MPC, 9 x {horizon} steps |")]
    assert len(rows) == 1 and rows[0].split("|")[4].strip() == "2"  # two steps acted


def test_plan_in_imagination_rejects_a_horizon_inside_the_latency(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "plan_in_imagination.py"), "--horizon", "3"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--horizon 3 cannot see a first action: the pipelined sampler shows it 3 steps later" in proc.stderr


def test_plan_in_imagination_names_a_bad_device(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "plan_in_imagination.py"), "--device", "gpu0"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu0'" in proc.stderr


def test_plan_picks_the_first_action_of_the_best_sequence(tiny_world_dir: Path) -> None:
    """plan() on a world whose reward is 1 for action 5 (and 0.5 for 2): the best sequence holds 5."""
    import importlib.util

    import numpy as np
    import torch

    from matrix_env.vector import MatrixWorldVectorEnv

    spec = importlib.util.spec_from_file_location("plan_example", ROOT / "examples" / "plan_in_imagination.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    reward = lambda z0, z1, a: (a == 5).float() + 0.5 * (a == 2).float()  # noqa: E731
    envs = MatrixWorldVectorEnv(18, world=tiny_world_dir, obs_type="latent", max_episode_steps=-1, reward_fn=reward)
    envs.reset(seed=0)
    envs.restore_state(envs.clone_state(0))
    assert example.plan(envs, np.random.default_rng(0), horizon=3) == 5
    envs.sim.reward_fn = lambda z0, z1, a: torch.where(a == 7, 1.0, 0.0)  # another reward, another plan
    assert example.plan(envs, np.random.default_rng(0), horizon=3) == 7
