"""Recorded endings replayed in a world (``matrix-world endings``): does it end the episodes the game ended?

``matrix-world probe --hold D --real`` asks whether a world ends an episode where the real game would;
a world can fail that for two reasons: it never takes the car off the road and the playfield (its
roads are straighter than the game's), or it cannot draw the playfield's edge and end there. This
command separates them. For each recorded episode of ``--data`` whose last transition terminated
(CarRacing: the car left the playfield, -100), the world starts from the real frames that end
``before`` steps before that ending (the car already on its way out), replays the recorded actions
of those steps and then holds the last one for ``--after`` more steps. It reports the streams whose
termination head fired and when (the game ended them at step ``before``; a pipelined sampler shows
an action's effect ``latency`` = G - 1 steps late), how much of the view is CarRacing's black void
beyond the playfield (:func:`world_model.eval.metrics.void_share`) in the generated frame that the
ending action shaped (step ``before + latency``) against the real ending frame, and, as a check of
the head itself, how many of the real ending transitions its termination head fires on.
``--termination hazard`` counts a hazard world's random endings too (``matrix-world train-hazard``;
by default only the termination head's, which read what the frames show). Example::

    matrix-world endings --checkpoint matrix_env/worlds/hold --data ~/mw/data/carracing_exit_eval \\
        --before 3 10 20 --threads 1
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from world_model.errors import UsageError

if typing.TYPE_CHECKING:
    from world_model.checkpoint import WorldModel


@dataclass
class Args:
    """Replay recorded endings in a world: does its termination head end them, does it draw the void?"""

    data: Path
    """Recorded episodes (e.g. ``matrix-world record --policy exit``); those whose last step terminated are used."""
    checkpoint: Path = Path("matrix_env/worlds/default")
    """World-model directory."""
    before: tuple[int, ...] = (3, 10, 20)
    """Start this many steps before each recorded ending (one table row per value)."""
    after: int = 10
    """Steps driven past the recorded ending, holding the last recorded action; at least the sampler's action
    latency (G - 1 for pipelined), so that the ending action's frame is generated."""
    episodes: int = 16
    """At most this many ending episodes (the first by name)."""
    seed: int = 0
    """The noise keys."""
    mode: typing.Literal["pipelined", "reconditioned", "immediate"] | None = None
    """Sampler mode (default: the world's own, as the env runs it)."""
    termination: typing.Literal["threshold", "hazard"] = "threshold"
    """What ends a stream: "threshold", the termination head alone (what the frames show), or "hazard", also
    the hazard head's random endings (a world with one: ``matrix-world train-hazard``)."""
    threads: int = 0
    """torch.set_num_threads (0 = torch's default)."""
    out: Path | None = None
    """Write the rows as JSON here."""


@dataclass
class Endings:
    """Recorded endings cut for a replay: ``before`` steps and the context frames preceding them."""

    names: list[str]  # (S,) episode folder names
    context: np.ndarray  # (S, C, 72, 128, 3) uint8: the frames up to `before` steps before the ending
    actions: np.ndarray  # (S, before) int64: the recorded actions from there to the ending
    last: np.ndarray  # (S, 2, 72, 128, 3) uint8: the frames of the ending transition (its action: actions[:, -1])
    skipped: int  # ending episodes too short for the context and `before`


def ending_episodes(root: Path) -> list[Path]:
    """The recorded episodes of ``root`` whose last transition terminated, sorted by name.

    Raises:
        UsageError: ``root`` holds no recorded episodes, or none that terminated.
    """
    from world_model.data import episodes as E

    eps = E.list_episodes(root)
    out = [ep for ep in eps if bool(np.asarray(E.open_episode(ep)["terminated"])[-1])]
    if not out:
        raise UsageError(f"--data {str(root)!r}: none of its {len(eps)} episodes ends terminated "
                         "(record some with `matrix-world record --policy exit`)")
    return out


def cut_endings(episode_dirs: list[Path], context: int, before: int) -> Endings:
    """For each episode, the ``context`` frames ending ``before`` steps before its last frame, and the
    ``before`` recorded actions that lead from there to it.

    Raises:
        UsageError: ``before`` < 1, or no episode is long enough (``context + before`` frames).
    """
    from world_model.data import episodes as E

    if before < 1:
        raise UsageError(f"--before {before}: must be >= 1 (steps before the recorded ending)")
    names, ctx, acts, last = [], [], [], []
    for ep in episode_dirs:
        arrays = E.open_episode(ep)
        n = len(arrays["actions"])  # frames 0..n-1; actions[j] led to frame j, the ending is frame n-1
        t = n - 1 - before  # the newest context frame
        if t < context - 1:
            continue
        names.append(ep.name)
        ctx.append(np.asarray(arrays["frames"][t - context + 1 : t + 1]))
        acts.append(np.asarray(arrays["actions"][t + 1 : n], np.int64))
        last.append(np.asarray(arrays["frames"][n - 2 : n]))
    if not names:
        raise UsageError(f"no ending episode among {len(episode_dirs)} has {context + before} frames "
                         f"(context {context} + --before {before})")
    if (np.concatenate(acts) < 0).any():
        raise UsageError("the ending episodes must be labelled (recorded actions); found unknown actions (-1)")
    return Endings(names, np.stack(ctx), np.stack(acts), np.stack(last), len(episode_dirs) - len(names))


def replay(world: WorldModel, cut: Endings, after: int, seed: int, mode: str | None = None,
           termination: str = "threshold") -> dict:
    """Drive one stream per ending from its real context through the recorded actions, then ``after``
    more steps of the last one; the first ending per stream (the termination head's; with
    ``termination="hazard"`` also the hazard head's random ones) and the void drawn."""
    from world_model.data import episodes as E
    from world_model.eval import metrics as M
    from world_model.eval.suite import encode_frames, head_predictions
    from world_model.simulator import Simulator, sampler_config

    s, c = cut.context.shape[:2]
    before = cut.actions.shape[1]
    ctx = encode_frames(world.vae, cut.context.reshape(s * c, *cut.context.shape[2:]))  # (S*C, ch, h, w)
    cfg = sampler_config(world, mode)
    if cfg.context != c:
        raise UsageError(f"the sampler's context is {cfg.context} frames, the cut has {c}")
    if int(cut.actions.max()) >= len(world.action_names):
        raise UsageError(f"the recorded actions go up to {int(cut.actions.max())}; the world has "
                         f"{len(world.action_names)} actions {list(world.action_names)}")
    sim = Simulator(dataclasses.replace(world, start_latents=ctx.reshape(s, c, *ctx.shape[1:]),
                                        heads=head_predictions(world)), s, "cpu", sampler=cfg,
                    termination=termination)
    latency = sim.sampler.action_latency  # the ending action shapes the frame of step before + latency
    if after < latency:
        raise UsageError(f"--after {after}: must be >= the {cfg.mode} sampler's action latency {latency}, "
                         "so that the frame the ending action shapes is generated")
    sim.reset(torch.ones(s, dtype=torch.bool), torch.arange(s), generator=torch.Generator().manual_seed(seed))
    actions = np.concatenate([cut.actions, np.repeat(cut.actions[:, -1:], after, axis=1)], axis=1)  # (S, T)
    first = np.zeros(s, np.int64)  # (S,) 1-based step of the head's first firing, 0: none
    void = np.zeros((s, actions.shape[1]))  # (S, T)
    for k in range(actions.shape[1]):
        latents, _, terminated = sim.step(torch.from_numpy(actions[:, k]))
        void[:, k] = M.void_share(sim.decode(latents, E.TRAIN_HW).cpu().numpy())
        fired = terminated.cpu().numpy() & (first == 0)
        first[fired] = k + 1
    # the head on the real ending transitions (latents of the recorded frames), as the env would see them
    z = encode_frames(world.vae, cut.last.reshape(2 * s, *cut.last.shape[2:])).reshape(s, 2, *ctx.shape[1:])
    with torch.no_grad():
        _, logit = world.heads(z[:, 0], z[:, 1], world.control_pooled.float()[torch.from_numpy(cut.actions[:, -1])])
    logit = logit.float().numpy()  # (S,)
    ended = first > 0
    return {"before": before, "after": after, "mode": cfg.mode, "termination": termination, "latency": latency,
            "streams": s,
            "skipped": cut.skipped,
            "episodes": cut.names, "world_ended": int(ended.sum()),
            "world_first_end_step": float(np.median(first[ended])) if ended.any() else None,
            "world_first_end_steps": first.tolist(),
            "world_void_at_ending": float(void[:, before - 1 + latency].mean()),
            "world_void_max": float(void.max(axis=1).mean()), "world_void_by_step": void.mean(axis=0).tolist(),
            "real_void_at_ending": float(M.void_share(cut.last[:, 1]).mean()),
            "real_void_at_start": float(M.void_share(cut.context[:, -1]).mean()),
            "head_fires_on_real_ending": int((logit > world.heads.cfg.term_threshold).sum()),
            "head_logit_on_real_ending": logit.tolist()}


HEADER = ("| steps before the recorded ending | streams | world: streams ended (median first step) "
          "| void in view at the ending (world: + latency) / real | world: most void per stream "
          "| void in the start frame | termination head on the real ending |")


def format_row(row: dict) -> str:
    """One markdown table row."""
    first = "" if row["world_first_end_step"] is None else f" (step {row['world_first_end_step']:g})"
    streams = f"{row['streams']}" + (f" ({row['skipped']} too short)" if row["skipped"] else "")
    return (f"| {row['before']} | {streams} | {row['world_ended']}{first} | "
            f"{100 * row['world_void_at_ending']:.2f}% (step {row['before'] + row['latency']}) / "
            f"{100 * row['real_void_at_ending']:.2f}% | "
            f"{100 * row['world_void_max']:.2f}% | {100 * row['real_void_at_start']:.2f}% | "
            f"fires on {row['head_fires_on_real_ending']} of {row['streams']} |")


def main(argv: list[str] | None = None) -> int:
    """``matrix-world endings``: parse Args, print a markdown table (one row per ``--before``)."""
    import tyro

    from world_model.checkpoint import load_world
    from world_model.simulator import sampler_config

    args = tyro.cli(Args, args=argv, prog="matrix-world endings", description=__doc__.split("\n\n")[0])
    if args.after < 0 or args.episodes < 1:
        raise UsageError(f"--after {args.after} must be >= 0 and --episodes {args.episodes} >= 1")
    if not args.before or min(args.before) < 1:
        raise UsageError(f"--before {list(args.before)}: each must be >= 1 (steps before the recorded ending)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    world = load_world(args.checkpoint)
    context = sampler_config(world, args.mode).context
    eps = ending_episodes(args.data)[: args.episodes]
    print(f"{len(eps)} recorded endings of {args.data} replayed in {args.checkpoint} "
          f"(recorded actions, then the last one held for {args.after} steps; endings: {args.termination})")
    print(HEADER)
    print("|---:|---:|---|---|---:|---:|---|")
    rows = []
    for before in args.before:
        rows.append(replay(world, cut_endings(eps, context, before), args.after, args.seed, args.mode,
                           args.termination))
        print(format_row(rows[-1]), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=2))
            tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
