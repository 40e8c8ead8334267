"""The evaluation suite (``matrix-world eval``): control, fidelity, drift, heads and speed of a world.

    matrix-world eval --checkpoint WORLD_DIR --data DATA_DIR [--dr-data DR_EVAL_DIR] --out OUT_DIR

writes ``OUT/metrics.json`` (every number), ``OUT/*.png`` (confusion matrices, control accuracy,
drift curves, reward scatter), ``OUT/summary.md`` (a Markdown table for the README, with the
command, machine and date) and ``OUT/idm/`` (the inverse-dynamics model, reusable with ``--idm``).

What is measured (DESIGN.md §7)
-------------------------------
* **Control.** An inverse-dynamics model (``world_model.eval.idm``) is trained on the *training*
  split of ``--data`` (``split_episodes(data, holdout_fraction, split_seed)``; held-out episodes are
  never seen). Reported: its accuracy on real held-out transitions (the ceiling), on VAE
  reconstructions of them (the ceiling for anything that passes the decoder), on generated rollouts
  for every sampler mode in ``--modes``, and chance (1/A and the majority rate). Rollouts start from
  real held-out context windows (encoded with the world's VAE) and follow random actions held for
  ``--hold`` steps; frames are decoded at 72x128.
  *Action latency*: in ``pipelined`` mode an action conditions the frame emitted G-1 steps later
  (``SwinDPM.action_latency``), so the label of generated transition ``t`` is the action given at
  step ``t - latency``; ``reconditioned`` and ``immediate`` have latency 0. ``by_lag`` lists the
  accuracy for every lag 0..G-1 on the same transitions, which shows where the effect really lands,
  and ``unaligned_accuracy`` is lag 0. With ``--dr-data`` (a labelled domain-randomised eval split)
  the same is measured from DR start contexts, beside the IDM on real DR frames.
* **Fidelity.** VAE reconstruction PSNR of held-out frames at 72x128; teacher-forced next-frame PSNR
  (real context latents -> one ``immediate``-mode step with the real action -> decode, against the
  real next frame), beside the copy-last-frame baseline and the VAE ceiling; Fréchet distance of
  generated vs real held-out frame-stack features (the IDM's penultimate layer), beside the floor of
  VAE reconstructions with the same sample size. FDs are only comparable between runs that use the
  same IDM (pass ``--idm OUT/idm`` of an earlier run) and the same sample sizes. Detail: the RMS
  luma gradient (:func:`metrics.rms_gradient`; blur lowers it; CarRacing: above the dashboard) of
  real held-out frames, of their VAE reconstructions and (closed loop) of generated frames and of
  the real game's.
* **Drift.** ``--drift-envs`` streams generate ``--horizon`` frames with random held actions (the
  checkpoint's sampler); in each bucket of ``--bucket-edges`` (default [0,100), [100,1000),
  [1000,10000)) about ``--drift-samples`` frames are decoded and compared to real held-out frames:
  Fréchet distance, RGB-histogram total-variation distance and mean brightness. A flat curve is the
  goal. Generation stops early when ``--drift-budget-s`` is spent (``stopped_by_budget`` in the JSON).
* **Heads.** Reward / termination heads on real held-out latent transitions: reward MAE, RMSE and
  correlation (beside the MAE of predicting the training mean), termination precision / recall
  (negatives re-weighted by their sampling rate, since every episode's final segment is included).
* **Speed.** Simulator steps/s per mode at batch 1 and ``--speed-envs``, and 720p frames/s (step +
  720p decode, batch 1), timed with ``benchmarks/bench_env.py``'s ``time_steps``.

Defaults and runtime
--------------------
Sized for the shared 2-core CPU of the development machine (AMD EPYC, other jobs running) and a
world of the size ``build-world`` makes by default (DiT preset S, default VAE, un-distilled
pipelined sampler with 8 evaluations per step). Measured with a random world of that size on
synthetic data (``--threads 1``, chosen automatically on a busy CPU), seconds per section:

* read + encode + decode 2048 held-out frames (64 segments x 32): 58
* IDM, default preset, 600 steps x 64 transitions: 95
* VAE + teacher-forced PSNR (64 immediate-mode predictions): 14
* control rollouts, 3 modes x 8 streams x 32 steps (256 labels per mode): 318
* speed, 3 modes x (batch 1, batch 8, 720p), 3 timed steps each: 55
* drift, 2 streams, 256 frames per bucket: until ``--drift-budget-s`` = 900

i.e. ~24 min in total. 2048 frames is about the held-out split of the default data set (8 of 80
episodes x 251 frames). Such a world makes ~2 steps/s per stream here (one thread), so the 900 s
drift budget with 2 streams reaches ~900 of the 10,000 steps (``horizon_reached`` in the JSON; the
plot shows how far it got); a GPU, or a distilled 1-evaluation sampler, reaches 10k in the same
budget. Shorten with ``--horizon``, ``--modes``, ``--control-steps``; ``--quick`` (tiny IDM, a few
frames and steps) runs in ~5 s on a tiny world and is what the tests use.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from world_model.data import episodes as E
from world_model.data.record import is_carracing as env_is_carracing
from world_model.errors import UsageError
from world_model.eval import metrics as M
from world_model.eval.idm import (
    IDM_PRESETS,
    IDMTrainConfig,
    InverseDynamicsModel,
    TransitionSet,
    load_idm,
    predict,
    save_idm,
    sequence_stacks,
    train_idm,
)
from world_model.eval.latent_idm import (
    LatentIDM,
    LatentIDMConfig,
    LatentTransitions,
    latent_stacks,
    load_latent_idm,
    predict_latent,
    save_latent_idm,
    train_latent_idm,
)

if TYPE_CHECKING:
    from world_model.checkpoint import WorldModel

Mode = Literal["pipelined", "reconditioned", "immediate"]
ALL_MODES: tuple[Mode, ...] = ("pipelined", "reconditioned", "immediate")
VIEW_ROWS = M.CARRACING_VIEW_ROWS
"""Rows of a 72x128 CarRacing frame above the dashboard (the detail metric's view)."""


def is_carracing(world: WorldModel) -> bool:
    """Whether the world was recorded from CarRacing (the kerb metric and the view rows apply)."""
    return env_is_carracing(str(world.meta.get("env_id", "")))


def detail_rows(world: WorldModel) -> int | None:
    """Rows the detail metric reads: CarRacing's view above the dashboard, else the whole frame."""
    return VIEW_ROWS if is_carracing(world) else None


def palette_ignore(world: WorldModel) -> tuple[slice, slice] | None:
    """The box the colour palette leaves out: CarRacing's car (its black wheels), else nothing."""
    return M.KERB_CAR_BOX if is_carracing(world) else None


def real_palette(world: WorldModel, frames: np.ndarray) -> np.ndarray:
    """The colours of real frames (N, 72, 128, 3) in the world's view: bool (512,) for :func:`metrics.off_palette`."""
    return M.color_palette(frames, detail_rows(world), palette_ignore(world))


@dataclass
class Args:
    """Evaluate a world model: control accuracy (inverse dynamics), fidelity, drift, reward heads, speed."""

    checkpoint: Path
    """World-model checkpoint directory (world_model.checkpoint.save_world)."""
    data: Path
    """Recorded, labelled data directory (the world's training data; its held-out split is evaluated)."""
    out: Path
    """Output directory for metrics.json, *.png, summary.md and idm/."""
    dr_data: Path | None = None
    """Optional labelled domain-randomised eval split (record --domain-randomize): control across domains."""
    heads_data: Path | None = None
    """Optional labelled data directory for a second reward/termination test: its held-out split plus
    every episode stored with a split other than 'train' (e.g. `record --policy exit --split eval`,
    episodes that end at the playfield edge), none of which the trainers read."""
    quick: bool = False
    """Tiny sizes everywhere (a smoke test: seconds on a tiny world); explicit options still win."""
    device: str = "cpu"
    """Torch device (cpu, cuda)."""
    threads: int = 0
    """torch.set_num_threads; 0 = auto: torch's default, or 1 on a CPU that is already busy."""
    seed: int = 0
    """Seed of every random choice (segments, actions, noise, IDM)."""
    holdout_fraction: float = 0.1
    """Held-out episode fraction of split_episodes (same as train-vae / train-dit)."""
    split_seed: int = 0
    """Seed of split_episodes (same as train-vae / train-dit)."""
    modes: tuple[Mode, ...] = ALL_MODES
    """Sampler modes whose control accuracy and speed are measured."""
    mode: Mode | None = None
    """Sampler mode of the Fréchet / drift / DR rollouts (default: the checkpoint's)."""
    idm: Path | None = None
    """Load this inverse-dynamics model (an earlier run's OUT/idm) instead of training one."""
    idm_preset: Literal["tiny", "default"] = "default"
    """IDM size preset (world_model.eval.idm.IDM_PRESETS)."""
    idm_frames: int = 3
    """Frames per IDM input stack (2 = a pair; 3 also sees the velocity before the action)."""
    idm_steps: int = 600
    """IDM training steps."""
    idm_batch: int = 64
    """IDM training batch size."""
    latent_idm: Path | None = None
    """Load this latent IDM (an earlier run's OUT/latent_idm) instead of training one."""
    latent_idm_steps: int = 1500
    """Latent IDM training steps (batch 128)."""
    latent_idm_episodes: int = 32
    """Training episodes encoded with the world's VAE to train the latent IDM on."""
    hud_rows: int = 1
    """Bottom latent rows the latent IDM ignores (CarRacing's dashboard bars; 0 for other envs)."""
    heldout_frames: int = 2048
    """Real held-out frames read (in segments), encoded once and shared by every metric."""
    segment_len: int = 32
    """Frames per held-out segment (contiguous; the last segment of each episode ends at its end)."""
    min_frame: int = 15
    """First frame a segment may start at (skips CarRacing's reset zoom; clipped for short episodes)."""
    control_envs: int = 8
    """Streams per control rollout."""
    control_steps: int = 32
    """Generated steps per control rollout stream."""
    hold: int = 4
    """Steps each random action is held for."""
    tf_samples: int = 64
    """Teacher-forced next-frame predictions."""
    horizon: int = 10_000
    """Drift: generated steps per stream (shorten for a quick look)."""
    bucket_edges: tuple[int, ...] = M.DEFAULT_BUCKET_EDGES
    """Drift horizon buckets (cut at --horizon)."""
    drift_envs: int = 2
    """Drift: parallel streams (few, so that a slow world gets far in --drift-budget-s)."""
    drift_samples: int = 256
    """Drift: frames decoded and compared per bucket (all streams together)."""
    drift_budget_s: float = 900.0
    """Drift: stop generating after this many seconds (0 = no limit)."""
    speed_steps: int = 3
    """Timed steps per speed configuration (after 2 warm-up steps)."""
    speed_envs: int = 8
    """Batch size of the batched speed row."""
    loop_envs: int = 4
    """Closed loop: streams (and real CarRacing episodes) driven by the pixel road follower."""
    loop_steps: int = 200
    """Closed loop: steps per stream (0 = skip the section)."""


# `--quick` sizes; applied to options still at their defaults.
QUICK: dict[str, object] = {
    "idm_preset": "tiny", "idm_steps": 40, "idm_batch": 16, "latent_idm_steps": 40, "latent_idm_episodes": 2,
    "heldout_frames": 96, "segment_len": 12,
    "min_frame": 0, "control_envs": 4, "control_steps": 10, "tf_samples": 6, "horizon": 24,
    "bucket_edges": (0, 4, 12, 24), "drift_envs": 2, "drift_samples": 8, "speed_steps": 1, "speed_envs": 2,
    "loop_envs": 2, "loop_steps": 8,
}


def apply_quick(args: Args) -> Args:
    """``--quick``: replace every option in ``QUICK`` that the user left at its default."""
    if not args.quick:
        return args
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    return dataclasses.replace(args, **{k: v for k, v in QUICK.items() if getattr(args, k) == defaults[k]})


def resolve_threads(requested: int, device: str) -> int:
    """Torch CPU threads to use: ``requested``, or for 0 torch's default unless the CPU is busy.

    On a CPU whose 1-minute load average already exceeds half its cores, one thread is used: on the
    shared 2-core development machine two threads ran the DiT 4-20x slower than one (they spin
    waiting for each other while other processes hold the cores).
    """
    if requested:
        return requested
    if str(device).startswith("cpu") and hasattr(os, "getloadavg"):
        if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
            return 1
    return torch.get_num_threads()


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def log(msg: str) -> None:
    """Progress line (stdout, flushed)."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------- generated frames
class FrameSource(Protocol):
    """B generated streams as the control and drift metrics see them (the Simulator, or a stub).

    ``latency`` is the number of steps between an action and the first frame it conditions.
    """

    num_envs: int
    latency: int

    def start(self, rng: np.random.Generator) -> np.ndarray:
        """(Re)start every stream; returns the history frames (B, K-1, H, W, 3) uint8 before step 1."""
        ...

    def step(self, actions: np.ndarray, decode: bool = True) -> np.ndarray | None:
        """Advance every stream by one frame with actions (B,); the frames (B, H, W, 3) uint8 or None."""
        ...


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Normalised latents (N, C, h, w) -> uint8 frames (N, 72, 128, 3) with the VAE's native decoder (or any
    module with the same ``decode``, such as a world's observation decoder)."""
    from world_model.vae import tensor_to_frames

    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(latents), batch):
            x = vae.decode(latents[i : i + batch].to(device, torch.float32))  # (b, 3, H, W)
            if tuple(x.shape[-2:]) != E.TRAIN_HW:
                x = F.interpolate(x, size=E.TRAIN_HW, mode="bilinear", antialias=True, align_corners=False)
            out.append(tensor_to_frames(x).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *E.TRAIN_HW, 3), np.uint8)


def encode_frames(vae: torch.nn.Module, frames: np.ndarray, batch: int = 64) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> normalised posterior-mean latents (N, C, h, w) float32 (CPU)."""
    from world_model.vae import frames_to_tensor

    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = frames_to_tensor(np.ascontiguousarray(frames[i : i + batch]), device)  # (b, 3, H, W)
            out.append(vae.encode(x).cpu())
    return torch.cat(out)


class SimulatorSource:
    """Generated frames of a :class:`~world_model.simulator.Simulator` started from given contexts."""

    def __init__(self, world: WorldModel, contexts: torch.Tensor, num_envs: int, mode: str | None,
                 history: int, device: torch.device | str = "cpu", seed: int = 0,
                 record_latents: bool = False) -> None:
        """Build the simulator.

        Args:
            world: the loaded WorldModel.
            contexts: (S, Tc, C, h, w) start contexts (e.g. encoded real held-out windows); they replace
                the checkpoint's start latents for this evaluation.
            num_envs: B streams.
            mode: sampler mode (None: the checkpoint's).
            history: K-1, context frames returned by :meth:`start` (decoded; repeated if Tc is shorter).
            device: torch device.
            seed: seed of the streams' noise keys.
            record_latents: keep every history and generated latent (:attr:`latents`, for the latent
                IDM); off for long drift runs.
        """
        from world_model.simulator import Simulator, sampler_config

        self.contexts = contexts.float().cpu()
        self.world = dataclasses.replace(world, start_latents=self.contexts)
        self.sim = Simulator(self.world, num_envs, device, sampler=sampler_config(world, mode))
        self.num_envs = num_envs
        self.latency = self.sim.sampler.action_latency
        self.history = history
        self.generator = torch.Generator().manual_seed(seed)
        self.record_latents = record_latents
        self._latents: list[torch.Tensor] = []  # each (B, n, C, h, w)

    @property
    def latents(self) -> torch.Tensor:
        """(B, K-1+T, C, h, w): the history latents of the last :meth:`start`, then every generated one."""
        if not self._latents:
            raise RuntimeError("no latents recorded: build the source with record_latents=True and start it")
        return torch.cat(self._latents, dim=1)

    def start(self, rng: np.random.Generator) -> np.ndarray:
        """Restart every stream from a random context; returns its last K-1 frames decoded."""
        s, b = len(self.contexts), self.num_envs
        idx = rng.permutation(s)[:b] if s >= b else rng.integers(0, s, size=b)
        self.sim.reset(torch.ones(b, dtype=torch.bool), torch.from_numpy(idx), generator=self.generator)
        ctx = self.contexts[torch.from_numpy(idx)]  # (B, Tc, C, h, w)
        pick = np.clip(np.arange(ctx.shape[1] - self.history, ctx.shape[1]), 0, None)  # pad by repeating
        ctx = ctx[:, torch.from_numpy(pick)]  # (B, K-1, C, h, w)
        self._latents = [ctx] if self.record_latents else []
        frames = decode_latents(self.sim.vae, ctx.flatten(0, 1))  # (B*(K-1), H, W, 3)
        return frames.reshape(b, self.history, *frames.shape[1:])

    def step(self, actions: np.ndarray, decode: bool = True) -> np.ndarray | None:
        """One batched simulator step; decoded frames at 72x128 when ``decode``."""
        latents, _, _ = self.sim.step(torch.as_tensor(np.asarray(actions, np.int64)))
        if self.record_latents:
            self._latents.append(latents[:, None].float().cpu())  # (B, 1, C, h, w)
        return self.sim.decode(latents, E.TRAIN_HW).cpu().numpy() if decode else None


def collect_control(
    source: FrameSource, steps: int, hold: int, num_actions: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Roll ``source`` out under random held actions.

    Returns:
        ``(frames (B, K-1+T, H, W, 3) uint8`` (history then generated), ``actions (B, T) int64)``.
    """
    actions = M.hold_actions(source.num_envs, steps, num_actions, hold, rng)  # (B, T)
    frames = [source.start(rng)]  # (B, K-1, H, W, 3)
    for t in range(steps):
        frames.append(source.step(actions[:, t])[:, None])  # (B, 1, H, W, 3)
    return np.concatenate(frames, axis=1), actions


def control_scores(
    idm: InverseDynamicsModel, frames: np.ndarray, actions: np.ndarray, latency: int, max_lag: int
) -> tuple[dict, np.ndarray]:
    """IDM accuracy on generated rollouts, with labels aligned to the sampler's action latency.

    Generated frame ``t`` (0-based) conditions on the action given at step ``t - latency``. Every
    score uses the same transitions ``t >= max(max_lag, latency)``.

    Args:
        idm: the inverse-dynamics model (its ``cfg.frames`` = K).
        frames: (B, K-1+T, H, W, 3) uint8 from :func:`collect_control`.
        actions: (B, T) int64 actions given at each step.
        latency: the sampler's action latency (label lag of the main score).
        max_lag: largest lag of the ``by_lag`` sweep.

    Returns:
        ``(report, features)``: :func:`metrics.accuracy_report` of the aligned labels plus latency,
        ``by_lag`` (accuracy at lag 0..max_lag) and ``unaligned_accuracy`` (lag 0); features (B*T, D)
        of every generated frame stack.
    """
    k = idm.cfg.frames
    b, t_len = actions.shape
    if frames.shape[1] != k - 1 + t_len:
        raise ValueError(f"frames {frames.shape} do not hold K-1={k - 1} history + T={t_len} frames")
    stacks = np.stack([sequence_stacks(f, k) for f in frames])  # (B, T, K, H, W, 3)
    pred, feats = predict(idm, stacks.reshape(b * t_len, *stacks.shape[2:]))
    return aligned_report(pred.reshape(b, t_len), actions, latency, max_lag, idm.cfg.num_actions), feats


def aligned_report(pred: np.ndarray, actions: np.ndarray, latency: int, max_lag: int, num_actions: int) -> dict:
    """Accuracy of per-step predictions (B, T) against the actions (B, T), labels lagged by ``latency``.

    Every score uses the same transitions ``t >= max(max_lag, latency)``; ``by_lag`` holds the
    accuracy at every lag 0..max_lag and ``unaligned_accuracy`` lag 0.
    """
    t_len = actions.shape[1]
    first = max(max_lag, latency)
    if first >= t_len:
        raise UsageError(f"control rollouts of {t_len} steps are too short for action lag {first}")

    def labels(lag: int) -> np.ndarray:
        return actions[:, first - lag : t_len - lag]  # (B, T - first)

    p = pred[:, first:]
    report = M.accuracy_report(p.ravel(), labels(latency).ravel(), num_actions)
    report["latency"] = latency
    report["by_lag"] = [float((p == labels(lag)).mean()) for lag in range(max_lag + 1)]
    report["unaligned_accuracy"] = report["by_lag"][0]
    return report


def latent_control_scores(
    lidm: LatentIDM, latents: torch.Tensor, actions: np.ndarray, latency: int, max_lag: int
) -> dict:
    """The latent IDM's :func:`aligned_report` on generated latents (B, K-1+T, C, h, w) (no decode)."""
    k = lidm.cfg.frames
    b, t_len = actions.shape
    if latents.shape[1] < k - 1 + t_len:
        raise ValueError(f"latents {tuple(latents.shape)} do not hold K-1={k - 1} history + T={t_len} frames")
    lat = latents[:, latents.shape[1] - (k - 1 + t_len) :].numpy()  # (B, K-1+T, C, h, w)
    stacks = np.stack([latent_stacks(z, k) for z in lat])  # (B, T, K, C, h, w)
    pred = predict_latent(lidm, stacks.reshape(b * t_len, *stacks.shape[2:])).reshape(b, t_len)
    return aligned_report(pred, actions, latency, max_lag, lidm.cfg.num_actions)


def segment_latent_accuracy(lidm: LatentIDM, seg: Segments) -> dict:
    """The latent IDM on every real K-stack of the segments whose newest frame has a known action."""
    k = lidm.cfg.frames
    preds, labels = [], []
    for z, acts in zip(seg.latents.numpy(), seg.actions, strict=True):
        keep = np.nonzero(acts[k - 1 :] >= 0)[0]  # stack i ends at frame i + K - 1
        preds.append(predict_latent(lidm, latent_stacks(z, k)[keep]))
        labels.append(acts[k - 1 :][keep])
    return M.accuracy_report(np.concatenate(preds), np.concatenate(labels), lidm.cfg.num_actions)


def check_latent_idm(cfg: LatentIDMConfig, world: WorldModel, path: Path) -> None:
    """Raise UsageError if a saved latent IDM was trained on another latent space than the world's."""
    want = (world.vae.cfg.latent_channels, tuple(world.vae.cfg.latent_hw))
    if (cfg.latent_channels, tuple(cfg.latent_hw)) != want:
        raise UsageError(f"--latent-idm {path} reads latents of {cfg.latent_channels} channels x "
                         f"{tuple(cfg.latent_hw)}; this world's VAE makes {want[0]} x {want[1]}")
    fingerprint = world.vae.encoder_fingerprint()
    if cfg.encoder_fingerprint is None:
        log(f"[eval] warning: --latent-idm {path} does not record its encoder; assuming it is this world's")
    elif cfg.encoder_fingerprint != fingerprint:
        raise UsageError(f"--latent-idm {path} was trained on another encoder's latents (encoder fingerprint "
                         f"{cfg.encoder_fingerprint[:12]}, this world's VAE {fingerprint[:12]}); leave "
                         "--latent-idm out to train one on this world's latents")


def train_latent_idm_on(world: WorldModel, episodes: list[Path], args: Args, k: int, device: str) -> tuple:
    """Encode up to ``--latent-idm-episodes`` training episodes with the world's VAE; train a latent IDM.

    Returns:
        ``(latent IDM, training info)``.
    """
    picks = np.random.default_rng(args.seed).permutation(len(episodes))[: args.latent_idm_episodes]
    lats, acts = [], []
    for i in sorted(picks):
        arrays = E.open_episode(episodes[i])
        lats.append(encode_frames(world.vae, np.array(arrays["frames"])).numpy())  # (S+1, C, h, w)
        acts.append(np.asarray(arrays["actions"], np.int64))
    c, h, w = lats[0].shape[1:]
    cfg = LatentIDMConfig(num_actions=world.num_actions, frames=k, latent_channels=c, latent_hw=(h, w),
                          hud_rows=args.hud_rows, encoder_fingerprint=world.vae.encoder_fingerprint())
    transitions = LatentTransitions(lats, acts, k, world.num_actions)
    log(f"[eval] training the latent IDM on {len(transitions)} transitions of {len(lats)} episodes "
        f"({args.latent_idm_steps} steps)")
    lidm, info = train_latent_idm(cfg, transitions.sample, steps=args.latent_idm_steps, seed=args.seed,
                                  device=device, log=log if not args.quick else (lambda _m: None))
    info.update(transitions=len(transitions), episodes=len(lats))
    return lidm, info


def run_drift(
    source: FrameSource,
    idm: InverseDynamicsModel,
    acc: M.DriftAccumulator,
    horizon: int,
    samples_per_bucket: int,
    hold: int,
    num_actions: int,
    rng: np.random.Generator,
    budget_s: float = 0.0,
) -> dict:
    """Generate ``horizon`` frames per stream, sampling frames into ``acc``'s buckets.

    In each bucket about ``samples_per_bucket`` frames (all streams) are decoded at evenly spaced
    steps (with the K-1 frames before each, for the IDM features); other steps are not decoded.

    Returns:
        dict with ``buckets`` (:meth:`DriftAccumulator.result`), ``summary`` (:func:`drift_summary`),
        ``horizon_reached``, ``stopped_by_budget``, ``seconds``, ``trace`` ([step, brightness] pairs).
    """
    k, b = idm.cfg.frames, source.num_envs
    sample_at: set[int] = set()
    for bucket in acc.buckets:
        lo, hi = bucket.start, min(bucket.end, horizon)
        if hi <= lo:
            continue
        n = min(hi - lo, max(1, math.ceil(samples_per_bucket / b)))
        sample_at.update(int(s) for s in np.linspace(lo, hi - 1, n).round())
    decode_at = {s - j for s in sample_at for j in range(k)}
    actions = M.hold_actions(b, horizon, num_actions, hold, rng)  # (B, H)
    window = list(np.moveaxis(source.start(rng), 1, 0))  # K-1 frames (B, H, W, 3)
    t0 = time.perf_counter()
    reached, stopped = 0, False
    for step in range(horizon):
        frames = source.step(actions[:, step], decode=step in decode_at)
        window = (window + [frames])[-k:]
        if step in sample_at:
            stack = np.stack(window, axis=1)  # (B, K, H, W, 3)
            _, feats = predict(idm, stack)
            acc.add(step, window[-1], feats)
        reached = step + 1
        if budget_s and time.perf_counter() - t0 > budget_s:
            stopped = reached < horizon
            break
    rows = acc.result()
    return {
        "buckets": rows,
        "summary": M.drift_summary(rows),
        "horizon_reached": reached,
        "stopped_by_budget": stopped,
        "seconds": time.perf_counter() - t0,
        "trace": [[s, v] for s, v in acc.trace],
        "real_brightness": acc.real_brightness,
    }


# ------------------------------------------------------------------------------------ real data
@dataclass
class Segments:
    """Contiguous windows of real episodes, all of ``length`` frames."""

    names: list[str]
    starts: list[int]
    frames: np.ndarray  # (S, L, H, W, 3) uint8
    actions: np.ndarray  # (S, L) int64, -1 = unknown
    rewards: np.ndarray  # (S, L) float32
    terminated: np.ndarray  # (S, L) bool
    term_totals: dict[bool, int] = field(default_factory=dict)
    """Labelled transitions of the source episodes with terminated True / False (for re-weighting)."""
    latents: torch.Tensor | None = None  # (S, L, C, h, w)
    recon: np.ndarray | None = None  # (S, L, H, W, 3) uint8 VAE reconstructions

    def idm_predictions(
        self, idm: InverseDynamicsModel, which: Literal["frames", "recon"] = "frames"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the IDM on every K-frame stack whose newest frame has a known action.

        Stacks are views of one segment at a time, so no (N, K, H, W, 3) copy is made.

        Returns:
            ``(pred (N,), features (N, D), labels (N,))``.
        """
        k = idm.cfg.frames
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for seq, acts in zip(self.frames if which == "frames" else self.recon, self.actions, strict=True):
            keep = np.nonzero(acts[k - 1 :] >= 0)[0]  # stack i ends at frame i + K - 1
            pred, feats = predict(idm, sequence_stacks(seq, k)[keep])
            out.append((pred, feats, acts[k - 1 :][keep]))
        return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


def read_segments(episode_dirs: list[Path], frames_budget: int, length: int, min_frame: int) -> Segments:
    """Read about ``frames_budget`` frames of the episodes as segments of ``length`` frames.

    Segments are spread evenly over each episode (proportionally to its length, at least one per
    episode) and the last one of each episode ends at its end, so terminal transitions are included.
    """
    lengths = [len(E.open_episode(ep)["actions"]) for ep in episode_dirs]
    usable = [(ep, n) for ep, n in zip(episode_dirs, lengths, strict=True) if n >= length]
    if not usable:
        raise UsageError(f"no episode among {len(episode_dirs)} has {length} frames (--segment-len)")
    count = max(1, frames_budget // length)
    total = sum(n for _, n in usable)
    names, starts, cols = [], [], {"frames": [], "actions": [], "rewards": [], "terminated": []}
    totals = {True: 0, False: 0}
    for ep, n in usable:
        arrays = E.open_episode(ep)
        labelled = np.asarray(arrays["actions"][1:]) >= 0
        term = np.asarray(arrays["terminated"][1:], bool)
        totals[True] += int((term & labelled).sum())
        totals[False] += int((~term & labelled).sum())
        lo = min(min_frame, n - length)
        for s in np.unique(np.linspace(lo, n - length, max(1, round(count * n / total))).round().astype(int)):
            names.append(ep.name)
            starts.append(int(s))
            for key in cols:
                cols[key].append(np.asarray(arrays[key][s : s + length]))
    return Segments(
        names=names, starts=starts, frames=np.stack(cols["frames"]),
        actions=np.stack(cols["actions"]).astype(np.int64),
        rewards=np.stack(cols["rewards"]).astype(np.float32),
        terminated=np.stack(cols["terminated"]).astype(bool), term_totals=totals,
    )


def encode_segments(seg: Segments, vae: torch.nn.Module) -> None:
    """Fill ``seg.latents`` and ``seg.recon`` (one encode and one decode of every frame)."""
    s, length = seg.frames.shape[:2]
    z = encode_frames(vae, seg.frames.reshape(s * length, *seg.frames.shape[2:]))  # (S*L, C, h, w)
    seg.latents = z.reshape(s, length, *z.shape[1:])
    seg.recon = decode_latents(vae, z).reshape(seg.frames.shape)


def context_windows(
    seg: Segments, context: int, count: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """Pick random context windows that have a labelled next frame.

    Returns:
        ``(latents (N, Tc, C, h, w), pairs (N, 2))`` with N = min(count, available) and pairs the
        (segment, next-frame index) of each window.
    """
    length = seg.frames.shape[1]
    if length <= context:
        raise UsageError(f"--segment-len {length} must exceed the sampler context {context}")
    cand = np.array([(s, j) for s in range(len(seg.names)) for j in range(context, length)
                     if seg.actions[s, j] >= 0])
    if not len(cand):
        raise UsageError("no labelled next frame after a context window in the segments")
    pick = cand[rng.choice(len(cand), size=min(count, len(cand)), replace=False)]
    ctx = torch.stack([seg.latents[s, j - context : j] for s, j in pick])  # (N, Tc, C, h, w)
    return ctx, pick


# ---------------------------------------------------------------------------------- sections
def teacher_forced(world: WorldModel, seg: Segments, count: int, device: str, seed: int,
                   rng: np.random.Generator, chunk: int = 16) -> dict:
    """Next-frame PSNR: real context -> one ``immediate``-mode step with the real action -> decode."""
    from world_model.simulator import Simulator, sampler_config

    cfg = sampler_config(world, "immediate")
    ctx, pick = context_windows(seg, cfg.context, count, rng)
    n = len(pick)
    sim = Simulator(dataclasses.replace(world, start_latents=ctx), min(chunk, n), device, sampler=cfg)
    gen = torch.Generator().manual_seed(seed)
    preds = []
    for i in range(0, n, sim.num_envs):
        idx = np.arange(i, i + sim.num_envs) % n  # the last chunk wraps around (extra rows dropped)
        sim.reset(torch.ones(sim.num_envs, dtype=torch.bool), torch.from_numpy(idx), generator=gen)
        acts = torch.from_numpy(seg.actions[pick[idx, 0], pick[idx, 1]])
        latents, _, _ = sim.step(acts)
        preds.append(sim.decode(latents, E.TRAIN_HW).cpu().numpy()[: n - i])
    pred = np.concatenate(preds)  # (N, H, W, 3)
    target = seg.frames[pick[:, 0], pick[:, 1]]
    prev = seg.frames[pick[:, 0], pick[:, 1] - 1]
    recon = seg.recon[pick[:, 0], pick[:, 1]]
    per = [M.psnr(p, t) for p, t in zip(pred, target, strict=True)]
    return {
        "psnr": M.psnr(pred, target),
        "psnr_mean_per_frame": float(np.mean([min(v, 100.0) for v in per])),
        "copy_last_psnr": M.psnr(prev, target),
        "vae_recon_psnr": M.psnr(recon, target),
        "n": n,
        "immediate_steps": cfg.immediate_steps,
    }


def _endings_row(heads: dict, where: str) -> list[str]:
    """The summary row comparing the reward head at recorded endings with the game's reward there."""
    e = heads.get("endings", {})
    if not e.get("n"):
        return []
    world = "none (the head's)" if e["terminal_reward"] is None else _fmt(e["terminal_reward"], 1)
    values = f"{_fmt(e['head'], 2)} / {_fmt(e['env'], 2)} / {_fmt(e['recorded'], 2)}"
    return [f"| reward at recorded endings{where}: reward head / env / recorded | {values} | "
            f"{e['n']} endings; the world's terminal_reward: {world} |"]


def heads_metrics(world: WorldModel, seg: Segments, reward_baseline: float, device: str) -> dict:
    """Reward / termination heads on real held-out latent transitions ``(z[j-1], z[j], action[j])``."""
    s_idx, j_idx = np.nonzero(seg.actions[:, 1:] >= 0)
    j_idx = j_idx + 1
    if not len(s_idx):
        return {}
    heads = world.heads.to(device).eval()
    pooled = world.control_pooled.to(device, torch.float32)
    rewards, logits = [], []
    with torch.no_grad():
        for i in range(0, len(s_idx), 256):
            s, j = s_idx[i : i + 256], j_idx[i : i + 256]
            z_prev = seg.latents[s, j - 1].to(device)
            z_next = seg.latents[s, j].to(device)
            r, lg = heads(z_prev, z_next, pooled[torch.from_numpy(seg.actions[s, j]).to(device)])
            rewards.append(r.float().cpu().numpy())
            logits.append(lg.float().cpu().numpy())
    pred_r, logit = np.concatenate(rewards), np.concatenate(logits)
    true_r, true_t = seg.rewards[s_idx, j_idx], seg.terminated[s_idx, j_idx]
    sampled = {True: int(true_t.sum()), False: int((~true_t).sum())}
    rate = {c: seg.term_totals.get(c, 0) / sampled[c] if sampled[c] else 0.0 for c in (True, False)}
    weight = np.where(true_t, rate[True], rate[False])
    ends = true_t.astype(bool)  # recorded endings: the reward head, the env's reward there, the game's
    cfg = world.heads.cfg
    env_r = pred_r if cfg.terminal_reward is None else np.where(logit > cfg.term_threshold, cfg.terminal_reward, pred_r)
    endings = {"n": int(ends.sum()), "head": float(pred_r[ends].mean()) if ends.any() else float("nan"),
               "env": float(env_r[ends].mean()) if ends.any() else float("nan"),
               "recorded": float(true_r[ends].mean()) if ends.any() else float("nan"),
               "terminal_reward": world.heads.cfg.terminal_reward}
    return {
        "reward": M.reward_metrics(pred_r, true_r, baseline=reward_baseline),
        "endings": endings,
        "termination": {**M.termination_metrics(logit > world.heads.cfg.term_threshold, true_t, weight),
                        "threshold": float(world.heads.cfg.term_threshold)},
        "termination_at_logit_0": M.termination_metrics(logit > 0, true_t, weight),
        "scatter": (pred_r, true_r),
    }


def measure_speed(world: WorldModel, modes: tuple[str, ...], steps: int, batch: int, device: str) -> dict:
    """Time simulator steps/s per mode (batch 1 and ``batch``) and 720p frames/s (step + decode, batch 1)."""
    from world_model.simulator import Simulator, sampler_config

    try:
        from benchmarks.bench_env import time_steps
    except ImportError:  # benchmarks/ is not part of the installed package: the same warm-up + timing loop
        def time_steps(step: Callable[[], object], steps: int) -> float:
            for _ in range(2):
                step()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            return time.perf_counter() - t0

    out: dict = {}
    for mode in modes:
        row = {}
        for n in sorted({1, batch}):
            sim = Simulator(world, n, device, sampler=sampler_config(world, mode))
            sim.reset(torch.ones(n, dtype=torch.bool), torch.arange(n) % sim.num_starts,
                      generator=torch.Generator().manual_seed(0))
            acts = torch.arange(n) % world.num_actions
            sec = time_steps(lambda sim=sim, acts=acts: sim.step(acts), steps)
            row[f"steps_per_s_b{n}"] = n * steps / sec
            if n == 1:
                row["ms_per_step_b1"] = 1000 * sec / steps
                sec_hd = time_steps(lambda sim=sim, acts=acts: sim.decode(sim.step(acts)[0], "720p"), steps)
                row["fps_720p_b1"] = steps / sec_hd
                row["evals_per_step"] = sim.sampler.evals_per_step
        out[mode] = row
    return out


def bucket_means(x: np.ndarray, buckets: int = 4) -> list[dict]:
    """Mean of (T, B) values over ``buckets`` equal step ranges: [{"start", "end", "mean"}]."""
    edges = np.linspace(0, len(x), buckets + 1).round().astype(int)
    return [{"start": int(a), "end": int(b), "mean": float(x[a:b].mean())}
            for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _share(flags: list | np.ndarray) -> float | None:
    """Mean of 0/1 values, nan = not counted; None when nothing was counted."""
    x = np.asarray(flags, np.float64)
    return None if np.isnan(x).all() else float(np.nanmean(x))


def held_action(action_names: list[str], name: str) -> Callable[[np.ndarray], np.ndarray]:
    """An open-loop policy that always takes action ``name``: frames (B, H, W, 3) -> (B,) int64 ids.

    Raises:
        UsageError: ``name`` is not one of ``action_names``.
    """
    if name not in action_names:
        raise UsageError(f"hold action {name!r} is not one of the world's actions {action_names}")
    index = action_names.index(name)
    return lambda frames: np.full(len(frames), index, np.int64)


def head_predictions(world: WorldModel) -> torch.nn.Module:
    """The world's heads (the same weights) without the env's terminal reward: the reward head's own
    prediction on every step, as evaluations compare it (streams are driven on after an ending)."""
    heads = copy.copy(world.heads)
    heads.cfg = dataclasses.replace(heads.cfg, terminal_reward=None)
    return heads


def closed_loop(world: WorldModel, contexts: torch.Tensor, mode: str, envs: int, steps: int, seed: int,
                device: str, real_env_id: str | None, palette: np.ndarray | None = None,
                hold: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Drive the world (and the real CarRacing-v3) with the pixel road follower; compare road keeping.

    In the world, ``envs`` streams start from real held-out contexts whose last frame shows the car on
    the road (as the real game's episodes start; all contexts if none does); each step the follower reads
    the decoded 72x128 frames. On-road fraction (:func:`world_model.road_follower.on_road`) and
    reward per step are reported per quarter of the run; the same follower on the real game (when
    the world was recorded from CarRacing) gives the reference. With a ``palette`` of real colours
    (:func:`real_palette`), the share of off-palette pixels (:func:`metrics.off_palette`) is reported
    for both. ``hold`` (an action name, e.g. "D") replaces the follower by that action, held open
    loop: a world that keeps the road under a car driving straight is easier than the real game
    (a policy trained in it learns to drive straight). ``steer_share`` is the fraction of the
    follower's steps with the car on the road in which it turned (an action whose name ends in L or
    R; off the road it turns to search, which is not counted): a world whose road stops curving asks
    for less steering than the real game does, however well it keeps the road (None for a held
    action). CarRacing worlds also report ``car_faded``, the share of frames whose car is half gone
    (:func:`metrics.car_pixels`; the real game's opening zoom-in, ``metrics.ZOOM_STEPS``, is left out).
    ``dtype`` is the world's compute dtype (``torch.bfloat16``: autocast, as agents on a CPU run it).

    Raises:
        UsageError: ``hold`` is not one of the world's action names.
    """
    from world_model.road_follower import RoadFollower, on_road
    from world_model.simulator import Simulator, sampler_config

    try:
        follower = RoadFollower(list(world.action_names))
    except ValueError as err:
        return {"skipped": str(err)}
    policy = follower if hold is None else held_action(list(world.action_names), hold)
    on = on_road(decode_latents(world.vae, contexts[:, -1].float()))  # (S,) the real game starts on the road
    if on.any():
        contexts = contexts[torch.from_numpy(np.nonzero(on)[0])]
    sim = Simulator(dataclasses.replace(world, start_latents=contexts.float(), heads=head_predictions(world)), envs,
                    device, sampler=sampler_config(world, mode), dtype=dtype)
    perm = np.random.default_rng(seed).permutation(len(contexts))
    start = torch.from_numpy(perm[np.arange(envs) % len(perm)])  # (envs,) wraps when there are fewer starts
    sim.reset(torch.ones(envs, dtype=torch.bool), start, generator=torch.Generator().manual_seed(seed))
    frame = decode_latents(sim.vae, contexts[start, -1].float())  # (B, H, W, 3)
    turns = np.array([name.endswith(("L", "R")) for name in world.action_names])  # (A,) bool
    on, rew, detail, kerbs, cars, off, steer = [], [], [], [], [], [], []
    first_end = torch.zeros(envs, dtype=torch.long)  # (B,) step (1-based) of each stream's first ending, 0: none
    rows, carracing, ignore = detail_rows(world), is_carracing(world), palette_ignore(world)
    seen = on_road(frame)  # (B,) bool, the car on the road in the frame the policy reads
    for t in range(steps):  # a stream the termination head ends is counted once and driven on
        actions = policy(frame)  # (B,) int64
        steer.append(np.where(seen, turns[actions], np.nan))  # (B,) nan: off the road, not counted
        latents, reward, terminated = sim.step(torch.from_numpy(actions))
        frame = sim.decode(latents, E.TRAIN_HW).cpu().numpy()  # (B, 72, 128, 3)
        seen = on_road(frame)  # (B,) bool
        on.append(seen)
        detail.append(M.rms_gradient(frame, rows))
        if carracing:
            kerbs.append(M.kerb_pixels(frame, rows))
            cars.append(M.car_pixels(frame))
        if palette is not None:
            off.append(M.off_palette(frame, palette, rows, ignore))
        rew.append(reward.float().cpu().numpy())
        first_end = torch.where((first_end == 0) & terminated.cpu(), t + 1, first_end)
    ends = int((first_end > 0).sum())  # streams that terminated at least once (the real side: episodes)
    on_w, rew_w = np.array(on, np.float64), np.array(rew, np.float64)  # (T, B)
    out: dict = {"mode": mode, "envs": envs, "steps": steps, "policy": hold or "road follower",
                 "world": {"on_road": float(on_w.mean()), "on_road_by_quarter": bucket_means(on_w),
                           "reward_per_step": float(rew_w.mean()), "terminations": ends,
                           "first_end_step": float(first_end[first_end > 0].float().median()) if ends else None,
                           "detail": float(np.mean(detail)),
                           "detail_by_quarter": bucket_means(np.array(detail)),  # blur or drift lowers it
                           "steer_share": _share(steer) if hold is None else None}}
    if kerbs:
        out["world"]["kerb_pixels"] = float(np.mean(kerbs))
        out["world"]["car_faded"] = float((np.array(cars) < M.CAR_FADED_BELOW).mean())
    if off:
        out["world"]["off_palette"] = float(np.mean(off))
    if real_env_id is None or not env_is_carracing(real_env_id):
        out["real"] = {"skipped": f"the world was recorded from {real_env_id!r}, not CarRacing"}
        return out
    from agents.real_env import RealCarRacingEnv

    env = RealCarRacingEnv()
    on_r, rew_r, ends_r, detail_r = np.zeros((steps, envs)), np.zeros((steps, envs)), 0, np.zeros((steps, envs))
    kerb_r, off_r = np.zeros((steps, envs)), np.zeros((steps, envs))
    steer_r, car_r = np.full((steps, envs), np.nan), np.full((steps, envs), np.nan)  # nan: not counted
    first_end = np.zeros(envs, dtype=np.int64)  # (S,) step (1-based) of each stream's first ending, 0: none
    for i in range(envs):
        obs, _ = env.reset(seed=seed + i)
        since_reset = 0  # steps into the current episode (its first ones zoom in)
        for t in range(steps):
            action = int(policy(obs[None])[0])
            if on_road(obs[None])[0]:
                steer_r[t, i] = turns[action]
            obs, r, term, trunc, info = env.step(action)
            since_reset += 1
            on_r[t, i], rew_r[t, i] = on_road(obs[None])[0], r
            detail_r[t, i] = M.rms_gradient(obs[None], VIEW_ROWS)  # the real game is CarRacing: its view
            kerb_r[t, i] = M.kerb_pixels(obs[None], VIEW_ROWS)
            if since_reset > M.ZOOM_STEPS:
                car_r[t, i] = M.car_pixels(obs[None])[0] < M.CAR_FADED_BELOW
            if palette is not None:
                off_r[t, i] = M.off_palette(obs[None], palette, VIEW_ROWS, M.KERB_CAR_BOX)
            ends_r += int(term)
            if term and info.get("lap_finished") is False and first_end[i] == 0:  # left the playfield
                first_end[i] = t + 1
            if term or trunc:
                obs, _ = env.reset()
                since_reset = 0
    env.close()
    out["real"] = {"on_road": float(on_r.mean()), "on_road_by_quarter": bucket_means(on_r),
                   "reward_per_step": float(rew_r.mean()), "terminations": ends_r,
                   # as the world's "terminations": streams that left the playfield at least once, and when first
                   "ended_streams": int((first_end > 0).sum()),
                   "first_end_step": float(np.median(first_end[first_end > 0])) if first_end.any() else None,
                   "detail": float(detail_r.mean()), "detail_by_quarter": bucket_means(detail_r),
                   "kerb_pixels": float(kerb_r.mean()), "steer_share": _share(steer_r) if hold is None else None,
                   "car_faded": _share(car_r)}
    if palette is not None:
        out["real"]["off_palette"] = float(off_r.mean())
    return out


# -------------------------------------------------------------------------------------- output
def jsonable(obj: object) -> object:
    """Make metrics JSON-safe: numpy scalars -> Python, nan -> None, +-inf -> "inf" / "-inf"."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    """A share in [0, 1] as a percentage with 2 decimals."""
    return "n/a" if v is None else f"{100 * v:.2f}%"


def write_plots(out: Path, results: dict, action_names: list[str], scatter: tuple | None) -> list[str]:
    """confusion.png, control.png, drift.png, reward.png (those with data); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    written = []
    # --- confusion matrices: real held-out, then generated per mode (and DR)
    panels = [("real held-out", results["idm"]["real_heldout"])]
    panels += [(f"generated: {m}", r) for m, r in results["control"]["modes"].items()]
    if results["control"].get("dr"):
        panels.append(("generated from DR", results["control"]["dr"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, rep) in zip(axes[0], panels, strict=True):
        cm = np.asarray(rep["confusion"], np.float64)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{title}\nacc {_fmt(rep['accuracy'])}", fontsize=9)
        ax.set_xticks(range(len(action_names)), action_names, fontsize=7, rotation=90)
        ax.set_yticks(range(len(action_names)), action_names, fontsize=7)
        ax.set_xlabel("IDM prediction", fontsize=8)
    axes[0][0].set_ylabel("action given", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    written.append("confusion.png")

    # --- control accuracy bars
    bars = [("real", results["idm"]["real_heldout"]["accuracy"]),
            ("VAE recon", results["idm"]["recon_heldout"]["accuracy"])]
    bars += [(m, r["accuracy"]) for m, r in results["control"]["modes"].items()]
    if results["control"].get("dr"):
        bars.append(("DR gen", results["control"]["dr"]["accuracy"]))
    fig, ax = plt.subplots(figsize=(1.2 * len(bars) + 2, 3.2))
    ax.bar([b[0] for b in bars], [b[1] or 0.0 for b in bars], color="tab:blue")
    ax.axhline(results["idm"]["real_heldout"]["chance_uniform"], color="k", ls="--", lw=1, label="chance 1/A")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IDM accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "control.png", dpi=100)
    plt.close(fig)
    written.append("control.png")

    # --- drift curves
    drift = results.get("drift", {})
    rows = drift.get("buckets") or []
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        centers = [max(1.0, (r["start"] + min(r["end"], r["reached"] + 1)) / 2) for r in rows]
        for ax, key, label in ((axes[0], "frechet", "Fréchet distance (IDM features)"),
                               (axes[1], "hist_distance", "RGB histogram TV distance")):
            ax.plot(centers, [r[key] if r[key] is not None else np.nan for r in rows], "o-")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("generated steps")
            ax.set_title(label, fontsize=9)
            ax.set_ylim(bottom=0, top=1.0 if key == "hist_distance" else None)
        trace = np.asarray(drift.get("trace") or [[0, 0]], np.float64)
        axes[2].plot(trace[:, 0] + 1, trace[:, 1], ".", ms=3, label="generated")
        axes[2].axhline(drift["real_brightness"], color="k", ls="--", lw=1, label="real")
        axes[2].set_xscale("log")
        axes[2].xaxis.set_minor_formatter(NullFormatter())
        axes[2].set_xlabel("generated steps")
        axes[2].set_title("mean brightness", fontsize=9)
        axes[2].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "drift.png", dpi=100)
        plt.close(fig)
        written.append("drift.png")

    # --- reward scatter
    if scatter is not None and len(scatter[0]):
        pred, true = scatter
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        ax.scatter(true, pred, s=4, alpha=0.5)
        lim = [float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_xlabel("recorded reward")
        ax.set_ylabel("predicted reward")
        ax.set_title(f"reward head (held-out), corr {_fmt(results['heads']['reward']['corr'])}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "reward.png", dpi=100)
        plt.close(fig)
        written.append("reward.png")
    return written


def summary_markdown(results: dict) -> str:
    """Render a short Markdown summary for the README."""
    idm, ctrl, fid = results["idm"], results["control"], results["fidelity"]
    lines = [
        f"### World-model evaluation: `{Path(results['checkpoint']).name}`",
        "",
        f"Command: `{' '.join(results['command'])}`  ",
        f"Machine: {results['machine']['processor']}, {results['machine']['cpu_count']} CPUs, "
        f"device {results['machine']['device']}, torch {results['machine']['torch']}  ",
        f"Date: {results['date']}",
        "",
        "| metric | value | reference |",
        "|---|---:|---|",
        f"| IDM accuracy, real held-out | {_fmt(idm['real_heldout']['accuracy'])} | "
        f"chance {_fmt(idm['real_heldout']['chance_uniform'])} (1/A), "
        f"{_fmt(idm['real_heldout']['chance_majority'])} (majority) |",
        f"| IDM accuracy, VAE-reconstructed held-out | {_fmt(idm['recon_heldout']['accuracy'])} | "
        "ceiling for decoded frames |",
    ]
    lat = idm.get("latent")
    if lat:
        lines.append(f"| latent IDM accuracy, real held-out latents | {_fmt(lat['real_heldout']['accuracy'])} | "
                     f"ceiling for generated latents (bottom {lat['config']['hud_rows']} latent row(s) ignored) |")
        for mode, rep in ctrl["modes"].items():
            lr = rep.get("latent")
            if lr:
                lags = ", ".join(_fmt(a, 2) for a in lr["by_lag"])
                lines.append(f"| latent IDM accuracy, generated ({mode}, latency {lr['latency']}) | "
                             f"{_fmt(lr['accuracy'])} | by lag 0..: {lags} |")
        if ctrl.get("dr", {}).get("latent"):
            lines.append(f"| latent IDM accuracy, generated from DR starts | "
                         f"{_fmt(ctrl['dr']['latent']['accuracy'])} | "
                         f"latent IDM on real DR {_fmt(lat['real_dr']['accuracy'])} |")
    for mode, rep in ctrl["modes"].items():
        lags = ", ".join(_fmt(a, 2) for a in rep["by_lag"])
        lines.append(f"| IDM accuracy, generated ({mode}, latency {rep['latency']}) | "
                     f"{_fmt(rep['accuracy'])} | "
                     f"by lag 0..: {lags}; chance {_fmt(rep['chance_majority'])} (majority) |")
    if ctrl.get("dr"):
        lines.append(f"| IDM accuracy, generated from DR starts | {_fmt(ctrl['dr']['accuracy'])} | "
                     f"IDM on real DR {_fmt(idm['real_dr']['accuracy'])} |")
    tf = fid["teacher_forced"]
    lines += [
        f"| VAE reconstruction PSNR (72x128) | {_fmt(fid['vae_psnr'], 2)} dB | |",
        f"| teacher-forced next-frame PSNR | {_fmt(tf['psnr'], 2)} dB | "
        f"copy last frame {_fmt(tf['copy_last_psnr'], 2)} dB, "
        f"VAE ceiling {_fmt(tf['vae_recon_psnr'], 2)} dB |",
        f"| Fréchet distance, generated vs real | {_fmt(fid['frechet']['generated'], 2)} | "
        f"VAE-recon floor {_fmt(fid['frechet']['vae_recon_floor'], 2)} (n={fid['frechet']['n']}) |",
    ]
    if "detail" in fid:
        view = "above the dashboard" if fid["detail"].get("rows") else "whole frame"
        lines.append(f"| detail (RMS luma gradient, {view}), VAE-reconstructed held-out | "
                     f"{_fmt(fid['detail']['vae_recon'], 2)} | real frames {_fmt(fid['detail']['real'], 2)} |")
    if "kerb_pixels" in fid:
        kp = fid["kerb_pixels"]
        lines.append(f"| kerb pixels per frame (red/white, above the dashboard), VAE-reconstructed held-out | "
                     f"{_fmt(kp['vae_recon'], 2)} | real frames {_fmt(kp['real'], 2)} |")
    if "generated" in fid.get("off_palette", {}):
        op = fid["off_palette"]
        lines.append(f"| off-palette pixels (colours no held-out frame has), generated | "
                     f"{_pct(op['generated'])} | VAE-reconstructed held-out {_pct(op['vae_recon'])} |")
    drift = results.get("drift", {})
    for r in drift.get("buckets", []):
        span = f"{r['start']}-{min(r['end'], r['reached'] + 1)}"
        values = f"{_fmt(r['frechet'], 2)} / {_fmt(r['hist_distance'])} / {_fmt(r['brightness_gap'], 1)}"
        lines.append(f"| drift {span} steps: FD / hist TV / brightness gap | {values} | "
                     f"{r['frames']} frames |")
    heads = results.get("heads", {})
    if "reward" in heads:
        rw, tm = heads["reward"], heads["termination"]
        lines += [
            f"| reward head MAE / corr | {_fmt(rw['mae'])} / {_fmt(rw['corr'])} | "
            f"constant-mean MAE {_fmt(rw.get('mae_constant_baseline'))} (n={rw['n']}) |",
            f"| termination precision / recall (logit > {_fmt(tm.get('threshold', 0.0), 2)}) | "
            f"{_fmt(tm['precision'])} / {_fmt(tm['recall'])} | {tm['positives']} terminal of {tm['n']}; "
            f"false terminations per step {_fmt(tm.get('false_positive_rate'), 4)} |",
        ]
        lines += _endings_row(heads, "")
        if "extra" in heads:
            rw, tm, ex = heads["extra"]["reward"], heads["extra"]["termination"], heads["extra"]
            lines += [
                f"| reward head MAE / corr, {ex['episodes']} unseen episodes of {ex['data']} | "
                f"{_fmt(rw['mae'])} / {_fmt(rw['corr'])} | constant-mean MAE {_fmt(rw.get('mae_constant_baseline'))} |",
                f"| termination precision / recall, same episodes | {_fmt(tm['precision'])} / {_fmt(tm['recall'])} | "
                f"{tm['positives']} terminal of {tm['n']}; at logit > 0: "
                f"{_fmt(ex['termination_at_logit_0']['precision'])} / {_fmt(ex['termination_at_logit_0']['recall'])} |",
            ]
            lines += _endings_row(ex, ", same episodes")
    loop = results.get("closed_loop", {})
    if "world" in loop:
        quarters = " / ".join(_fmt(q["mean"], 2) for q in loop["world"]["on_road_by_quarter"])
        real = loop.get("real", {})
        ref = (f"real CarRacing, same follower: {_fmt(real['on_road'], 2)} on road, "
               f"reward/step {_fmt(real['reward_per_step'], 2)}, {real.get('terminations', 0)} terminations"
               ) if "on_road" in real else real.get("skipped", "")
        lines.append(f"| closed loop, road follower {loop['steps']} steps x {loop['envs']}: on road by quarter "
                     f"/ predicted reward per step / terminations | {quarters} / "
                     f"{_fmt(loop['world']['reward_per_step'], 2)} / {loop['world'].get('terminations', 0)} | "
                     f"{ref} |")
        if "detail" in loop["world"]:
            ref = f"real game {_fmt(real['detail'], 2)}" if "detail" in real else ""
            by_q = loop["world"].get("detail_by_quarter")  # absent in results written before it existed
            by_q = f" ({' / '.join(_fmt(q['mean'], 2) for q in by_q)} by quarter)" if by_q else ""
            lines.append(f"| detail (RMS luma gradient), closed-loop frames | "
                         f"{_fmt(loop['world']['detail'], 2)}{by_q} | {ref} |")
        if "kerb_pixels" in loop["world"]:
            ref = f"real game {_fmt(real['kerb_pixels'], 2)}" if "kerb_pixels" in real else ""
            lines.append(f"| kerb pixels per frame, closed-loop frames | "
                         f"{_fmt(loop['world']['kerb_pixels'], 2)} | {ref} |")
        if "car_faded" in loop["world"]:
            ref = f"real game {_pct(real['car_faded'])} (after its zoom-in)" if "car_faded" in real else ""
            lines.append(f"| car half gone, share of closed-loop frames | {_pct(loop['world']['car_faded'])} | {ref} |")
        if "off_palette" in loop["world"]:
            ref = f"real game {_pct(real['off_palette'])}" if "off_palette" in real else ""
            lines.append(f"| off-palette pixels, closed-loop frames | {_pct(loop['world']['off_palette'])} | {ref} |")
        ref = f"real game {_fmt(real['steer_share'], 2)}" if "steer_share" in real else ""
        lines.append(f"| steering share: follower steps that turned, of those on the road | "
                     f"{_fmt(loop['world']['steer_share'], 2)} | {ref} (a straighter road asks for less) |")
    for mode, row in results.get("speed", {}).items():
        batched = [k for k in row if k.startswith("steps_per_s_b") and k != "steps_per_s_b1"]
        extra = f", batch {batched[0][13:]}: {_fmt(row[batched[0]], 1)}" if batched else ""
        lines.append(f"| speed ({mode}, {row['evals_per_step']} evals/step): steps/s | "
                     f"{_fmt(row['steps_per_s_b1'], 1)} (batch 1{extra}) | "
                     f"720p {_fmt(row['fps_720p_b1'], 1)} FPS |")
    if drift.get("stopped_by_budget"):
        lines += ["", f"Drift stopped by its time budget at {drift['horizon_reached']} steps."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main
def unseen_episodes(root: Path, holdout_fraction: float, split_seed: int) -> list[Path]:
    """Labelled episodes of ``root`` no trainer reads: the held-out split and every non-'train' split."""
    from world_model.data.loader import split_episodes

    _, held = split_episodes(root, holdout_fraction, split_seed)
    out = labelled_episodes(root, held)
    for ep in E.list_episodes(root):
        meta = E.read_meta(ep)
        if meta.get("labelled") and meta.get("split", "train") != "train":
            out.append(ep)
    return out


def labelled_episodes(root: Path, names: list[str]) -> list[Path]:
    """Return the named episodes of ``root`` that carry action labels and belong to the training split."""
    out = []
    for name in names:
        ep = Path(root) / E.EPISODES_DIR / name
        meta = E.read_meta(ep)
        if meta.get("labelled") and meta.get("split", "train") == "train":
            out.append(ep)
    return out


def check_actions(episode_dirs: list[Path], action_names: list[str], where: str) -> None:
    """Refuse data whose action table differs from the world's."""
    for ep in episode_dirs[:1]:
        names = E.read_meta(ep).get("action_names")
        if names is not None and list(names) != list(action_names):
            raise UsageError(f"{where}: episode {ep.name} has actions {names}, the world has {action_names}")


def evaluate(args: Args, command: list[str] | None = None) -> dict:
    """Run every section; write OUT/metrics.json, plots and summary.md. Returns the results dict."""
    args = apply_quick(args)
    before = torch.get_num_threads()
    threads = resolve_threads(args.threads, args.device)
    if threads != before:
        log(f"[eval] torch threads: {threads}" + ("" if args.threads else " (auto: the CPU is busy)"))
    torch.set_num_threads(threads)
    try:
        return _evaluate(args, command)
    finally:
        torch.set_num_threads(before)


def _evaluate(args: Args, command: list[str] | None) -> dict:
    from world_model.checkpoint import load_world
    from world_model.data.loader import split_episodes
    from world_model.simulator import sampler_config

    for name in ("control_envs", "control_steps", "tf_samples", "drift_envs", "drift_samples", "speed_steps",
                 "speed_envs", "hold", "idm_steps", "idm_batch", "heldout_frames"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {str(args.data)!r} does not exist or is not a directory")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    device = args.device

    def lap(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log(f"[eval] {name}: {timings[name]:.1f}s")

    # ---- world and data
    t0 = time.perf_counter()
    world = load_world(args.checkpoint, device)
    default_cfg = sampler_config(world, args.mode)
    num_actions = world.num_actions
    loaded_lidm = None  # loaded and checked before any encoding or training: refuse one of another encoder
    if args.latent_idm is not None:
        loaded_lidm = load_latent_idm(args.latent_idm, device)
        check_latent_idm(loaded_lidm.cfg, world, args.latent_idm)
    train_names, held_names = split_episodes(args.data, args.holdout_fraction, args.split_seed)
    train_eps = labelled_episodes(args.data, train_names)
    held_eps = labelled_episodes(args.data, held_names)
    if not train_eps or not held_eps:
        raise UsageError(
            f"--data {str(args.data)!r} needs labelled training AND held-out episodes "
            f"(found {len(train_eps)} / {len(held_eps)}; held-out fraction {args.holdout_fraction})"
        )
    check_actions(train_eps, world.action_names, "--data")
    seg = read_segments(held_eps, args.heldout_frames, args.segment_len, args.min_frame)
    encode_segments(seg, world.vae)
    log(f"[eval] world {args.checkpoint}: {num_actions} actions, sampler {default_cfg}; "
        f"{len(train_eps)} train / {len(held_eps)} held-out episodes, {seg.frames.shape[0]} segments "
        f"x {seg.frames.shape[1]} frames")
    lap("load_and_encode", t0)

    # ---- inverse-dynamics model
    t0 = time.perf_counter()
    if args.idm is not None:
        idm = load_idm(args.idm, device)
        if idm.cfg.num_actions != num_actions:
            raise UsageError(f"--idm {args.idm} has {idm.cfg.num_actions} actions, the world {num_actions}")
        idm_train = {"loaded_from": str(args.idm)}
    else:
        cfg = dataclasses.replace(IDM_PRESETS[args.idm_preset], num_actions=num_actions,
                                  frames=args.idm_frames)
        transitions = TransitionSet(train_eps, cfg.frames, num_actions)
        log(f"[eval] training the IDM on {len(transitions)} real labelled transitions "
            f"({args.idm_steps} steps)")
        train_cfg = IDMTrainConfig(steps=args.idm_steps, batch_size=args.idm_batch, seed=args.seed,
                                   log_every=0 if args.quick else 100)
        idm, idm_train = train_idm(cfg, transitions.sample, train_cfg, device, log)
        idm_train["transitions"] = len(transitions)
        save_idm(out / "idm", idm)
    k = idm.cfg.frames
    real_pred, real_feats, real_labels = seg.idm_predictions(idm, "frames")
    recon_pred, recon_feats, recon_labels = seg.idm_predictions(idm, "recon")
    results_idm = {
        "config": dataclasses.asdict(idm.cfg),
        "train": idm_train,
        "real_heldout": M.accuracy_report(real_pred, real_labels, num_actions),
        "recon_heldout": M.accuracy_report(recon_pred, recon_labels, num_actions),
    }
    log(f"[eval] IDM accuracy: real held-out {results_idm['real_heldout']['accuracy']:.3f}, "
        f"VAE-reconstructed {results_idm['recon_heldout']['accuracy']:.3f}, chance {1 / num_actions:.3f}")
    if loaded_lidm is not None:
        lidm = loaded_lidm
        if (lidm.cfg.num_actions, lidm.cfg.frames) != (num_actions, k):
            raise UsageError(f"--latent-idm {args.latent_idm} has {lidm.cfg.num_actions} actions / "
                             f"{lidm.cfg.frames} frames; need {num_actions} / {k}")
        lidm_train: dict = {"loaded_from": str(args.latent_idm)}
    else:
        lidm, lidm_train = train_latent_idm_on(world, train_eps, args, k, device)
        save_latent_idm(out / "latent_idm", lidm)
    results_idm["latent"] = {"config": dataclasses.asdict(lidm.cfg), "train": lidm_train,
                             "real_heldout": segment_latent_accuracy(lidm, seg)}
    log(f"[eval] latent IDM accuracy: real held-out {results_idm['latent']['real_heldout']['accuracy']:.3f}")
    lap("idm", t0)

    # ---- fidelity: VAE and teacher-forced PSNR
    t0 = time.perf_counter()
    rows = detail_rows(world)
    fidelity: dict = {"vae_psnr": M.psnr(seg.recon, seg.frames),
                      "vae_psnr_frames": int(np.prod(seg.frames.shape[:2])),
                      "detail": {"real": M.rms_gradient(seg.frames.reshape(-1, *seg.frames.shape[2:]), rows),
                                 "vae_recon": M.rms_gradient(seg.recon.reshape(-1, *seg.recon.shape[2:]), rows),
                                 "rows": rows}}
    if is_carracing(world):
        fidelity["kerb_pixels"] = {"real": M.kerb_pixels(seg.frames.reshape(-1, *seg.frames.shape[2:]), rows),
                                   "vae_recon": M.kerb_pixels(seg.recon.reshape(-1, *seg.recon.shape[2:]), rows)}
    palette = real_palette(world, seg.frames.reshape(-1, *seg.frames.shape[2:]))  # (512,) held-out colours
    fidelity["off_palette"] = {"vae_recon": M.off_palette(seg.recon.reshape(-1, *seg.recon.shape[2:]), palette, rows,
                                                          palette_ignore(world)),
                               "palette_cells": int(palette.sum())}
    fidelity["teacher_forced"] = teacher_forced(world, seg, args.tf_samples, device, args.seed, rng)
    log(f"[eval] VAE PSNR {fidelity['vae_psnr']:.2f} dB; "
        f"teacher-forced {fidelity['teacher_forced']['psnr']:.2f} dB "
        f"(copy-last {fidelity['teacher_forced']['copy_last_psnr']:.2f})")
    lap("psnr", t0)

    # ---- heads
    t0 = time.perf_counter()
    train_rewards = [np.asarray(E.open_episode(ep)["rewards"][1:]) for ep in train_eps]
    reward_baseline = float(np.concatenate(train_rewards).mean())  # constant-mean predictor
    heads = heads_metrics(world, seg, reward_baseline, device)
    scatter = heads.pop("scatter", None)
    if args.heads_data is not None:
        extra = unseen_episodes(args.heads_data, args.holdout_fraction, args.split_seed)
        if not extra:
            raise UsageError(f"--heads-data {str(args.heads_data)!r} holds no labelled held-out or eval-split episode")
        check_actions(extra, world.action_names, "--heads-data")
        seg_h = read_segments(extra, args.heldout_frames, args.segment_len, 0)
        encode_segments(seg_h, world.vae)
        heads["extra"] = heads_metrics(world, seg_h, reward_baseline, device)
        heads["extra"].pop("scatter", None)
        heads["extra"]["data"], heads["extra"]["episodes"] = str(args.heads_data), len(extra)
    lap("heads", t0)

    # ---- control rollouts per mode (+ Fréchet distance of the default mode)
    t0 = time.perf_counter()
    max_lag = max(sampler_config(world).groups, default_cfg.groups) - 1
    contexts, _ = context_windows(seg, default_cfg.context, 4 * args.control_envs, rng)
    control: dict = {"modes": {}, "hold": args.hold, "steps": args.control_steps, "envs": args.control_envs}
    gen_feats = None
    for i, mode in enumerate(dict.fromkeys([*args.modes, default_cfg.mode])):
        src = SimulatorSource(world, contexts, args.control_envs, mode, k - 1, device, args.seed + i,
                              record_latents=True)
        frames, actions = collect_control(src, args.control_steps, args.hold, num_actions, rng)
        rep, feats = control_scores(idm, frames, actions, src.latency, max_lag)
        rep["latent"] = latent_control_scores(lidm, src.latents, actions, src.latency, max_lag)
        if mode in args.modes:
            control["modes"][mode] = rep
            log(f"[eval] control {mode}: latent IDM {rep['latent']['accuracy']:.3f} "
                f"(by lag {[round(a, 3) for a in rep['latent']['by_lag']]}), pixel IDM {rep['accuracy']:.3f} "
                f"(latency {rep['latency']}, by lag {[round(a, 3) for a in rep['by_lag']]})")
        if mode == default_cfg.mode:
            gen_feats = feats
            gen = frames[:, k - 1 :].reshape(-1, *frames.shape[2:])  # (B*T, H, W, 3) without the decoded history
            fidelity["off_palette"]["generated"] = M.off_palette(gen, palette, rows, palette_ignore(world))
    n_fd = min(len(gen_feats), len(recon_feats))
    floor_rows = rng.choice(len(recon_feats), size=n_fd, replace=False)
    fidelity["frechet"] = {
        "generated": M.frechet_distance(gen_feats[:n_fd], real_feats),
        "vae_recon_floor": M.frechet_distance(recon_feats[floor_rows], real_feats),
        "n": n_fd,
        "n_real": len(real_feats),
        "mode": default_cfg.mode,
    }
    log(f"[eval] Fréchet distance generated {fidelity['frechet']['generated']:.2f} "
        f"(VAE floor {fidelity['frechet']['vae_recon_floor']:.2f})")
    lap("control", t0)

    # ---- domain-randomised start contexts
    if args.dr_data is not None:
        t0 = time.perf_counter()
        dr_eps = [ep for ep in E.list_episodes(args.dr_data) if E.read_meta(ep).get("labelled")]
        if not dr_eps:
            raise UsageError(f"--dr-data {str(args.dr_data)!r} holds no labelled episodes")
        check_actions(dr_eps, world.action_names, "--dr-data")
        dr_budget = max(args.segment_len, args.heldout_frames // 2)
        dr = read_segments(dr_eps, dr_budget, args.segment_len, args.min_frame)
        encode_segments(dr, world.vae)
        dr_pred, _, dr_labels = dr.idm_predictions(idm, "frames")
        results_idm["real_dr"] = M.accuracy_report(dr_pred, dr_labels, num_actions)
        results_idm["latent"]["real_dr"] = segment_latent_accuracy(lidm, dr)
        fidelity["vae_psnr_dr"] = M.psnr(dr.recon, dr.frames)
        dr_ctx, _ = context_windows(dr, default_cfg.context, 4 * args.control_envs, rng)
        src = SimulatorSource(world, dr_ctx, args.control_envs, default_cfg.mode, k - 1, device,
                              args.seed + 100, record_latents=True)
        frames, actions = collect_control(src, args.control_steps, args.hold, num_actions, rng)
        control["dr"], _ = control_scores(idm, frames, actions, src.latency, max_lag)
        control["dr"]["latent"] = latent_control_scores(lidm, src.latents, actions, src.latency, max_lag)
        control["dr"]["mode"] = default_cfg.mode
        log(f"[eval] DR: IDM on real {results_idm['real_dr']['accuracy']:.3f}, generated "
            f"{control['dr']['accuracy']:.3f}; latent IDM on real {results_idm['latent']['real_dr']['accuracy']:.3f}, "
            f"generated {control['dr']['latent']['accuracy']:.3f}")
        lap("dr", t0)

    # ---- drift
    t0 = time.perf_counter()
    edges = tuple(e for e in args.bucket_edges if e < args.horizon) + (args.horizon,)
    acc = M.DriftAccumulator(real_feats, seg.frames.reshape(-1, *seg.frames.shape[2:]), edges)
    src = SimulatorSource(world, contexts, args.drift_envs, default_cfg.mode, k - 1, device, args.seed + 200)
    drift = run_drift(src, idm, acc, args.horizon, args.drift_samples, args.hold, num_actions, rng,
                      args.drift_budget_s)
    drift["mode"] = default_cfg.mode
    log(f"[eval] drift to {drift['horizon_reached']} steps: " + "; ".join(
        f"[{r['start']},{r['end']}) FD {r['frechet']:.2f} hist {r['hist_distance']:.3f} "
        f"brightness gap {r['brightness_gap']:+.1f}" for r in drift["buckets"]))
    lap("drift", t0)

    # ---- closed loop: the pixel road follower in the world and in the real game
    loop: dict = {}
    if args.loop_steps > 0:
        t0 = time.perf_counter()
        loop = closed_loop(world, contexts, default_cfg.mode, args.loop_envs, args.loop_steps, args.seed, device,
                           world.meta.get("env_id"), palette)
        if "world" in loop:
            real = loop["real"].get("on_road")
            log(f"[eval] closed loop ({args.loop_steps} steps): on road "
                + " ".join(f"{q['mean']:.2f}" for q in loop["world"]["on_road_by_quarter"])
                + f" by quarter (real game {real if real is None else round(real, 3)})")
        lap("closed_loop", t0)

    # ---- speed
    t0 = time.perf_counter()
    speed = measure_speed(world, tuple(args.modes), args.speed_steps, args.speed_envs, device)
    lap("speed", t0)

    timings["total"] = time.perf_counter() - t_start
    results = {
        "command": command or ["matrix-world", "eval"],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "processor": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "dr_data": str(args.dr_data) if args.dr_data else None,
        "args": dataclasses.asdict(args),
        "num_actions": num_actions,
        "action_names": list(world.action_names),
        "sampler": dataclasses.asdict(default_cfg),
        "split": {"train_episodes": len(train_eps), "heldout_episodes": len(held_eps),
                  "heldout_segments": len(seg.names), "segment_len": int(seg.frames.shape[1])},
        "idm": results_idm,
        "control": control,
        "fidelity": fidelity,
        "heads": heads,
        "drift": drift,
        "closed_loop": loop,
        "speed": speed,
        "timings_s": timings,
    }
    results = jsonable(results)
    plots = write_plots(out, results, list(world.action_names), scatter)
    results["plots"] = plots
    E.write_json_atomic(out / "metrics.json", results)
    (out / "summary.md").write_text(summary_markdown(results))
    log(f"[eval] wrote {out / 'metrics.json'}, {out / 'summary.md'}, {', '.join(plots)} "
        f"in {timings['total']:.0f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    """``matrix-world eval``: parse Args and run the suite."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world eval", description=__doc__.split("\n\n")[0])
    evaluate(args, ["matrix-world", "eval", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
