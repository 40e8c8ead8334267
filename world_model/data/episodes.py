"""On-disk episode format: atomic writes, memory-mapped reads, the manifest and the data set card.

Layout (docs/ARCHITECTURE.md)::

    DATA/manifest.json
    DATA/episodes/ep_000123/{meta.json, frames_72x128.npy, video_720p.mp4,
                             actions.npy, rewards.npy, terminated.npy, truncated.npy}

Every per-step array is aligned on the frame index: ``actions[k]`` is the action that produced
``frames[k]`` (``actions[0] = -1``, nothing produced the reset frame), ``rewards[k]`` the reward of
that step. An episode is written under ``episodes/.tmp-<name>-<pid>/`` and renamed when complete, so a
killed writer leaves no half episode; the manifest is rebuilt from the complete episode folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from world_model.errors import UsageError

FORMAT_VERSION = 1
TRAIN_HW = (72, 128)  # (H, W) training resolution: 1280x720 / 10, keeps 16:9
FRAMES_FILE = f"frames_{TRAIN_HW[0]}x{TRAIN_HW[1]}.npy"
VIDEO_FILE = "video_720p.mp4"
LABEL_FILES = ("actions.npy", "rewards.npy", "terminated.npy", "truncated.npy")
EPISODES_DIR = "episodes"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


def episode_name(index: int) -> str:
    """Folder name of episode ``index`` (zero-padded so names sort in index order)."""
    return f"ep_{index:06d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that shape recorded data."""
    import gymnasium

    out = {"python": platform.python_version(), "numpy": np.__version__, "gymnasium": gymnasium.__version__}
    try:
        import imageio_ffmpeg

        out["ffmpeg"] = imageio_ffmpeg.get_ffmpeg_version()
    except Exception:  # noqa: BLE001 - the version is informative only
        pass
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_data_root(root: Path, *, create: bool) -> Path:
    """Validate a data directory path; with ``create`` make it (and refuse a file or a foreign manifest)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {str(root)!r} is a file; expected a directory (new or holding recorded data)")
    manifest = root / MANIFEST
    if manifest.exists():
        try:
            version = json.loads(manifest.read_text()).get("format_version")
        except (json.JSONDecodeError, AttributeError) as err:
            raise UsageError(f"{manifest} is not a valid manifest: {err}") from err
        if version != FORMAT_VERSION:
            raise UsageError(
                f"{manifest} has format_version {version!r}; this MatrixWorld reads format_version "
                f"{FORMAT_VERSION}. Record into a new directory."
            )
    if create:
        (root / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
    elif not (root / EPISODES_DIR).is_dir():
        raise UsageError(f"data directory {str(root)!r} holds no recorded episodes (no {EPISODES_DIR}/ folder)")
    return root


def list_episodes(root: Path) -> list[Path]:
    """Complete episode folders under ``root``, sorted by name (temporary folders excluded)."""
    folder = Path(root) / EPISODES_DIR
    if not folder.is_dir():
        raise UsageError(f"data directory {str(root)!r} holds no recorded episodes (no {EPISODES_DIR}/ folder)")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX))


def sample_frames(root: Path, episodes: int, every: int) -> tuple[np.ndarray, list[Path]]:
    """Every ``every``-th frame of the first ``episodes`` episodes of ``root`` (e.g. a palette of real colours).

    Returns:
        frames (N, 72, 128, 3) uint8 and the episodes read.

    Raises:
        UsageError: ``root`` holds no episodes.
    """
    eps = list_episodes(root)[:episodes]
    if not eps:
        raise UsageError(f"data directory {str(root)!r} holds no episodes")
    return np.concatenate([np.asarray(open_episode(ep)["frames"][::every]) for ep in eps]), eps


def remove_stale_tmp(root: Path) -> int:
    """Delete half-written episodes left by a killed recorder; returns how many."""
    stale = [p for p in (Path(root) / EPISODES_DIR).glob(f"{TMP_PREFIX}*")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def read_meta(episode: Path) -> dict[str, Any]:
    """The episode's ``meta.json`` (clear error if missing or corrupt)."""
    path = Path(episode) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UsageError(f"episode {str(episode)!r} has no meta.json; it is not a complete episode") from err
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is corrupt: {err}") from err


def open_episode(episode: Path, mmap: bool = True) -> dict[str, np.ndarray]:
    """Memory-map an episode's arrays.

    Returns:
        dict with frames (S+1, 72, 128, 3) uint8, actions (S+1,) int16 (-1 = unknown),
        rewards (S+1,) float32, terminated / truncated (S+1,) bool.
    """
    episode = Path(episode)
    mode = "r" if mmap else None
    out: dict[str, np.ndarray] = {}
    for key, fname in [("frames", FRAMES_FILE), *[(f[:-4], f) for f in LABEL_FILES]]:
        path = episode / fname
        try:
            out[key] = np.load(path, mmap_mode=mode, allow_pickle=False)
        except FileNotFoundError as err:
            raise UsageError(f"episode file {path} is missing") from err
        except ValueError as err:
            raise UsageError(f"episode file {path} is corrupt: {err}") from err
    n = len(out["frames"])
    bad = [k for k, v in out.items() if len(v) != n]
    if bad or out["frames"].shape[1:] != (*TRAIN_HW, 3):
        raise UsageError(
            f"episode {episode} is inconsistent: frames {out['frames'].shape}, "
            + ", ".join(f"{k} {out[k].shape}" for k in out if k != "frames")
        )
    return out


def write_episode(
    root: Path, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], video_tmp: Path | None = None
) -> Path:
    """Write one complete episode atomically.

    Args:
        root: data directory.
        name: episode folder name.
        arrays: frames (S+1, 72, 128, 3) uint8 and the four label arrays, (S+1,) each.
        meta: JSON-serialisable episode metadata; file hashes and step count are added here.
        video_tmp: a finished 720p video already written inside the episode's temporary folder.

    Returns:
        The final episode folder.
    """
    final = Path(root) / EPISODES_DIR / name
    tmp = tmp_episode_dir(root, name)
    tmp.mkdir(parents=True, exist_ok=True)
    if video_tmp is not None and video_tmp.parent != tmp:
        raise ValueError(f"video {video_tmp} must be written inside {tmp}")
    files = {FRAMES_FILE: arrays["frames"], **{f: arrays[f[:-4]] for f in LABEL_FILES}}
    for fname, arr in files.items():
        np.save(tmp / fname, np.ascontiguousarray(arr), allow_pickle=False)
    hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    meta = {**meta, "format_version": FORMAT_VERSION, "steps": int(len(arrays["frames"]) - 1), "sha256": hashes}
    write_json_atomic(tmp / "meta.json", meta)
    if final.exists():  # a complete copy already exists (resume raced): keep the first
        shutil.rmtree(tmp)
        return final
    os.replace(tmp, final)
    return final


def tmp_episode_dir(root: Path, name: str) -> Path:
    """The temporary folder an episode is written into before its rename."""
    return Path(root) / EPISODES_DIR / f"{TMP_PREFIX}{name}-{os.getpid()}"


def build_manifest(root: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from the complete episodes (atomic), and return it."""
    root = Path(root)
    episodes = []
    totals = {"episodes": 0, "steps": 0, "labelled_steps": 0, "unlabelled_steps": 0}
    action_counts: dict[str, int] = {}
    for ep in list_episodes(root):
        meta = read_meta(ep)
        actions = np.load(ep / "actions.npy", mmap_mode="r")[1:]
        names = meta.get("action_names", [])
        counts = {
            names[a] if 0 <= a < len(names) else "unknown": int(c)
            for a, c in zip(*np.unique(actions, return_counts=True), strict=True)
        }
        for k, c in counts.items():
            action_counts[k] = action_counts.get(k, 0) + c
        episodes.append(
            {
                "name": ep.name,
                "steps": meta["steps"],
                "labelled": meta["labelled"],
                "env_id": meta["env_id"],
                "seed": meta.get("seed"),
                "action_counts": counts,
                "meta_sha256": sha256_file(ep / "meta.json"),
            }
        )
        totals["episodes"] += 1
        totals["steps"] += meta["steps"]
        totals["labelled_steps" if meta["labelled"] else "unlabelled_steps"] += meta["steps"]
    old = {}
    if (root / MANIFEST).exists():
        old = json.loads((root / MANIFEST).read_text())
    manifest = {
        "format_version": FORMAT_VERSION,
        "train_hw": list(TRAIN_HW),
        **{k: v for k, v in old.items() if k in ("recipe",)},
        **(extra or {}),
        "totals": totals,
        "action_counts": dict(sorted(action_counts.items())),
        "versions": versions(),
        "episodes": episodes,
    }
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def load_manifest(root: Path) -> dict[str, Any]:
    """Read and version-check ``manifest.json``."""
    check_data_root(root, create=False)
    path = Path(root) / MANIFEST
    if not path.exists():
        return build_manifest(root)
    return json.loads(path.read_text())


def dir_size(path: Path) -> int:
    """Bytes on disk under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def data_card(root: Path) -> str:
    """The data set card printed by ``matrix-world data-info``."""
    manifest = load_manifest(root)
    eps = list_episodes(root)
    rewards = [np.load(ep / "rewards.npy", mmap_mode="r")[1:] for ep in eps]
    terms = sum(int(np.load(ep / "terminated.npy", mmap_mode="r").sum()) for ep in eps)
    all_r = np.concatenate(rewards) if rewards else np.zeros(0, np.float32)
    ep_returns = np.array([r.sum() for r in rewards]) if rewards else np.zeros(0)
    size = dir_size(root)
    steps = manifest["totals"]["steps"]
    video = sum((ep / VIDEO_FILE).stat().st_size for ep in eps if (ep / VIDEO_FILE).exists())
    frames = sum((ep / FRAMES_FILE).stat().st_size for ep in eps)
    lines = [
        f"data set: {Path(root).resolve()}",
        f"format_version: {manifest['format_version']}",
        f"episodes: {manifest['totals']['episodes']}  steps: {steps}  "
        f"(labelled {manifest['totals']['labelled_steps']}, unlabelled {manifest['totals']['unlabelled_steps']})",
        f"envs: {sorted({e['env_id'] for e in manifest['episodes']})}",
        "actions: " + "  ".join(f"{k}={v}" for k, v in manifest["action_counts"].items()),
        f"reward per step: mean {all_r.mean() if all_r.size else 0:.3f}  std {all_r.std() if all_r.size else 0:.3f}"
        f"  min {all_r.min() if all_r.size else 0:.2f}  max {all_r.max() if all_r.size else 0:.2f}",
        f"episode return: mean {ep_returns.mean() if ep_returns.size else 0:.1f}"
        f"  min {ep_returns.min() if ep_returns.size else 0:.1f}  max {ep_returns.max() if ep_returns.size else 0:.1f}",
        f"terminations: {terms}",
        f"disk: {size / 1e6:.1f} MB total; 720p video {video / 1e6:.1f} MB, "
        f"{TRAIN_HW[0]}x{TRAIN_HW[1]} frames {frames / 1e6:.1f} MB"
        + (f"; {size / max(steps, 1) * 1000 / 1e6:.1f} MB per 1,000 steps" if steps else ""),
    ]
    return "\n".join(lines)


def data_info_main(argv: list[str]) -> int:
    """``matrix-world data-info DIR``: print the data set card."""
    import argparse

    parser = argparse.ArgumentParser(prog="matrix-world data-info", description=data_info_main.__doc__)
    parser.add_argument("data", type=Path, help="a directory written by `matrix-world record`")
    args = parser.parse_args(argv)
    if not args.data.exists():
        raise UsageError(f"data directory {str(args.data)!r} does not exist")
    print(data_card(args.data))
    return 0
