"""Latent cache (``matrix-world encode-latents``): encode every episode once with the trained VAE.

Layout::

    LATENTS/latents.json                       format_version, vae_sha256, latent_shape (C, h, w), dtype,
                                               data dir and its manifest sha256, episodes done
    LATENTS/episodes/<ep>/latents.npy          (S+1, C, h, w) float16, normalised latents (VAE.encode,
                                               posterior mean), aligned with the episode's frames

Each episode is written as ``episodes/.tmp-<ep>-<pid>/`` and renamed when complete, so a killed
run leaves no half episode; a rerun skips the episodes already encoded (resumable). The cache is
tied to one VAE: a rerun with another VAE is refused unless ``--overwrite``. DiT training reads
these files and never runs the encoder. Under ``torchrun`` each rank encodes every
``world_size``-th episode.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from world_model.errors import UsageError

FORMAT_VERSION = 1
INFO_FILE = "latents.json"
LATENTS_FILE = "latents.npy"  # same name world_model.data.loader reads
TMP_PREFIX = ".tmp-"
FLOAT16_MAX = 65504.0


@dataclass
class Args:
    """Encode every episode of a data directory into a latent cache with a trained VAE."""

    data: Path
    """Recorded data directory."""
    vae: Path
    """Directory holding vae.safetensors + vae_config.json (train-vae's output, RUN_DIR/model, or a world)."""
    out: Path
    """Latent cache directory to create or complete."""
    batch_size: int = 64
    """Frames per encoder call."""
    device: str = "auto"
    """auto, cpu or cuda."""
    bf16: bool = False
    """Encode under bf16 autocast (faster on AVX512-BF16 / AMX CPUs and GPUs; fp32, with a note, where the
    device would emulate bf16; the cache is float16 either way and records `encoded_bf16`)."""
    overwrite: bool = False
    """Delete a cache made by another VAE instead of refusing."""


def vae_sha256(vae_dir: Path) -> str:
    """SHA-256 of the VAE weights file (identifies the VAE a cache or a DiT belongs to)."""
    from world_model.data.episodes import sha256_file

    path = Path(vae_dir) / "vae.safetensors"
    if not path.is_file():
        raise UsageError(
            f"--vae {str(vae_dir)!r} holds no vae.safetensors (expected train-vae's output dir or a world)"
        )
    return sha256_file(path)


def latent_space_sha256(vae_dir: Path) -> str:
    """Identity of the latent space a VAE encodes into.

    A VAE whose decoder was fine-tuned with a frozen encoder (``train-vae --init-from A
    --freeze-encoder``) records A's latent-space identity in its ``train_vae.json``: latent caches and
    DiTs made with A stay valid for it; a world directory records its VAE's in ``config.json``. Any
    other VAE is identified by its weights file.
    """
    from world_model.checkpoint import world_provenance

    summary = Path(vae_dir) / "train_vae.json"
    world = None if summary.is_file() else world_provenance(vae_dir)
    if world is not None and world["latent_space_sha256"]:  # a world records its VAE's latent space
        return world["latent_space_sha256"]
    if summary.is_file():
        try:
            recorded = json.loads(summary.read_text()).get("latent_space_sha256")
        except json.JSONDecodeError as err:
            raise UsageError(f"{summary} is corrupt: {err}") from err
        if recorded:
            return recorded
    return vae_sha256(vae_dir)


def read_info(latents: Path) -> dict:
    """``LATENTS/latents.json`` (clear error if missing or corrupt)."""
    path = Path(latents) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UsageError(
            f"latent cache {str(latents)!r} has no {INFO_FILE}; run `matrix-world encode-latents`"
        ) from err
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is corrupt: {err}") from err


def resolve_caches(
    data: list[Path] | tuple[Path, ...], latents: list[Path] | tuple[Path, ...]
) -> tuple[dict[Path, Path], list[dict]]:
    """Pair each data directory with its latent cache and check that the caches agree.

    Args:
        data: data directories.
        latents: one latent cache per data directory, in the same order.

    Returns:
        ``(data root -> cache root, the latents.json of every cache)``.

    Raises:
        UsageError: counts differ, a cache is missing, or caches come from different VAEs.
    """
    if len(data) != len(latents):
        raise UsageError(
            f"{len(data)} --data directories but {len(latents)} --latents caches; give one per data dir"
        )
    infos = []
    for cache in latents:
        if not Path(cache).is_dir():
            raise UsageError(
                f"--latents {str(cache)!r} does not exist; run `matrix-world encode-latents` first"
            )
        infos.append(read_info(cache))
    key = lambda info: (info.get("vae_sha256"), info.get("latent_shape"))  # noqa: E731
    for cache, info in zip(latents[1:], infos[1:], strict=True):
        if key(info) != key(infos[0]):
            raise UsageError(f"latent caches {latents[0]} and {cache} were made by different VAEs")
    return {Path(r): Path(c) for r, c in zip(data, latents, strict=True)}, infos


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@torch.no_grad()
def encode_episode(
    vae: torch.nn.Module, frames: np.ndarray, batch_size: int, device: torch.device, bf16: bool
) -> np.ndarray:
    """Normalised latents of one episode.

    Args:
        vae: FrameVAE in eval mode.
        frames: (S+1, 72, 128, 3) uint8 (may be a memmap).
        batch_size: frames per encoder call.
        device: where the VAE runs.
        bf16: autocast to bf16.

    Returns:
        (S+1, C, h, w) float16.
    """
    from world_model.train.common import autocast
    from world_model.vae import frames_to_tensor

    out = []
    for i in range(0, len(frames), batch_size):
        x = frames_to_tensor(
            torch.from_numpy(np.array(frames[i : i + batch_size])).to(device)
        )  # (B, 3, 72, 128)
        with autocast(device, bf16):
            z = vae.encode(x)  # (B, C, h, w) posterior mean, normalised
        out.append(z.float().cpu().numpy())
    z = np.concatenate(out)  # (S+1, C, h, w)
    if not np.isfinite(z).all() or np.abs(z).max() > FLOAT16_MAX:
        raise UsageError(
            "the VAE produced non-finite or float16-overflowing latents; check the VAE checkpoint"
        )
    return z.astype(np.float16)


def encode_all(args: Args, command: list[str] | None = None) -> dict:
    """Encode the missing episodes; returns the final ``latents.json`` content.

    Args:
        args: the parsed arguments.
        command: the command line, recorded in ``latents.json`` (part of a world's recipe).
    """
    from world_model.checkpoint import load_module
    from world_model.data.episodes import EPISODES_DIR, MANIFEST, list_episodes, open_episode, sha256_file
    from world_model.train.common import barrier, cleanup_distributed, resolve_bf16, setup_distributed
    from world_model.vae import FrameVAE, VAEConfig

    if not Path(args.data).is_dir():
        raise UsageError(f"--data {str(args.data)!r} does not exist or is not a directory")
    episodes = list_episodes(args.data)
    if not episodes:
        raise UsageError(f"--data {str(args.data)!r} holds no complete episodes")
    info = setup_distributed(args.device)
    bf16 = resolve_bf16(args.bf16, info.device)  # fp32 where bf16 would be emulated
    vae_sha256(args.vae)  # checks that --vae holds a VAE
    sha = latent_space_sha256(args.vae)  # caches are keyed by the latent space (same for decoder fine-tunes)
    vae = load_module(args.vae, "vae", FrameVAE, VAEConfig, map_location=info.device).eval()
    c, (h, w) = vae.cfg.latent_channels, vae.cfg.latent_hw
    out = Path(args.out)
    ep_root = out / EPISODES_DIR

    existing = read_info(out) if (out / INFO_FILE).exists() else None
    if existing is not None and existing.get("vae_sha256") != sha:
        if not args.overwrite:
            raise UsageError(
                f"latent cache {str(out)!r} was made in another latent space "
                f"(vae_sha256 {existing.get('vae_sha256')}, --vae has {sha}; caches written before the "
                f"latent-space identity was recorded hold the weights hash instead); use a new --out or "
                f"pass --overwrite"
            )
        if info.is_main:
            shutil.rmtree(ep_root, ignore_errors=True)
    header = {
        "format_version": FORMAT_VERSION,
        "vae_sha256": sha,
        "vae_dir": str(Path(args.vae).resolve()),
        "command": command or [],
        "latent_shape": [c, h, w],
        "dtype": "float16",
        "encoded_bf16": bf16,
        "normalised": True,
        "latent_shift": vae.latent_shift.tolist(),
        "latent_scale": vae.latent_scale.tolist(),
        "data": str(Path(args.data).resolve()),
        "data_manifest_sha256": sha256_file(Path(args.data) / MANIFEST)
        if (Path(args.data) / MANIFEST).exists()
        else "",
    }
    if info.is_main:
        ep_root.mkdir(parents=True, exist_ok=True)
        for stale in ep_root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        same_vae = existing is not None and existing.get("vae_sha256") == sha
        _write_json(out / INFO_FILE, {**header, "episodes": existing.get("episodes", {}) if same_vae else {}})
    barrier()

    done = skipped = 0
    for ep in episodes[info.rank :: info.world_size]:
        arrays = open_episode(ep)  # validates the episode's files (UsageError names a corrupt one)
        target = ep_root / ep.name / LATENTS_FILE
        if target.exists():
            try:
                if np.load(target, mmap_mode="r").shape == (len(arrays["frames"]), c, h, w):
                    skipped += 1
                    continue
            except ValueError:
                pass  # corrupt: re-encode
            shutil.rmtree(target.parent)
        z = encode_episode(vae, arrays["frames"], args.batch_size, info.device, bf16)  # (S+1, C, h, w)
        tmp = ep_root / f"{TMP_PREFIX}{ep.name}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / LATENTS_FILE, "wb") as f:
            np.save(f, z, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ep_root / ep.name)
        done += 1
        if info.is_main:
            print(f"encoded {ep.name}: {tuple(z.shape)}", flush=True)
    barrier()
    result = header
    if info.is_main:
        eps = {}
        for ep in episodes:
            path = ep_root / ep.name / LATENTS_FILE
            if path.exists():
                eps[ep.name] = int(np.load(path, mmap_mode="r").shape[0])
        result = {**header, "episodes": eps}
        _write_json(out / INFO_FILE, result)
        print(
            f"latent cache {out}: {len(eps)} episodes ({done} encoded now, {skipped} already done on rank 0)"
        )
    cleanup_distributed()
    return result


def main(argv: list[str] | None = None) -> int:
    """``matrix-world encode-latents``: parse Args and fill the latent cache."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world encode-latents", description=__doc__.split("\n\n")[0])
    command = ["matrix-world", "encode-latents", *(sys.argv[1:] if argv is None else argv)]
    encode_all(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
