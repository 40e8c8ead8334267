"""Training throughput: samples/s of one VAE and one DiT optimiser step, fp32 beside bf16, one run.

Each row times the trainers' own step (``world_model.train.vae.VAELoss`` and
``world_model.train.dit.make_inputs`` + ``compute_losses``, then backward, gradient clipping,
AdamW and the EMA update) on random inputs of the real shapes, so data loading is excluded: this
is the compute ceiling a data loader has to keep up with. A VAE sample is one 72x128 frame (plus
``--hr-batch`` 720p crops per step when given); a DiT sample is one window of ``--window`` latent
frames.

Usage::

    PYTHONPATH=. python benchmarks/bench_train.py                         # tiny + default presets
    PYTHONPATH=. python benchmarks/bench_train.py --vae-presets tiny --dit-presets tiny --steps 5
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import tyro
from torch import nn


@dataclass
class Args:
    """Time VAE and DiT training steps in fp32 and bf16."""

    vae_presets: tuple[str, ...] = ("tiny", "default")
    """VAE presets to time (world_model.vae.VAE_PRESETS); empty to skip."""
    dit_presets: tuple[str, ...] = ("tiny", "S")
    """DiT presets to time (world_model.dit.DIT_PRESETS); empty to skip."""
    vae_batch: int = 32
    """Frames per VAE step."""
    hr_batch: int = 0
    """720p crops (180x320) per VAE step (0 = no HR head loss, like data without videos)."""
    dit_batch: int = 16
    """Windows per DiT step."""
    window: int = 8
    """Frames per DiT window (context 4 + noise groups)."""
    steps: int = 8
    """Timed steps per row (after 2 warm-up steps)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    device: str = "auto"
    """auto, cpu or cuda."""


def _time(step, steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` (2 warm-up calls first)."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _optimise(model: nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer, ema, step: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update(model, step)


def bench_vae(preset: str, args: Args, bf16: bool, device: torch.device) -> float:
    """Samples/s of one VAE training step."""
    from world_model.train import common
    from world_model.train.vae import Args as VAEArgs
    from world_model.train.vae import VAELoss
    from world_model.vae import VAE_PRESETS, FrameVAE

    torch.manual_seed(0)
    cfg = VAE_PRESETS[preset]
    vae = FrameVAE(cfg).to(device)
    ema = common.EMA(vae, 0.999)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    loss_fn = VAELoss(vae, VAEArgs(data=None), cfg.kl_weight)  # type: ignore[arg-type]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.vae_batch, 3, *cfg.in_hw, device=device) * 2 - 1  # (B, 3, 72, 128)
    hr = None
    if args.hr_batch:
        hr = {
            "lr": torch.rand(args.hr_batch, 3, *cfg.in_hw, device=device) * 2 - 1,
            "hr": torch.rand(args.hr_batch, 3, 180, 320, device=device) * 2 - 1,
            "yx": torch.tensor([[10, 20]] * args.hr_batch, device=device),
        }
    count = [0]

    def step() -> None:
        with common.autocast(device, bf16):
            losses, _ = loss_fn(x, gen, hr)
        _optimise(vae, losses["loss/total"], opt, ema, count[0])
        count[0] += 1

    return args.vae_batch / _time(step, args.steps, device)


def bench_dit(preset: str, args: Args, bf16: bool, device: torch.device) -> float:
    """Samples/s (windows/s) of one DiT + heads training step."""
    from world_model.dit import VideoDiT, get_preset
    from world_model.heads import HeadsConfig, RewardTerminationHeads
    from world_model.text import ControlEmbeddings
    from world_model.train import common
    from world_model.train.dit import Args as DiTArgs
    from world_model.train.dit import DiTWithHeads, compute_losses, make_inputs

    torch.manual_seed(0)
    c, hw, dt, n_tok, n_act = 8, (9, 16), 384, 16, 9  # default VAE latent, MiniLM width, driving table
    cfg = get_preset(preset, latent_channels=c, latent_hw=hw, text_dim=dt, max_frames=max(16, args.window))
    model = DiTWithHeads(VideoDiT(cfg), RewardTerminationHeads(HeadsConfig(c, hw, dt))).to(device)
    ema = common.EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    table = ControlEmbeddings(
        torch.randn(n_act + 1, n_tok, dt, device=device),
        torch.ones(n_act + 1, n_tok, dtype=torch.bool, device=device),
        torch.randn(n_act + 1, dt, device=device),
    )
    b, t = args.dit_batch, args.window
    batch = {
        "latents": torch.randn(b, t, c, *hw),
        "actions": torch.randint(-1, n_act, (b, t)),
        "rewards": torch.randn(b, t),
        "terminated": torch.rand(b, t) < 0.05,
        "labelled": torch.ones(b, dtype=torch.bool),
        "has_rewards": torch.ones(b, dtype=torch.bool),
    }
    run_args = DiTArgs(data=None, latents=None, window=t)  # type: ignore[arg-type]
    gen = torch.Generator(device=device).manual_seed(0)
    count = [0]

    def step() -> None:
        inp = make_inputs(batch, table, run_args, gen, device)
        with common.autocast(device, bf16):
            losses = compute_losses(model, inp, 10.0, 1.0)
        _optimise(model, losses["loss/total"], opt, ema, count[0])
        count[0] += 1

    return b / _time(step, args.steps, device)


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    from world_model.train.common import resolve_bf16

    args = tyro.cli(Args, args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    has_bf16 = resolve_bf16(True, device)
    print(
        f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, steps {args.steps}"
    )
    print(
        f"{'model':<6}{'preset':<9}{'batch':>6}{'fp32 samples/s':>16}{'bf16 samples/s':>16}{'bf16/fp32':>11}"
    )
    rows = [("vae", p, args.vae_batch, bench_vae) for p in args.vae_presets]
    rows += [("dit", p, args.dit_batch, bench_dit) for p in args.dit_presets]
    for kind, preset, batch, fn in rows:
        fp32 = fn(preset, args, False, device)
        bf16 = fn(preset, args, True, device) if has_bf16 else math.nan
        print(f"{kind:<6}{preset:<9}{batch:>6}{fp32:>16.1f}{bf16:>16.1f}{bf16 / fp32:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
