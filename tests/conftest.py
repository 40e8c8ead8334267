"""Shared fixtures: a tiny, randomly initialised world-model checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TEXT_DIM = 16  # random control tables (no text encoder in the fast tests)
TINY_TOKENS = 4
TINY_STARTS = 3  # recorded start contexts
TINY_START_FRAMES = 4
TINY_SAMPLER = {"context": 2, "groups": 2, "steps_per_shift": 1, "mode": "pipelined"}
# Termination-logit bias of the random heads: its logits are ~0.01, so -10 means "never terminates";
# tests that need terminations build a world with a positive bias (always terminates).
TINY_TERM_BIAS = -10.0


def build_tiny_world(seed: int = 0):
    """A random tiny :class:`~world_model.checkpoint.WorldModel` whose actions matter.

    Freshly initialised DiTs output zeros (adaLN-Zero) and ignore controls (zero gates), which
    would make every action test vacuous: the zero-initialised layers get small random weights
    and the interactive gates are opened (1.0) instead.
    """
    import torch
    import torch.nn.functional as F

    from world_model.actions import DRIVING_ACTIONS, DRIVING_SENTENCES, control_sentences
    from world_model.checkpoint import WorldModel
    from world_model.dit import DiTConfig, VideoDiT
    from world_model.heads import HeadsConfig, RewardTerminationHeads
    from world_model.vae import VAE_PRESETS, FrameVAE

    torch.manual_seed(seed)
    vae = FrameVAE(VAE_PRESETS["tiny"])
    c, hw = vae.cfg.latent_channels, vae.cfg.latent_hw
    dit = VideoDiT(
        DiTConfig(
            latent_channels=c, latent_hw=hw, dim=32, depth=2, heads=2, max_frames=8, text_dim=TINY_TEXT_DIM
        )
    )
    heads = RewardTerminationHeads(
        HeadsConfig(latent_channels=c, latent_hw=hw, text_dim=TINY_TEXT_DIM, hidden=16)
    )
    with torch.no_grad():
        for module in (vae, dit):
            for p in module.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0.0, 0.05)
        for gate in dit.gates():
            gate.fill_(1.0)
        heads.mlp[-1].bias[1] = TINY_TERM_BIAS
    num_rows = len(DRIVING_ACTIONS) + 1
    tokens = torch.randn(num_rows, TINY_TOKENS, TINY_TEXT_DIM)
    mask = torch.ones(num_rows, TINY_TOKENS, dtype=torch.bool)
    mask[-1, -1] = False  # one padded token, as real tokenizers produce
    tokens = tokens * mask[..., None]
    pooled = F.normalize(tokens.sum(1) / mask.sum(1, keepdim=True), dim=-1)
    return WorldModel(
        vae=vae.eval(),
        dit=dit.eval(),
        heads=heads.eval(),
        control_tokens=tokens,
        control_mask=mask,
        control_pooled=pooled,
        action_names=list(DRIVING_ACTIONS),
        sentences=control_sentences(DRIVING_SENTENCES),
        start_latents=torch.randn(TINY_STARTS, TINY_START_FRAMES, c, *hw),
        sampler=dict(TINY_SAMPLER),
        meta={"fps": 15, "note": "random tiny test world"},
    )


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a saved random tiny world-model checkpoint (built once per test session)."""
    from world_model.checkpoint import save_world

    directory = tmp_path_factory.mktemp("worlds") / "tiny"
    save_world(directory, build_tiny_world(), recipe={"command": "tests/conftest.py:build_tiny_world"})
    return directory


@pytest.fixture(scope="session")
def tiny_obs_world_dir(tiny_world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world with a random observation decoder (``train-obs-decoder``'s module), saved once."""
    import torch

    from world_model.checkpoint import load_world, save_world
    from world_model.vae import ObsDecoder, ObsDecoderConfig

    world = load_world(tiny_world_dir)
    torch.manual_seed(1)
    dec = ObsDecoder(ObsDecoderConfig(latent_channels=world.vae.cfg.latent_channels, channels=(4, 4, 4)))
    dec.latent_shift.copy_(world.vae.latent_shift)
    dec.latent_scale.copy_(world.vae.latent_scale)
    world.obs_decoder = dec.eval().requires_grad_(False)
    directory = tmp_path_factory.mktemp("worlds") / "tiny_obs"
    save_world(directory, world, recipe={"command": "tests/conftest.py:tiny_obs_world_dir"})
    return directory
