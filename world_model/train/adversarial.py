"""Adversarial loss for the frame decoder: a PatchGAN discriminator and hinge losses.

A pixel loss (L1/MSE) makes the decoder predict the mean of what a latent could be: where the
9x16 latent does not pin an edge or a kerb down to the pixel, the mean is a blur. A discriminator
that judges local patches (pix2pix's PatchGAN; LDM's autoencoder recipe) penalises blur itself,
so the decoder commits to sharp edges and draws the textures the latent implies (kerbs on curves).

Used on the decoder side (``train-vae --freeze-encoder`` or ``--hr-only``), it leaves the latent
space, every latent cache and every DiT trained on it valid; without a frozen encoder the
adversarial gradient reaches the encoder too (LDM's full-autoencoder recipe).

The adversarial term is weighted as in LDM (Rombach et al. 2022, ``calculate_adaptive_weight``):
``w = adv_weight * |grad_last(rec)| / |grad_last(g)|`` on the decoder's last layer, so the
adversarial gradient stays a fixed fraction of the reconstruction gradient whatever the losses'
scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from world_model.train import common


class PatchDiscriminator(nn.Module):
    """Fully convolutional critic: (B, 3, H, W) image in [-1, 1] -> (B, 1, H/2^n, W/2^n) logits.

    ``n = len(channels)`` stride-2 4x4 convolutions (LeakyReLU, GroupNorm after the first), then a
    3x3 conv to one logit per patch. With the default (64, 128, 256) each logit sees a 38-pixel
    patch: at 72x128 the road's width and its edges, at 720p the edge of a kerb.
    """

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = 3
        for i, c in enumerate(channels):
            layers.append(nn.Conv2d(prev, c, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.GroupNorm(min(32, c // 4), c))
            layers.append(nn.LeakyReLU(0.2))
            prev = c
        layers.append(nn.Conv2d(prev, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # pix2pix init
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits of ``x`` (B, 3, H, W) -> (B, 1, H', W'); higher means "real"."""
        return self.net(x)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic: push real patches above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator (the decoder): raise the critic's score of its output."""
    return -fake_logits.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """LDM's balance of the two gradients on ``last_layer``: |grad rec| / |grad g| (detached).

    Args:
        rec_loss: scalar reconstruction loss (its graph must reach ``last_layer``).
        g_loss: scalar generator loss (likewise).
        last_layer: the weight of the decoder's output layer.

    Returns:
        Scalar weight in [0, max_weight], without a graph.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if rec_grad is None or g_grad is None:
        raise ValueError(
            "adaptive_weight: the reconstruction or the adversarial loss does not reach the decoder's "
            "output layer (are all reconstruction weights 0?)"
        )
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class Critic:
    """A PatchGAN critic with its optimiser, and the two halves of an adversarial training step.

    Per step, after the reconstruction losses: :meth:`generator_term` (the decoder's extra loss
    against the frozen critic), the decoder's backward and optimiser step, then :meth:`step` (one
    critic update on the same real and detached decoded images).

    Args:
        weight: ``adv_weight``, the adversarial share of the output layer's gradient.
        lr: base learning rate of the critic (scaled per step like the decoder's).
        device: where the critic lives.
        wrap: wraps the critic for its own update (``common.wrap_ddp``: identity on one process).
            The generator term calls the raw module with its weights frozen, so no DDP hook fires.
    """

    def __init__(
        self, weight: float, lr: float, device: torch.device, wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    ) -> None:
        self.weight, self.lr = weight, lr
        self.disc = PatchDiscriminator().to(device)
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
        self.wrapped = wrap(self.disc)

    def generator_term(
        self,
        rec_loss: torch.Tensor,
        fake: torch.Tensor,
        last_layer: torch.Tensor,
        autocast: contextlib.AbstractContextManager,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's adversarial loss and its adaptive weight (add ``weight * g`` to the loss).

        Args:
            rec_loss: scalar reconstruction loss of this step.
            fake: (B', 3, H, W) decoded images, in the decoder's graph (reconstructions, and with
                ``train-vae --gen-latents`` decodes of generated latents after them: one mean over all).
            last_layer: weight of the decoder's output layer.
            autocast: the trainer's autocast context.

        Returns:
            ``(g, weight)``: scalar generator loss (with graph) and scalar weight (without).
        """
        self.disc.requires_grad_(False)  # gradients reach the decoder only
        try:
            with autocast:
                g = generator_loss(self.disc(fake).float())  # critic logits (B', 1, H/8, W/8)
        finally:
            self.disc.requires_grad_(True)
        return g, self.weight * adaptive_weight(rec_loss, g, last_layer)

    def step(
        self, real: torch.Tensor, fake: torch.Tensor, lr_scale: float, autocast: contextlib.AbstractContextManager
    ) -> torch.Tensor:
        """One critic update on ``real`` (B, 3, H, W) and ``fake`` (B', 3, H, W) images; returns its loss.

        ``lr_scale`` is the decoder's current learning rate over its base rate (warmup, cosine decay).
        """
        common.set_lr(self.optimizer, self.lr * lr_scale)
        with autocast:
            both = torch.cat([real, fake.detach().to(real.dtype)])  # (B + B', 3, H, W)
            logits = self.wrapped(both).float()  # (B + B', 1, H/8, W/8)
        loss = discriminator_loss(logits[: len(real)], logits[len(real) :])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
