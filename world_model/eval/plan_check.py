"""Does a world rank action sequences as the real game does? (``matrix-world plan-check``)

The random-shooting planner (``examples/plan_in_imagination.py``) takes the first action of the
candidate sequence with the highest predicted return. This check measures what that choice rests
on, on real CarRacing-v3 states: the pixel road follower drives the real game; at each check step
``t`` the last C real frames start an imagined episode (``reset(options={"context_frames": ...})``,
as the planner does) and N candidate sequences of H actions are rolled out twice:

- in the world, one batched forward per step (all candidates share the noise stream): the
  predicted return (reward head, CarRacing's -100 where the termination head ends a candidate) and
  the share of imagined frames with the car on the road (:func:`world_model.road_follower.on_road`);
- in the real game, by replaying the episode's seed and its first ``t`` actions (CarRacing is
  deterministic given both; each replay is checked against the recorded frame), then the
  candidate: the real return over its H steps and the share of real frames on the road.

Per state it reports Spearman rank correlations (predicted vs real return; imagined vs real
on-road share; imagined on-road share vs real return) and what a planner picking by each gains in
real return over the mean candidate, beside the best candidate's gain (the ceiling; a random pick
gains 0 on average). With the pipelined sampler the first ``action_latency`` imagined frames were
conditioned before the candidates differ, so only the last H - latency steps can rank them.

    matrix-world plan-check --world default --seeds 0 1 2 3 --at 15 30 45 60 --out plan_check.json
"""

from __future__ import annotations

import json
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from world_model.errors import UsageError

if typing.TYPE_CHECKING:
    from matrix_env.vector import MatrixWorldVectorEnv

LEAVE_PENALTY = -100.0  # CarRacing's reward for leaving the playfield, for worlds without a terminal_reward
NATIVE = (72, 128)  # the model's frame size: what the follower and on_road read


@dataclass
class Args:
    """Rank N action sequences in a world and in the real game from the same real states."""

    world: str = "default"
    """A shipped world's name or a checkpoint directory."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Real CarRacing-v3 episodes (seeds) driven by the road follower."""
    at: tuple[int, ...] = (15, 30, 45, 60)
    """Check steps: the states after this many follower actions (each replay costs t real steps per candidate)."""
    candidates: int = 18
    """N, action sequences per state (>= 9: every first action is tried)."""
    horizon: int = 8
    """H, steps each sequence looks ahead."""
    sampler_mode: typing.Literal["pipelined", "reconditioned", "immediate"] | None = None
    """The world's sampler (default: the checkpoint's)."""
    ctx_noise: float | None = None
    """The sampler's context noise (default: the checkpoint's)."""
    seed: int = 0
    """Seed of the candidate sequences and the imagined episodes' noise."""
    threads: int = 0
    """torch.set_num_threads (0 = torch's default)."""
    out: Path | None = None
    """Write every state's numbers as JSON here (rewritten after each state)."""


def candidate_sequences(rng: np.random.Generator, n: int, horizon: int, num_actions: int) -> np.ndarray:
    """Random shooting's candidates: (N, H) action ids. Every first action is tried (row i starts
    with i mod num_actions); the first half hold their first action, the rest continue at random."""
    seqs = rng.integers(0, num_actions, (n, horizon))  # (N, H)
    seqs[:, 0] = np.arange(n) % num_actions
    hold = np.arange(n) < n // 2
    seqs[hold] = seqs[hold, :1]
    return seqs


def imagined_returns(envs: MatrixWorldVectorEnv, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Roll ``seqs`` (N, H) out in the N sub-envs (which already hold the start), one batched forward per
    step. Returns (predicted return (N,), share of imagined frames on the road (N,), or None when the
    envs' observations are latents). A candidate the termination head ends scores the world's
    terminal reward (``HeadsConfig.terminal_reward``; a world without one, or under a ``reward_fn``:
    that reward + ``LEAVE_PENALTY``) and nothing after it."""
    from world_model.road_follower import on_road

    n, horizon = seqs.shape
    score, road, alive_steps = np.zeros(n), np.zeros(n), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    pixels = envs.obs_type == "rgb"
    in_reward = envs.sim.heads.cfg.terminal_reward is not None and envs.sim.reward_fn is None
    penalty = 0.0 if in_reward else LEAVE_PENALTY  # the world's reward already holds the game's ending
    for t in range(horizon):
        obs, reward, terminated, _, _ = envs.step(seqs[:, t])  # one batched forward for all N
        score += np.where(alive, reward + penalty * terminated, 0.0)
        if pixels:
            road += np.where(alive, on_road(obs), 0.0)
        alive_steps += alive
        alive &= ~terminated
    return score, (road / alive_steps if pixels else None)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (tied values share their mean rank; values equal to 9
    decimals tie, so sums of the same rewards in another order do); NaN when either is constant."""
    ra, rb = _ranks(np.round(np.asarray(a, float), 9)), _ranks(np.round(np.asarray(b, float), 9))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties: mean rank
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def state_summary(pred: np.ndarray, img_road: np.ndarray, real: np.ndarray, real_road: np.ndarray) -> dict:
    """One state's rank correlations, the real-return gains of picking by each judge (over the mean
    candidate), and the on-road shares: imagined (mean candidate), real (the head's pick, the mean
    candidate, the best candidate by real return)."""
    mean, pick, best = real.mean(), int(np.argmax(pred)), int(np.argmax(real))
    return {
        "rho_return": spearman(pred, real),
        "rho_road": spearman(img_road, real_road),
        "rho_road_return": spearman(img_road, real),
        "gain_head": float(real[pick] - mean),
        "gain_road": float(real[np.argmax(img_road)] - mean),
        "gain_best": float(real[best] - mean),
        "imagined_road_mean": float(img_road.mean()),
        "real_road_pick": float(real_road[pick]),
        "real_road_mean": float(real_road.mean()),
        "real_road_best": float(real_road[best]),
    }


def check(args: Args) -> list[dict]:
    """Drive, branch and replay every (seed, check step); returns one dict per state (also printed)."""
    import torch

    from agents.real_env import RealCarRacingEnv
    from matrix_env.env import MatrixWorldEnv
    from matrix_env.vector import MatrixWorldVectorEnv
    from world_model.eval.suite import is_carracing
    from world_model.road_follower import RoadFollower, on_road

    if args.candidates < 9 or args.horizon < 1:
        raise UsageError(f"--candidates {args.candidates} must be >= 9 and --horizon {args.horizon} >= 1")
    if not args.seeds or not args.at or min(args.at) < 1:
        raise UsageError(f"--seeds {list(args.seeds)} and --at {list(args.at)}: expected some seeds and steps >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sampler = None if args.ctx_noise is None else {"ctx_noise": args.ctx_noise}
    kw = {"sampler_mode": args.sampler_mode, "sampler": sampler, "obs_decoder": False}  # the VAE's frames
    anchor = MatrixWorldEnv(world=args.world, obs_type="latent", **kw)  # starts from real frames
    if not is_carracing(anchor.world):
        env_id = anchor.world.meta.get("env_id", "no env_id")
        raise UsageError(f"--world {args.world}: recorded from {env_id!r}; plan-check drives the real CarRacing-v3 "
                         "only")  # fmt: skip
    envs = MatrixWorldVectorEnv(args.candidates, world=anchor.world, obs_size=NATIVE, max_episode_steps=-1, **kw)
    latency = envs.sim.sampler.action_latency
    if args.horizon <= latency:
        raise UsageError(f"--horizon {args.horizon} cannot see a first action: the {envs.sim.cfg.mode} sampler "
                         f"shows it {latency} steps later; use --horizon > {latency}")  # fmt: skip
    context = anchor.sim.cfg.context
    real = RealCarRacingEnv(obs_size=NATIVE)
    follower = RoadFollower(real.get_action_meanings())
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    for seed in args.seeds:
        obs, _ = real.reset(seed=seed)
        frames, actions = [obs], []  # frames[t]: the frame after t actions
        for _ in range(max(args.at)):
            actions.append(int(follower(obs[None])[0]))
            obs, _, terminated, truncated, _ = real.step(actions[-1])
            frames.append(obs)
            if terminated or truncated:
                break
        for t in sorted(a for a in args.at if a < len(frames)):
            t0 = time.perf_counter()
            ctx = [frames[max(0, i)] for i in range(t - context + 1, t + 1)]  # before the first: the first
            anchor.reset(seed=int(rng.integers(2**31)), options={"context_frames": np.stack(ctx)})
            envs.restore_state(anchor.clone_state())  # the real state, in every candidate
            seqs = candidate_sequences(rng, args.candidates, args.horizon, envs.single_action_space.n)
            pred, img_road = imagined_returns(envs, seqs)
            real_ret, real_road = np.zeros(len(seqs)), np.zeros(len(seqs))
            for i, seq in enumerate(seqs):
                start = real.replay(seed, actions[:t])
                if not np.array_equal(start, frames[t]):
                    raise RuntimeError(f"seed {seed}: replaying {t} actions did not reach the recorded frame")
                steps = 0
                for a in seq:
                    o, r, terminated, truncated, _ = real.step(int(a))
                    real_ret[i] += r
                    real_road[i] += on_road(o[None])[0]
                    steps += 1
                    if terminated or truncated:
                        break
                real_road[i] /= steps
            row = {"seed": seed, "t": t, "actions": seqs.tolist(), "pred_return": pred.tolist(),
                   "imagined_on_road": img_road.tolist(), "real_return": real_ret.tolist(),
                   "real_on_road": real_road.tolist(), **state_summary(pred, img_road, real_ret, real_road),
                   "wall_s": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            print(format_row(f"seed {seed}, t {t}", [row]), flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "states": rows}))
                tmp.replace(args.out)
    return rows


SUMMARY_KEYS = ("rho_return", "rho_road", "imagined_road_mean", "real_road_pick", "real_road_mean", "real_road_best",
                "gain_head", "gain_road", "gain_best")  # fmt: skip


def format_row(label: str, rows: list[dict]) -> str:
    """A markdown row: the means over ``rows`` of each state's summary (NaN correlations left out)."""
    cells = []
    for key in SUMMARY_KEYS:
        vals = np.array([r[key] for r in rows], float)
        vals = vals[np.isfinite(vals)]
        cells.append(f"{vals.mean():.2f}" if len(vals) else "-")
    return f"| {label} | {len(rows)} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """``matrix-world plan-check``: parse Args, print a markdown table (one row per state, then the mean)."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world plan-check", description=__doc__.split("\n\n")[0])
    print(f"{args.world} world, {args.candidates} candidates x {args.horizon} steps, real seeds {list(args.seeds)} "
          f"at steps {list(args.at)}")  # fmt: skip
    print("| state | states | rho: predicted vs real return | rho: imagined vs real on-road | imagined on-road | real "
          "on-road: head's pick | mean candidate | best candidate | real gain over the mean candidate: head's pick | "
          "pick by imagined on-road | best candidate |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = check(args)
    print(format_row("**mean**", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
