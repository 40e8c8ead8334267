"""Reward and termination heads on clean latents (DESIGN.md §4 "Reward and termination").

A transition is (z_prev, z_next, control): the previous and the new clean latent frame and the
pooled embedding of the action that produced ``z_next``. One small conv trunk reads
``[z_prev, z_next, z_next - z_prev]`` (the difference makes motion / track progress explicit),
global-average-pools it, and an MLP with the control embedding predicts the reward and a
termination logit.

An optional hazard head (``HeadsConfig.hazard_horizon`` H > 0; its own trunk and MLP on the same
frames, without the action unless ``hazard_action``; trained by ``matrix-world train-hazard`` with
the rest of the world frozen) predicts the log-odds that the episode ends within the next H
transitions, this one included. It is calibrated (plain BCE, no class weight), so it carries what
the frames cannot show: a car crossing uniform grass will reach the playfield's edge, but no frame
says when (docs/EXPERIMENTS.md, "Four times the exits"). With ``termination="hazard"`` the
simulator ends a stream with the per-step probability :func:`per_step_hazard` derives from it,
besides the thresholded termination logit.

A recurrent hazard head (``HeadsConfig.hazard_memory`` M > 0) adds a one-layer GRU over the hazard
trunk's per-transition features: its (B, M) state is the stream's memory of what the car has driven
through (how long it has been on open grass, which one frame does not show), kept per stream by the
simulator (``SwinDPMState.memory``), zeroed on reset and carried by ``get_state`` / ``set_state``.
It is read through :meth:`RewardTerminationHeads.hazard_step`, one transition at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Huber transition point for the reward loss: CarRacing rewards are ~ -0.1 per frame and
# +1000/N per new tile (~ +3); a delta of 1 keeps the rare large rewards from dominating.
REWARD_HUBER_DELTA = 1.0
TERMINATIONS = ("threshold", "hazard")


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

    hazard_horizon: int = 0
    """H: the hazard head predicts the log-odds that the episode ends within the next H transitions
    (this one included). 0: no hazard head (the heads then have exactly the reward and termination
    outputs, as every world before it)."""
    hazard_action: bool = False
    """The hazard head also reads the action's control embedding. Off by default: one action barely
    moves where the car is H steps later, but in recorded data it identifies the recording policy
    (the exit policy's "D" and coasting turns), which the head then learns instead of the scene
    (docs/EXPERIMENTS.md, "A hazard head")."""
    hazard_memory: int = 0
    """M: width of a recurrent hazard head's state (a GRU over the hazard trunk's per-transition features,
    one state per stream; :meth:`RewardTerminationHeads.hazard_step`). 0: the hazard reads the transition
    alone."""
    termination: Literal["threshold", "hazard"] = "threshold"
    """How a step ends an episode. "threshold": the termination logit exceeds ``term_threshold``.
    "hazard": that, or a draw from the stream's random stream with the hazard head's per-step
    probability (:func:`per_step_hazard`; needs ``hazard_horizon`` > 0)."""

    def __post_init__(self) -> None:
        h = self.hazard_horizon
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"hazard_horizon must be an int >= 0 (0: no hazard head), got {h!r}")
        m = self.hazard_memory
        if isinstance(m, bool) or not isinstance(m, int) or m < 0 or (m > 0 and h == 0):
            raise ValueError(f"hazard_memory must be an int >= 0, and 0 without a hazard head (hazard_horizon 0), "
                             f"got {m!r} with hazard_horizon {h!r}")
        if not isinstance(self.hazard_action, bool):
            raise ValueError(f"hazard_action must be a bool, got {self.hazard_action!r}")
        if self.termination not in TERMINATIONS:
            raise ValueError(f"termination must be one of {TERMINATIONS}, got {self.termination!r}")
        if self.termination == "hazard" and h == 0:
            raise ValueError("termination='hazard' needs a hazard head (hazard_horizon > 0; matrix-world train-hazard)")
        r = self.terminal_reward
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r)):
            raise ValueError(f"terminal_reward must be None or a finite number, got {r!r}")


def per_step_hazard(hazard_logit: torch.Tensor, horizon: int) -> torch.Tensor:
    """Per-step ending probability h from the log-odds of ending within ``horizon`` steps.

    A constant hazard h over H steps ends the episode within them with probability
    q = 1 - (1 - h)^H, so h = 1 - (1 - q)^(1/H) = -expm1(log(1 - q) / H), with
    log(1 - q) = logsigmoid(-logit) (exact for large logits; -inf logits give 0).

    Args:
        hazard_logit: (B,) log-odds of ending within ``horizon`` steps.
        horizon: H >= 1.

    Returns:
        (B,) probabilities in [0, 1].
    """
    return -torch.expm1(F.logsigmoid(-hazard_logit) / horizon)


def _trunk(c: int, hid: int) -> nn.Sequential:
    """Conv trunk: (B, 3C, H, W) -> (B, hid), global-average-pooled."""
    return nn.Sequential(
        nn.Conv2d(3 * c, hid // 2, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(hid // 2, hid, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(hid, hid, 3, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class RewardTerminationHeads(nn.Module):
    """Predict reward, termination logit and (optionally) hazard logit of a latent transition under an action."""

    def __init__(self, cfg: HeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, hid = cfg.latent_channels, cfg.hidden
        self.trunk = _trunk(c, hid)
        self.ctrl = nn.Linear(cfg.text_dim, hid)
        self.mlp = nn.Sequential(nn.Linear(2 * hid, hid), nn.SiLU(), nn.Linear(hid, 2))
        self.hazard: nn.ModuleDict | None = None
        if cfg.hazard_horizon > 0:  # its own weights: training it leaves reward and termination untouched
            feat = 2 * hid if cfg.hazard_action else hid  # per-transition features
            self.hazard = nn.ModuleDict({
                "trunk": _trunk(c, hid),
                "mlp": nn.Sequential(nn.Linear(feat + cfg.hazard_memory, hid), nn.SiLU(), nn.Linear(hid, 1)),
            })
            if cfg.hazard_action:
                self.hazard["ctrl"] = nn.Linear(cfg.text_dim, hid)
            if cfg.hazard_memory > 0:
                self.hazard["gru"] = nn.GRU(feat, cfg.hazard_memory, batch_first=True)

    @staticmethod
    def transition(z_prev: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """(B, 3C, H, W) the trunks' input ``[z_prev, z_next, z_next - z_prev]`` of (B, C, H, W) latents."""
        return torch.cat([z_prev, z_next, z_next - z_prev], dim=1)

    def forward(
        self, z_prev: torch.Tensor, z_next: torch.Tensor, ctrl_pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict reward and termination of a transition (the hazard: :meth:`hazard_logit`,
        :meth:`hazard_step`, from the same :meth:`transition`).

        Args:
            z_prev: (B, C, H, W) previous clean latent.
            z_next: (B, C, H, W) new clean latent.
            ctrl_pooled: (B, Dt) pooled control embedding of the action taken.

        Returns:
            ``(reward, term_logit)``: (B,) each.
        """
        return self.reward_termination(self.transition(z_prev, z_next), ctrl_pooled)

    def reward_termination(self, x: torch.Tensor, ctrl_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) reward and (B,) termination logit from the trunks' input x (B, 3C, H, W) and the (B, Dt)
        pooled control embedding."""
        h = torch.cat([self.trunk(x), self.ctrl(ctrl_pooled)], dim=-1)  # (B, 2*hidden)
        reward, term_logit = self.mlp(h).unbind(dim=-1)  # 2 x (B,)
        return reward, term_logit

    def hazard_features(self, x: torch.Tensor, ctrl_pooled: torch.Tensor) -> torch.Tensor:
        """(B, F) the hazard head's per-transition features of x (B, 3C, H, W) (:meth:`transition`) and the
        (B, Dt) pooled control embedding (read only with ``cfg.hazard_action``)."""
        if self.hazard is None:
            raise ValueError("these heads have no hazard head (HeadsConfig.hazard_horizon = 0)")
        hz = self.hazard
        f = hz["trunk"](x)  # (B, hidden)
        if self.cfg.hazard_action:
            f = torch.cat([f, hz["ctrl"](ctrl_pooled)], dim=-1)  # (B, 2*hidden)
        return f

    def hazard_logit(self, x: torch.Tensor, ctrl_pooled: torch.Tensor) -> torch.Tensor:
        """(B,) hazard log-odds of a per-transition hazard head (no memory) from the trunks' input x
        (B, 3C, H, W) and the (B, Dt) pooled control embedding; a recurrent head needs :meth:`hazard_step`."""
        if self.cfg.hazard_memory > 0:
            raise ValueError("a recurrent hazard head (hazard_memory > 0) reads the stream's memory: use hazard_step")
        f = self.hazard_features(x, ctrl_pooled)  # (B, F)
        return self.hazard["mlp"](f)[:, 0]  # (B,)

    def hazard_step(
        self, x: torch.Tensor, ctrl_pooled: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One transition of every stream: (B,) hazard log-odds and the (B, M) new memory.

        Args:
            x: (B, 3C, H, W) the trunks' input (:meth:`transition`).
            ctrl_pooled: (B, Dt) pooled control embedding (read only with ``cfg.hazard_action``).
            memory: (B, M) the streams' memory before this transition (zeros at an episode's start);
                M = 0 for a per-transition head, returned as it is.
        """
        f = self.hazard_features(x, ctrl_pooled)  # (B, F)
        if self.cfg.hazard_memory > 0:
            _, h = self.hazard["gru"](f[:, None], memory[None].contiguous())  # (1, B, M)
            memory = h[0]  # (B, M)
            f = torch.cat([f, memory], dim=-1)  # (B, F + M)
        return self.hazard["mlp"](f)[:, 0], memory

    def hazard_sequence(self, feats: torch.Tensor) -> torch.Tensor:
        """(E, T) hazard log-odds of E episodes' transitions from their (E, T, F) features
        (:meth:`hazard_features`), the memory starting at zero: what :meth:`hazard_step` gives one step at a
        time (training and the calibration report; padding at an episode's end does not change its earlier logits)."""
        if self.cfg.hazard_memory > 0:
            mem, _ = self.hazard["gru"](feats)  # (E, T, M)
            feats = torch.cat([feats, mem], dim=-1)  # (E, T, F + M)
        return self.hazard["mlp"](feats)[..., 0]  # (E, T)

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

