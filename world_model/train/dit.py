"""Train the video DiT and the reward/termination heads on cached latents (``matrix-world train-dit``).

One step, for a batch of windows of T = C + G latent frames (C context, G noise groups):

* Noise levels (flow time, 0 clean .. 1 noise), per sample, one of two schemes:
    - Swin-DPM (``swin_fraction``, default 50%): the C context frames get light noise
      ``t ~ U[0, ctx_noise]`` (it fights drift, DESIGN.md §4); noisy frame g in 0..G-1 gets
      ``t = (g + u) / G`` with one ``u ~ U[0, 1)`` per sample, the staggered levels the sampler
      sees in its window.
    - Diffusion forcing (the rest): ``t ~ U[0, 1]`` independently per frame.
* Rectified flow: ``x_t = (1 - t) x0 + t eps``, the DiT predicts ``v = eps - x0``; the loss is the
  MSE on v averaged over frames with weight 1 for noisy frames and ``ctx_loss_weight`` (default 0)
  for the Swin-DPM context frames.
* Control: each frame's action (``actions[k]`` produced ``frames[k]``) indexes the control table
  (A action sentences + the unknown sentence, encoded ONCE at the start of the run, stored in the
  run dir and reused on resume); data id -1 is the unknown row, and with probability
  ``ctrl_dropout`` a frame's control is replaced by the unknown row (so unlabelled footage and
  unknown actions stay in distribution).
* Heads, jointly (same optimiser): on clean latents ``(z[k-1], z[k], pooled control of
  actions[k]) -> rewards[k], terminated[k]`` for labelled transitions, BCE with a class-balanced
  ``pos_weight`` computed from the training windows.

The EMA weights are saved as the final model: ``save_module(out, "dit")``, ``save_module(out,
"heads")`` and ``control_table.safetensors``.

Example::

    matrix-world train-dit --data ~/data/carracing --latents ~/latents/carracing \
        --run-dir ~/runs/dit --preset B
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from world_model.errors import UsageError
from world_model.swin_dpm import SwinDPM, SwinDPMConfig
from world_model.text import ControlEmbeddings, TextEncoderConfig
from world_model.train import common

CONTROL_TABLE_FILE = "control_table.safetensors"
# Fields that may change between a run and its resume: they do not change the math.
RESUME_FREE = (
    "run_dir",
    "out",
    "ckpt_every",
    "keep_ckpts",
    "num_workers",
    "debug_hashes",
    "step_sleep",
    "device",
    "control_table",
    "eval_batches",
    "stop_at",
    "max_minutes",
)
# Upper bound of the termination pos_weight: keeps the BCE sane when terminations are very rare.
MAX_POS_WEIGHT = 1000.0


@dataclass
class Args:
    """Train the video DiT (flow matching, per-frame noise levels, action cross-attention) and the heads."""

    data: tuple[Path, ...]
    """Recorded data directories (e.g. the labelled and the unlabelled set)."""
    latents: tuple[Path, ...]
    """Latent caches written by ``matrix-world encode-latents``, one per data directory, same order."""
    run_dir: Path = Path("~/runs/dit")
    """Run directory for checkpoints, TensorBoard and the final model; a rerun resumes from it."""
    out: Path | None = None
    """Where the final model goes (default: RUN_DIR/model)."""
    preset: Literal["tiny", "S", "B"] = "S"
    """DiT size preset (world_model.dit.DIT_PRESETS); latent shape and text width come from the data."""
    patch: int | None = None
    """Patch size of the DiT's tokens (default: the preset's, 1). 2 on a 9x16 latent pads it to 10x16:
    40 tokens per frame instead of 144, ~3.3x less DiT time per env step (docs/EXPERIMENTS.md, "A fast world":
    trained from nothing, it lost the road)."""
    patch_shift: int | None = None
    """Columns the patch grid is moved by, in [0, patch) (default 0; DiTConfig.patch_shift): 1 at patch 2
    puts CarRacing's car, latent columns 7-8, in one token column instead of across two. Given with
    --init-from, a parent on another grid keeps its weights and only the grid moves; left out, the parent's
    grid must be the preset's (e.g. fine-tuning world "fast" needs --patch 2 --patch-shift 1)."""
    causal: bool = True
    """Block-causal temporal attention (frame i attends frames <= i); --no-causal trains bidirectional."""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Text encoder for the control table (encoded once per run)."""
    control_table: Path | None = None
    """Reuse a control_table.safetensors (from a DiT run or model dir) instead of running the text encoder."""
    init_from: Path | None = None
    """Warm start: a train-dit model dir or a world dir, whose DiT + heads weights (same preset, latent
    shape, text width) initialise this run; the optimiser, schedule and EMA start fresh, its control
    table is reused and its recipe is recorded in this run's train_dit.json. A patch-1 parent may start a
    DiT with larger patches (--patch P): its patch embedding and output layer are inflated (each token
    embeds the mean of its P x P latent pixels as the parent embeds one pixel, and the output repeats the
    parent's velocity over the patch), every other weight is copied."""
    teacher: Path | None = None
    """Distillation: a train-dit model dir or a world dir whose DiT (same latent shape and control
    table) gives the regression target, its velocity on the same noisy window and controls, in place of
    the noise-minus-data flow target. The heads still learn from the data's labels. With --init-from the
    same dir and --patch 2, this distils the default world into a DiT with 3.6x fewer tokens."""
    action_distill_weight: float = 0.0
    """With --teacher: also match the teacher's response to the action. Each window is run a second time
    with every frame's control replaced by another action's (drawn uniformly among the others), and the
    loss adds this weight times the squared difference between the student's and the teacher's velocity
    change, (v(a) - v(a')) against (v_T(a) - v_T(a')). The plain distillation target is dominated by the
    picture; the action's effect on the velocity is a small part of it, and a student can lose it
    (a distilled world that barely turns, docs/EXPERIMENTS.md). 0 = off (one pass per step; > 0 doubles
    the batch through both DiTs)."""
    consistency_weight: float = 0.0
    """Stream consistency (The Matrix's SCM), with a --teacher *world*: also train the student to do in one
    model call per shift what the teacher's own sampler does in ``--consistency-substeps``. Each window's
    first ``context + G`` frames (G = ``--consistency-groups``) are put at the levels the student's sampler
    holds them before a shift (pipelined, the teacher world's level shift and context noise); the teacher
    runs its k Euler steps over them, and the student's velocity at those levels must equal the teacher's
    mean velocity over the shift, (x_after - x_before) / (t_after - t_before): the student's one step aims to
    land where the teacher's k land, at a k-th of the calls (the 2x2-patch student so trained kept its
    turning but not its car: docs/EXPERIMENTS.md, "Stream consistency"). 0 = off; > 0 adds B windows to
    the student's batch and k teacher passes."""
    consistency_groups: int = 2
    """G of the student's sampler that --consistency-weight distils for (frames in flight)."""
    consistency_substeps: int = 2
    """k, the teacher's Euler steps per shift that the student's one step must match (>= 2)."""
    window: int = 8
    """T, frames per training window (context + noise groups)."""
    context: int = 4
    """C, clean context frames of the Swin-DPM scheme (G = window - context noise groups)."""
    steps: int = 100_000
    """Optimiser steps in total (a resumed run continues up to this count)."""
    stop_at: int | None = None
    """Stop this invocation at step N of the run (counted like ``steps``), saving a checkpoint and
    exporting the EMA model so far, without changing the learning-rate schedule set by ``steps``;
    rerun with a larger value (or without it) to continue. Values >= ``steps`` change nothing; a
    value below the step a resumed run has already reached is refused. For a compute budget that
    ends before the schedule does."""
    max_minutes: float | None = None
    """Stop this invocation once it has trained this many minutes (wall clock, counted from its first
    step), like ``--stop-at`` at the step it has reached: checkpoint, EMA model exported, schedule
    unchanged, the same command resumes. For a lent machine with a fixed time budget."""
    batch_size: int = 16
    """Windows per step per rank."""
    lr: float = 1e-4
    """Peak AdamW learning rate (cosine decay to lr/10 after the warmup)."""
    warmup: int = 1000
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    ema_decay: float = 0.9999
    """EMA decay; the EMA weights are the ones saved as the final model."""
    ctrl_dropout: float = 0.1
    """Probability of replacing a frame's control with the unknown row."""
    ctx_noise: float = 0.1
    """Max flow time of the lightly noised context frames (Swin-DPM scheme)."""
    swin_fraction: float = 0.5
    """Fraction of samples with Swin-DPM staggered levels (the rest: independent uniform levels)."""
    ctx_loss_weight: float = 0.0
    """Loss weight of the Swin-DPM context frames (noisy frames weigh 1)."""
    heads_weight: float = 1.0
    """Weight of the reward/termination loss in the joint objective."""
    road_weight: float = 1.0
    """Sampling weight of windows whose last frame shows the car on the road (CarRacing's grey road
    under the car, see ``world_model.road_follower.on_road``) or that hold a termination; other
    windows weigh 1. Above 1 it shifts training towards driving on the road (the recording policy
    spends 10-80% of an episode on grass). 1 = every window equally likely (a plain permutation)."""
    curve_weight: float = 1.0
    """Extra sampling weight (multiplying ``road_weight``) of windows whose last frame shows the car on
    the road and the road ahead off-centre by more than the road follower's deadband (a curve, or the
    car beside the middle: ``road_follower.heading_error``). 1 = off. Generated roads are straighter than
    recorded ones (docs/EXPERIMENTS.md, "Steering share"); this shifts training towards the frames with bends."""
    leave_weight: float = 1.0
    """Extra sampling weight of windows in which the car leaves the road: on the road in the first
    frame, off it in the last. 1 = off. Generated roads stay under a car that ignores them (a held
    "D" keeps the road far longer than in the game; docs/EXPERIMENTS.md); these are the windows that
    show the opposite."""
    focus_box: tuple[int, int, int, int] | None = None
    """ROW0 ROW1 COL0 COL1: a box of latent positions (rows ROW0..ROW1-1, columns COL0..COL1-1 of the
    latent grid) whose velocity errors weigh --focus-weight times the rest in every velocity loss (flow
    or distillation, action, consistency). For what the camera keeps in one place and the eye checks
    first: CarRacing's car sits in rows 5-7, columns 7-8 of the 9x16 latent (``5 8 7 9``), 6 of 144
    positions, so a plain mean barely sees it (the 2x2-patch students fade it; docs/EXPERIMENTS.md,
    "A loss that looks at the car"). The weights are scaled to mean 1 over the frame, so the loss keeps its
    scale, but the training log's loss/* are weighted; held-out eval/* stay unweighted (comparable across
    runs) and eval/focus adds the error inside the box alone (one more pass of both DiTs per eval batch)."""
    focus_weight: float = 1.0
    """Weight of the --focus-box positions' velocity errors relative to the others' (1 = off)."""
    heads_hidden: int = 128
    """Width of the heads (HeadsConfig.hidden)."""
    bf16: bool = False
    """bf16 autocast (CPU with AVX512-BF16/AMX, or a bf16 GPU); fp32 (with a note) where the device
    would emulate bf16 (an AVX2-only CPU: 0.12x fp32 speed). The summary records `bf16_used`."""
    ckpt_every: int = 1000
    """Write a training checkpoint every this many steps (and at the end)."""
    keep_ckpts: int = 2
    """Training checkpoints kept in RUN_DIR/state."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    seed: int = 0
    """Seed of the data order, the init and the noise."""
    device: str = "auto"
    """auto, cpu or cuda."""
    holdout_fraction: float = 0.1
    """Fraction of episodes held out for the final evaluation (same split as train-vae)."""
    eval_batches: int = 8
    """Held-out batches for the final evaluation of the EMA model."""
    debug_hashes: bool = False
    """Write RUN_DIR/debug/dit_rank<r>.txt with the final weight hash (DDP equality tests)."""
    step_sleep: float = 0.0
    """Debug: sleep this long after each step (lets kill/resume tests catch a run mid-way)."""


# ----------------------------------------------------------------------------- control table
def save_control_table(path: Path, table: ControlEmbeddings, sentences: list[str], text: dict) -> None:
    """Write the control table as safetensors (tokens, mask, pooled) with the sentences in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tensors = {
        "tokens": table.tokens.float().contiguous(),
        "mask": table.mask.bool().contiguous(),
        "pooled": table.pooled.float().contiguous(),
    }
    save_file(tensors, str(tmp), metadata={"sentences": json.dumps(sentences), "text": json.dumps(text)})
    tmp.replace(path)


def load_control_table(path: Path) -> tuple[ControlEmbeddings, list[str]]:
    """Read a control table written by :func:`save_control_table`; returns it and its sentences.

    A missing ``path`` inside a world directory reads the world's own control rows instead.
    """
    from safetensors import safe_open

    from world_model.checkpoint import CONFIG_FILE, CONTROL_FILE

    world_dir = Path(path).parent
    if not Path(path).exists() and (world_dir / CONTROL_FILE).is_file() and (world_dir / CONFIG_FILE).is_file():
        # a world directory (``--init-from WORLD``): the same rows, stored in its control file
        try:
            with safe_open(str(world_dir / CONTROL_FILE), framework="pt") as f:
                table = ControlEmbeddings(f.get_tensor("tokens"), f.get_tensor("mask"), f.get_tensor("pooled"))
            return table, list(json.loads((world_dir / CONFIG_FILE).read_text())["sentences"])
        except Exception as err:
            raise UsageError(f"world {str(world_dir)!r}: its control table is missing or corrupt: {err}") from err
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            table = ControlEmbeddings(f.get_tensor("tokens"), f.get_tensor("mask"), f.get_tensor("pooled"))
        return table, json.loads(meta["sentences"])
    except Exception as err:  # safetensors raises its own error types
        raise UsageError(f"control table {str(path)!r} is missing or corrupt: {err}") from err


def action_table(episodes: list[Path]) -> tuple[list[str], list[str]]:
    """Action names and sentences shared by the labelled episodes (driving table if none is labelled).

    Raises:
        UsageError: two labelled episodes disagree (name both).
    """
    from world_model.actions import DRIVING_ACTIONS, DRIVING_SENTENCES
    from world_model.data.episodes import read_meta

    found: tuple[list[str], list[str], Path] | None = None
    for ep in episodes:
        meta = read_meta(ep)
        if not meta.get("labelled") or "sentences" not in meta:
            continue
        names, sentences = list(meta.get("action_names", [])), list(meta["sentences"])
        if found is None:
            found = (names, sentences, ep)
        elif (names, sentences) != found[:2]:
            raise UsageError(
                f"episodes {found[2].name} and {ep.name} have different action tables; train on one env"
            )
    if found is None:
        return list(DRIVING_ACTIONS), list(DRIVING_SENTENCES)
    return found[0], found[1]


# ----------------------------------------------------------------------------- model
class DiTWithHeads(nn.Module):
    """The DiT and the heads as one module, so one DDP wrapper and one optimiser cover both."""

    def __init__(self, dit: nn.Module, heads: nn.Module) -> None:
        """Hold both modules."""
        super().__init__()
        self.dit, self.heads = dit, heads

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ctrl_tokens: torch.Tensor,
        ctrl_mask: torch.Tensor,
        z_prev: torch.Tensor,
        z_next: torch.Tensor,
        ctrl_pooled: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Velocity of the noisy window and the heads' predictions for the clean transitions.

        Args:
            x_t: (B, T, C, H, W) noisy latents.
            t: (B, T) flow time.
            ctrl_tokens: (B, T, N, Dt), ctrl_mask: (B, T, N) bool.
            z_prev, z_next: (M, C, H, W) clean latents of M transitions.
            ctrl_pooled: (M, Dt) pooled control of the action of each transition.

        Returns:
            ``(v, reward, term_logit)``: (B, T, C, H, W), (M,), (M,).
        """
        v = self.dit(x_t, t, ctrl_tokens, ctrl_mask)
        reward, term_logit = self.heads(z_prev, z_next, ctrl_pooled)
        return v, reward, term_logit


def sample_levels(
    b: int,
    window: int,
    context: int,
    ctx_noise: float,
    swin_fraction: float,
    ctx_loss_weight: float,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame flow times and loss weights: the Swin-DPM / diffusion-forcing mix.

    Returns:
        ``(t, weight)``, each (B, T) float32.
    """
    g = window - context
    swin = torch.rand(b, 1, generator=generator, device=device) < swin_fraction  # (B, 1)
    u = torch.rand(b, 1, generator=generator, device=device)  # (B, 1) stagger offset
    groups = torch.arange(g, device=device, dtype=torch.float32)  # (G,)
    t_ctx = torch.rand(b, context, generator=generator, device=device) * ctx_noise  # (B, C)
    t_swin = torch.cat([t_ctx, (groups + u) / g], dim=1)  # (B, T)
    t_df = torch.rand(b, window, generator=generator, device=device)  # (B, T)
    t = torch.where(swin, t_swin, t_df)  # (B, T)
    w_swin = torch.cat(
        [torch.full((context,), ctx_loss_weight, device=device), torch.ones(g, device=device)]
    )  # (T,)
    weight = torch.where(swin, w_swin.expand(b, window), torch.ones(b, window, device=device))  # (B, T)
    return t, weight


def termination_pos_weight(dataset: object, window: int) -> tuple[float, int, int]:
    """Class balance of the labelled transitions the heads see, counted as the windows sample them.

    A frame k is the "next" frame of a transition in every window that starts in [k-T+1, k-1], so
    frames near an episode's end (where terminations are) appear in fewer windows; counting per
    window keeps ``pos_weight = negatives / positives`` honest.

    Returns:
        ``(pos_weight, positives, negatives)``; pos_weight is 1 without positives.
    """
    from world_model.data.episodes import open_episode

    pos = neg = 0
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for ep, labelled in ((ep, lab) for d in parts for (ep, _), lab in zip(d.paths, d.labelled, strict=True)):
        if not labelled:
            continue
        a = open_episode(ep)
        n = len(a["actions"])
        starts = np.zeros(n)
        starts[: n - window + 1] = 1.0
        uses = np.convolve(starts, np.ones(window - 1))[: n - 1]  # uses[k-1]: windows where frame k is "next"
        valid = np.asarray(a["actions"][1:]) >= 0
        term = np.asarray(a["terminated"][1:], dtype=bool)
        pos += int(uses[valid & term].sum())
        neg += int(uses[valid & ~term].sum())
    weight = min(MAX_POS_WEIGHT, neg / pos) if pos > 0 else 1.0
    return float(weight), pos, neg


def road_window_weights(
    dataset: object, window: int, road_weight: float, curve_weight: float = 1.0, leave_weight: float = 1.0
) -> np.ndarray:
    """Sampling weight per training window: ``road_weight`` where the window's last frame is on the
    road or the window holds a termination, 1 elsewhere, times ``curve_weight`` where that last frame
    is on the road with the road ahead off-centre (``|heading error| > DEADBAND``), times
    ``leave_weight`` where the first frame is on the road and the last is not (the car leaves it). Returns
    (len(dataset),) float64 in the dataset's window order (ConcatDataset parts in order, episodes in
    order, windows by start)."""
    from world_model.data.episodes import open_episode, read_meta
    from world_model.road_follower import DEADBAND, SEARCH_BELOW, heading_error, on_road

    out, others = [], set()
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for ep in (ep for d in parts for ep, _ in d.paths):
        env_id = str(read_meta(ep).get("env_id", ""))
        if not env_id.startswith("CarRacing"):
            others.add(env_id)
        a = open_episode(ep)
        frames = np.asarray(a["frames"])  # (S+1, 72, 128, 3) uint8
        n = len(frames)
        last = frames[window - 1 :]  # (n-T+1, 72, 128, 3) the last frame of each window
        on = on_road(frames)  # (n,) bool, per frame
        road = on[window - 1 :]  # (n-T+1,) the last frame of each window on the road
        leave = on[: n - window + 1] & ~road  # (n-T+1,) on the road at the window's start, not at its end
        term = np.convolve(np.asarray(a["terminated"], dtype=float), np.ones(window))[window - 1 : n] > 0
        err, frac = heading_error(last)  # (n-T+1,) each
        curve = road & (frac >= SEARCH_BELOW) & (np.abs(err) > DEADBAND)
        weight = np.where(road | term, road_weight, 1.0) * np.where(curve, curve_weight, 1.0)
        out.append(weight * np.where(leave, leave_weight, 1.0))
    if others:
        print(f"warning: --road-weight reads CarRacing's grey road, but some episodes come from {sorted(others)}")
    weights = np.concatenate(out)
    assert len(weights) == len(dataset), (len(weights), len(dataset))
    return weights


@dataclass
class StepInputs:
    """Model inputs and targets of one batch (see :func:`make_inputs`)."""

    x_t: torch.Tensor  # (B, T, C, H, W)
    t: torch.Tensor  # (B, T)
    v_target: torch.Tensor  # (B, T, C, H, W)
    weight: torch.Tensor  # (B, T)
    ctrl_tokens: torch.Tensor  # (B, T, N, Dt)
    ctrl_mask: torch.Tensor  # (B, T, N)
    z_prev: torch.Tensor  # (B*(T-1), C, H, W)
    z_next: torch.Tensor  # (B*(T-1), C, H, W)
    ctrl_pooled: torch.Tensor  # (B*(T-1), Dt)
    reward: torch.Tensor  # (B*(T-1),)
    terminated: torch.Tensor  # (B*(T-1),)
    head_mask: torch.Tensor  # (B*(T-1),) bool: labelled transitions
    alt_ctrl_tokens: torch.Tensor | None = None  # (B, T, N, Dt): another action per frame (--action-distill-weight)
    alt_ctrl_mask: torch.Tensor | None = None  # (B, T, N)
    # --consistency-weight: the first L = C + G frames at the student sampler's levels before a shift
    cons_x: torch.Tensor | None = None  # (B, L, C, H, W): context noised to ctx_noise, frames in flight at their level
    cons_t: torch.Tensor | None = None  # (k, L): the teacher's model-input times for each of its k Euler steps
    cons_dt: torch.Tensor | None = None  # (k, G): the level change of the frames in flight at each Euler step
    focus: torch.Tensor | None = None  # (H, W), mean 1: weights of the velocity errors by latent position (--focus-box)


def focus_map(box: tuple[int, int, int, int], weight: float, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H, W) weights of the velocity errors: ``weight`` inside ``box`` (rows r0..r1-1, columns c0..c1-1),
    1 outside, scaled to mean 1 (``weight`` = inf: the box alone, i.e. the mean error inside it)."""
    r0, r1, c0, c1 = box
    inside = torch.zeros(hw, device=device)  # (H, W)
    inside[r0:r1, c0:c1] = 1.0
    w = inside if math.isinf(weight) else 1.0 + (weight - 1.0) * inside
    return w / w.mean()


def make_inputs(
    batch: dict[str, torch.Tensor],
    table: ControlEmbeddings,
    args: Args,
    generator: torch.Generator,
    device: torch.device,
    scm: SwinDPM | None = None,
    extra_generator: torch.Generator | None = None,
) -> StepInputs:
    """Noise a batch of latent windows and gather its control embeddings.

    Args:
        batch: WindowDataset items collated: latents (B, T, C, H, W), actions (B, T), rewards,
            terminated (B, T), labelled, has_rewards (B,).
        table: control table on ``device`` (A+1 rows, unknown last).
        args: the run's Args (levels, dropout).
        generator: RNG for levels, noise and dropout, on ``device``.
        device: compute device.
        scm: the teacher's sampler for ``--consistency-weight`` (:func:`consistency_sampler`), or None.
        extra_generator: RNG for the draws only distillation options make (other actions, the sampler
            windows' noise); default ``generator``. Evaluation passes its own, so the plain losses see the
            same levels and noise with or without those options.
    """
    x0 = batch["latents"].to(device, non_blocking=True)  # (B, T, C, H, W)
    actions = batch["actions"].to(device)  # (B, T), -1 = unknown
    b, n_frames = actions.shape
    unknown = table.tokens.shape[0] - 1
    rows = torch.where(actions < 0, torch.full_like(actions, unknown), actions)  # (B, T) table rows
    drop = torch.rand(b, n_frames, generator=generator, device=device) < args.ctrl_dropout  # (B, T)
    rows_in = torch.where(drop, torch.full_like(rows, unknown), rows)  # (B, T)

    t, weight = sample_levels(
        b, n_frames, args.context, args.ctx_noise, args.swin_fraction, args.ctx_loss_weight, generator, device
    )  # (B, T) each
    eps = torch.randn(x0.shape, generator=generator, device=device)  # (B, T, C, H, W)
    tt = t[:, :, None, None, None]  # (B, T, 1, 1, 1)
    x_t = (1.0 - tt) * x0 + tt * eps

    labelled = (batch["labelled"] & batch["has_rewards"]).to(device)  # (B,)
    head_mask = (actions[:, 1:] >= 0) & labelled[:, None]  # (B, T-1)
    extra = generator if extra_generator is None else extra_generator
    alt = None
    if args.action_distill_weight > 0:  # another known action per frame (never the unknown row, never rows_in)
        other = torch.randint(0, unknown - 1, (b, n_frames), generator=extra, device=device)  # (B, T)
        other = torch.where(other >= rows_in, other + 1, other)  # uniform over the known actions but rows_in
        any_known = torch.randint(0, unknown, (b, n_frames), generator=extra, device=device)  # (B, T)
        alt = torch.where(rows_in < unknown, other, any_known)  # a dropped (unknown) frame: any known action
    cons = None
    if scm is not None:  # the sampler's window before a shift: x = (1 - t) x0 + t eps at its model-input times
        n = scm.window_len
        t_in = scm.t_in  # (k, L): row 0 = context at ctx_noise, frames in flight at their level
        eps_c = torch.randn(x0[:, :n].shape, generator=extra, device=device)  # (B, L, C, H, W)
        tt0 = t_in[0][None, :, None, None, None]  # (1, L, 1, 1, 1)
        cons = ((1.0 - tt0) * x0[:, :n] + tt0 * eps_c, t_in, scm.dt)
    return StepInputs(
        x_t=x_t,
        t=t,
        v_target=eps - x0,
        weight=weight,
        ctrl_tokens=table.tokens[rows_in],
        ctrl_mask=table.mask[rows_in],  # (B, T, N, Dt), (B, T, N)
        z_prev=x0[:, :-1].flatten(0, 1),
        z_next=x0[:, 1:].flatten(0, 1),  # (B*(T-1), C, H, W)
        ctrl_pooled=table.pooled[rows[:, 1:]].flatten(0, 1),  # (B*(T-1), Dt): the real action
        reward=batch["rewards"][:, 1:].to(device).flatten(),
        terminated=batch["terminated"][:, 1:].to(device).flatten(),
        head_mask=head_mask.flatten(),
        alt_ctrl_tokens=None if alt is None else table.tokens[alt],
        alt_ctrl_mask=None if alt is None else table.mask[alt],
        cons_x=None if cons is None else cons[0],
        cons_t=None if cons is None else cons[1],
        cons_dt=None if cons is None else cons[2],
        focus=None if args.focus_box is None else focus_map(args.focus_box, args.focus_weight, x0.shape[-2:], device),
    )


def compute_losses(
    model: nn.Module,
    inp: StepInputs,
    pos_weight: float,
    heads_weight: float,
    teacher: nn.Module | None = None,
    action_weight: float = 0.0,
    consistency_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Flow-matching loss on the noisy frames plus the heads' loss on labelled transitions.

    With a ``teacher`` DiT the velocity target is the teacher's on the same inputs (distillation); with
    ``action_weight`` > 0 and the inputs' other actions, the window also runs under those (one doubled batch
    through each DiT) and the student's velocity change matches the teacher's ("loss/action"); with
    ``consistency_weight`` > 0 and the inputs' sampler windows, the student's velocity there matches the
    teacher's mean velocity over its k Euler steps of one shift ("loss/consistency", stream consistency).
    """
    from world_model.heads import RewardTerminationHeads

    b = inp.x_t.shape[0]
    x_t, t, tokens, mask = inp.x_t, inp.t, inp.ctrl_tokens, inp.ctrl_mask
    contrast = teacher is not None and action_weight > 0
    consist = teacher is not None and consistency_weight > 0
    if contrast and inp.alt_ctrl_tokens is None:
        raise ValueError("action_weight > 0 needs inputs made with args.action_distill_weight > 0 (other actions)")
    if consist and inp.cons_x is None:
        raise ValueError("consistency_weight > 0 needs inputs made with a consistency sampler (make_inputs scm=...)")
    if contrast:  # (2B, ...): the window under its actions, then under the other actions
        x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
        tokens, mask = torch.cat([tokens, inp.alt_ctrl_tokens]), torch.cat([mask, inp.alt_ctrl_mask])
    x_s, t_s, tokens_s, mask_s = x_t, t, tokens, mask  # the student's batch
    if consist:  # + B rows: the sampler's first L frames, then the window's own (a causal DiT never reads them)
        n = inp.cons_x.shape[1]
        x_s = torch.cat([x_s, torch.cat([inp.cons_x, inp.x_t[:, n:]], dim=1)])
        t_s = torch.cat([t_s, torch.cat([inp.cons_t[0].expand(b, n), inp.t[:, n:]], dim=1)])
        tokens_s, mask_s = torch.cat([tokens_s, inp.ctrl_tokens]), torch.cat([mask_s, inp.ctrl_mask])
    v_all, reward, term_logit = model(x_s, t_s, tokens_s, mask_s, inp.z_prev, inp.z_next, inp.ctrl_pooled)
    v = v_all[:b]  # (B, T, C, H, W)
    v_target = inp.v_target  # (B, T, C, H, W)
    if teacher is not None:
        with torch.no_grad():
            vt_all = teacher(x_t, t, tokens, mask).float()  # (B or 2B, T, C, H, W)
        v_target = vt_all[:b]
    per_frame = _squared(v.float() - v_target, inp.focus).mean(dim=(2, 3, 4))  # (B, T)
    flow = (per_frame * inp.weight).sum() / inp.weight.sum().clamp(min=1e-8)
    action = None
    if contrast:
        dv = (v_all[:b] - v_all[b : 2 * b]).float() - (vt_all[:b] - vt_all[b:])  # (B, T, C, H, W)
        per_frame = _squared(dv, inp.focus).mean(dim=(2, 3, 4))  # (B, T)
        action = (per_frame * inp.weight).sum() / inp.weight.sum().clamp(min=1e-8)
    consistency = None
    if consist:
        consistency = consistency_loss(v_all[-b:, : inp.cons_x.shape[1]], inp, teacher)
    m = inp.head_mask
    if bool(m.any()):
        h = RewardTerminationHeads.loss(
            reward[m].float(), term_logit[m].float(), inp.reward[m], inp.terminated[m], pos_weight
        )
    else:  # no labelled transition in this batch: keep every head parameter in the graph (DDP)
        zero = 0.0 * (reward.sum() + term_logit.sum())
        h = {"loss": zero, "reward_loss": zero.detach(), "term_loss": zero.detach()}
    out = {
        "loss/total": flow + heads_weight * h["loss"] + (0.0 if action is None else action_weight * action)
        + (0.0 if consistency is None else consistency_weight * consistency),
        "loss/flow": flow,
        "loss/reward": h["reward_loss"],
        "loss/termination": h["term_loss"],
    }
    if action is not None:
        out["loss/action"] = action
    if consistency is not None:
        out["loss/consistency"] = consistency
    return out


def _squared(err: torch.Tensor, focus: torch.Tensor | None) -> torch.Tensor:
    """err ** 2 (..., H, W), weighted by latent position when a focus map (H, W) is given."""
    return err.pow(2) if focus is None else err.pow(2) * focus


def consistency_loss(v: torch.Tensor, inp: StepInputs, teacher: nn.Module) -> torch.Tensor:
    """Stream consistency: the student's one-call velocity ``v`` (B, L, C, H, W) on the sampler's window
    ``inp.cons_x`` against the teacher's mean velocity over the shift, from its k Euler steps over the
    whole window (context input fixed, as in :meth:`SwinDPM.step`). Only the G frames in flight count.
    """
    b, n = inp.cons_x.shape[:2]
    g = inp.cons_dt.shape[1]
    with torch.no_grad():
        x = inp.cons_x.float().clone()  # (B, L, C, H, W)
        tokens, mask = inp.ctrl_tokens[:, :n], inp.ctrl_mask[:, :n]  # (B, L, N, Dt), (B, L, N)
        for j in range(inp.cons_t.shape[0]):
            vj = teacher(x, inp.cons_t[j].expand(b, n), tokens, mask).float()  # (B, L, C, H, W)
            x[:, -g:] += inp.cons_dt[j][None, :, None, None, None] * vj[:, -g:]
        span = inp.cons_dt.sum(dim=0)[None, :, None, None, None]  # (1, G, 1, 1, 1): t_after - t_before < 0
        target = (x[:, -g:] - inp.cons_x[:, -g:].float()) / span  # (B, G, C, H, W)
    return _squared(v[:, -g:].float() - target, inp.focus).mean()


def consistency_sampler(args: Args) -> SwinDPMConfig:
    """The teacher's sampler that ``--consistency-weight`` distils: the teacher world's level shift and context
    noise, pipelined, ``--consistency-groups`` frames in flight, ``--consistency-substeps`` Euler steps per shift.

    Returns:
        The teacher's sampler config, ``steps_per_shift`` = k (the student's own sampler is the same with 1).

    Raises:
        UsageError: no teacher, a non-world teacher, a guided sampler, a bidirectional student, or G / k /
            context that do not fit.
    """
    from world_model.checkpoint import CheckpointError, _read_json
    from world_model.simulator import sampler_config_from

    w, g, k = args.consistency_weight, args.consistency_groups, args.consistency_substeps
    if args.teacher is None:
        raise UsageError(f"--consistency-weight {w} distils a teacher's sampler: give --teacher (a world dir)")
    if not args.causal:
        raise UsageError(f"--consistency-weight {w} reads each window's first --context + --consistency-groups "
                         "frames alone, which needs a block-causal student: drop --no-causal")
    if g < 1 or k < 2:
        raise UsageError(f"--consistency-groups {g} / --consistency-substeps {k}: expected G >= 1 frames in flight "
                         "and k >= 2 teacher steps per shift (k = 1 is plain distillation)")
    if args.context + g > args.window:
        raise UsageError(f"--consistency-groups {g}: --context {args.context} + G frames must fit in --window "
                         f"{args.window}")
    try:
        sampler = _read_json(Path(args.teacher).expanduser() / "config.json").get("sampler")
    except CheckpointError as err:
        raise UsageError(f"--consistency-weight {w}: --teacher {args.teacher} must be a world dir: {err}") from err
    if not isinstance(sampler, dict):
        raise UsageError(f"--consistency-weight {w}: --teacher {args.teacher} has no sampler settings (a train-dit "
                         "model dir?); give a world dir, whose level shift and context noise the student learns")
    try:  # read as the env reads a world's sampler (defaults for missing fields, bad values named)
        cfg = sampler_config_from(sampler, "pipelined", {"groups": g, "steps_per_shift": k})
    except UsageError as err:
        raise UsageError(f"--consistency-weight {w}: --teacher {args.teacher}'s sampler settings: {err}") from err
    if cfg.context != args.context:
        raise UsageError(f"--consistency-weight {w}: the teacher world's sampler holds {cfg.context} context frames, "
                         f"this run --context {args.context}")
    if cfg.guidance != 1.0:
        raise UsageError(f"--consistency-weight {w}: the teacher world's sampler uses guidance {cfg.guidance}; "
                         "the consistency target is unguided: give a world with guidance 1")
    return cfg


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: object,
    table: ControlEmbeddings,
    args: Args,
    pos_weight: float,
    device: torch.device,
    teacher: nn.Module | None = None,
    scm: SwinDPM | None = None,
) -> dict[str, float]:
    """Held-out losses of the (EMA) model with a fixed RNG and no control dropout, plus heads metrics.

    Returns:
        eval/{total,flow,reward,termination} losses (flow against the data's target, comparable across
        runs), eval/distill (the flow loss against the ``teacher``'s velocity, with one), eval/action and
        eval/consistency (with their options), all unweighted by ``--focus-box``; eval/focus (with a box:
        the error inside it alone, against the teacher when there is one, else the data's target); and
        eval/reward_mae and eval/termination_accuracy (over labelled transitions, when there are any).
    """
    model.eval()
    eval_args = dataclasses.replace(args, ctrl_dropout=0.0, focus_box=None)  # unweighted: comparable across runs
    gen = torch.Generator(device=device).manual_seed(12345)
    extra = torch.Generator(device=device).manual_seed(54321)  # distillation-only draws: gen's stream unchanged
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    sums: dict[str, float] = {}
    n_batches, abs_err, correct, count = 0, 0.0, 0, 0
    for i, batch in enumerate(loader):
        if i >= args.eval_batches:
            break
        inp = make_inputs(batch, table, eval_args, gen, device, scm, extra)
        for k, v in compute_losses(model, inp, pos_weight, args.heads_weight).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if args.focus_box is not None:  # eval/focus: the distillation (or flow) error inside the box alone
            box = dataclasses.replace(inp, focus=focus_map(args.focus_box, math.inf, inp.x_t.shape[-2:], device))
            sums["loss/focus"] = sums.get("loss/focus", 0.0) + float(
                compute_losses(model, box, pos_weight, args.heads_weight, teacher)["loss/flow"]
            )
        if teacher is not None:
            got = compute_losses(model, inp, pos_weight, args.heads_weight, teacher, args.action_distill_weight,
                                 args.consistency_weight)
            sums["loss/distill"] = sums.get("loss/distill", 0.0) + float(got["loss/flow"])
            if "loss/action" in got:  # eval/action: the velocity change under another action vs the teacher's
                sums["loss/action"] = sums.get("loss/action", 0.0) + float(got["loss/action"])
            if "loss/consistency" in got:  # eval/consistency: one call per shift vs the teacher's k
                sums["loss/consistency"] = sums.get("loss/consistency", 0.0) + float(got["loss/consistency"])
        n_batches += 1
        reward, term_logit = model.heads(inp.z_prev, inp.z_next, inp.ctrl_pooled)  # (M,), (M,)
        m = inp.head_mask
        abs_err += float((reward[m] - inp.reward[m]).abs().sum())
        correct += int(((term_logit[m] > 0) == inp.terminated[m]).sum())
        count += int(m.sum())
    out = {f"eval/{k.split('/')[-1]}": v / max(n_batches, 1) for k, v in sums.items()}
    if count:
        out["eval/reward_mae"] = abs_err / count
        out["eval/termination_accuracy"] = correct / count
    return out


# ----------------------------------------------------------------------------- main
def inflate_patch(state: dict[str, torch.Tensor], patch: int) -> dict[str, torch.Tensor]:
    """A patch-1 DiT's weights as a patch-``patch`` DiT's (every other weight unchanged).

    Tokens are laid out ``(c p1 p2)`` (``VideoDiT._run``): the new embedding gives each of a patch's
    p*p pixels 1/p^2 of the old per-pixel weight (the token embeds the patch's mean pixel), and the new
    output layer repeats the old one's rows over the patch (every pixel gets the token's velocity).
    So on a latent constant over each patch the inflated DiT computes the old one on the pooled
    latent, upsampled (tests/test_train.py).
    """
    pp = patch * patch
    out = dict(state)
    out["patch_embed.weight"] = state["patch_embed.weight"].repeat_interleave(pp, dim=1) / pp  # (D, C*p*p)
    out["final.weight"] = state["final.weight"].repeat_interleave(pp, dim=0)  # (C*p*p, D)
    out["final.bias"] = state["final.bias"].repeat_interleave(pp, dim=0)  # (C*p*p,)
    return out


def check_teacher_controls(teacher_dir: Path, table: ControlEmbeddings, sentences: list[str], what: str) -> None:
    """The teacher must read the same control rows as the student (tokens, mask, pooled and sentences):
    its velocity for "turn left" is the student's target for "turn left".

    Raises:
        UsageError: the teacher's control table differs, naming the part.
    """
    theirs, their_sentences = load_control_table(Path(teacher_dir).expanduser() / CONTROL_TABLE_FILE)
    if their_sentences != sentences:
        raise UsageError(f"--teacher {teacher_dir}: its control table encodes other sentences than {what}")
    for part in ("tokens", "mask", "pooled"):
        a, b = getattr(theirs, part), getattr(table, part)
        if a.shape != b.shape or not torch.equal(a.float().cpu(), b.float().cpu()):
            raise UsageError(f"--teacher {teacher_dir}: its control table's {part} differ from {what}; give the "
                             "teacher's table (--control-table TEACHER) or train the student with the same --text")


def check_teacher_causal(model_dir: Path, causal: bool) -> None:
    """A block-causal student needs a block-causal teacher (read from its ``dit_config.json``, before
    anything is written to the run dir).

    Raises:
        UsageError: a missing or unreadable config, or a non-causal teacher for a causal student.
    """
    from world_model.checkpoint import CheckpointError, _read_json

    try:
        teacher_causal = bool(_read_json(Path(model_dir).expanduser() / "dit_config.json").get("causal", True))
    except CheckpointError as err:
        raise UsageError(f"--teacher {model_dir}: {err}") from err
    if causal and not teacher_causal:
        raise UsageError(f"--teacher {model_dir}: its DiT attends to future frames (causal=False); a block-causal "
                         "student cannot match velocities that read frames it never sees; use a causal teacher")


def load_teacher(model_dir: Path, dit_cfg: object, window: int, device: torch.device) -> nn.Module:
    """The frozen teacher DiT of ``--teacher`` (a train-dit model dir or a world dir), checked against this run."""
    from world_model.checkpoint import load_module
    from world_model.dit import DiTConfig, VideoDiT

    teacher = load_module(model_dir, "dit", VideoDiT, DiTConfig)
    for k in ("latent_channels", "latent_hw", "text_dim"):
        got, want = getattr(teacher.cfg, k), getattr(dit_cfg, k)
        if tuple(np.atleast_1d(got)) != tuple(np.atleast_1d(want)):
            raise UsageError(f"--teacher {model_dir}: its DiT has {k}={got!r}, this run's data needs {want!r}")
    if teacher.cfg.max_frames < window:
        raise UsageError(f"--teacher {model_dir}: its DiT takes at most {teacher.cfg.max_frames} frames, "
                         f"this run's windows have {window}")
    return teacher.to(device).eval().requires_grad_(False)


def warm_start(model: DiTWithHeads, model_dir: Path, dit_cfg: object, heads_cfg: object,
               move_grid: bool = False) -> None:
    """Copy the DiT + heads weights of a train-dit model dir into ``model`` (configs must match exactly,
    but a patch-1 parent is inflated to larger patches and, with ``move_grid`` (``--patch-shift`` given),
    a parent on another patch grid keeps its weights on this run's grid)."""
    from world_model.checkpoint import load_module
    from world_model.dit import DiTConfig, VideoDiT
    from world_model.heads import HeadsConfig, RewardTerminationHeads

    dit = load_module(model_dir, "dit", VideoDiT, DiTConfig)
    heads = load_module(model_dir, "heads", RewardTerminationHeads, HeadsConfig)
    # a world's heads carry the decision threshold and terminal reward build-world chose: not weights;
    # its hazard head (train-hazard) is trained on the world's frozen latents: not carried over
    had_hazard = heads.cfg.hazard_horizon > 0
    heads.cfg = dataclasses.replace(heads.cfg, term_threshold=heads_cfg.term_threshold,
                                    terminal_reward=heads_cfg.terminal_reward,
                                    hazard_horizon=heads_cfg.hazard_horizon, termination=heads_cfg.termination,
                                    hazard_action=heads_cfg.hazard_action, hazard_memory=heads_cfg.hazard_memory)
    state = dit.state_dict()
    if dit.cfg.patch == 1 and dit_cfg.patch > 1:  # inflate a patch-1 parent to this run's patches
        state = inflate_patch(state, dit_cfg.patch)
        dit.cfg = dataclasses.replace(dit.cfg, patch=dit_cfg.patch)
    if move_grid and dit.cfg.patch == dit_cfg.patch:  # same weights on a moved grid
        dit.cfg = dataclasses.replace(dit.cfg, patch_shift=dit_cfg.patch_shift)
    for name, got, want in (("dit", dit.cfg, dit_cfg), ("heads", heads.cfg, heads_cfg)):
        if got != want:
            diff = {
                k: (getattr(got, k), getattr(want, k))
                for k in dataclasses.asdict(want)
                if getattr(got, k) != getattr(want, k)
            }
            hint = ""
            if "patch_shift" in diff:
                hint = f" (give --patch-shift {got.patch_shift} to keep its patch grid, or another value to move it)"
            raise UsageError(
                f"--init-from {model_dir}: its {name} config differs from this run's (found, expected): {diff}{hint}"
            )
    model.dit.load_state_dict(state)
    model.heads.load_state_dict({k: v for k, v in heads.state_dict().items() if not k.startswith("hazard.")})
    if had_hazard:
        print(f"--init-from {model_dir}: its hazard head is not carried over (rerun matrix-world train-hazard "
              "on the new world)")


def train(args: Args, command: list[str] | None = None) -> dict:
    """Train (or resume) and export; returns the summary written to ``OUT/train_dit.json``.

    Args:
        args: the parsed arguments.
        command: the command line, recorded in the summary (the recipe of the model).
    """
    from world_model.actions import control_sentences
    from world_model.checkpoint import save_module
    from world_model.data.latents import resolve_caches
    from world_model.dit import DiTConfig, VideoDiT, get_preset
    from world_model.heads import HeadsConfig, RewardTerminationHeads
    from world_model.text import build_control_table

    if not 0 <= args.context < args.window:
        raise UsageError(f"--context {args.context} must be in [0, --window {args.window})")
    if args.window < 2:
        raise UsageError(f"--window {args.window}: need at least 2 frames (one transition for the heads)")
    if args.stop_at is not None and args.stop_at < 1:
        raise UsageError(f"--stop-at {args.stop_at}: expected a step count >= 1 (or leave it out)")
    if args.patch is not None and args.patch < 1:
        raise UsageError(f"--patch {args.patch}: expected a patch size >= 1 (or leave it out: the preset's)")
    patch = get_preset(args.preset).patch if args.patch is None else args.patch
    if args.patch_shift is not None and not 0 <= args.patch_shift < patch:
        raise UsageError(f"--patch-shift {args.patch_shift}: expected columns in [0, {patch}) (the patch size)")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise UsageError(f"--max-minutes {args.max_minutes}: expected a number of minutes > 0 (or leave it out)")
    if not (math.isfinite(args.road_weight) and args.road_weight > 0):
        raise UsageError(f"--road-weight {args.road_weight}: expected a finite number > 0 (1 = uniform sampling)")
    if not (math.isfinite(args.curve_weight) and args.curve_weight > 0):
        raise UsageError(f"--curve-weight {args.curve_weight}: expected a finite number > 0 (1 = off)")
    if not (math.isfinite(args.leave_weight) and args.leave_weight > 0):
        raise UsageError(f"--leave-weight {args.leave_weight}: expected a finite number > 0 (1 = off)")
    if not (math.isfinite(args.focus_weight) and args.focus_weight > 0):
        raise UsageError(f"--focus-weight {args.focus_weight}: expected a finite number > 0 (1 = off)")
    if (args.focus_box is None) != (args.focus_weight == 1.0):
        box = "(none)" if args.focus_box is None else " ".join(map(str, args.focus_box))
        raise UsageError(f"--focus-box {box} / --focus-weight {args.focus_weight}: give both (a box and "
                         "a weight other than 1) or neither")
    if not (math.isfinite(args.action_distill_weight) and args.action_distill_weight >= 0):
        raise UsageError(f"--action-distill-weight {args.action_distill_weight}: expected a finite number >= 0")
    if args.action_distill_weight > 0 and args.teacher is None:
        raise UsageError(f"--action-distill-weight {args.action_distill_weight} matches a teacher's response to "
                         "the action: give --teacher")
    if not (math.isfinite(args.consistency_weight) and args.consistency_weight >= 0):
        raise UsageError(f"--consistency-weight {args.consistency_weight}: expected a finite number >= 0")
    scm_cfg = None
    if args.consistency_weight > 0:
        scm_cfg = consistency_sampler(args)
    elif (args.consistency_groups, args.consistency_substeps) != (Args.consistency_groups, Args.consistency_substeps):
        raise UsageError(f"--consistency-groups {args.consistency_groups} / --consistency-substeps "
                         f"{args.consistency_substeps} set the sampler --consistency-weight distils: give a weight > 0")
    info = common.setup_distributed(args.device)
    run_dir = Path(args.run_dir).expanduser()
    out_dir = Path(args.out).expanduser() if args.out else run_dir / "model"
    train_eps, heldout_eps = common.resolve_episodes(args.data, args.holdout_fraction, args.seed)
    caches, lat_infos = resolve_caches(args.data, args.latents)
    lat_info = lat_infos[0]
    c, h, w = lat_info["latent_shape"]
    if args.focus_box is not None:
        r0, r1, c0, c1 = args.focus_box
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w) or (r1 - r0, c1 - c0) == (h, w):
            raise UsageError(f"--focus-box {r0} {r1} {c0} {c1}: expected ROW0 ROW1 COL0 COL1 with 0 <= ROW0 < ROW1 <= "
                             f"{h} and 0 <= COL0 < COL1 <= {w}, not the whole latent ({h}x{w})")

    if args.teacher is not None:
        check_teacher_causal(args.teacher, args.causal)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = common.latest_checkpoint(run_dir)
    config = common.to_jsonable(args)
    common.check_run_config(
        run_dir, config, RESUME_FREE, resuming=ckpt is not None, write=info.is_main,
        defaults=common.field_defaults(type(args)),
    )
    common.clean_stale_tmp(run_dir, info)

    # Control table: encoded once per run (rank 0), stored in the run dir, reused by every rank and on resume.
    names, action_sentences = action_table([*train_eps, *heldout_eps])
    sentences = control_sentences(action_sentences)
    table_path = run_dir / CONTROL_TABLE_FILE
    if info.is_main and not table_path.exists():
        reuse = args.control_table
        for parent in (args.init_from, args.teacher):  # a parent's rows, so its weights read the same controls
            if reuse is None and parent is not None:
                reuse = Path(parent).expanduser() / CONTROL_TABLE_FILE
        if reuse is not None:
            table, stored = load_control_table(reuse)  # a train-dit run dir's, or a world's
            if stored != sentences:
                raise UsageError(f"control table {reuse} encodes other sentences than this data's")
        else:
            table = build_control_table(sentences, args.text)
        if args.teacher is not None:  # checked before the run dir holds a table the teacher cannot read
            check_teacher_controls(args.teacher, table, sentences, f"the one chosen for this run ({reuse or 'new'})")
        save_control_table(table_path, table, sentences, common.to_jsonable(args.text))
    common.barrier()
    table, stored = load_control_table(table_path)
    if stored != sentences:
        raise UsageError(
            f"{table_path} encodes other sentences than this data's action table; use a new --run-dir"
        )
    if args.teacher is not None:  # a resumed run (or another rank) with a teacher given now
        check_teacher_controls(args.teacher, table, sentences, f"this run's {table_path}")
    table = table.to(info.device)
    if args.action_distill_weight > 0 and table.tokens.shape[0] - 1 < 2:
        raise UsageError(f"--action-distill-weight needs at least 2 actions to contrast; the data has "
                         f"{table.tokens.shape[0] - 1}")

    common.seed_everything(args.seed)  # same init on every rank
    dit_cfg: DiTConfig = get_preset(
        args.preset,
        latent_channels=c,
        latent_hw=(h, w),
        text_dim=table.tokens.shape[-1],
        max_frames=max(DiTConfig().max_frames, args.window),
        causal=args.causal,
        **({} if args.patch is None else {"patch": args.patch}),
        **({} if args.patch_shift is None else {"patch_shift": args.patch_shift}),
    )
    heads_cfg = HeadsConfig(
        latent_channels=c, latent_hw=(h, w), text_dim=table.tokens.shape[-1], hidden=args.heads_hidden
    )
    model = DiTWithHeads(VideoDiT(dit_cfg), RewardTerminationHeads(heads_cfg)).to(info.device)
    if args.init_from is not None and ckpt is None:  # on resume the checkpoint already holds the weights
        warm_start(model, Path(args.init_from).expanduser(), dit_cfg, heads_cfg, move_grid=args.patch_shift is not None)
    scm = None if scm_cfg is None else SwinDPM(scm_cfg, info.device)  # level tables on the device
    teacher = None if args.teacher is None else load_teacher(
        Path(args.teacher).expanduser(), dit_cfg, args.window, info.device
    )
    ema = common.EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay
    )
    gen = torch.Generator(device=info.device).manual_seed(
        args.seed * 1000 + info.rank
    )  # levels, noise, dropout
    bf16 = common.resolve_bf16(args.bf16, info.device)

    start = 0
    if ckpt is not None:
        start = common.load_checkpoint(ckpt, info, model, ema, optimizer, {"noise": gen})["step"]

    dataset = common.window_dataset(train_eps, args.window, source="latents", latents=caches)
    pos_weight, n_pos, n_neg = termination_pos_weight(dataset, args.window)
    weights = None
    if args.road_weight != 1.0 or args.curve_weight != 1.0 or args.leave_weight != 1.0:
        weights = road_window_weights(dataset, args.window, args.road_weight, args.curve_weight, args.leave_weight)
        if info.rank == 0:
            kinds = ", ".join(f"{float((weights == w).mean()):.2f} weigh {w:g}" for w in np.unique(weights))
            print(f"window weighting: {kinds}", flush=True)
    sampler = common.ResumableBatchSampler(
        len(dataset), args.batch_size, info.rank, info.world_size, args.seed, start, weights=weights
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=info.device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
        persistent_workers=args.num_workers > 0,
    )
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    if end < start:
        raise UsageError(f"--stop-at {args.stop_at} is below step {start}, which {run_dir} has already reached")
    logger = common.Logger(run_dir, info, end, start, desc="train-dit")
    if ckpt is not None:
        logger.print(f"resumed from {ckpt} at step {start}")
    n_params = sum(p.numel() for p in model.dit.parameters())
    logger.print(
        f"DiT {args.preset}: {n_params / 1e6:.2f}M params; {len(dataset)} training windows of {args.window}; "
        f"termination pos_weight {pos_weight:.1f} ({n_pos} pos / {n_neg} neg)"
    )

    step_fn = common.wrap_ddp(model, info)
    batches = iter(loader)
    model.train()
    deadline = None if args.max_minutes is None else time.monotonic() + 60.0 * args.max_minutes
    for step in range(start, end):
        batch = next(batches)
        inp = make_inputs(batch, table, args, gen, info.device, scm)
        lr = common.cosine_lr(step, args.steps, args.lr, args.warmup)
        common.set_lr(optimizer, lr)
        with common.autocast(info.device, bf16):
            losses = compute_losses(step_fn, inp, pos_weight, args.heads_weight, teacher, args.action_distill_weight,
                                    args.consistency_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss/total"].backward()
        grad_norm = nn.utils.clip_grad_norm_(
            model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf
        )
        optimizer.step()
        ema.update(model, step)

        scalars = common.reduce_scalars(losses)
        gates = {f"gate/{i}": torch.tanh(g).abs().mean().item() for i, g in enumerate(model.dit.gates())}
        logger.step(
            step + 1,
            len(inp.x_t) * info.world_size,
            {**scalars, **gates, "opt/lr": lr, "opt/grad_norm": grad_norm.item()},
        )
        out_of_time = deadline is not None and common.any_rank(time.monotonic() > deadline, info)
        if out_of_time:
            end = step + 1
        if (step + 1) % args.ckpt_every == 0 or step + 1 == end:
            common.save_checkpoint(
                run_dir, step + 1, info, model, ema, optimizer, {"noise": gen}, config, keep=args.keep_ckpts
            )
        if out_of_time:
            logger.print(f"--max-minutes {args.max_minutes}: stopped at step {end} of {args.steps}")
            break
        if args.step_sleep:
            time.sleep(args.step_sleep)
    if args.debug_hashes:
        common.write_debug_hash(run_dir, info, "dit", model, end)

    summary: dict = {}
    if info.is_main:
        final = ema.module
        metrics: dict = {}
        eval_eps = heldout_eps or train_eps
        try:
            eval_set = common.window_dataset(eval_eps, args.window, source="latents", latents=caches)
            metrics = evaluate(final, eval_set, table, args, pos_weight, info.device, teacher, scm)
            metrics["eval/split"] = "heldout" if heldout_eps else "train (no held-out episodes)"
        except UsageError as err:  # held-out episodes shorter than a window
            metrics = {"eval/skipped": str(err)}
        logger.report(end, metrics)
        save_module(out_dir, "dit", final.dit, dit_cfg)
        save_module(out_dir, "heads", final.heads, heads_cfg)
        save_control_table(
            out_dir / CONTROL_TABLE_FILE, table.to("cpu"), sentences, common.to_jsonable(args.text)
        )
        summary = {
            "command": command or [],
            "args": config,
            "steps": end,
            "schedule_steps": args.steps,
            "world_size": info.world_size,
            "bf16_used": bf16,  # --bf16 falls back to fp32 where the device would emulate it
            "action_names": names,
            "sentences": sentences,
            "window": args.window,
            "context": args.context,
            "data_manifest_sha256": common.data_fingerprint(args.data),
            "latents_vae_sha256": lat_info.get("vae_sha256"),
            "train_episodes": [str(p) for p in train_eps],
            "heldout_episodes": [str(p) for p in heldout_eps],
            "termination_pos_weight": pos_weight,
            "init_from": common.parent_summary(args.init_from, "train_dit.json"),
            "teacher": common.parent_summary(args.teacher, "train_dit.json"),
            # --consistency-weight: the sampler this DiT was distilled for, one call per shift (build-world's default)
            "consistency_sampler": None if scm_cfg is None
            else dataclasses.asdict(dataclasses.replace(scm_cfg, steps_per_shift=1)),
            "eval": metrics,
        }
        (out_dir / "train_dit.json").write_text(json.dumps(summary, indent=2))
        print(f"saved DiT + heads + control table to {out_dir}")
    logger.close()
    common.cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    """``matrix-world train-dit``: parse Args and train."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world train-dit", description=__doc__.split("\n\n")[0])
    train(args, command=["matrix-world", "train-dit", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
