"""Plan with the world: model-predictive control, in the world itself or in the real CarRacing-v3.

Every step, the episode being acted is put into all N sub-envs of a planning vector env, which rolls
N action sequences H steps ahead in one batched forward per step; the first action of the sequence
with the highest predicted return (the world's reward and termination heads) is taken: random
shooting. Every first action is tried (N >= 9); half of the sequences hold their first action for
the whole horizon, the other half continue at random. All N share the episode's noise stream, so
their futures differ only through their actions.

The world's sampler decides when an action shows: pipelined (the shipped default) draws it from
the 4th frame on (3 frames in flight were conditioned on earlier actions), so H must exceed 3 and
only H - 3 steps of each sequence see its first action; ``--sampler-mode immediate`` shows it in
the next frame (4 model calls per step instead of 1, sharing the context pass). The heads'
termination costs a candidate CarRacing's -100 for leaving the playfield.

- ``--act-in world``: the acted episode is a ``MatrixWorldEnv``'s; ``clone_state`` / ``restore_state``
  copy it into the planner. Returns are the world's predictions.
- ``--act-in real``: the acted episode is the real game's. Each step the last 4 real frames start an
  imagined episode (``reset(options={"context_frames": ...})``), which the planner branches (a
  restart: the actions already taken are not in it, and with the pipelined sampler its first 3
  frames lean on the last real one). Returns are the real game's: the world's use as a model for
  control, with no training at all.

Beside MPC, a random policy and the pixel road follower drive the same episodes. Whether the world
ranks the candidates as the real game would: ``matrix-world plan-check``.

python examples/plan_in_imagination.py --act-in world --steps 40
python examples/plan_in_imagination.py --act-in real --episodes 3 --dtype bfloat16 --compile
python examples/plan_in_imagination.py --act-in real --sampler-mode immediate --ctx-noise 0.25 --horizon 4
python examples/plan_in_imagination.py --act-in real --episodes 3 --steps 250 --device cuda --candidates 72 --horizon 16
"""

import argparse
import sys
import time
from collections import deque

import numpy as np

from matrix_env.env import MatrixWorldEnv
from matrix_env.vector import MatrixWorldVectorEnv
from world_model.errors import UsageError
from world_model.eval.plan_check import NATIVE, candidate_sequences, imagined_returns
from world_model.road_follower import RoadFollower, on_road


def plan(envs: MatrixWorldVectorEnv, rng: np.random.Generator, horizon: int) -> int:
    """Best first action over N sequences (the sub-envs already hold the acted episode)."""
    seqs = candidate_sequences(rng, envs.num_envs, horizon, envs.single_action_space.n)  # (N, H)
    score, _ = imagined_returns(envs, seqs)  # one batched forward per look-ahead step
    return int(seqs[np.argmax(score), 0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--act-in", choices=("world", "real"), default="world")
    p.add_argument("--world", default="default", help="a shipped world's name or a checkpoint directory")
    p.add_argument("--steps", type=int, default=40, help="steps per acted episode (the real game ends at 250)")
    p.add_argument("--episodes", type=int, default=1, help="episodes per policy")
    p.add_argument("--candidates", type=int, default=18, help="N, action sequences tried per step")
    p.add_argument("--horizon", type=int, default=8, help="H, steps each sequence looks ahead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler-mode", choices=("pipelined", "reconditioned", "immediate"), default=None,
                   help="the world's sampler (default: the checkpoint's, pipelined for the shipped worlds)")
    p.add_argument("--ctx-noise", type=float, default=None,
                   help="the sampler's context noise (default: the checkpoint's; immediate mode was measured at 0.25)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the planner's DiT calls")
    p.add_argument("--device", default="cpu", help="torch device of the world: cpu or cuda (the real game: CPU)")
    args = p.parse_args()
    for name in ("steps", "episodes", "candidates", "horizon"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    kw = {"dtype": args.dtype, "sampler_mode": args.sampler_mode, "device": args.device,
          "sampler": None if args.ctx_noise is None else {"ctx_noise": args.ctx_noise}}
    try:  # a bad --world, --device or sampler setting: one line, not a traceback
        if args.act_in == "world":
            # the VAE's frames, as the real game's row is scored from (no observation decoder)
            env = MatrixWorldEnv(world=args.world, obs_size=NATIVE, obs_decoder=False, **kw)
            anchor = env
        else:
            from agents.real_env import RealCarRacingEnv

            env = RealCarRacingEnv(obs_size=NATIVE)
            anchor = MatrixWorldEnv(world=args.world, obs_type="latent", **kw)  # starts from real frames
    except UsageError as err:  # CheckpointError too
        p.error(str(err))
    envs = MatrixWorldVectorEnv(args.candidates, world=anchor.world, obs_type="latent", max_episode_steps=-1,
                                compile_model=args.compile, **kw)  # fmt: skip
    latency = envs.sim.sampler.action_latency
    if args.horizon <= latency:
        p.error(f"--horizon {args.horizon} cannot see a first action: the {envs.sim.cfg.mode} sampler shows it "
                f"{latency} steps later; use --horizon > {latency} or --sampler-mode immediate")  # fmt: skip
    context = anchor.sim.cfg.context
    rng = np.random.default_rng(args.seed)
    recent: deque = deque(maxlen=context)  # the real game's last frames

    def mpc(obs: np.ndarray) -> int:
        if args.act_in == "real":
            recent.append(obs)
            while len(recent) < context:  # an episode's first step: repeat its first frame
                recent.appendleft(obs)
            anchor.reset(seed=int(rng.integers(2**31)), options={"context_frames": np.stack(recent)})
        envs.restore_state(anchor.clone_state())  # the acted episode, in every sub-env
        return plan(envs, rng, args.horizon)

    follower = RoadFollower(env.get_action_meanings())
    policies = {
        "random": lambda obs: int(rng.integers(env.action_space.n)),
        "road follower": lambda obs: int(follower(obs[None])[0]),
        f"MPC, {args.candidates} x {args.horizon} steps": mpc,
    }
    what = "predicted by the world" if args.act_in == "world" else "real CarRacing-v3"
    print(f"acting in the {args.act_in} ({args.world} world plans, {envs.sim.cfg.mode} sampler), {args.episodes} "
          f"episode(s) of up to {args.steps} steps from seeds {args.seed}..{args.seed + args.episodes - 1}; "
          f"returns {what}")  # fmt: skip
    print("| policy | return (mean +- sd) | on road | steps | s / step |\n|---|---:|---:|---:|---:|")
    for name, policy in policies.items():
        returns, road, steps, t0 = [], 0, 0, time.perf_counter()
        for ep in range(args.episodes):
            obs, _ = env.reset(seed=args.seed + ep)
            recent.clear()
            ret, ep_steps = 0.0, 0
            while ep_steps < args.steps:
                obs, reward, terminated, truncated, _ = env.step(policy(obs))
                ret, road, ep_steps = ret + reward, road + int(on_road(obs[None])[0]), ep_steps + 1
                if terminated or truncated:
                    break
            returns.append(ret)
            steps += ep_steps
            print(f"  {name}, seed {args.seed + ep}: return {ret:.1f} in {ep_steps} steps", file=sys.stderr, flush=True)
        sec = (time.perf_counter() - t0) / steps
        mean, sd = np.mean(returns), np.std(returns)
        print(f"| {name} | {mean:.1f} +- {sd:.1f} | {road / steps:.2f} | {steps} | {sec:.2f} |", flush=True)


if __name__ == "__main__":
    main()
