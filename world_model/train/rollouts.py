"""Generated latents for the decoder's adversarial fine-tune (``matrix-world rollout-latents``).

A decoder trained on encoder latents meets other latents at play time: the DiT's. Its few-step
samples are softer than an encoding of a real frame (the pipelined sampler takes 4 Euler steps per
frame, which average what the context leaves open), and a decoder that only ever saw encodings
draws them as blur. This module drives a world's streams in closed loop and stores every emitted
latent, so that ``train-vae --gen-latents DIR`` can show them to its critic: the decoder then
learns to draw real-looking frames (sharp road edges, kerbs on curves) from the latents it will
actually be given, while the reconstruction loss on real frames keeps it faithful. There is no
paired target for a generated latent; only the critic judges those decodes.

Driver: the pixel road follower (:class:`world_model.road_follower.RoadFollower`) with a share of
uniformly random actions, so the rollouts cover turns, braking and the car leaving the road.

Output (``OUT/``): ``latents.safetensors`` with ``latents`` (N, C, h, w) float32 normalised latents
(step-major: N = (steps - skip) x envs), and ``rollouts.json`` with the world's latent-space
identity and recipe, the sampler, the counts, the command and the SHA-256 of the tensor file
(checked on load, so the pair cannot be mixed up). Both are written atomically; a rerun removes
the old info first, so a crash between the two writes leaves no info, not a stale one.
``train-vae`` records the info of the sets it used in its summary, so a world built on that decoder
lists the rollout (and its world's recipe) in its own recipe.

Example::

    matrix-world rollout-latents --checkpoint matrix_env/worlds/default --envs 64 --steps 100 \\
        --out ~/mw/gen_latents/default
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from world_model.errors import UsageError

LATENTS_FILE = "latents.safetensors"
INFO_FILE = "rollouts.json"


@dataclass
class Args:
    """Drive a world in closed loop and store the latents it generates."""

    out: Path
    """Output directory (``latents.safetensors`` + ``rollouts.json``)."""
    checkpoint: Path = Path("matrix_env/worlds/default")
    """World-model directory whose DiT generates (its start contexts seed the streams)."""
    envs: int = 64
    """Streams driven at once (one batched forward per step)."""
    steps: int = 100
    """Steps per stream."""
    skip: int = 4
    """Warm-up steps per stream that are not stored (their frames are still close to the real context)."""
    random_prob: float = 0.2
    """Share of steps whose action is drawn uniformly instead of the road follower's."""
    seed: int = 0
    """Seed of the start contexts, the noise and the random actions."""
    threads: int = 0
    """torch.set_num_threads (0 = torch's default)."""


def check_args(args: Args) -> None:
    """Clear errors for bad counts before any model is loaded."""
    if args.envs < 1 or args.steps < 1:
        raise UsageError(f"--envs {args.envs} and --steps {args.steps} must be >= 1")
    if not 0 <= args.skip < args.steps:
        raise UsageError(f"--skip {args.skip}: must be in [0, --steps={args.steps})")
    if not 0.0 <= args.random_prob <= 1.0:
        raise UsageError(f"--random-prob {args.random_prob}: must be a probability in [0, 1]")


@torch.no_grad()
def collect(args: Args) -> tuple[torch.Tensor, dict]:
    """Run the rollouts; returns the stored latents (N, C, h, w) float32 and the info dict."""
    from world_model.checkpoint import load_world, world_provenance
    from world_model.data.episodes import TRAIN_HW
    from world_model.data.latents import latent_space_sha256
    from world_model.road_follower import RoadFollower
    from world_model.simulator import Simulator

    check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint).expanduser()
    world = load_world(checkpoint)
    try:
        follower = RoadFollower(list(world.action_names))
    except ValueError as err:
        raise UsageError(f"{checkpoint}: {err}") from err
    sim = Simulator(world, args.envs, "cpu")
    rng = np.random.default_rng(args.seed)
    num_starts = len(world.start_latents)
    starts = torch.from_numpy(rng.permutation(num_starts)[np.arange(args.envs) % num_starts])  # (B,) wraps
    gen = torch.Generator().manual_seed(args.seed)
    first = sim.reset(torch.ones(args.envs, dtype=torch.bool), starts, generator=gen)  # (B, C, h, w)
    frame = sim.decode(first, TRAIN_HW).cpu().numpy()  # (B, 72, 128, 3)
    kept = []
    t0 = time.perf_counter()
    for t in range(args.steps):
        actions = follower(frame)  # (B,) int64
        explore = rng.random(args.envs) < args.random_prob
        actions[explore] = rng.integers(0, len(world.action_names), int(explore.sum()))
        latents, _, _ = sim.step(torch.from_numpy(actions))  # (B, C, h, w)
        frame = sim.decode(latents, TRAIN_HW).cpu().numpy()
        if t >= args.skip:
            kept.append(latents.float().clone())
    out = torch.cat(kept)  # (N, C, h, w), step-major
    info = {
        "checkpoint": str(checkpoint),
        "latent_space_sha256": latent_space_sha256(checkpoint),
        "latent_shape": list(out.shape[1:]),
        "count": len(out),
        "envs": args.envs,
        "steps": args.steps,
        "skip": args.skip,
        "random_prob": args.random_prob,
        "seed": args.seed,
        "sampler": dataclasses.asdict(sim.cfg),
        "world_recipe": (world_provenance(checkpoint) or {}).get("commands", []),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return out, info


def save(out_dir: Path, latents: torch.Tensor, info: dict) -> None:
    """Write ``latents.safetensors`` and ``rollouts.json`` atomically: the old info goes first, the
    tensors next, the info (with the tensor file's SHA-256) last."""
    from world_model.checkpoint import _atomic_save_tensors, _atomic_write_json
    from world_model.data.episodes import sha256_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INFO_FILE).unlink(missing_ok=True)
    _atomic_save_tensors(out_dir / LATENTS_FILE, {"latents": latents})
    _atomic_write_json(out_dir / INFO_FILE, {**info, "latents_sha256": sha256_file(out_dir / LATENTS_FILE)})


def load(path: Path, latent_space: str, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """Generated latents of ``path`` (N, C, h, w) float32 and their info, checked against the decoding VAE.

    Raises:
        UsageError: missing/corrupt files, or latents of another latent space or shape.
    """
    from world_model.checkpoint import CheckpointError, _load_tensors
    from world_model.data.episodes import sha256_file

    path = Path(path).expanduser()
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except FileNotFoundError as err:
        raise UsageError(f"--gen-latents {str(path)!r} has no {INFO_FILE}; run `matrix-world rollout-latents`") from err
    except json.JSONDecodeError as err:
        raise UsageError(f"{path / INFO_FILE} is corrupt: {err}") from err
    if info.get("latent_space_sha256") != latent_space:
        raise UsageError(
            f"--gen-latents {str(path)!r} was generated in latent space {str(info.get('latent_space_sha256'))[:12]}, "
            f"the VAE being trained decodes latent space {latent_space[:12]}; roll out a world built on this VAE"
        )
    if (path / LATENTS_FILE).is_file() and sha256_file(path / LATENTS_FILE) != info.get("latents_sha256"):
        raise UsageError(
            f"--gen-latents {str(path)!r}: {LATENTS_FILE} does not match the SHA-256 in {INFO_FILE} "
            "(written by another run); rerun `matrix-world rollout-latents`"
        )
    try:
        latents = _load_tensors(path / LATENTS_FILE)["latents"].float()
    except (CheckpointError, KeyError) as err:
        raise UsageError(f"--gen-latents {str(path)!r}: cannot read {LATENTS_FILE}: {err}") from err
    if tuple(latents.shape[1:]) != tuple(latent_shape) or len(latents) == 0:
        raise UsageError(
            f"--gen-latents {str(path)!r} holds latents of shape {tuple(latents.shape)}, expected (N>0, "
            f"{', '.join(map(str, latent_shape))})"
        )
    return latents, {"path": str(path), **info}


def main(argv: list[str] | None = None) -> int:
    """``matrix-world rollout-latents``: parse Args, roll out, save."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world rollout-latents", description=__doc__.split("\n\n")[0])
    latents, info = collect(args)
    info["command"] = ["matrix-world", "rollout-latents", *(sys.argv[1:] if argv is None else argv)]
    save(Path(args.out).expanduser(), latents, info)
    print(f"saved {len(latents)} generated latents {tuple(latents.shape[1:])} to {args.out} ({info['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
