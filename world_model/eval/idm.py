"""Inverse-dynamics model (IDM): which action turned frame k-1 into frame k.

The control metric of DESIGN.md §7: an IDM trained on real recorded, labelled transitions labels
generated ones; its accuracy on generated rollouts (against the actions the world model was given)
says how well the world model obeys its controls, beside the IDM's accuracy on real held-out
transitions (the ceiling) and chance. Its penultimate layer is also the fixed feature network of
the suite's Fréchet distances (features of short frame stacks, so they see both appearance and
motion).

Input: a stack of ``K = cfg.frames`` consecutive 72x128 frames ``frames[k-K+1 .. k]`` (uint8,
channels last); label: ``actions[k]``, the action that produced ``frames[k]`` (the data format's
alignment). ``K = 3`` (default) lets the net see the velocity before and after the action, which
separates drive / coast / brake; ``K = 2`` is the plain pair. The net reads the newest frame and the
K-1 frame differences, so motion is explicit rather than learned from scratch.

Training augments half the batches' samples with a 2x blur (average-pool + bilinear upsample):
generated frames come out of the VAE decoder, which is blurrier than the recorder; the blur keeps the
IDM from reading "sharp" as a cue. Sampling is class-balanced by default, so the IDM's prior matches
the uniformly random actions of the generated rollouts rather than the recording policy's mix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from world_model.data import episodes as E
from world_model.errors import UsageError


@dataclass
class IDMConfig:
    """Inverse-dynamics network hyper-parameters."""

    num_actions: int = 9
    """A, number of action classes."""
    frames: int = 3
    """K, frames per input stack (2 = a pair; 3 also sees the velocity before the action)."""
    in_hw: tuple[int, int] = E.TRAIN_HW
    """(H, W) of the input frames."""
    channels: tuple[int, ...] = (16, 32, 64, 64)
    """Widths of the stride-2 convolutions (each halves H and W)."""
    feature_dim: int = 64
    """D, width of the penultimate layer (the Fréchet-distance features)."""

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"IDM frames must be >= 2 (a transition), got {self.frames}")
        if self.num_actions < 2:
            raise ValueError(f"IDM num_actions must be >= 2, got {self.num_actions}")


IDM_PRESETS: dict[str, IDMConfig] = {
    "tiny": IDMConfig(channels=(8, 16, 16), feature_dim=32),
    "default": IDMConfig(),
}


@dataclass
class IDMTrainConfig:
    """IDM training settings."""

    steps: int = 600
    """Optimiser steps (~0.2-0.4 s each for the default net and batch on a 2-core CPU)."""
    batch_size: int = 64
    """Transitions per step."""
    lr: float = 2e-3
    """AdamW learning rate (constant after a short warmup)."""
    warmup: int = 50
    """Linear warmup steps."""
    blur_prob: float = 0.5
    """Fraction of training samples blurred 2x (mimics VAE-decoded frames)."""
    balanced: bool = True
    """Sample every action equally often (the rollouts' actions are uniform)."""
    seed: int = 0
    """Seed of the init, the sampling and the augmentation."""
    log_every: int = 100
    """Print the running loss / accuracy every this many steps (0 = never)."""


def _conv_out(n: int) -> int:
    """Spatial size after a stride-2 convolution with 'same'-style padding."""
    return (n - 1) // 2 + 1


class InverseDynamicsModel(nn.Module):
    """Small CNN: K stacked frames -> action logits, with a penultimate feature layer."""

    def __init__(self, cfg: IDMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        prev = 3 * cfg.frames  # newest frame + K-1 differences
        h, w = cfg.in_hw
        for i, c in enumerate(cfg.channels):
            k = 5 if i == 0 else 3  # a wider first kernel sees a few pixels of motion at full res
            # GroupNorm: measured ~1.5x the held-out accuracy after the same short training
            layers += [nn.Conv2d(prev, c, k, stride=2, padding=k // 2), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            prev, h, w = c, _conv_out(h), _conv_out(w)
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(prev * h * w, cfg.feature_dim), nn.SiLU())
        self.classifier = nn.Linear(cfg.feature_dim, cfg.num_actions)

    @staticmethod
    def prepare(stacks: torch.Tensor) -> torch.Tensor:
        """uint8 stacks (B, K, H, W, 3) -> float input (B, 3K, H, W): newest frame, then differences.

        Frames map to [-1, 1]; difference ``frames[i+1] - frames[i]`` to [-2, 2].
        """
        if stacks.dtype != torch.uint8:
            raise TypeError(f"IDM input must be uint8 frames, got {stacks.dtype}")
        x = stacks.movedim(-1, 2).float().div_(127.5).sub_(1.0)  # (B, K, 3, H, W)
        diffs = x[:, 1:] - x[:, :-1]  # (B, K-1, 3, H, W)
        return torch.cat([x[:, -1:], diffs], dim=1).flatten(1, 2)  # (B, 3K, H, W)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: prepared input (B, 3K, H, W) -> (B, D)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute action logits: prepared input (B, 3K, H, W) -> (B, A)."""
        return self.classifier(self.trunk(x))


def blur2x(x: torch.Tensor) -> torch.Tensor:
    """Halve and restore the resolution of (B, C, H, W) images (average pool, bilinear up)."""
    small = F.avg_pool2d(x, 2, ceil_mode=True)  # (B, C, H/2, W/2)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def sequence_stacks(frames: np.ndarray, k: int) -> np.ndarray:
    """All stacks of k consecutive frames of a sequence, as a view: (T, H, W, 3) -> (T-k+1, k, H, W, 3)."""
    return np.moveaxis(sliding_window_view(frames, k, axis=0), -1, 1)


# ---------------------------------------------------------------------------------------- data
def index_transitions(
    actions: list[np.ndarray], frames: int, num_actions: int, names: list[str]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Every labelled transition with K frames of history, over several sequences.

    Args:
        actions: per sequence, (S_i,) int action ids, -1 = unknown (``actions[k]`` produced frame k).
        frames: K.
        num_actions: A; ids must be below it.
        names: per sequence, how errors name it.

    Returns:
        ``(index (N, 2) rows of (sequence, k), labels (N,), rows of each class)``.
    """
    index, labels = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for e, (acts, name) in enumerate(zip(actions, names, strict=True)):
        acts = np.asarray(acts, np.int64)
        ks = np.nonzero(acts >= 0)[0]
        ks = ks[ks >= frames - 1]
        if len(ks) and acts[ks].max() >= num_actions:
            raise UsageError(f"{name} has action id {acts[ks].max()} >= num_actions={num_actions}")
        index.append(np.stack([np.full(len(ks), e), ks], axis=1))
        labels.append(acts[ks])
    lab = np.concatenate(labels)
    return np.concatenate(index), lab, [np.nonzero(lab == a)[0] for a in range(num_actions)]


def balanced_rows(by_class: list[np.ndarray], batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random rows, every class present equally likely (rows of each class in ``by_class``)."""
    present = [c for c in by_class if len(c)]
    if not present:
        raise UsageError("no labelled transitions to train the inverse-dynamics model on")
    cls = rng.integers(0, len(present), size=batch)
    return np.array([present[c][rng.integers(0, len(present[c]))] for c in cls])


class TransitionSet:
    """Labelled transitions ``(frames[k-K+1..k], actions[k])`` of recorded episodes (memory-mapped).

    Only transitions with a known action (``actions[k] >= 0``) and K frames of history inside the
    episode are kept, so unlabelled footage contributes nothing.
    """

    def __init__(self, episode_dirs: list[Path], frames: int, num_actions: int) -> None:
        self.k = frames
        self.num_actions = num_actions
        arrays = [E.open_episode(ep, mmap=True) for ep in episode_dirs]
        self.frames: list[np.ndarray] = [a["frames"] for a in arrays]
        # index (N, 2): episode, k; labels (N,)
        self.index, self.labels, self.by_class = index_transitions(
            [a["actions"] for a in arrays], frames, num_actions, [f"episode {ep}" for ep in episode_dirs]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def stacks(self, rows: np.ndarray) -> np.ndarray:
        """uint8 stacks (len(rows), K, H, W, 3) of the given transition rows."""
        return np.stack([np.asarray(self.frames[e][k - self.k + 1 : k + 1]) for e, k in self.index[rows]])

    def sample(
        self, batch: int, rng: np.random.Generator, balanced: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw a random batch: (stacks (B, K, H, W, 3) uint8, labels (B,) int64)."""
        if len(self) == 0:
            raise UsageError("no labelled transitions to train the inverse-dynamics model on")
        rows = balanced_rows(self.by_class, batch, rng) if balanced else rng.integers(0, len(self), size=batch)
        return self.stacks(rows), self.labels[rows]


# ------------------------------------------------------------------------------------ training
def train_idm(
    cfg: IDMConfig,
    sample: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]],
    train_cfg: IDMTrainConfig,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[InverseDynamicsModel, dict]:
    """Train an IDM from a batch sampler.

    Args:
        cfg: network config.
        sample: ``sample(batch_size, rng) -> (stacks (B, K, H, W, 3) uint8, labels (B,) int)``.
        train_cfg: optimiser / augmentation settings.
        device: compute device.
        log: progress printer.

    Returns:
        ``(model in eval mode, {"steps", "seconds", "final_loss", "final_train_accuracy"})``.
    """
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    model = InverseDynamicsModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    run_loss, run_acc, n_run = 0.0, 0.0, 0
    loss_val, acc_val = float("nan"), float("nan")
    for step in range(train_cfg.steps):
        for g in opt.param_groups:
            g["lr"] = train_cfg.lr * min(1.0, (step + 1) / max(1, train_cfg.warmup))
        stacks, labels = sample(train_cfg.batch_size, rng)
        x = InverseDynamicsModel.prepare(torch.from_numpy(stacks)).to(device)  # (B, 3K, H, W)
        if train_cfg.blur_prob > 0:
            blur = (torch.rand(len(x), generator=gen) < train_cfg.blur_prob).to(device)  # (B,)
            x = torch.where(blur[:, None, None, None], blur2x(x), x)
        y = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += loss.item()
        run_acc += float((logits.argmax(-1) == y).float().mean())
        n_run += 1
        if (train_cfg.log_every and (step + 1) % train_cfg.log_every == 0) or step + 1 == train_cfg.steps:
            loss_val, acc_val = run_loss / n_run, run_acc / n_run
            if train_cfg.log_every:
                log(f"  idm step {step + 1}/{train_cfg.steps}: loss {loss_val:.3f} acc {acc_val:.3f} "
                    f"({time.perf_counter() - t0:.0f}s)")
            run_loss, run_acc, n_run = 0.0, 0.0, 0
    model.eval().requires_grad_(False)
    return model, {
        "steps": train_cfg.steps,
        "seconds": time.perf_counter() - t0,
        "final_loss": loss_val,
        "final_train_accuracy": acc_val,
    }


@torch.no_grad()
def predict(
    model: InverseDynamicsModel, stacks: np.ndarray, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """IDM predictions and features of uint8 stacks (N, K, H, W, 3) (array or view).

    Returns:
        ``(pred (N,) int64 action ids, features (N, D) float32)``.
    """
    device = next(model.parameters()).device
    preds, feats = [], []
    for i in range(0, len(stacks), batch_size):
        x = InverseDynamicsModel.prepare(torch.from_numpy(np.ascontiguousarray(stacks[i : i + batch_size])))
        f = model.features(x.to(device))  # (b, D)
        preds.append(model.classifier(f).argmax(-1).cpu().numpy())
        feats.append(f.float().cpu().numpy())
    if not preds:
        return np.zeros(0, np.int64), np.zeros((0, model.cfg.feature_dim), np.float32)
    return np.concatenate(preds), np.concatenate(feats)


def save_idm(directory: Path, model: InverseDynamicsModel) -> None:
    """Write ``idm.safetensors`` + ``idm_config.json`` (reload with :func:`load_idm`)."""
    from world_model.checkpoint import save_module

    save_module(directory, "idm", model, model.cfg)


def load_idm(directory: Path, device: torch.device | str = "cpu") -> InverseDynamicsModel:
    """Load an IDM written by :func:`save_idm` (eval mode, no grad)."""
    from world_model.checkpoint import load_module

    return load_module(directory, "idm", InverseDynamicsModel, IDMConfig, device).eval().requires_grad_(False)
