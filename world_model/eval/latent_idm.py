"""Latent inverse-dynamics model: which action turned latent frame k-1 into latent frame k.

The pixel IDM (``world_model.eval.idm``) reads cues the VAE decoder blurs away, so on decoded
frames — real reconstructions included — it sits near chance and cannot tell a world that obeys
its controls from one that does not. This IDM works where the world model works: on the VAE's
normalised latents. It is trained on the latent cache of the real *training* episodes and scored on
real held-out latents (the ceiling) and on the latents the simulator emits (no decode), so the
same network judges real and generated transitions in the same space.

Input: a stack of ``K = cfg.frames`` consecutive latents ``z[k-K+1 .. k]`` (C, h, w each); label:
``actions[k]`` (the data format's alignment). The net sees the newest latent and the K-1
differences. ``cfg.hud_rows`` bottom latent rows are cut off: CarRacing draws its steering / gas
bars there, and an IDM reading them would score the dashboard rather than the road.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from world_model.errors import UsageError
from world_model.eval.idm import balanced_rows, index_transitions


@dataclass
class LatentIDMConfig:
    """Latent inverse-dynamics network hyper-parameters."""

    num_actions: int = 9
    """A, number of action classes."""
    frames: int = 3
    """K, latent frames per input stack (2 = a pair; 3 also sees the velocity before the action)."""
    latent_channels: int = 8
    """C of the latents."""
    latent_hw: tuple[int, int] = (9, 16)
    """(h, w) of the latents."""
    hud_rows: int = 1
    """Bottom latent rows ignored (CarRacing's dashboard; 0 for other envs)."""
    width: int = 96
    """Channels of the convolutions."""
    encoder_fingerprint: str | None = None
    """:meth:`FrameVAE.encoder_fingerprint` of the VAE whose latents it was trained on; the eval suite
    refuses to reuse it with another encoder (None: saved before this field, not checked)."""

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"latent IDM frames must be >= 2 (a transition), got {self.frames}")
        if not 0 <= self.hud_rows < self.latent_hw[0]:
            raise ValueError(f"hud_rows must be in [0, {self.latent_hw[0]}), got {self.hud_rows}")
        fp = self.encoder_fingerprint
        if fp is not None and not (isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp)):
            raise ValueError(f"encoder_fingerprint must be None or 64 hex digits, got {fp!r}")


class LatentIDM(nn.Module):
    """Small CNN over latent stacks: (B, K, C, h, w) -> action logits (B, A)."""

    def __init__(self, cfg: LatentIDMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(cfg.frames * cfg.latent_channels, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d((2, 2)),  # keeps coarse left/right layout
            nn.Flatten(),
            nn.Linear(4 * w, w),
            nn.SiLU(),
            nn.Linear(w, cfg.num_actions),
        )

    def prepare(self, stacks: torch.Tensor) -> torch.Tensor:
        """(B, K, C, h, w) latents -> (B, K*C, h - hud_rows, w): newest latent, then the K-1 differences."""
        x = stacks.float()
        if self.cfg.hud_rows:
            x = x[..., : -self.cfg.hud_rows, :]
        diffs = x[:, 1:] - x[:, :-1]  # (B, K-1, C, h', w)
        return torch.cat([x[:, -1:], diffs], dim=1).flatten(1, 2)

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        """Action logits of latent stacks (B, K, C, h, w) -> (B, A)."""
        return self.net(self.prepare(stacks))


def latent_stacks(latents: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """All K-stacks of a latent sequence: (T, C, h, w) -> (T-K+1, K, C, h, w) (a view for arrays)."""
    arr = latents.cpu().numpy() if isinstance(latents, torch.Tensor) else latents
    return np.moveaxis(sliding_window_view(arr, k, axis=0), -1, 1)


class LatentTransitions:
    """Labelled latent transitions ``(z[k-K+1..k], actions[k])`` of whole sequences (e.g. episodes)."""

    def __init__(self, latents: list[np.ndarray], actions: list[np.ndarray], frames: int, num_actions: int) -> None:
        """Index every labelled transition with K latents of history.

        Args:
            latents: per sequence, (S_i, C, h, w) latents (array or memory map).
            actions: per sequence, (S_i,) int action ids, -1 = unknown (``actions[k]`` produced frame k).
            frames: K.
            num_actions: A (action ids must be below it).
        """
        for e, (lat, acts) in enumerate(zip(latents, actions, strict=True)):
            if len(acts) != len(lat):
                raise UsageError(f"sequence {e}: {len(lat)} latents but {len(acts)} actions")
        self.k = frames
        self.latents = latents
        # index (N, 2): sequence, k; labels (N,)
        self.index, self.labels, self.by_class = index_transitions(
            actions, frames, num_actions, [f"sequence {e}" for e in range(len(actions))]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def stacks(self, rows: np.ndarray) -> np.ndarray:
        """float32 stacks (len(rows), K, C, h, w) of the given transition rows."""
        return np.stack(
            [np.asarray(self.latents[e][k - self.k + 1 : k + 1], np.float32) for e, k in self.index[rows]]
        )

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Class-balanced random batch: (stacks (B, K, C, h, w), labels (B,))."""
        rows = balanced_rows(self.by_class, batch, rng)
        return self.stacks(rows), self.labels[rows]


def train_latent_idm(
    cfg: LatentIDMConfig,
    sample: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]],
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[LatentIDM, dict]:
    """Train a latent IDM (AdamW, short warmup, cosine decay) from a batch sampler.

    Returns:
        ``(model in eval mode, {"steps", "seconds", "final_train_accuracy"})``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = LatentIDM(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0, accs = time.perf_counter(), []
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + np.cos(np.pi * step / steps))
        stacks, labels = sample(batch_size, rng)
        logits = model(torch.from_numpy(stacks).to(device))
        y = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        accs.append(float((logits.argmax(-1) == y).float().mean()))
        if (step + 1) % 250 == 0:
            log(f"  latent idm step {step + 1}/{steps}: acc {np.mean(accs[-50:]):.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval().requires_grad_(False)
    return model, {
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "final_train_accuracy": float(np.mean(accs[-50:])) if accs else float("nan"),
    }


@torch.no_grad()
def predict_latent(model: LatentIDM, stacks: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted action ids (N,) of latent stacks (N, K, C, h, w)."""
    device = next(model.parameters()).device
    out = [
        model(torch.from_numpy(np.ascontiguousarray(stacks[i : i + batch_size], np.float32)).to(device))
        .argmax(-1)
        .cpu()
        .numpy()
        for i in range(0, len(stacks), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def save_latent_idm(directory: Path, model: LatentIDM) -> None:
    """Write ``latent_idm.safetensors`` + config (reload with :func:`load_latent_idm`)."""
    from world_model.checkpoint import save_module

    save_module(directory, "latent_idm", model, model.cfg)


def load_latent_idm(directory: Path, device: torch.device | str = "cpu") -> LatentIDM:
    """Load a latent IDM written by :func:`save_latent_idm` (eval mode, no grad)."""
    from world_model.checkpoint import load_module

    return load_module(directory, "latent_idm", LatentIDM, LatentIDMConfig, device).eval().requires_grad_(False)
