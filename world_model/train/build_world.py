"""Assemble a shipped world-model directory (``matrix-world build-world``).

Inputs are the outputs of the earlier stages: the VAE dir (``train-vae``), the DiT dir
(``train-dit``: DiT, heads, control table, ``train_dit.json``), the recorded data and its latent
cache. The result is a :func:`world_model.checkpoint.save_world` directory with

* ``start_latents`` (S, Tc, C, h, w): real context windows of Tc frames from the latent cache,
  starting at frame >= ``min_frame`` (CarRacing zooms in during its first ~50 frames at 50 fps;
  15 skips the worst of it at the recorder's frame skip), spread round-robin over held-out and
  training episodes in a seeded order;
* ``sampler``: the default Swin-DPM settings (``SwinDPMConfig`` fields) matching the training window;
* ``meta``: data set, episode/frame of every start, training summaries and metrics;
* the recipe: the exact commands of every stage and the data manifest hash.

Example::

    matrix-world build-world --vae ~/runs/vae/model --dit ~/runs/dit/model --data ~/data/carracing \\
        --latents ~/latents/carracing --out matrix_env/worlds/carracing
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from world_model.errors import UsageError
from world_model.swin_dpm import SwinDPMConfig
from world_model.train import common


@dataclass
class Args:
    """Assemble a world-model checkpoint from trained VAE / DiT directories and recorded data."""

    vae: Path
    """train-vae output directory (vae.safetensors, vae_config.json, train_vae.json), or a world directory."""
    dit: Path
    """train-dit output directory (dit/heads safetensors, control_table.safetensors, train_dit.json), or a
    world directory (whose sampler settings and termination threshold then are the defaults below)."""
    data: tuple[Path, ...]
    """Recorded data directories the DiT was trained on."""
    latents: tuple[Path, ...]
    """Their latent caches (same order), encoded with this VAE; start contexts are taken from them."""
    out: Path
    """World-model directory to write (replaced atomically if it exists)."""
    starts: int = 32
    """S, number of start contexts shipped with the world."""
    context: int | None = None
    """Tc, frames per start context (default: the DiT's training context)."""
    min_frame: int = 15
    """First frame index a start context may begin at (skips the reset zoom-in)."""
    seed: int = 0
    """Seed of the start-context choice."""
    mode: Literal["pipelined", "reconditioned", "immediate"] | None = None
    """Default Swin-DPM mode of the world (see world_model.swin_dpm; default pipelined)."""
    groups: int | None = None
    """Default G, frames in flight (default: the DiT's training window minus its context, or the
    --dit world's own G). Fewer than trained shorten the window: measured on the shipped worlds in README.md."""
    steps_per_shift: int | None = None
    """Default Euler evaluations per shift (default 8: a non-distilled teacher needs several)."""
    ctx_noise: float | None = None
    """Default sampler context noise (default: half the DiT's training ctx_noise)."""
    level_shift: float | None = None
    """Default warp of the sampler's noise levels (SwinDPMConfig.level_shift; default 1 = evenly spaced)."""
    term_threshold: float | None = None
    """Termination logit threshold of the shipped heads (HeadsConfig.term_threshold; default 0). 0 = the
    decision of the class-weighted loss. Measured on the shipped DiT: at 0, 12 of 12 unseen
    terminations caught and no false one on 992 held-out driving transitions; at the
    prior-corrected log(pos_weight) + log(road_weight) = 8.0, none caught (with ~20 positive
    windows the head is not calibrated enough for the correction)."""
    terminal_reward: float | None = None
    """Reward of a transition the termination head ends (HeadsConfig.terminal_reward); default: the
    median recorded reward of the terminal transitions in the DiT's training data (CarRacing's
    leaving the playfield: -100), else the --dit world's own, else none (the reward head's prediction)."""
    road_starts: bool | None = None
    """Only start where the car is on the road in the last context frame (the pixel test of
    world_model.road_follower on the recorded frame); default: on for CarRacing data."""


def recorded_terminal_reward(roots: list[Path] | tuple[Path, ...]) -> float | None:
    """Median recorded reward of the terminal transitions of the episodes under ``roots`` (the
    game's reward for an ending), or None when none is readable or none ended."""
    from world_model.data.episodes import list_episodes

    rewards = []
    for root in roots:
        try:
            episodes = list_episodes(root)
        except UsageError:
            continue  # data gone (a world built elsewhere): the caller falls back
        for ep in episodes:
            try:
                terminated = np.load(ep / "terminated.npy", mmap_mode="r")  # (S+1,) bool
                reward = np.load(ep / "rewards.npy", mmap_mode="r")  # (S+1,) float
            except (FileNotFoundError, ValueError):
                continue  # unlabelled footage has no rewards
            rewards.extend(np.asarray(reward)[np.asarray(terminated, dtype=bool)].tolist())
    return float(np.median(rewards)) if rewards else None


def _summary(model_dir: Path, summary_file: str, what: str) -> dict:
    """The trainer's summary of ``model_dir`` (or a world's, see ``common.read_summary``); clear error if none."""
    summary = common.read_summary(model_dir, summary_file)
    if summary is None:
        raise UsageError(f"{model_dir / summary_file} is missing; is it a {what} output directory or a world?")
    return summary


def _check_window(cfg: SwinDPMConfig, max_frames: int) -> None:
    """UsageError unless the windowed modes' window (context + G frames) fits the DiT's positions.

    Checked in every mode: an env may switch a world's default mode to a windowed one.
    """
    window = cfg.context + cfg.groups
    if window > max_frames:
        raise UsageError(f"--groups {cfg.groups}: context {cfg.context} + {cfg.groups} = {window} frames exceeds "
                         f"the DiT's max_frames={max_frames}; expected --groups <= {max_frames - cfg.context}")


def _unique(commands: list[list[str]]) -> list[list[str]]:
    """Commands in order, each once (a world's recipe can reach a new one through both its VAE and DiT)."""
    seen: set[tuple[str, ...]] = set()
    return [c for c in commands if not (tuple(c) in seen or seen.add(tuple(c)))]


def pick_starts(
    heldout: list[Path],
    train: list[Path],
    caches: dict[Path, Path],
    count: int,
    context: int,
    min_frame: int,
    seed: int,
    road_starts: bool = False,
) -> tuple[torch.Tensor, list[dict]]:
    """Choose ``count`` real context windows, alternating held-out and training episodes.

    Episodes of each split are visited in a seeded order, round-robin (held-out first), and each
    visit takes a random start frame in ``[min_frame, len - context]`` not taken before.

    Args:
        heldout: held-out episode folders.
        train: training episode folders.
        caches: data root -> latent cache root.
        count: S, contexts wanted (fewer come back if fewer distinct windows exist).
        context: Tc, frames per context.
        min_frame: first allowed start frame.
        seed: RNG seed.
        road_starts: keep only windows whose last frame shows the car on the road (recorded frame).

    Returns:
        ``(start_latents (S, Tc, C, h, w) float32, [{"data", "episode", "split", "frame"}] * S)``.

    Raises:
        UsageError: no episode is long enough for one window from ``min_frame``.
    """
    from world_model.data.episodes import open_episode
    from world_model.data.latents import LATENTS_FILE
    from world_model.road_follower import on_road
    from world_model.train.common import data_root

    rng = np.random.default_rng(seed)
    arrays, free = {}, {}
    for ep in [*heldout, *train]:
        path = caches[data_root(ep)] / "episodes" / ep.name / LATENTS_FILE
        if not path.exists():
            raise UsageError(f"latent cache {path} is missing; run `matrix-world encode-latents`")
        z = np.load(path, mmap_mode="r")  # (S+1, C, h, w) float16
        if len(z) - context >= min_frame:
            candidates = np.arange(min_frame, len(z) - context + 1)  # window start frames
            if road_starts:
                ok = on_road(np.asarray(open_episode(ep)["frames"]))  # (S+1,) car on the road
                candidates = candidates[ok[candidates + context - 1]]
            if len(candidates):
                arrays[ep] = z
                free[ep] = list(rng.permutation(candidates))
    if not arrays:
        raise UsageError(
            f"no episode has {min_frame + context} frames (--min-frame {min_frame} + context {context})"
            + (" with the car on the road (--no-road-starts lifts that condition)" if road_starts else "")
        )
    orders = [[ep for ep in split if ep in arrays] for split in (heldout, train)]
    orders = [[o[k] for k in rng.permutation(len(o))] for o in orders if o]
    cycle = [ep for group in zip(*orders, strict=False) for ep in group]  # interleave the splits
    cycle += [ep for o in orders for ep in o[min(map(len, orders)) :]]  # the longer split's rest
    picks: list[tuple[Path, int]] = []
    while len(picks) < count and any(free[ep] for ep in cycle):
        for ep in cycle:
            if free[ep] and len(picks) < count:
                picks.append((ep, int(free[ep].pop())))
    windows = [np.asarray(arrays[ep][i : i + context], np.float32) for ep, i in picks]  # S x (Tc, C, h, w)
    info = [
        {
            "data": str(data_root(ep)),
            "episode": ep.name,
            "split": "heldout" if ep in heldout else "train",
            "frame": i,
        }
        for ep, i in picks
    ]
    return torch.from_numpy(np.stack(windows)), info  # (S, Tc, C, h, w)


def build(args: Args, command: list[str] | None = None) -> Path:
    """Assemble and save the world; returns its directory."""
    from world_model.checkpoint import WorldModel, load_module, save_world
    from world_model.data.episodes import read_meta
    from world_model.data.latents import latent_space_sha256, resolve_caches
    from world_model.dit import DiTConfig, VideoDiT
    from world_model.heads import HeadsConfig, RewardTerminationHeads
    from world_model.train.common import data_fingerprint, resolve_episodes
    from world_model.train.dit import CONTROL_TABLE_FILE, load_control_table
    from world_model.vae import FrameVAE, VAEConfig

    for name, path in (("--vae", args.vae), ("--dit", args.dit)):
        if not Path(path).is_dir():
            raise UsageError(f"{name} {str(path)!r} does not exist or is not a directory")
    vae_summary = _summary(Path(args.vae), "train_vae.json", "train-vae")
    dit_summary = _summary(Path(args.dit), "train_dit.json", "train-dit")
    dit_args = dit_summary.get("args", {})
    context = args.context or int(dit_summary["context"])
    trained_groups = max(1, int(dit_summary["window"]) - int(dit_summary["context"]))
    # defaults: a world's own settings when --dit is a world, the sampler a stream-consistency student was
    # distilled for (train-dit --consistency-weight), else the teacher's
    inherited = dit_summary.get("world_sampler") or dit_summary.get("consistency_sampler") or {
        "mode": "pipelined", "steps_per_shift": 8, "level_shift": 1.0,
        "ctx_noise": float(dit_args.get("ctx_noise", 0.0)) / 2,
    }  # fmt: skip
    given = {"mode": args.mode, "groups": args.groups, "steps_per_shift": args.steps_per_shift,
             "ctx_noise": args.ctx_noise, "level_shift": args.level_shift}
    settings = {"groups": trained_groups, **{k: v for k, v in inherited.items() if k != "context"}}
    settings.update({k: v for k, v in given.items() if v is not None})
    term_threshold = args.term_threshold
    if term_threshold is None:
        term_threshold = dit_summary.get("world_term_threshold") or 0.0
    try:  # the sampler settings are checked before anything heavy is loaded
        sampler_cfg = SwinDPMConfig(context=context, **settings)
    except ValueError as err:
        raise UsageError(f"build-world sampler settings (--context/--groups/--steps-per-shift/--mode/"
                         f"--ctx-noise/--level-shift): {err}") from err
    sampler = dataclasses.asdict(sampler_cfg)
    caches, lat_infos = resolve_caches(args.data, args.latents)
    lat_info = lat_infos[0]
    sha = latent_space_sha256(args.vae)  # a decoder-only fine-tune keeps its parent's latent space
    if dit_summary.get("latents_vae_sha256") != sha:
        raise UsageError(
            f"the DiT in {args.dit} was trained on latents of another VAE (vae_sha256 "
            f"{dit_summary.get('latents_vae_sha256')}); --vae {args.vae} has {sha}"
        )
    if lat_info.get("vae_sha256") != sha:
        raise UsageError(
            f"latent caches {list(map(str, args.latents))} were made by another VAE than --vae {args.vae}"
        )
    fingerprint = data_fingerprint(args.data)  # start contexts may come from a subset of the DiT's data
    trained = dit_summary.get("data_manifest_sha256") or {}
    changed = sorted(root for root, sha in fingerprint.items() if root in trained and trained[root] != sha)
    if changed:
        print(f"note: {changed} changed since the DiT was trained (manifest hashes differ)")

    vae = load_module(args.vae, "vae", FrameVAE, VAEConfig)
    dit = load_module(args.dit, "dit", VideoDiT, DiTConfig)
    _check_window(sampler_cfg, dit.cfg.max_frames)
    heads = load_module(args.dit, "heads", RewardTerminationHeads, HeadsConfig)
    table, sentences = load_control_table(Path(args.dit) / CONTROL_TABLE_FILE)
    if not math.isfinite(term_threshold):
        raise UsageError(f"--term-threshold {term_threshold}: expected a finite logit")
    heads.cfg.term_threshold = term_threshold
    terminal_reward = args.terminal_reward
    if terminal_reward is None:
        terminal_reward = recorded_terminal_reward([Path(p) for p in dit_args.get("data", [])])
    if terminal_reward is None:
        terminal_reward = dit_summary.get("world_terminal_reward")
    if terminal_reward is not None and not math.isfinite(terminal_reward):
        raise UsageError(f"--terminal-reward {terminal_reward}: expected a finite reward")
    heads.cfg.terminal_reward = terminal_reward

    # the DiT's own split (deterministic in its holdout_fraction and seed); starts come from
    # labelled episodes when there are any (unlabelled footage may be randomised-colour)
    train, heldout = resolve_episodes(
        args.data, dit_args.get("holdout_fraction", 0.1), dit_args.get("seed", 0)
    )
    labelled = {ep for ep in [*train, *heldout] if read_meta(ep).get("labelled")}
    if labelled:
        train, heldout = [ep for ep in train if ep in labelled], [ep for ep in heldout if ep in labelled]
    first = read_meta((train or heldout)[0])
    road_starts = args.road_starts
    if road_starts is None:
        road_starts = str(first.get("env_id", "")).startswith("CarRacing")
    start_latents, picks = pick_starts(
        heldout, train, caches, args.starts, context, args.min_frame, args.seed, road_starts
    )
    if len(picks) < args.starts:
        print(
            f"note: only {len(picks)} distinct start windows exist; shipping them all (asked {args.starts})"
        )

    world = WorldModel(
        vae=vae,
        dit=dit,
        heads=heads,
        control_tokens=table.tokens,
        control_mask=table.mask,
        control_pooled=table.pooled,
        action_names=list(dit_summary["action_names"]),
        sentences=list(sentences),
        start_latents=start_latents,
        sampler=sampler,
        meta={
            "env_id": first.get("env_id"),
            "env_kwargs": first.get("env_kwargs", {}),
            "frame_skip": first.get("frame_skip"),
            "data_manifest_sha256": fingerprint,
            "vae_sha256": sha,
            "starts": picks,
            "road_starts": road_starts,
            "vae_eval": vae_summary.get("eval", {}),
            "dit_eval": dit_summary.get("eval", {}),
            "vae_steps": vae_summary.get("steps"),
            "dit_steps": dit_summary.get("steps"),
            "termination_pos_weight": dit_summary.get("termination_pos_weight"),
        },
    )
    recipe = {
        "commands": _unique([
            *common.stage_commands(vae_summary),
            *[info.get("command", []) for info in lat_infos],
            *common.stage_commands(dit_summary),
            command or [],
        ]),
        "data_manifest_sha256": fingerprint,
        "vae_args": vae_summary.get("args", {}),
        "dit_args": dit_args,
    }
    out = save_world(args.out, world, recipe)
    print(f"saved world model to {out}: {len(picks)} start contexts of {context} frames, sampler {sampler}, "
          f"terminal reward {terminal_reward}")
    return out


@dataclass
class SamplerArgs:
    """Write a copy of a world with other default sampler settings or terminal reward (weights, starts
    and data untouched)."""

    world: Path
    """World directory to start from."""
    out: Path
    """World directory to write (may be --world itself: it is replaced atomically)."""
    mode: Literal["pipelined", "reconditioned", "immediate"] | None = None
    """Swin-DPM mode (see world_model.swin_dpm)."""
    groups: int | None = None
    """G, frames in flight."""
    steps_per_shift: int | None = None
    """k, Euler evaluations of the window per shift."""
    immediate_steps: int | None = None
    """Euler steps per frame in immediate mode."""
    ctx_noise: float | None = None
    """Flow time of the noise on the context frames, in [0, 1)."""
    level_shift: float | None = None
    """Warp of the noise levels (1 = evenly spaced)."""
    guidance: float | None = None
    """Classifier-free guidance scale on the actions (1 = off)."""
    terminal_reward: float | None = None
    """Reward of a transition the termination head ends (HeadsConfig.terminal_reward; CarRacing: -100)."""


def check_world_copy(world: Path, out: Path) -> None:
    """Refuse a ``--world`` that is not a world directory and an ``--out`` that exists and is not one
    (``save_world`` replaces what is there)."""
    from world_model.checkpoint import MANIFEST_FILE

    if not (Path(world) / MANIFEST_FILE).is_file():
        raise UsageError(f"--world {str(world)!r} is not a world directory (no {MANIFEST_FILE})")
    if Path(out).exists() and not (Path(out) / MANIFEST_FILE).is_file():
        raise UsageError(f"--out {str(out)!r} exists and is not a world directory; refusing to replace it")


def copied_recipe(world: Path, command: list[str] | None) -> dict:
    """The recipe of a world directory with ``command`` appended (for a world written from another)."""
    from world_model.checkpoint import MANIFEST_FILE

    recipe = json.loads((Path(world) / MANIFEST_FILE).read_text()).get("recipe", {})
    recipe["commands"] = [*recipe.get("commands", []), *([command] if command else [])]
    return recipe


def set_sampler(args: SamplerArgs, command: list[str] | None = None) -> Path:
    """Save ``args.world`` with the given sampler settings changed; its recipe gains ``command``."""
    from world_model.checkpoint import load_world, save_world
    from world_model.simulator import sampler_config

    names = ("mode", "groups", "steps_per_shift", "immediate_steps", "ctx_noise", "level_shift", "guidance")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if not given and args.terminal_reward is None:
        raise UsageError(f"set-sampler: nothing to change; give at least one of "
                         f"{', '.join('--' + k.replace('_', '-') for k in (*names, 'terminal_reward'))}")
    if args.terminal_reward is not None and not math.isfinite(args.terminal_reward):
        raise UsageError(f"--terminal-reward {args.terminal_reward}: expected a finite reward")
    check_world_copy(args.world, args.out)
    world = load_world(args.world)
    cfg = sampler_config(world, None, given)  # UsageError naming a bad value
    _check_window(cfg, world.dit.cfg.max_frames)
    world.sampler = dataclasses.asdict(cfg)
    if args.terminal_reward is not None:
        world.heads.cfg.terminal_reward = args.terminal_reward
    out = save_world(args.out, world, copied_recipe(args.world, command))
    print(f"saved world model to {out}: sampler {world.sampler}, terminal reward {world.heads.cfg.terminal_reward}")
    return out


def set_sampler_main(argv: list[str] | None = None) -> int:
    """``matrix-world set-sampler``: parse SamplerArgs and write the world."""
    import tyro

    args = tyro.cli(SamplerArgs, args=argv, prog="matrix-world set-sampler",
                    description=SamplerArgs.__doc__)
    set_sampler(args, command=["matrix-world", "set-sampler", *(sys.argv[1:] if argv is None else argv)])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``matrix-world build-world``: parse Args and assemble the world directory."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world build-world", description=__doc__.split("\n\n")[0])
    build(args, command=["matrix-world", "build-world", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
