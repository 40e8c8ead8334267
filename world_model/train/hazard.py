"""Train a world's hazard head on recorded latents (``matrix-world train-hazard``).

The hazard head (:class:`world_model.heads.RewardTerminationHeads` with ``hazard_horizon`` H)
predicts, for a transition (z_prev, z_next; and the action with ``--hazard-action``), the log-odds
that the episode ends within the next H transitions, this one included. It is trained with plain
BCE (no class weight), so its probabilities are calibrated on the mix of data it sees, and the
simulator can draw endings at the rate they happen in that data (``termination="hazard"``) where
the frames cannot show them: a world never draws the playfield's edge coming closer across uniform
grass (docs/EXPERIMENTS.md, "Four times the exits"), but whether the car is crossing open grass
away from the road is in the frames.

With ``--memory M`` the head is recurrent (``HeadsConfig.hazard_memory``): a GRU over the
per-transition features carries each stream's memory, so the hazard can depend on how long the car
has been on open grass. An env resets a stream from a recorded window along a drive (from frame 15
on, on the road) with an empty memory, so each training sequence is a uniformly drawn episode from a
transition drawn uniformly along it to its end, the memory zero at its first transition (a whole
episode is one such draw; starts before frame 15 or off the road are kept, a superset of the env's),
``--sequence-batch`` sequences per step; censored transitions still feed the memory but carry no
loss. The calibration report reads whole episodes from their first transition.

Labels: transition k of an episode (frames k-1 -> k, ``actions[k]``) is positive when
``terminated[k : k + H]`` holds a termination. Episodes cut off by the recorder's step limit (the
longest truncated episode of a data directory) give no label within H - 1 steps of that limit (the
ending may have come after the cut); those positions are left out of every episode of the
directory, ended or not, so that late states are not kept only when they ended. Unlabelled
episodes (no actions) and evaluation-only episodes (``meta["split"] != "train"``) are left out; the
data directories' held-out episodes (the split of ``train-dit``) are kept aside for the calibration
report.

Everything else in the world (VAE, DiT, reward and termination heads, starts, sampler) is copied
unchanged; the hazard weights are a separate branch of the heads. The run takes a few minutes on a
CPU, so a killed run is simply rerun (the world is written atomically at the end; nothing partial
is left).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from world_model.errors import UsageError

# predicted within-H probability bins of the calibration table
CALIBRATION_BINS = (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)


@dataclass
class Args:
    """Train a world's hazard head (ending within H steps, calibrated) on recorded latents; write the world with it."""

    world: Path
    """World directory whose VAE encoded the latent caches; everything but the hazard head is copied unchanged."""
    data: tuple[Path, ...]
    """Recorded data directories (labelled; e.g. the follower, exit and hold sets: the mix sets the rates)."""
    latents: tuple[Path, ...]
    """Latent caches of the data directories (``matrix-world encode-latents --vae WORLD``), same order."""
    out: Path
    """World directory to write (may be --world itself: it is replaced atomically)."""
    horizon: int = 30
    """H: the head predicts an ending within the next H transitions."""
    hazard_action: bool = False
    """The head also reads the action (HeadsConfig.hazard_action). Off: in recorded data the action identifies
    the recording policy, and the head learns that instead of the scene (docs/EXPERIMENTS.md)."""
    memory: int = 0
    """M: a recurrent hazard head with an M-wide GRU memory per stream (HeadsConfig.hazard_memory), trained on
    episodes from a transition drawn uniformly along them; 0: the hazard reads each transition alone."""
    termination: Literal["hazard", "threshold"] = "hazard"
    """The written world's termination rule (HeadsConfig.termination): "hazard" draws endings at the head's
    rate besides the thresholded termination logit; "threshold" stores the head without using it."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 256
    """Transitions per step (a per-transition head)."""
    sequence_batch: int = 8
    """Episode sequences per step (a recurrent head, --memory > 0)."""
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to lr/10)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    holdout_fraction: float = 0.1
    """Fraction of each data directory's episodes held out for the calibration report (train-dit's split)."""
    seed: int = 0
    """Seed of the init, the batches and the split."""
    threads: int = 0
    """torch threads (0: torch's default)."""


@dataclass
class Transitions:
    """Labelled transitions of recorded episodes, in memory.

    z_prev, z_next: (N, C, h, w) float32; actions: (N,) long; ends: (N,) bool, the episode ends within
    H transitions; known: (N,) bool, the label is not censored (all True unless loaded with
    ``keep_censored``); episode: (N,) long, index into ``names`` and ``ended`` ((E,) bool: the episode
    ended, its ending transition kept or not); source: (N,) long, index of the data directory. An
    episode's transitions are contiguous and in order.
    """

    z_prev: torch.Tensor
    z_next: torch.Tensor
    actions: torch.Tensor
    ends: torch.Tensor
    known: torch.Tensor
    episode: torch.Tensor
    source: torch.Tensor
    names: list[str]
    ended: torch.Tensor

    def __len__(self) -> int:
        return len(self.actions)

    def known_only(self) -> Transitions:
        """The transitions with uncensored labels (the same episodes and names)."""
        k = self.known
        return Transitions(self.z_prev[k], self.z_next[k], self.actions[k], self.ends[k], self.known[k],
                           self.episode[k], self.source[k], self.names, self.ended)

    def episode_spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E,) long first index and (E,) long length of every episode's transitions."""
        length = torch.bincount(self.episode, minlength=len(self.names))  # (E,)
        return torch.cumsum(length, 0) - length, length


def hazard_labels(terminated: np.ndarray, horizon: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels of an episode's transitions for an ending within ``horizon`` steps.

    Args:
        terminated: (S+1,) bool, aligned on frames (``terminated[k]``: step k ended the episode).
        horizon: H >= 1.
        limit: the recorder's step limit (episodes were cut off after ``limit`` steps), None if none was.

    Returns:
        ``(ends, known)``, each (S,) bool for transitions k = 1..S: ``ends[k-1]`` is
        ``terminated[k : k + H].any()``; ``known[k-1]`` is False where k + H - 1 > ``limit`` (the
        H-step future passes the limit: censored, in every episode alike).
    """
    if horizon < 1:
        raise UsageError(f"--horizon {horizon}: must be >= 1")
    term = np.asarray(terminated, dtype=bool)[1:]  # (S,) transition k-1 -> k
    s = len(term)
    if limit is None and not term.any() and s > 0:
        raise UsageError("an episode that did not end needs the step limit it was cut off at (limit=None given)")
    window = np.convolve(term.astype(np.int64), np.ones(horizon, np.int64))[horizon - 1 :]  # (S,) sum of term[i : i+H]
    known = np.ones(s, bool) if limit is None else np.arange(s) + horizon <= limit
    return window > 0, known


def step_limit(root: Path) -> int | None:
    """The recorder's step limit of a data directory: the length of its labelled training episodes that
    were cut off without ending (None: every one ended).

    Raises:
        UsageError: the cut-off episodes differ in length (two limits in one directory), or an ended
            episode is longer than the limit.
    """
    from world_model.data import episodes as E

    ended, cut = {}, {}
    for p in E.list_episodes(root):
        meta = E.read_meta(p)
        if not meta.get("labelled") or meta.get("split", "train") != "train":
            continue
        (ended if np.load(p / "terminated.npy", mmap_mode="r")[1:].any() else cut)[p.name] = int(meta["steps"])
    if not cut:
        return None
    limit = max(cut.values())
    odd = sorted(n for n, s in cut.items() if s != limit) + sorted(n for n, s in ended.items() if s > limit)
    if odd:
        raise UsageError(f"{root}: episodes {odd[:3]} do not fit one step limit of {limit} steps (the longest "
                         "episode cut off without ending); record each step limit into its own data directory")
    return limit


def load_transitions(data: tuple[Path, ...], latents: tuple[Path, ...], horizon: int, split: str,
                     holdout_fraction: float, seed: int, keep_censored: bool = False) -> Transitions | None:
    """The labelled transitions of the ``split`` ("train" or "held-out") episodes of every data directory,
    the censored ones too with ``keep_censored`` (a recurrent head's memory runs through them); None for an
    empty held-out split."""
    from world_model.data import episodes as E
    from world_model.data.latents import LATENTS_FILE, resolve_caches
    from world_model.data.loader import split_episodes

    if len({Path(d).resolve() for d in data}) != len(data):
        raise UsageError(f"--data {[str(d) for d in data]}: a directory is given twice")
    caches, _ = resolve_caches(data, latents)
    zp, zn, act, ends, kn, ep, src, names, ended = [], [], [], [], [], [], [], [], []
    for s, (root, cache) in enumerate(caches.items()):
        E.check_data_root(root, create=False)
        limit = step_limit(root)
        train, held = split_episodes(root, holdout_fraction, seed)
        wanted = set(train if split == "train" else held)
        for path in E.list_episodes(root):
            meta = E.read_meta(path)
            if path.name not in wanted or not meta.get("labelled") or meta.get("split", "train") != "train":
                continue
            rec = E.open_episode(path)
            lat_path = cache / E.EPISODES_DIR / path.name / LATENTS_FILE
            if not lat_path.is_file():
                raise UsageError(f"latent cache {lat_path} is missing; run `matrix-world encode-latents` first")
            lat = torch.from_numpy(np.load(lat_path).astype(np.float32))  # (S+1, C, h, w)
            if len(lat) != len(rec["actions"]):
                raise UsageError(f"{lat_path} holds {len(lat)} latents for {len(rec['actions'])} frames of {path}")
            e, k = hazard_labels(rec["terminated"], horizon, limit)  # (S,) each
            use = k | keep_censored
            keep = torch.from_numpy(np.nonzero(use & (np.asarray(rec["actions"][1:]) >= 0))[0])  # (n,)
            if len(keep) == 0:
                continue
            zp.append(lat[:-1][keep])
            zn.append(lat[1:][keep])
            act.append(torch.from_numpy(np.array(rec["actions"][1:], np.int64))[keep])
            ends.append(torch.from_numpy(e)[keep])
            kn.append(torch.from_numpy(k)[keep])
            ep.append(torch.full((len(keep),), len(names), dtype=torch.long))
            src.append(torch.full((len(keep),), s, dtype=torch.long))
            names.append(f"{root}/{path.name}")
            ended.append(bool(np.asarray(rec["terminated"]).any()))
    if not names or not any(k.any() for k in kn):
        if split != "train":
            return None
        raise UsageError(f"no labelled {split} episode with uncensored transitions in {[str(d) for d in data]}")
    return Transitions(torch.cat(zp), torch.cat(zn), torch.cat(act), torch.cat(ends), torch.cat(kn), torch.cat(ep),
                       torch.cat(src), names, torch.tensor(ended))


def episode_logits(heads: torch.nn.Module, t: Transitions, pooled: torch.Tensor, episodes: torch.Tensor,
                   spans: tuple[torch.Tensor, torch.Tensor],
                   offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A recurrent head's hazard logits along episodes, the memory zero at each one's first transition read.

    Args:
        episodes: (E,) long episode indices; spans: :meth:`Transitions.episode_spans`.
        offset: (E,) long transitions to skip at each episode's start (each < its length); None: none.

    Returns:
        ``(logits, index)``: (E, T) logits, T >= the longest sequence's length, and (E, T) long transition
        indices into ``t``, -1 past a sequence's end (padding: its logits there are meaningless).
    """
    start, length = spans[0][episodes], spans[1][episodes]  # (E,) each
    if offset is not None:  # sequences that start mid-drive, as an env's reset does
        start, length = start + offset, length - offset
    # shapes rounded up to a few sizes (T to 32, n to 256 rows): with a new size at every training step,
    # glibc's allocator fragments (peak RSS 4.9 GiB after 1,000 steps, 1.4 GiB with these buckets)
    steps = torch.arange(-(-int(length.max()) // 32) * 32)  # (T,)
    valid = steps[None] < length[:, None]  # (E, T)
    index = torch.where(valid, start[:, None] + steps[None], -1)  # (E, T)
    flat = index[valid]  # (n,) transitions, in episode order
    rows = torch.cat([flat, flat[:1].expand((-len(flat)) % 256)])  # (n',) the padding rows repeat the first
    x = heads.transition(t.z_prev[rows], t.z_next[rows])  # (n', 3C, h, w)
    f = heads.hazard_features(x, pooled[t.actions[rows]])[: len(flat)]  # (n, F)
    feats = f.new_zeros(*valid.shape, f.shape[-1]).masked_scatter(valid[..., None], f)  # (E, T, F)
    return heads.hazard_sequence(feats), index


@torch.no_grad()
def predict(heads: torch.nn.Module, t: Transitions, pooled: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """(N,) hazard logits of every transition (a recurrent head: along each whole episode)."""
    if heads.cfg.hazard_memory > 0:
        spans, out = t.episode_spans(), torch.empty(len(t))
        for i in range(0, len(t.names), 16):  # 16 episodes at a time
            logits, index = episode_logits(heads, t, pooled, torch.arange(i, min(i + 16, len(t.names))), spans)
            out[index[index >= 0]] = logits[index >= 0]
        return out
    out = []
    for i in range(0, len(t), batch):
        x = heads.transition(t.z_prev[i : i + batch], t.z_next[i : i + batch])  # (b, 3C, h, w)
        out.append(heads.hazard_logit(x, pooled[t.actions[i : i + batch]]))  # (b,)
    return torch.cat(out)


def report(logits: torch.Tensor, t: Transitions, horizon: int, base_rate: float, sources: list[str]) -> dict:
    """Calibration of the hazard head on transitions ``t``: BCE against the constant base rate, bins, per data set.

    ``expected_endings`` per data directory is the number of its episodes an env drawing endings at
    the per-step hazards would have ended somewhere along the labelled part of the recorded drive (the
    sum over episodes of 1 - prod(1 - h)), against its episodes that ended (``recorded_endings``). A drawn ending that
    comes before the recorded one counts the same, so this checks the rate, not the timing.
    """
    from world_model.heads import per_step_hazard

    y = t.ends.float()
    q = torch.sigmoid(logits)
    base = torch.full_like(y, base_rate).clamp(1e-6, 1 - 1e-6)
    out: dict = {"transitions": len(t), "episodes": len(t.names), "ending_rate": float(y.mean()),
                 "bce": float(F.binary_cross_entropy_with_logits(logits, y)),
                 "bce_base_rate": float(F.binary_cross_entropy(base, y)), "bins": [], "sets": []}
    edges = torch.tensor(CALIBRATION_BINS)
    which = torch.bucketize(q, edges[1:-1], right=True)  # (N,) bin index
    for b in range(len(edges) - 1):
        m = which == b
        out["bins"].append({"range": [float(edges[b]), float(edges[b + 1])], "count": int(m.sum()),
                            "predicted": float(q[m].mean()) if m.any() else None,
                            "observed": float(y[m].mean()) if m.any() else None})
    log_survive = torch.log1p(-per_step_hazard(logits.double(), horizon).clamp(max=1 - 1e-12))  # (N,) log(1 - h)
    n_ep = len(t.names)
    survive = torch.zeros(n_ep, dtype=torch.float64).index_add_(0, t.episode, log_survive).exp()  # (E,)
    ep_source = torch.full((n_ep,), -1, dtype=torch.long).index_copy_(0, t.episode, t.source)  # (E,), -1: none
    for s, name in enumerate(sources):
        m, e = t.source == s, ep_source == s  # episodes with no labelled transition here count nowhere
        if not m.any():
            continue
        out["sets"].append({"data": name, "episodes": int(e.sum()), "transitions": int(m.sum()),
                            "predicted": float(q[m].mean()), "observed": float(y[m].mean()),
                            "expected_endings": float((1 - survive[e]).sum()),
                            "recorded_endings": int(t.ended[e].sum())})
    return out


def calibration(heads: torch.nn.Module, t: Transitions, pooled: torch.Tensor, horizon: int, base_rate: float,
                sources: list[str]) -> dict:
    """:func:`report` of the head's predictions on the uncensored transitions of ``t`` (a recurrent head
    reads the censored ones too, on its way along each episode)."""
    logits = predict(heads, t, pooled)  # (N,)
    return report(logits[t.known], t.known_only(), horizon, base_rate, sources)


def format_report(rep: dict, where: str) -> str:
    """Markdown tables of :func:`report`."""
    lines = [f"{where}: {rep['transitions']} transitions of {rep['episodes']} episodes, ending within H: "
             f"{100 * rep['ending_rate']:.1f}%; BCE {rep['bce']:.4f} (constant base rate: {rep['bce_base_rate']:.4f})",
             "", "| predicted P(ends within H) | transitions | mean predicted | observed |", "|---|---:|---:|---:|"]
    for b in rep["bins"]:
        pred = "" if b["predicted"] is None else f"{b['predicted']:.3f}"
        obs = "" if b["observed"] is None else f"{b['observed']:.3f}"
        lines.append(f"| {b['range'][0]:g} - {b['range'][1]:g} | {b['count']} | {pred} | {obs} |")
    lines += ["", "| data | episodes | mean predicted | observed | episodes an env would end along the drive "
              "(expected) | episodes that ended |", "|---|---:|---:|---:|---:|---:|"]
    for s in rep["sets"]:
        lines.append(f"| {s['data']} | {s['episodes']} | {s['predicted']:.3f} | {s['observed']:.3f} "
                     f"| {s['expected_endings']:.1f} | {s['recorded_endings']} |")
    return "\n".join(lines)


def train(args: Args, command: list[str] | None = None) -> dict:
    """Train the hazard head and write the world; returns the summary stored in its meta (``hazard``)."""
    from world_model.checkpoint import load_world, save_world
    from world_model.data.latents import latent_space_sha256, read_info
    from world_model.heads import RewardTerminationHeads
    from world_model.train.build_world import check_world_copy, copied_recipe

    if args.horizon < 1:
        raise UsageError(f"--horizon {args.horizon}: must be >= 1")
    if args.steps < 1 or args.batch_size < 1 or args.sequence_batch < 1:
        raise UsageError(f"--steps {args.steps} --batch-size {args.batch_size} --sequence-batch "
                         f"{args.sequence_batch}: each must be >= 1")
    if args.memory < 0:
        raise UsageError(f"--memory {args.memory}: must be >= 0 (0: a per-transition head)")
    check_world_copy(args.world, args.out)
    sha = latent_space_sha256(Path(args.world))
    for cache in args.latents:
        got = read_info(Path(cache)).get("vae_sha256")
        if got != sha:
            raise UsageError(f"--latents {cache} was encoded by another VAE (vae_sha256 {got}); --world "
                             f"{args.world} has {sha}: run `matrix-world encode-latents --vae {args.world}`")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = load_world(args.world)
    cfg = dataclasses.replace(world.heads.cfg, hazard_horizon=args.horizon, termination=args.termination,
                              hazard_action=args.hazard_action, hazard_memory=args.memory)
    heads = RewardTerminationHeads(cfg)
    old = {k: v for k, v in world.heads.state_dict().items() if not k.startswith("hazard.")}
    missing, unexpected = heads.load_state_dict(old, strict=False)
    assert not unexpected and all(k.startswith("hazard.") for k in missing), (missing, unexpected)
    pooled = world.control_pooled.float()  # (A+1, Dt)

    t0 = time.time()
    recurrent = args.memory > 0  # episode sequences, censored transitions included (they feed the memory)
    train_t = load_transitions(args.data, args.latents, args.horizon, "train", args.holdout_fraction, args.seed,
                               keep_censored=recurrent)
    held_t = load_transitions(args.data, args.latents, args.horizon, "held-out", args.holdout_fraction, args.seed,
                              keep_censored=recurrent)
    top = max(int(x.actions.max()) for x in (train_t, held_t) if x is not None)
    if top >= world.num_actions:
        raise UsageError(f"the recorded actions go up to {top}; the world has {world.num_actions} actions")
    base_rate = float(train_t.ends[train_t.known].float().mean())
    print(f"train-hazard: {int(train_t.known.sum())} labelled transitions of {len(train_t.names)} episodes "
          f"({100 * base_rate:.1f}% end "
          f"within {args.horizon} steps), {0 if held_t is None else int(held_t.known.sum())} held out; loaded in "
          f"{time.time() - t0:.0f} s", flush=True)

    params = list(heads.hazard.parameters())  # the rest of the heads stays as the world has it
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    heads.train()
    t0, n, spans = time.time(), len(train_t), train_t.episode_spans()
    for step in range(1, args.steps + 1):
        if recurrent:  # uniform episodes from a uniform transition on; the loss on their uncensored transitions
            eps = torch.randint(0, len(train_t.names), (args.sequence_batch,), generator=gen)  # (E,)
            length = spans[1][eps]  # (E,)
            offset = torch.minimum((torch.rand(len(eps), generator=gen) * length).long(), length - 1)  # (E,)
            logit, index = episode_logits(heads, train_t, pooled, eps, spans, offset)  # (E, T) each
            idx = index[index >= 0]  # (n,) in the order of logit[index >= 0]
            logit, known = logit[index >= 0], train_t.known[idx]
            if not known.any():  # every drawn sequence lies past the step limit's horizon: nothing to learn
                sched.step()  # the schedule keeps its length
                continue
            loss = F.binary_cross_entropy_with_logits(logit[known], train_t.ends[idx][known].float())
        else:
            idx = torch.randint(0, n, (args.batch_size,), generator=gen)  # (b,)
            x = heads.transition(train_t.z_prev[idx], train_t.z_next[idx])  # (b, 3C, h, w)
            logit = heads.hazard_logit(x, pooled[train_t.actions[idx]])  # (b,)
            loss = F.binary_cross_entropy_with_logits(logit, train_t.ends[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} bce {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    heads.eval()

    sources = [str(d) for d in args.data]
    summary = {"horizon": args.horizon, "termination": args.termination, "base_rate": base_rate,
               "args": {k: [str(p) for p in v] if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                        for k, v in dataclasses.asdict(args).items()},
               "train": calibration(heads, train_t, pooled, args.horizon, base_rate, sources)}
    print(format_report(summary["train"], "train"))
    summary["held_out"] = None if held_t is None else calibration(heads, held_t, pooled, args.horizon, base_rate,
                                                                  sources)
    print("held out: no labelled episode" if held_t is None else format_report(summary["held_out"], "held out"))

    world.heads = heads
    world.meta = {**world.meta, "hazard": summary}
    save_world(args.out, world, copied_recipe(args.world, command))
    kind = f"recurrent hazard head (memory {args.memory})" if recurrent else "hazard head"
    print(f"saved world model to {args.out}: {kind} (H = {args.horizon}), termination {args.termination!r}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``matrix-world train-hazard``: parse Args, train, write the world."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world train-hazard", description=Args.__doc__)
    train(args, command=["matrix-world", "train-hazard", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
