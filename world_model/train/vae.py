"""Train the frame VAE (``matrix-world train-vae``), with DDP and crash-safe resume.

Losses (per step):
    L1 + MSE between the 72x128 frames and their reconstruction (posterior sample), plus
    ``kl_weight * KL`` (LDM's sum-over-latent convention), plus, when the episodes carry
    ``video_720p.mp4``, an L1 loss of the super-resolving head on random ``hr_crop`` crops of the
    real 720p frames. A crop is cut on the 10x grid of the 72x128 frame; the decoder trunk runs at
    72x128 and the (pixel-local) 720p head only on the trunk features under the crop, so the head
    trains on exact 720p targets at a fraction of a full 720p decode (see :func:`hr_crop_predict`).
    With ``--adv-weight``, a PatchGAN critic (``adversarial.py``) judges the 72x128 reconstruction
    (or, with ``--hr-only``, the 720p crops) and its hinge loss joins the decoder's. With
    ``--gen-latents`` it also judges decodes of latents the DiT generated (``rollouts.py``).

After training the EMA model gets per-channel latent statistics fitted on training frames
(``set_latent_stats``), is evaluated on held-out episodes (PSNR at 72x128, and at 720p where
videos exist, beside the PSNR of the nearest-upsampled ground-truth 72x128 frame as a baseline) and
is saved with ``checkpoint.save_module(out, "vae", ...)``.

Example::

    matrix-world train-vae --data ~/data/carracing --run-dir ~/runs/vae --preset default --bf16
    torchrun --nproc_per_node 2 -m agents.cli train-vae --data ... --run-dir ...   # DDP
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from world_model.errors import UsageError
from world_model.train import common
from world_model.train.adversarial import Critic

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
)


@dataclass
class Args:
    """Train the frame VAE (72x128 <-> latents, plus the 720p super-resolving head)."""

    data: tuple[Path, ...]
    """Recorded data directories (``matrix-world record``; e.g. the labelled and the unlabelled set)."""
    run_dir: Path = Path("~/runs/vae")
    """Run directory for checkpoints, TensorBoard and the final model; a rerun resumes from it."""
    out: Path | None = None
    """Where the final model goes (default: RUN_DIR/model)."""
    preset: Literal["tiny", "default"] = "default"
    """VAE size preset (world_model.vae.VAE_PRESETS)."""
    steps: int = 20_000
    """Optimiser steps in total (a resumed run continues up to this count)."""
    batch_size: int = 32
    """Frames per step per rank."""
    lr: float = 2e-4
    """Peak AdamW learning rate (cosine decay to lr/10 after the warmup)."""
    warmup: int = 500
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    ema_decay: float = 0.999
    """EMA decay; the EMA weights are the ones saved as the final model."""
    l1_weight: float = 1.0
    """Weight of the L1 reconstruction loss at 72x128."""
    mse_weight: float = 1.0
    """Weight of the MSE reconstruction loss at 72x128."""
    kl_weight: float | None = None
    """Weight of the KL term (default: the preset's VAEConfig.kl_weight)."""
    hr_crop: tuple[int, int] = (180, 320)
    """(H, W) of the 720p training crops for the super-resolving head; multiples of 10."""
    hr_batch: int = 4
    """720p crops per step per rank."""
    hr_weight: float = 1.0
    """Weight of the 720p L1 loss."""
    hr_shuffle: int = 32
    """Shuffle buffer (frames) of the sequential 720p video reader."""
    init_from: Path | None = None
    """Start from this trained VAE (a ``save_module`` directory); its config replaces --preset."""
    freeze_encoder: bool = False
    """Train the decoder and the 720p head only (needs --init-from). The latent space, and with it
    every latent cache and DiT trained on it, stays valid: the way to improve decoding later."""
    hr_only: bool = False
    """Train the 720p head only (needs --init-from): encoder, decoder and the 72x128 output stay
    exactly as they are, so latent caches, DiTs and every 72x128 metric stay valid."""
    hr_base: str | None = None
    """Change the 720p head's base image ("nearest" | "bilinear"; default: the --init-from VAE's)."""
    hr_kernel: int | None = None
    """Change the kernel of the head's last conv (1 | 3). With a changed base or kernel the head's last
    conv starts from zero, i.e. from the plain upsampled decode."""
    adv_weight: float = 0.0
    """Adversarial (PatchGAN hinge) loss on the decoder's output, as a fraction of the reconstruction
    gradient at the output layer (LDM's adaptive weight; 0 = off, LDM uses 0.5). The critic judges
    the 72x128 reconstruction, or with --hr-only the 720p crops. Sharpens what a pixel loss blurs."""
    adv_start: int = 0
    """Step from which the adversarial term enters the decoder's loss (the critic trains from step 0)."""
    disc_lr: float | None = None
    """Critic learning rate (default: --lr), same schedule as the decoder's."""
    gen_latents: tuple[Path, ...] = ()
    """Generated latents (``matrix-world rollout-latents`` directories) whose decodes the critic judges
    beside the reconstructions (needs --freeze-encoder, --adv-weight > 0 and no --hr-only): the decoder
    learns to draw real-looking frames from the DiT's latents, not only from encodings of real frames.
    They have no paired target; only the critic sees them."""
    gen_anchor_weight: float = 0.0
    """Weight of an L1 loss between the decodes of the generated latents and the --init-from decoder's
    decodes of the same latents (0 = off). The critic alone may draw whatever fools it where a
    generated latent is unlike any encoding (high-contrast blobs beside the car were seen); the anchor
    keeps those decodes near the parent's and leaves the critic room for thin detail (edges, kerb lines)."""
    gen_palette_weight: float = 0.0
    """Weight of a colour prior on the decodes of the generated latents (0 = off; needs
    --gen-palette-data): the mean distance of each pixel beyond a margin to the nearest real colour.
    Real colours keep it at zero (red and white kerbs, road-grass blends); invented ones (the yellow,
    magenta and black blobs an unanchored critic drew beside the car) pay for their distance."""
    gen_palette_data: Path | None = None
    """Recorded episodes whose 72x128 frames give the real colours of --gen-palette-weight (CarRacing:
    the view above the dashboard, without the car's box). Not domain-randomised footage."""
    gen_batch: int = 16
    """Generated latents decoded per step (with --gen-latents). The decoder's adversarial term is one
    mean over the batch's reconstructions and these decodes, so the two batch sizes set their shares
    (--batch-size 32, --gen-batch 16: 2/3 and 1/3 of the adversarial gradient)."""
    detail_weight: float = 0.0
    """Extra L1 weight on pixels that differ from their 7x7 neighbourhood (small objects: the car,
    kerbs, the HUD), which a plain pixel loss under-weights."""
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
    """Fraction of episodes held out for the PSNR evaluation."""
    stats_frames: int = 4096
    """Training frames used to fit the latent shift/scale."""
    eval_frames: int = 256
    """Held-out frames for the 72x128 PSNR (720p PSNR uses at most eval_frames // 16)."""
    debug_hashes: bool = False
    """Write RUN_DIR/debug/vae_rank<r>.txt with the final weight hash (DDP equality tests)."""
    step_sleep: float = 0.0
    """Debug: sleep this long after each step (lets kill/resume tests catch a run mid-way)."""


# ----------------------------------------------------------------------------- data
class HRCropStream(IterableDataset):
    """Endless stream of (72x128 frame, aligned 720p crop) pairs read sequentially from videos.

    Each (rank, worker) shard decodes its episodes' ``video_720p.mp4`` front to back with imageio
    (sequential decoding is what H.264 is fast at), pairs frame ``k`` with ``frames[k]`` of the
    72x128 array, cuts a random ``crop`` whose corner sits on the 10x grid, and yields from a
    shuffle buffer so consecutive items come from different moments.

    Resume note: the stream restarts from a seed that includes the resume step, so after a resume
    the 720p crops differ from the uninterrupted run (the 72x128 batches do not).
    """

    def __init__(
        self,
        episodes: list[Path],
        crop: tuple[int, int],
        scale: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: int,
    ) -> None:
        """Store the shard layout; nothing is opened until iteration."""
        super().__init__()
        self.episodes, self.crop, self.scale = episodes, crop, scale
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``lr`` (72,128,3) uint8, ``hr`` (ch,cw,3) uint8, ``yx`` (2,) crop corner in 72x128 pixels."""
        import imageio.v3 as iio

        from world_model.data.episodes import VIDEO_FILE, open_episode

        worker = get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        shard, nshards = self.rank * nworkers + wid, self.world_size * nworkers
        # few episodes: every shard reads all of them, in its own random order
        mine = self.episodes[shard::nshards] if len(self.episodes) >= nshards else list(self.episodes)
        rng = np.random.default_rng([self.seed, shard])
        ch, cw = self.crop
        buffer: list[dict[str, torch.Tensor]] = []
        while True:
            for ep in rng.permutation(len(mine)):
                frames = open_episode(mine[ep])["frames"]  # (S+1, 72, 128, 3) uint8, mmap
                for k, hr in enumerate(iio.imiter(mine[ep] / VIDEO_FILE)):
                    if k >= len(frames):
                        break
                    h, w = hr.shape[0] // self.scale, hr.shape[1] // self.scale  # 72x128 grid
                    y = int(rng.integers(0, h - ch // self.scale + 1))
                    x = int(rng.integers(0, w - cw // self.scale + 1))
                    ys, xs = y * self.scale, x * self.scale
                    item = {
                        "lr": torch.from_numpy(np.array(frames[k])),
                        "hr": torch.from_numpy(np.ascontiguousarray(hr[ys : ys + ch, xs : xs + cw])),
                        "yx": torch.tensor([y, x]),
                    }
                    if len(buffer) < self.shuffle:
                        buffer.append(item)
                        continue
                    j = int(rng.integers(len(buffer)))
                    buffer[j], item = item, buffer[j]
                    yield item


def hr_crop_predict(vae: nn.Module, lr: torch.Tensor, yx: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """720p crops of ``decode_hr(encode(lr))``, running the super-resolving head only under the crops.

    The decoder trunk runs on the whole 72x128 frame (it has GroupNorms, whose statistics a
    partial decode would change, and it is cheap at this size); the 720p head is local (2x2
    transposed conv, 1x1 or 3x3 conv, pixel shuffle, nearest or bilinear base), so running it on the
    trunk's feature crop plus a one-pixel margin (where the head reads beyond the crop) gives exactly
    the pixels of a full 720p decode, at about (crop area / frame area) of the cost.

    Args:
        vae: the FrameVAE (raw module).
        lr: (B, 3, 72, 128) frames in [-1, 1].
        yx: (B, 2) crop corners in 72x128 pixels.
        crop_hw: (ch, cw) size of the 720p crops; multiples of ``sr_factor``.

    Returns:
        (B, 3, ch, cw) predicted crops.
    """
    sr = vae.cfg.sr_factor
    ch, cw = crop_hw[0] // sr, crop_hw[1] // sr  # crop size in 72x128 pixels
    feats = vae.decode_features(vae.encode(lr))  # (B, C0, 72, 128), from the posterior mean
    low = vae.to_rgb(feats)  # (B, 3, 72, 128)
    crop = [(int(y), int(x)) for y, x in yx.tolist()]
    h, w = feats.shape[-2:]  # the head reads one low-res pixel around the crop; margins differ at the border
    preds = []
    for b, (y, x) in enumerate(crop):
        y0, x0, y1, x1 = max(0, y - 1), max(0, x - 1), min(h, y + ch + 1), min(w, x + cw + 1)
        out = vae.hr_from_features(feats[b : b + 1, :, y0:y1, x0:x1], low[b : b + 1, :, y0:y1, x0:x1])
        oy, ox = (y - y0) * sr, (x - x0) * sr
        preds.append(out[:, :, oy : oy + ch * sr, ox : ox + cw * sr])  # (1, 3, ch*sr, cw*sr)
    return torch.cat(preds)


def _with_head(cfg: object, args: Args) -> object:
    """``cfg`` with the 720p head settings of ``--hr-base`` / ``--hr-kernel`` (clear error if bad)."""
    from dataclasses import replace

    change = {k: v for k, v in (("hr_base", args.hr_base), ("hr_kernel", args.hr_kernel)) if v is not None}
    try:
        return replace(cfg, **change)
    except ValueError as err:
        raise UsageError(f"--hr-base / --hr-kernel: {err}") from err


PALETTE_MARGIN = 2 * 16 / 255
"""Distance in [-1, 1] RGB units a pixel may be from its nearest real colour at no cost: 16 grey levels,
the half-width of the 16-level colour cells whose mean colours form the palette (a colour in a cell's
corner can be up to ~28 levels from its mean and pays a little)."""


def palette_targets(data: Path, episodes: int = 32, every: int = 4) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The real colours of a recording for ``--gen-palette-weight``.

    Returns:
        ``colours`` (K, 3) float32 in [-1, 1] (:func:`world_model.eval.metrics.palette_colours` of every
        ``every``-th frame of the first ``episodes`` episodes), ``keep`` (72, 128) bool (the pixels the
        loss reads: CarRacing's view without the car's box, else all), and a record for the summary.
    """
    from world_model.data import episodes as E
    from world_model.data.record import is_carracing
    from world_model.eval import metrics as M

    try:
        frames, eps = E.sample_frames(data, episodes, every)  # (N, 72, 128, 3)
    except UsageError as err:
        raise UsageError(f"--gen-palette-data: {err}") from err
    carracing = is_carracing(str(E.read_meta(eps[0]).get("env_id", "")))
    rows, ignore = (M.CARRACING_VIEW_ROWS, M.KERB_CAR_BOX) if carracing else (None, None)
    colours = torch.from_numpy(M.palette_colours(frames, rows, ignore)) / 127.5 - 1  # (K, 3)
    keep = torch.from_numpy(M.view_mask(frames.shape[1:3], rows, ignore))  # (72, 128) the same pixels
    record = {"data": str(data), "episodes": len(eps), "frames": len(frames), "colours": len(colours),
              "view": "CarRacing view without the car" if carracing else "whole frame"}
    return colours, keep, record


def palette_loss(images: torch.Tensor, colours: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mean distance beyond :data:`PALETTE_MARGIN` of the pixels ``pixels`` (P,) int64 (row-major
    indices into H*W, e.g. ``keep.flatten().nonzero().squeeze(1)``) of ``images`` (G, 3, H, W) in
    [-1, 1] to their nearest colour of ``colours`` (K, 3).

    The decodes are not clamped: a value past [-1, 1] pays for its distance too. The term is part of
    the loss whose gradient sets the critic's adaptive weight (as the anchor's is).
    """
    g, _, h, w = images.shape
    px = images.float().permute(0, 2, 3, 1).reshape(g, h * w, 3).index_select(1, pixels).reshape(-1, 3)  # (G*P, 3)
    with torch.no_grad():  # the nearest colour, in chunks: (G*P, K) distances would not fit a big batch
        nearest = torch.cat([torch.cdist(c, colours).argmin(1) for c in px.split(16384)])  # (G*P,)
    dist = (px - colours[nearest]).norm(dim=1)  # (G*P,) differentiable in px
    return F.relu(dist - PALETTE_MARGIN).mean()


class VAELoss(nn.Module):
    """The reconstruction losses of one step, in one forward, so DDP sees a single graph per step.

    The adversarial term (``Critic.generator_term``) is added by the trainer on the returned images.
    """

    def __init__(self, vae: nn.Module, args: Args, kl_weight: float, anchor: nn.Module | None = None,
                 palette: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Hold the VAE, the loss weights, the frozen parent VAE of ``--gen-anchor-weight`` and the
        ``(colours, pixels)`` of ``--gen-palette-weight`` (each or None; see :func:`palette_loss`)."""
        super().__init__()
        self.vae, self.args, self.kl_weight, self.anchor, self.palette = vae, args, kl_weight, anchor, palette

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator,
        hr_batch: dict[str, torch.Tensor] | None,
        gen_z: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Losses of one step.

        Args:
            x: (B, 3, 72, 128) frames in [-1, 1].
            generator: RNG of the posterior sample.
            hr_batch: ``lr`` (Bh, 3, 72, 128), ``hr`` (Bh, 3, ch, cw) in [-1, 1], ``yx`` (Bh, 2); or None.
            gen_z: (G, Cz, h, w) generated latents to decode for the critic (``--gen-latents``), or None.

        Returns:
            dict of scalar losses, ``loss/total`` being the one to minimise; and ``(real, fake)``,
            the images a critic compares: the 72x128 frames (B, 3, 72, 128) and their reconstruction,
            followed by the decodes of ``gen_z`` ((B + G, 3, 72, 128)); or with ``--hr-only`` the
            720p crops and their prediction (Bh, 3, ch, cw).
        """
        from world_model.vae import kl

        a = self.args
        hr_pred = None
        if hr_batch is not None:
            hr_pred = hr_crop_predict(self.vae, hr_batch["lr"], hr_batch["yx"], hr_batch["hr"].shape[-2:])
            hr_l1 = F.l1_loss(hr_pred.float(), hr_batch["hr"])  # hr_pred (Bh, 3, ch, cw)
        if a.hr_only:  # everything but the head is frozen: the 72x128 losses cannot change
            return {"loss/hr_l1": hr_l1, "loss/total": a.hr_weight * hr_l1}, (hr_batch["hr"], hr_pred)
        out = self.vae(x, generator=generator)
        recon = out["recon"].float()  # (B, 3, 72, 128)
        l1 = (recon - x).abs()  # (B, 3, H, W)
        if a.detail_weight > 0:
            local = F.avg_pool2d(x, 7, stride=1, padding=3, count_include_pad=False)  # (B, 3, H, W)
            detail = (x - local).abs().mean(1, keepdim=True)  # (B, 1, H, W) local contrast
            l1 = l1 * (1 + a.detail_weight * detail)
        losses = {
            "loss/l1": l1.mean(),
            "loss/mse": F.mse_loss(recon, x),
            "loss/kl": kl(out["mean"].float(), out["logvar"].float()),
        }
        total = a.l1_weight * losses["loss/l1"] + a.mse_weight * losses["loss/mse"] + self.kl_weight * losses["loss/kl"]
        if hr_batch is not None:
            losses["loss/hr_l1"] = hr_l1
            total = total + a.hr_weight * hr_l1
        losses["loss/total"] = total
        fake = out["recon"]  # (B, 3, 72, 128)
        if gen_z is not None:
            gen_dec = self.vae.decode(gen_z)  # (G, 3, 72, 128)
            if self.anchor is not None:
                with torch.no_grad():
                    parent = self.anchor.decode(gen_z).float()  # (G, 3, 72, 128), the --init-from decoder's
                losses["loss/gen_anchor"] = F.l1_loss(gen_dec.float(), parent)
                total = losses["loss/total"] = total + a.gen_anchor_weight * losses["loss/gen_anchor"]
            if self.palette is not None:
                losses["loss/gen_palette"] = palette_loss(gen_dec, *self.palette)
                losses["loss/total"] = total + a.gen_palette_weight * losses["loss/gen_palette"]
            fake = torch.cat([fake, gen_dec.to(fake.dtype)])  # (B + G, 3, 72, 128)
        return losses, (x, fake)


# ----------------------------------------------------------------------------- evaluation
def psnr_u8(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two uint8 image tensors of the same shape."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@torch.no_grad()
def evaluate(vae: nn.Module, episodes: list[Path], frames_budget: int, device: torch.device, batch: int = 32) -> dict:
    """PSNR of ``decode(encode(x))`` at 72x128 and of ``decode_hr`` at 720p on the given episodes.

    Frames are taken evenly spaced over the episodes (deterministic). The 720p baseline is the
    nearest-upsampled ground-truth 72x128 frame, i.e. what the head must beat to add detail.
    """
    import imageio.v3 as iio

    from world_model.data.episodes import VIDEO_FILE, open_episode
    from world_model.vae import frames_to_tensor, tensor_to_frames

    vae.eval()
    arrays = [open_episode(ep)["frames"] for ep in episodes]
    total = sum(len(a) for a in arrays)
    stride = max(1, total // max(1, frames_budget))
    picks = [(e, k) for e, a in enumerate(arrays) for k in range(len(a))][::stride][:frames_budget]
    se, n = 0.0, 0
    for i in range(0, len(picks), batch):
        gt = torch.from_numpy(np.stack([arrays[e][k] for e, k in picks[i : i + batch]])).to(device)  # (B,72,128,3)
        rec = tensor_to_frames(vae.decode(vae.encode(frames_to_tensor(gt))))  # (B, 72, 128, 3)
        se += (rec.float() - gt.float()).pow(2).sum().item()
        n += gt.numel()
    out = {"psnr_72x128": 10 * math.log10(255.0**2 / max(se / max(n, 1), 1e-10)), "eval_frames": len(picks)}

    videos = [(e, ep) for e, ep in enumerate(episodes) if (ep / VIDEO_FILE).exists()]
    hr_budget = max(1, frames_budget // 16)
    if videos:
        per_video = max(1, hr_budget // len(videos))
        se_hr = se_up = 0.0
        n_hr = 0
        for e, ep in videos:
            stride_v = max(1, len(arrays[e]) // per_video)
            for k, hr in enumerate(iio.imiter(ep / VIDEO_FILE)):
                if k >= len(arrays[e]) or n_hr >= hr_budget:
                    break
                if k % stride_v:
                    continue
                gt_hr = torch.from_numpy(hr).to(device)  # (720, 1280, 3)
                lr = torch.from_numpy(np.array(arrays[e][k])).to(device)  # (72, 128, 3)
                pred = tensor_to_frames(vae.decode_hr(vae.encode(frames_to_tensor(lr)[None])))[0]  # (720,1280,3)
                up = lr.repeat_interleave(hr.shape[0] // lr.shape[0], 0).repeat_interleave(
                    hr.shape[1] // lr.shape[1], 1
                )
                se_hr += (pred.float() - gt_hr.float()).pow(2).mean().item()
                se_up += (up.float() - gt_hr.float()).pow(2).mean().item()
                n_hr += 1
        out["psnr_720p"] = 10 * math.log10(255.0**2 / max(se_hr / n_hr, 1e-10))
        out["psnr_720p_nearest_upsample_baseline"] = 10 * math.log10(255.0**2 / max(se_up / n_hr, 1e-10))
        out["eval_frames_720p"] = n_hr
    return out


@torch.no_grad()
def fit_latent_stats(
    vae: nn.Module, episodes: list[Path], frames_budget: int, device: torch.device, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw posterior means over (evenly spaced) training frames.

    Returns:
        ``(shift, scale)``, each (Cz,).
    """
    from world_model.data.episodes import open_episode
    from world_model.vae import frames_to_tensor

    vae.eval()
    arrays = [open_episode(ep)["frames"] for ep in episodes]
    picks = [(e, k) for e, a in enumerate(arrays) for k in range(len(a))]
    picks = picks[:: max(1, len(picks) // max(1, frames_budget))][:frames_budget]
    s1 = s2 = None
    n = 0
    for i in range(0, len(picks), batch):
        x = torch.from_numpy(np.stack([arrays[e][k] for e, k in picks[i : i + batch]])).to(device)
        mean, _ = vae.encode_dist(frames_to_tensor(x))  # (B, Cz, h, w) raw
        mean = mean.double()
        s1 = mean.sum((0, 2, 3)) if s1 is None else s1 + mean.sum((0, 2, 3))  # (Cz,)
        s2 = mean.pow(2).sum((0, 2, 3)) if s2 is None else s2 + mean.pow(2).sum((0, 2, 3))
        n += mean.shape[0] * mean.shape[2] * mean.shape[3]
    shift = s1 / n
    scale = (s2 / n - shift.pow(2)).clamp(min=1e-12).sqrt().clamp(min=1e-4)
    return shift.float().cpu(), scale.float().cpu()


# ----------------------------------------------------------------------------- main
def train(args: Args, command: list[str] | None = None) -> dict:
    """Train (or resume) and export; returns the summary written to ``OUT/train_vae.json``.

    Args:
        args: the parsed arguments.
        command: the command line, recorded in the summary (the recipe of the model).
    """
    from world_model.checkpoint import save_module
    from world_model.data.episodes import TRAIN_HW, VIDEO_FILE
    from world_model.data.latents import latent_space_sha256
    from world_model.vae import VAE_PRESETS, FrameVAE, frames_to_tensor

    info = common.setup_distributed(args.device)
    run_dir = Path(args.run_dir).expanduser()
    out_dir = Path(args.out).expanduser() if args.out else run_dir / "model"
    if not (0 < args.hr_crop[0] <= 720 and 0 < args.hr_crop[1] <= 1280):
        raise UsageError(f"--hr-crop {args.hr_crop}: must fit in a 720x1280 frame")
    if args.hr_crop[0] % 10 or args.hr_crop[1] % 10:
        raise UsageError(f"--hr-crop {args.hr_crop}: both sides must be multiples of 10 (the 72x128 -> 720p grid)")
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    if args.adv_weight < 0:
        raise UsageError(f"--adv-weight {args.adv_weight}: must be >= 0 (0 = no critic)")
    if args.adv_start < 0:
        raise UsageError(f"--adv-start {args.adv_start}: must be a step >= 0")
    if args.disc_lr is not None and args.disc_lr <= 0:
        raise UsageError(f"--disc-lr {args.disc_lr}: must be > 0 (or omitted: --lr)")
    if args.gen_latents:  # the critic judges decodes of the DiT's latents: same latent space, a critic, the decoder
        why = "trains the decoder on the DiT's latents through the critic"
        if not args.freeze_encoder:
            raise UsageError(f"--gen-latents {why}; it needs --freeze-encoder (the latent space must stay the DiT's)")
        if args.adv_weight <= 0:
            raise UsageError(f"--gen-latents {why}; it needs --adv-weight > 0 (got {args.adv_weight})")
        if args.hr_only:
            raise UsageError(f"--gen-latents {why}; --hr-only trains the 720p head alone, drop one of them")
        if args.gen_batch < 1:
            raise UsageError(f"--gen-batch {args.gen_batch}: must be >= 1")
    if args.gen_anchor_weight < 0 or (args.gen_anchor_weight > 0 and not args.gen_latents):
        raise UsageError(f"--gen-anchor-weight {args.gen_anchor_weight}: must be >= 0, and > 0 only with --gen-latents")
    if args.gen_palette_weight < 0 or (args.gen_palette_weight > 0 and not args.gen_latents):
        raise UsageError(f"--gen-palette-weight {args.gen_palette_weight}: must be >= 0, and > 0 only with "
                         "--gen-latents")
    if (args.gen_palette_weight > 0) != (args.gen_palette_data is not None):
        raise UsageError(f"--gen-palette-weight {args.gen_palette_weight} and --gen-palette-data "
                         f"{args.gen_palette_data}: give both (weight > 0) or neither")
    train_eps, heldout_eps = common.resolve_episodes(args.data, args.holdout_fraction, args.seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = common.latest_checkpoint(run_dir)
    config = common.to_jsonable(args)
    common.check_run_config(
        run_dir, config, RESUME_FREE, resuming=ckpt is not None, write=info.is_main,
        defaults=common.field_defaults(type(args)),
    )
    common.clean_stale_tmp(run_dir, info)

    common.seed_everything(args.seed)  # same init on every rank
    cfg = _with_head(VAE_PRESETS[args.preset], args)
    if tuple(cfg.in_hw) != tuple(TRAIN_HW):
        raise UsageError(f"preset {args.preset!r} has in_hw {cfg.in_hw}, the data is {TRAIN_HW}")
    vae = FrameVAE(cfg).to(info.device)
    if args.freeze_encoder and args.init_from is None:
        raise UsageError("--freeze-encoder needs --init-from VAE_DIR (the VAE whose latent space to keep)")
    if args.hr_only and args.init_from is None:
        raise UsageError("--hr-only needs --init-from VAE_DIR (the VAE whose 720p head to retrain)")
    if args.init_from is not None:
        from world_model.checkpoint import load_module
        from world_model.vae import VAEConfig

        vae = load_module(Path(args.init_from).expanduser(), "vae", FrameVAE, VAEConfig).to(info.device)
        cfg = _with_head(vae.cfg, args)
        if cfg != vae.cfg:  # a new head: every weight but the head's last conv, which starts at zero
            parent, vae = vae, FrameVAE(cfg).to(info.device)  # (so decode_hr starts as the upsampled decode)
            vae.load_state_dict({k: v for k, v in parent.state_dict().items() if not k.startswith("hr_out.")},
                                strict=False)
    if args.hr_only:
        for name, p in vae.named_parameters():
            p.requires_grad_(name.startswith(("hr_up.", "hr_out.")))
    elif args.freeze_encoder:
        for p in [*vae.enc_in.parameters(), *vae.encoder.parameters()]:
            p.requires_grad_(False)
    gen_pool, gen_infos = None, []  # (N, Cz, h, w) generated latents, checked against the decoded latent space
    if args.gen_latents:
        from world_model.train import rollouts

        space = latent_space_sha256(Path(args.init_from).expanduser())
        shape = (cfg.latent_channels, *cfg.latent_hw)
        sets = [rollouts.load(p, space, shape) for p in args.gen_latents]
        gen_pool = torch.cat([z for z, _ in sets]).to(info.device)
        gen_infos = [gen_info for _, gen_info in sets]
    ema = common.EMA(vae, args.ema_decay)
    optimizer = torch.optim.AdamW(
        [p for p in vae.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay
    )
    gen = torch.Generator(device=info.device).manual_seed(args.seed * 1000 + info.rank)  # posterior noise
    bf16 = common.resolve_bf16(args.bf16, info.device)
    critic = None
    if args.adv_weight > 0:
        disc_lr = args.lr if args.disc_lr is None else args.disc_lr
        critic = Critic(args.adv_weight, disc_lr, info.device, wrap=lambda m: common.wrap_ddp(m, info))
    aux = {} if critic is None else {"disc": (critic.disc, critic.optimizer)}
    # the layer whose gradients balance the adversarial term against the reconstruction
    last_layer = vae.hr_out.weight if args.hr_only else vae.to_rgb.weight

    start = 0
    if ckpt is not None:
        start = common.load_checkpoint(ckpt, info, vae, ema, optimizer, {"noise": gen}, aux=aux)["step"]

    dataset = common.window_dataset(train_eps, window=1, source="frames")
    sampler = common.ResumableBatchSampler(len(dataset), args.batch_size, info.rank, info.world_size, args.seed, start)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=info.device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
        persistent_workers=args.num_workers > 0,
    )
    video_eps = [ep for ep in train_eps if (ep / VIDEO_FILE).exists()]
    hr_iter = None
    logger = common.Logger(run_dir, info, args.steps, start, desc="train-vae")
    if ckpt is not None:
        logger.print(f"resumed from {ckpt} at step {start}")
    if args.hr_only and not (video_eps and args.hr_weight > 0):
        raise UsageError(
            f"--hr-only trains the 720p head alone, which needs {VIDEO_FILE} in the training episodes and "
            f"--hr-weight > 0 (got {len(video_eps)} episodes with video, --hr-weight {args.hr_weight})"
        )
    if video_eps and args.hr_weight > 0:
        stream = HRCropStream(
            video_eps,
            args.hr_crop,
            cfg.sr_factor,
            seed=args.seed * 1_000_003 + start,
            rank=info.rank,
            world_size=info.world_size,
            shuffle=args.hr_shuffle,
        )
        # an explicit generator: creating the iterator must not draw from the global RNG
        workers = min(1, args.num_workers)
        hr_loader = DataLoader(stream, batch_size=args.hr_batch, num_workers=workers, generator=torch.Generator())
        hr_iter = iter(hr_loader)
        logger.print(f"720p head: training on {args.hr_crop} crops from {len(video_eps)} episode videos")
    else:
        logger.print(f"note: no {VIDEO_FILE} in the training episodes; the 720p head is not trained (no HR loss)")

    kl_weight = cfg.kl_weight if args.kl_weight is None else args.kl_weight
    anchor = None  # the --init-from VAE, frozen: the target of --gen-anchor-weight
    if args.gen_anchor_weight > 0:
        from world_model.checkpoint import load_module
        from world_model.vae import VAEConfig

        anchor = load_module(Path(args.init_from).expanduser(), "vae", FrameVAE, VAEConfig).to(info.device).eval()
        anchor.requires_grad_(False)
    palette, palette_info = None, None  # the real colours of --gen-palette-weight
    if args.gen_palette_weight > 0:
        colours, keep, palette_info = palette_targets(Path(args.gen_palette_data).expanduser())
        palette = (colours.to(info.device), keep.flatten().nonzero().squeeze(1).to(info.device))  # (K, 3), (P,)
        logger.print(f"colour prior: {palette_info['colours']} real colours from {palette_info['frames']} frames "
                     f"of {args.gen_palette_data}")
    step_fn = common.wrap_ddp(VAELoss(vae, args, kl_weight, anchor, palette), info, find_unused=hr_iter is None)
    batches = iter(loader)
    vae.train()
    for step in range(start, args.steps):
        batch = next(batches)
        x = frames_to_tensor(batch["frames"][:, 0].to(info.device, non_blocking=True))  # (B, 3, 72, 128)
        hr_batch = None
        if hr_iter is not None:
            hb = next(hr_iter)
            hr_batch = {
                "lr": frames_to_tensor(hb["lr"].to(info.device)),  # (Bh, 3, 72, 128)
                "hr": frames_to_tensor(hb["hr"].to(info.device)),  # (Bh, 3, ch, cw)
                "yx": hb["yx"].to(info.device),  # (Bh, 2)
            }
        gen_z = None
        if gen_pool is not None:  # a per-step seed: the same draws after a resume (distinct for rank < 97)
            pick = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 97 + info.rank)
            idx = torch.randint(len(gen_pool), (args.gen_batch,), generator=pick).to(info.device)  # (G,)
            gen_z = gen_pool[idx]  # (G, Cz, h, w)
        lr = common.cosine_lr(step, args.steps, args.lr, args.warmup)
        common.set_lr(optimizer, lr)
        with common.autocast(info.device, bf16):
            losses, (real, fake) = step_fn(x, gen, hr_batch, gen_z)
        total = losses["loss/total"]
        if critic is not None and step >= args.adv_start:  # decoder step against the (frozen) critic
            g_adv, weight = critic.generator_term(total, fake, last_layer, common.autocast(info.device, bf16))
            losses["loss/rec"] = total
            total = losses["loss/total"] = total + weight * g_adv
            losses["loss/g_adv"], losses["adv/weight"] = g_adv, weight
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = nn.utils.clip_grad_norm_(
            [p for p in vae.parameters() if p.requires_grad], args.grad_clip if args.grad_clip > 0 else math.inf
        )
        optimizer.step()
        ema.update(vae, step)
        if critic is not None:  # critic step on the same real and (detached) decoded images
            losses["loss/disc"] = critic.step(real, fake, lr / args.lr, common.autocast(info.device, bf16))

        scalars = common.reduce_scalars(losses)
        logger.step(step + 1, len(x) * info.world_size, {**scalars, "opt/lr": lr, "opt/grad_norm": grad_norm.item()})
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            common.save_checkpoint(
                run_dir, step + 1, info, vae, ema, optimizer, {"noise": gen}, config, keep=args.keep_ckpts, aux=aux
            )
        if args.step_sleep:
            time.sleep(args.step_sleep)
    if args.debug_hashes:
        common.write_debug_hash(run_dir, info, "vae", vae, args.steps)
        if critic is not None:
            common.write_debug_hash(run_dir, info, "vae_critic", critic.disc, args.steps)

    summary: dict = {}
    if info.is_main:
        final = ema.module
        if args.freeze_encoder or args.hr_only:  # same encoder, same latent space: keep its statistics
            shift, scale = final.latent_shift.detach().cpu(), final.latent_scale.detach().cpu()
        else:
            shift, scale = fit_latent_stats(final, train_eps, args.stats_frames, info.device)
        final.set_latent_stats(shift, scale)
        eval_eps = heldout_eps or train_eps
        metrics = evaluate(final, eval_eps, args.eval_frames, info.device)
        metrics["eval_split"] = "heldout" if heldout_eps else "train (no held-out episodes)"
        logger.report(args.steps, metrics)
        save_module(out_dir, "vae", final, cfg)
        summary = {
            "command": command or [],
            "args": config,
            "steps": args.steps,
            "world_size": info.world_size,
            "bf16_used": bf16,  # --bf16 falls back to fp32 where the device would emulate it
            "data_manifest_sha256": common.data_fingerprint(args.data),
            "train_episodes": [str(p) for p in train_eps],
            "heldout_episodes": [str(p) for p in heldout_eps],
            "latent_shift": shift.tolist(),
            "latent_scale": scale.tolist(),
            "hr_trained": hr_iter is not None,
            # latent caches / DiTs of the parent VAE stay valid for a frozen-encoder fine-tune
            "latent_space_sha256": latent_space_sha256(Path(args.init_from).expanduser())
            if args.freeze_encoder or args.hr_only
            else None,
            "init_from": common.parent_summary(args.init_from, "train_vae.json"),
            "gen_latents": gen_infos,  # the rollouts whose decodes the critic judged (their recipes)
            "gen_palette": palette_info,  # the recording whose colours the generated decodes kept
            "eval": metrics,
        }
        (out_dir / "train_vae.json").write_text(json.dumps(summary, indent=2))
        print(f"saved VAE to {out_dir}")
    logger.close()
    common.cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    """``matrix-world train-vae``: parse Args and train."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world train-vae", description=__doc__.split("\n\n")[0])
    train(args, command=["matrix-world", "train-vae", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
