"""Train a PPO agent only in MatrixWorld (or, as the baseline, in the real game), then evaluate it in
the real CarRacing-v3.

It trains in the shipped "hold" world by default (`--world`): the world for training agents that go
to the real game (docs/EXPERIMENTS.md, "Data that punishes ignoring the road" and "Steering share").
The agent sees 84x84 frames in both worlds: MatrixWorld decodes at 72x128 and resizes; the real
env renders 1280x720, averages down to 72x128 (the recorder's pipeline) and resizes the same way.
The imagined reward is the world's reward head; the real return is CarRacing's own.

    python examples/ppo_in_imagination.py --timesteps 4096 --episodes 3

A step-matched baseline: the same PPO trained on the real game for the same number of agent steps
(`--train-in real`: real CarRacing-v3 envs, no world; the world flags do not apply):

    python examples/ppo_in_imagination.py --train-in real --timesteps 65536 --num-envs 16 --frame-stack 2

A long run, resumable (rerun the same command after a kill: it continues from the newest checkpoint
in --run-dir, saved atomically every --save-every timesteps):

    python examples/ppo_in_imagination.py --timesteps 300000 --run-dir ~/ppo --dtype bfloat16 --compile

(--dtype bfloat16 only on a GPU or a CPU with AVX512-BF16 / AMX; elsewhere it is several times slower
than float32 and the world warns: keep float32 with --compile there, README "Env speed".)
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecFrameStack, VecMonitor

from agents.real_env import RealCarRacingEnv
from agents.vec_env import MatrixWorldSB3VecEnv
from matrix_env import world_path
from world_model.actions import DRIVING_ACTIONS
from world_model.checkpoint import load_world
from world_model.road_follower import RoadFollower

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--timesteps", type=int, default=4096, help="PPO training timesteps (in all, with resume)")
parser.add_argument("--train-in", default="world", choices=("world", "real"),
                    help="train in the world (default) or, as the baseline, in the real CarRacing-v3")
parser.add_argument("--num-envs", type=int, default=8, help="training envs (imagined: one batched forward)")
parser.add_argument("--frame-stack", type=int, default=1, help="frames the agent sees per step (1 = no stack)")
parser.add_argument("--n-steps", type=int, default=128, help="PPO rollout length per env")
parser.add_argument("--world", default="hold",
                    help="a shipped world's name (default: hold, the world for training agents) or a world directory")
parser.add_argument("--dtype", default="float32",
                    help="world dtype: float32, bfloat16, or auto (the faster of the two on this device and batch)")
parser.add_argument("--compile", action="store_true", help="torch.compile the world's DiT")
parser.add_argument("--device", default="cpu", help="torch device of the world and the policy: cpu or cuda")
parser.add_argument("--sampler-mode", default=None, choices=("pipelined", "reconditioned", "immediate"),
                    help="Swin-DPM action-latency mode of the world (default: the world's)")
parser.add_argument("--ctx-noise", type=float, default=None, help="sampler ctx_noise (default: the world's)")
parser.add_argument("--groups", type=int, default=None,
                    help="sampler noise groups G, frames in flight (default: the world's; pipelined latency G-1)")
parser.add_argument("--run-dir", type=Path, default=None, help="checkpoints and progress log; resumes from it")
parser.add_argument("--save-every", type=int, default=16384, help="timesteps between checkpoints (with --run-dir)")
parser.add_argument("--episodes", type=int, default=3, help="real CarRacing-v3 evaluation episodes (0: none)")
parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the first real evaluation episode")
parser.add_argument("--no-baselines", action="store_true", help="evaluate only the agent (no random/follower rows)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
for name in ("timesteps", "num_envs", "frame_stack", "n_steps", "save_every"):
    if getattr(args, name) < 1:
        parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
if args.episodes < 0:
    parser.error(f"--episodes must be >= 0, got {args.episodes}")
if args.train_in == "real":
    world_flags = {
        "--sampler-mode": args.sampler_mode,
        "--ctx-noise": args.ctx_noise,
        "--groups": args.groups,
        "--compile": args.compile or None,
        "--dtype": None if args.dtype == "float32" else args.dtype,
    }
    given = [flag for flag, value in world_flags.items() if value is not None]
    if given:
        parser.error(f"--train-in real trains without a world; {', '.join(given)} would be ignored")


def stacked(venv: VecEnv) -> VecEnv:
    """The same frame stack in imagination and in the real game."""
    return VecFrameStack(venv, args.frame_stack) if args.frame_stack > 1 else venv


if args.train_in == "world":
    train_env: VecEnv = MatrixWorldSB3VecEnv(
        world=args.world, num_envs=args.num_envs, obs_size=(84, 84), max_episode_steps=250, dtype=args.dtype,
        compile_model=args.compile, device=args.device, sampler_mode=args.sampler_mode,
        sampler={k: v for k, v in (("ctx_noise", args.ctx_noise), ("groups", args.groups)) if v is not None},
    )
    cfg = train_env.venv.sim.cfg
    print(f"imagining {args.num_envs} envs on {args.device} in {train_env.venv.sim.dtype}: sampler {cfg.mode}, "
          f"ctx_noise {cfg.ctx_noise}, groups {cfg.groups}")
else:  # the baseline: the same agent and samples, from the real game (250-step episodes too)
    train_env = VecMonitor(DummyVecEnv([lambda: RealCarRacingEnv(obs_size=(84, 84))] * args.num_envs))
    print(f"training in {args.num_envs} real CarRacing-v3 envs (no world)")
train_env.seed(args.seed)
train_env = stacked(train_env)  # episode returns: the adapter's or VecMonitor's

ckpt = args.run_dir / "ppo.zip" if args.run_dir else None
if ckpt is not None and ckpt.exists():
    model = PPO.load(ckpt, env=train_env, device=args.device)
    print(f"resumed {ckpt} at {model.num_timesteps} timesteps")
else:
    model = PPO(
        "CnnPolicy", train_env, n_steps=args.n_steps, batch_size=256, n_epochs=4, learning_rate=2.5e-4,
        ent_coef=0.01, clip_range=0.1, seed=args.seed, device=args.device, verbose=1,
    )  # fmt: skip

while model.num_timesteps < args.timesteps:
    chunk = args.timesteps - model.num_timesteps
    if ckpt is not None:
        chunk = min(chunk, args.save_every)
    model.learn(total_timesteps=chunk, reset_num_timesteps=False)
    if ckpt is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = args.run_dir / "ppo.tmp.zip"
        model.save(tmp)
        os.replace(tmp, ckpt)  # atomic: a kill never leaves a half-written checkpoint
        returns = [ep["r"] for ep in model.ep_info_buffer]
        key = "imagined_return" if args.train_in == "world" else "real_return"
        line = {"timesteps": model.num_timesteps, key: float(np.mean(returns)) if returns else None}
        with open(args.run_dir / "progress.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
train_env.close()
steps = f"{model.num_timesteps} {'imagined' if args.train_in == 'world' else 'real'} steps"
if args.episodes == 0:
    print(f"{steps}; no real evaluation (--episodes 0)")
    raise SystemExit(0)


def real_returns(act, world=None) -> tuple[list[float], int]:
    """Returns of ``act(obs) -> actions`` over --episodes real episodes, seeds --eval-seed, +1, ...,
    and how many of them ended early (the car left the playfield: CarRacing's -100) rather than at
    the 250-step limit.

    With ``world`` the agent sees each real frame encoded by the world's VAE and decoded as the world's
    envs decode its observations (its observation decoder if it has one, else the VAE).
    """
    out, ended = [], 0
    codec = {} if world is None else {"vae": world.vae, "decoder": world.obs_decoder}
    for ep in range(args.episodes):
        real = stacked(DummyVecEnv([lambda: RealCarRacingEnv(obs_size=(84, 84), **codec)]))
        real.seed(args.eval_seed + ep)
        obs, total, done = real.reset(), 0.0, False
        while not done:
            obs, reward, dones, infos = real.step(act(obs))
            total, done = total + float(reward[0]), bool(dones[0])
        ended += infos[0].get("lap_finished") is False  # CarRacing: False when the car left the playfield
        real.close()
        out.append(total)
    return out, ended


rng = np.random.default_rng(args.seed)
follower = RoadFollower(DRIVING_ACTIONS)
world = load_world(world_path(args.world)) if args.train_in == "world" else None
model.set_random_seed(args.seed)  # after the world's construction, which draws from torch's RNG
trained = "PPO trained in imagination" if args.train_in == "world" else "PPO trained in the real game"
rows = {
    trained: real_returns(lambda obs: model.predict(obs, deterministic=False)[0]),
    "the same, greedy": real_returns(lambda obs: model.predict(obs, deterministic=True)[0]),
}
if world is not None:
    rows["the same, real frames encoded and decoded as the world's envs do"] = real_returns(
        lambda obs: model.predict(obs, deterministic=False)[0], world
    )
if not args.no_baselines:
    rows["random policy"] = real_returns(lambda obs: rng.integers(9, size=1))
    rows["pixel road follower (scripted reference)"] = real_returns(lambda obs: follower(obs[..., -3:]))
print(f"real CarRacing-v3, {args.episodes} episodes (seeds {args.eval_seed}+), {steps}:")
for name, (rets, ended) in rows.items():
    print(f"  {name}: return {np.mean(rets):.1f} +- {np.std(rets):.1f}  {[round(r, 1) for r in rets]}; "
          f"left the playfield in {ended}/{len(rets)}")
