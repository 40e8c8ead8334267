"""SB3 feature extractors for MatrixWorld observations.

Pixel observations use SB3's ``NatureCNN`` (``CnnPolicy``). Latent observations
(``obs_type="latent"``, (C, h, w) float32, e.g. (8, 9, 16)) are already a compact, normalised
image: a small conv net without aggressive striding keeps their spatial detail. Pass it through
``policy_kwargs``::

    PPO("MlpPolicy", venv, policy_kwargs={"features_extractor_class": LatentCNN})
"""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class LatentCNN(BaseFeaturesExtractor):
    """Conv features of (C, h, w) latent observations: two 3x3 convs (the second stride 2) + linear."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 256, width: int = 64) -> None:
        """Build the network for ``observation_space`` (shape (C, h, w)).

        Args:
            observation_space: the latent Box space.
            features_dim: output width.
            width: channels of the conv layers.
        """
        if len(observation_space.shape) != 3:
            raise ValueError(f"LatentCNN needs (C, h, w) observations, got shape {observation_space.shape}")
        super().__init__(observation_space, features_dim)
        c = observation_space.shape[0]
        self.cnn = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(n_flat, features_dim), nn.SiLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, features_dim)."""
        return self.linear(self.cnn(observations))
