"""Reward / termination heads: shapes, loss, backward."""

import torch

from world_model.heads import HeadsConfig, RewardTerminationHeads


def test_heads_shapes_loss_backward() -> None:
    torch.manual_seed(0)
    cfg = HeadsConfig(latent_channels=4, latent_hw=(9, 16), text_dim=12, hidden=16)
    heads = RewardTerminationHeads(cfg)
    z_prev, z_next = torch.randn(2, 3, 4, 9, 16).unbind(0)[:2]
    ctrl = torch.randn(3, 12)
    reward, term = heads(z_prev, z_next, ctrl)
    assert reward.shape == term.shape == (3,)
    losses = heads.loss(reward, term, torch.tensor([0.1, -0.1, 3.0]), torch.tensor([False, True, False]), 5.0)
    assert set(losses) == {"loss", "reward_loss", "term_loss"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in heads.parameters())


def test_pos_weight_upweights_terminations() -> None:
    logit = torch.zeros(2)
    term = torch.tensor([True, False])
    zero = torch.zeros(2)
    base = RewardTerminationHeads.loss(zero, logit, zero, term, 1.0)["term_loss"]
    weighted = RewardTerminationHeads.loss(zero, logit, zero, term, 9.0)["term_loss"]
    assert weighted > base
    assert RewardTerminationHeads.loss(zero, logit, zero, term)["reward_loss"] == 0
