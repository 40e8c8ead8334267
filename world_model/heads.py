"""Reward and termination heads on clean latents (DESIGN.md §4 "Reward and termination").

A transition is (z_prev, z_next, control): the previous and the new clean latent frame and the
pooled embedding of the action that produced ``z_next``. One small conv trunk reads
``[z_prev, z_next, z_next - z_prev]`` (the difference makes motion / track progress explicit),
global-average-pools it, and an MLP with the control embedding predicts the reward and a
termination logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Huber transition point for the reward loss: CarRacing rewards are ~ -0.1 per frame and
# +1000/N per new tile (~ +3); a delta of 1 keeps the rare large rewards from dominating.
REWARD_HUBER_DELTA = 1.0


@dataclass
class HeadsConfig:
    """Reward / termination head hyper-parameters."""

    latent_channels: int = 8
    """C, channels of the normalised VAE latent."""
    latent_hw: tuple[int, int] = (9, 16)
    """(H, W) of the latent (the trunk is convolutional + pooled; used for shape checks)."""
    text_dim: int = 384
    """Dt, width of the pooled control embedding."""
    hidden: int = 128
    """Width of the trunk's last layer and of the MLP."""
    term_threshold: float = 0.0
    """Termination logit above which a transition ends the episode (``build-world
    --term-threshold``). Trained with BCE class weight ``pos_weight`` on the rare positives, the
    logit of a calibrated head would be the true log-odds + log(pos_weight), which suggests that
    offset as threshold; measured on the shipped world it catches no termination (the head, trained
    on ~20 terminal windows, is not calibrated), while 0 catches all of them with no false ones on
    held-out driving (README). Default 0."""
    terminal_reward: float | None = None
    """Reward of a transition the termination head ends, in place of the reward head's prediction
    there (``build-world --terminal-reward``; default: the recorded reward of the training data's
    terminal transitions). CarRacing gives -100 for leaving the playfield; the Huber-trained reward
    head cannot regress that rare value (it predicts about -1.5 on recorded exits), so without this
    an imagined exit would cost ~1/70 of a real one. None: the head's prediction."""

    def __post_init__(self) -> None:
        r = self.terminal_reward
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r)):
            raise ValueError(f"terminal_reward must be None or a finite number, got {r!r}")


class RewardTerminationHeads(nn.Module):
    """Predict reward and termination logit of a latent transition under an action."""

    def __init__(self, cfg: HeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, hid = cfg.latent_channels, cfg.hidden
        self.trunk = nn.Sequential(
            nn.Conv2d(3 * c, hid // 2, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hid // 2, hid, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(hid, hid, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.ctrl = nn.Linear(cfg.text_dim, hid)
        self.mlp = nn.Sequential(nn.Linear(2 * hid, hid), nn.SiLU(), nn.Linear(hid, 2))

    def forward(
        self, z_prev: torch.Tensor, z_next: torch.Tensor, ctrl_pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict reward and termination.

        Args:
            z_prev: (B, C, H, W) previous clean latent.
            z_next: (B, C, H, W) new clean latent.
            ctrl_pooled: (B, Dt) pooled control embedding of the action taken.

        Returns:
            ``(reward, term_logit)``, each (B,).
        """
        feats = self.trunk(torch.cat([z_prev, z_next, z_next - z_prev], dim=1))  # (B, hidden)
        h = torch.cat([feats, self.ctrl(ctrl_pooled)], dim=-1)  # (B, 2*hidden)
        reward, term_logit = self.mlp(h).unbind(dim=-1)  # 2 x (B,)
        return reward, term_logit

    @staticmethod
    def loss(
        reward_pred: torch.Tensor,
        term_logit: torch.Tensor,
        reward: torch.Tensor,
        terminated: torch.Tensor,
        pos_weight: float | torch.Tensor = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Huber loss on the reward plus class-balanced BCE on terminations.

        Args:
            reward_pred: (B,) predicted reward.
            term_logit: (B,) predicted termination logit.
            reward: (B,) recorded reward.
            terminated: (B,) recorded termination (bool or 0/1).
            pos_weight: weight of positive (terminal) samples, typically #negatives / #positives
                since terminations are rare.

        Returns:
            dict with ``loss`` (sum), ``reward_loss`` and ``term_loss`` (scalars).
        """
        reward_loss = F.huber_loss(reward_pred, reward.to(reward_pred.dtype), delta=REWARD_HUBER_DELTA)
        pw = torch.as_tensor(pos_weight, dtype=term_logit.dtype, device=term_logit.device)
        term_loss = F.binary_cross_entropy_with_logits(
            term_logit, terminated.to(term_logit.dtype), pos_weight=pw
        )
        return {"loss": reward_loss + term_loss, "reward_loss": reward_loss, "term_loss": term_loss}

