"""Train a world's observation decoder (``matrix-world train-obs-decoder``).

Agents see small frames (84x84): the vector env decodes every latent with the VAE's
training-resolution decoder (72x128) and resizes. Once the DiT is cheap that decode is a third of a
batched step on a CPU (README, "Env speed"). :class:`world_model.vae.ObsDecoder` is the same decoder
at a fraction of the width; this command trains it to reproduce the world's VAE ``decode`` of the
same latents (distillation: no frames are read, the VAE is the target), on the latents of recorded
episodes (``encode-latents`` caches) and, with ``--gen-latents``, on latents the world generated
(``rollout-latents``: what the decoder meets at play time). The world is written to ``--out`` as a copy
with the decoder added (VAE, DiT, heads, starts, sampler unchanged; the command appended to its
recipe); the env then uses it for agent-sized observations (``obs_decoder=False`` turns it off).

The report compares the two decoders on held-out latents, never trained on, per source (each
``--latents`` cache and each ``--gen-latents`` set: other-domain footage scores apart from the game's):
every 20th recorded episode and every 20th generated stream of each, whole (a neighbouring frame of
the same drive would make the score optimistic). It gives the PSNR of the uint8 frames against the
VAE's float32 decode at the native size and at 84x84 after the env's resize, and how often the road
follower picks the same action from the two 84x84 frames; and it times both decoders at batch 16.
The target is always the VAE's float32 decode (``--bf16`` speeds up the student only). The run takes
minutes on a CPU; a killed run is simply rerun (the world is written atomically at the end).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from world_model.errors import UsageError

HELDOUT_EVERY = 20  # every 20th recorded episode and generated stream (the first included) is held out, whole
REPORT_HW = (84, 84)  # the agents' observation size of the report
PSNR_CAP = 100.0  # dB reported for identical uint8 frames (JSON has no inf)


@dataclass
class Args:
    """Train a narrow decoder for agent-sized observations to match a world's VAE; write the world with it."""

    world: Path
    """The world whose VAE ``decode`` is the target and that gets the decoder."""
    out: Path
    """Where the world with the decoder is written (may equal --world: replaced atomically)."""
    latents: tuple[Path, ...] = ()
    """Latent caches of recorded episodes (``encode-latents`` with this world's VAE or latent space);
    at least 2 episodes in each, as every 20th (the first included) is held out whole for the report."""
    gen_latents: tuple[Path, ...] = ()
    """Generated latents (``matrix-world rollout-latents`` of a world in the same latent space); at least 2
    streams (``--envs``) in each, every 20th held out whole."""
    channels: tuple[int, ...] = (16, 32, 64)
    """Decoder widths (``ObsDecoderConfig.channels``; the VAE's (32, 64, 128)), one per upsampling."""
    steps: int = 1500
    """Optimiser steps."""
    batch_size: int = 64
    """Latents per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay to lr/10 after the warmup)."""
    warmup: int = 50
    """Linear warmup steps."""
    bf16: bool = False
    """bf16 autocast for the student (a CPU with AVX512-BF16/AMX, or a bf16 GPU); the target stays the VAE's
    float32 decode (the report's timings run both decoders under it)."""
    seed: int = 0
    """Seed of the init and the batch order."""
    device: str = "cpu"
    """Torch device."""


def load_pool(
    args: Args, latent_space: str, shape: tuple[int, ...]
) -> tuple[dict[str, list[torch.Tensor]], list[dict]]:
    """The latents of each source, named "recorded <cache dir>" (one tensor per episode) or "generated
    <set dir>" (one tensor per stream), each (n, C, h, w) float32, checked against the world.

    Raises:
        UsageError: no source, a cache of another latent space or shape.
    """
    from world_model.data.latents import LATENTS_FILE, read_info
    from world_model.train import rollouts

    if not args.latents and not args.gen_latents:
        raise UsageError("give --latents (encode-latents caches) and/or --gen-latents (rollout-latents sets)")
    parts: dict[str, list[torch.Tensor]] = {}
    sources = []

    def name(kind: str, path: Path) -> str:  # "recorded carracing"; a repeated name gets " #2", " #3", ...
        base = f"{kind} {path.name}"
        key, n = base, 1
        while key in parts:
            n += 1
            key = f"{base} #{n}"
        return key

    for cache in args.latents:
        cache = Path(cache).expanduser()
        info = read_info(cache)
        if info.get("vae_sha256") != latent_space or tuple(info.get("latent_shape", ())) != shape:
            raise UsageError(
                f"--latents {str(cache)!r} holds latents of shape {info.get('latent_shape')} from latent space "
                f"{str(info.get('vae_sha256'))[:12]}; the world decodes {shape} from {latent_space[:12]}"
            )
        files = sorted((cache / "episodes").glob(f"*/{LATENTS_FILE}"))
        if not files:
            raise UsageError(f"--latents {str(cache)!r} holds no encoded episodes")
        episodes = [torch.from_numpy(np.load(f).astype(np.float32)) for f in files]  # each (S+1, C, h, w)
        parts[name("recorded", cache)] = episodes
        sources.append({"path": str(cache), "episodes": len(files)})
    for path in args.gen_latents:
        z, info = rollouts.load(path, latent_space, shape)  # (N, C, h, w), step-major over info["envs"] streams
        envs = int(info.get("envs", 1))
        parts[name("generated", Path(info["path"]))] = [z[s::envs] for s in range(envs)]  # each (steps, C, h, w)
        sources.append({"path": info["path"], "latents": len(z), "command": info.get("command")})
    return parts, sources


def split(units: list[torch.Tensor], source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) latents of one source: every HELDOUT_EVERY-th unit (episode or stream), whole,
    is held out, the first included.

    Raises:
        UsageError: fewer than 2 units (nothing would be left on one side).
    """
    if len(units) < 2:
        what = "episodes" if source.startswith("recorded") else "streams (rollout-latents --envs)"
        raise UsageError(f"{source}: {len(units)} {what}; need at least 2 to hold one out for the report")
    pick = lambda held: torch.cat([u for i, u in enumerate(units) if (i % HELDOUT_EVERY == 0) == held])  # noqa: E731
    return pick(False), pick(True)


def resized(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, 84, 84), the env's resize (antialiased bilinear)."""
    return F.interpolate(x, size=REPORT_HW, mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def compare(vae: torch.nn.Module, dec: torch.nn.Module, z: torch.Tensor, bf16: bool, device: torch.device) -> dict:
    """``dec`` (under bf16 autocast if asked) against the VAE's float32 decode on latents ``z`` (N, C, h, w):
    PSNR of the uint8 frames at the native size and at 84x84, and how often the road follower picks the
    same action from the two 84x84 frames."""
    from world_model.actions import DRIVING_ACTIONS
    from world_model.eval.metrics import psnr
    from world_model.road_follower import RoadFollower
    from world_model.train.common import autocast
    from world_model.vae import tensor_to_frames

    ref, got = [], []
    for i in range(0, len(z), 64):
        zb = z[i : i + 64].to(device)
        ref.append(vae.decode(zb).float().cpu())
        with autocast(device, bf16):
            got.append(dec(zb).float().cpu())
    ref_t, got_t = torch.cat(ref), torch.cat(got)  # (N, 3, H, W)
    frames = lambda x: tensor_to_frames(x).numpy()  # noqa: E731  (N, H, W, 3) uint8, the env's clamp
    small_ref, small_got = frames(resized(ref_t)), frames(resized(got_t))  # (N, 84, 84, 3)
    follower = RoadFollower(DRIVING_ACTIONS)
    return {
        "latents": len(z),
        "psnr_native_db": min(psnr(frames(got_t), frames(ref_t)), PSNR_CAP),  # identical frames: the cap, not inf
        "psnr_84_db": min(psnr(small_got, small_ref), PSNR_CAP),
        "follower_same_action": float((follower(small_got) == follower(small_ref)).mean()),
    }


@torch.no_grad()
def decode_ms(vae: torch.nn.Module, dec: torch.nn.Module, z: torch.Tensor, bf16: bool, device: torch.device) -> dict:
    """Milliseconds per call of the VAE's decode and of ``dec`` on a batch of 16 latents (5 calls after one)."""
    from world_model.train.common import autocast

    out = {}
    zb = z[:16].to(device)
    for name, fn in (("vae_decode_ms", vae.decode), ("obs_decoder_ms", dec)):
        with autocast(device, bf16):
            fn(zb)  # warm-up
            t0 = time.perf_counter()
            for _ in range(5):
                fn(zb)
        out[name] = (time.perf_counter() - t0) / 5 * 1000.0
    return out


def train(args: Args, command: list[str] | None = None) -> dict:
    """Train the decoder, write the world with it; returns the report (also in the world's meta)."""
    from world_model.checkpoint import load_world, save_world
    from world_model.data.latents import latent_space_sha256
    from world_model.device import check_device
    from world_model.train.build_world import check_world_copy, copied_recipe
    from world_model.train.common import autocast, cosine_lr, set_lr
    from world_model.vae import ObsDecoder, ObsDecoderConfig

    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{name} {value}: expected an integer >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: expected a finite number > 0")
    if not args.channels or min(args.channels) < 1:
        raise UsageError(f"--channels {args.channels}: expected one width >= 1 per upsampling")
    world_dir, out = Path(args.world).expanduser(), Path(args.out).expanduser()
    check_world_copy(world_dir, out)
    device = check_device(args.device)
    world = load_world(world_dir, device)
    vae = world.vae
    if len(args.channels) != len(vae.cfg.channels):
        raise UsageError(
            f"--channels {args.channels}: the world's VAE upsamples {len(vae.cfg.channels)} times "
            f"({vae.cfg.channels}); give one width per upsampling"
        )
    shape = (vae.cfg.latent_channels, *vae.cfg.latent_hw)
    pools, sources = load_pool(args, latent_space_sha256(world_dir), shape)  # source -> [(n, C, h, w)]
    splits = {k: split(units, k) for k, units in pools.items()}  # source -> (training, held out)
    train_z = torch.cat([tr for tr, _ in splits.values()])  # (N_train, C, h, w)
    eval_z = {k: ev for k, (_, ev) in splits.items()}  # source -> (N_eval, C, h, w)

    torch.manual_seed(args.seed)
    cfg = ObsDecoderConfig(latent_channels=shape[0], channels=tuple(args.channels))
    dec = ObsDecoder(cfg).to(device)
    dec.latent_shift.copy_(vae.latent_shift)
    dec.latent_scale.copy_(vae.latent_scale)
    opt = torch.optim.AdamW(dec.parameters(), lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"train-obs-decoder: {sum(p.numel() for p in dec.parameters()) / 1e3:.0f}k params, "
          f"{len(train_z)} training latents, held out: {', '.join(f'{len(z)} {k}' for k, z in eval_z.items())}",
          flush=True)
    t0 = time.monotonic()
    for step in range(args.steps):
        idx = torch.randint(len(train_z), (args.batch_size,), generator=gen)  # (B,)
        z = train_z[idx].to(device)  # (B, C, h, w)
        set_lr(opt, cosine_lr(step, args.steps, args.lr, args.warmup))
        with torch.no_grad():
            target = vae.decode(z).float()  # (B, 3, H, W), always the float32 decode
        with autocast(device, args.bf16):
            loss = (dec(z).float() - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step + 1 == args.steps:
            took = time.monotonic() - t0
            print(f"step {step + 1}/{args.steps} L1 {float(loss.detach()):.4f} ({took:.0f} s)", flush=True)
    dec.eval().requires_grad_(False)

    report = {"heldout": {k: compare(vae, dec, z, args.bf16, device) for k, z in eval_z.items()}}
    report.update(decode_ms(vae, dec, train_z, args.bf16, device), channels=list(args.channels), steps=args.steps,
                  train_latents=len(train_z), minutes=(time.monotonic() - t0) / 60.0)
    print(json.dumps(report, indent=1), flush=True)
    report["sources"] = sources
    world.obs_decoder = dec
    world.meta = {**world.meta, "obs_decoder": report}
    save_world(out, world, copied_recipe(world_dir, command))
    print(f"wrote {out} with an observation decoder")
    return report


def main(argv: list[str] | None = None) -> int:
    """``matrix-world train-obs-decoder``: parse Args and train."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world train-obs-decoder", description=__doc__.split("\n\n")[0])
    train(args, command=["matrix-world", "train-obs-decoder", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
