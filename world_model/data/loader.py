"""Windowed loader for the trainers: random windows of T consecutive steps across episodes.

Arrays are memory-mapped lazily in each process (so the dataset pickles cheaply into DataLoader
workers and torchrun processes, and no process reads more than the windows it samples). The index
of valid windows is computed once from the episode lengths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from world_model.data import episodes as E
from world_model.errors import UsageError

LATENTS_FILE = "latents.npy"


def split_episodes(root: Path, holdout_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of a data directory's episode names.

    The split depends only on the episode names and ``seed``, so it is the same in every process and
    stays stable when more episodes are recorded later (an episode's side never changes).
    """
    names = [p.name for p in E.list_episodes(root)]
    if not names:
        raise UsageError(f"data directory {str(root)!r} holds no complete episodes")
    n_hold = max(1, round(holdout_fraction * len(names))) if holdout_fraction > 0 and len(names) > 1 else 0
    # rank by a hash of (seed, name): stable when episodes are added, unlike a shuffled prefix
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    held = set(ranked[:n_hold])
    return [n for n in names if n not in held], sorted(held)


class WindowDataset(Dataset):
    """Every window of ``window`` consecutive frames of the chosen episodes.

    Item: dict with
        frames (T, 72, 128, 3) uint8 tensor      (source="frames"), or
        latents (T, C, h, w) float32 tensor      (source="latents", from the latent cache),
        actions (T,) long     action that produced each frame (-1 = unknown),
        rewards (T,) float32, terminated (T,) bool, labelled () bool, has_rewards () bool.
    """

    def __init__(
        self,
        root: Path | list[Path],
        window: int,
        source: Literal["frames", "latents"] = "frames",
        latents_root: Path | list[Path] | None = None,
        episodes: list[str] | None = None,
        splits: tuple[str, ...] = ("train",),
    ) -> None:
        roots = [Path(r) for r in (root if isinstance(root, list | tuple) else [root])]
        if source not in ("frames", "latents"):
            raise UsageError(f"source {source!r}: expected 'frames' or 'latents'")
        if window < 1:
            raise UsageError(f"window {window}: expected >= 1")
        lat_roots: list[Path | None]
        if source == "latents":
            if latents_root is None:
                raise UsageError("source='latents' needs latents_root (written by `matrix-world encode-latents`)")
            lat_roots = [Path(r) for r in (latents_root if isinstance(latents_root, list | tuple) else [latents_root])]
            if len(lat_roots) != len(roots):
                raise UsageError(f"{len(roots)} data roots but {len(lat_roots)} latent roots; give one per data root")
        else:
            lat_roots = [None] * len(roots)
        self.window, self.source = window, source
        self.paths: list[tuple[Path, Path | None]] = []
        self.labelled: list[bool] = []
        self.has_rewards: list[bool] = []
        lengths = []
        for root, lat_root in zip(roots, lat_roots, strict=True):
            E.check_data_root(root, create=False)
            wanted = None if episodes is None else set(episodes)
            for ep in E.list_episodes(root):
                if wanted is not None and ep.name not in wanted:
                    continue
                meta = E.read_meta(ep)
                if meta.get("split", "train") not in splits:
                    continue
                n = meta["steps"] + 1
                lat = None
                if lat_root is not None:
                    lat = lat_root / E.EPISODES_DIR / ep.name / LATENTS_FILE
                    if not lat.exists():
                        raise UsageError(f"latent cache {lat} is missing; run `matrix-world encode-latents` first")
                if n < window:
                    continue
                self.paths.append((ep, lat))
                self.labelled.append(bool(meta["labelled"]))
                self.has_rewards.append(bool(meta.get("has_rewards", True)))
                lengths.append(n - window + 1)
        if not self.paths:
            raise UsageError(f"no episode in {[str(r) for r in roots]} is long enough for windows of {window} frames")
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # window offsets per episode
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _episode(self, k: int) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(k)
        if arrays is None:  # opened lazily: each DataLoader worker / process maps its own view
            ep, lat = self.paths[k]
            arrays = E.open_episode(ep, mmap=True)
            if lat is not None:
                arrays["latents"] = np.load(lat, mmap_mode="r", allow_pickle=False)
                if len(arrays["latents"]) != len(arrays["frames"]):
                    raise UsageError(
                        f"latent cache {lat} has {len(arrays['latents'])} frames, "
                        f"episode {ep} has {len(arrays['frames'])}; re-run encode-latents"
                    )
            self._arrays[k] = arrays
        return arrays

    def locate(self, index: int) -> tuple[int, int]:
        """Window index -> (episode number, first frame)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.starts, index, side="right") - 1)
        return k, int(index - self.starts[k])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k, i = self.locate(index)
        a = self._episode(k)
        sl = slice(i, i + self.window)
        item = {
            "actions": torch.from_numpy(a["actions"][sl].astype(np.int64)),  # (T,)
            "rewards": torch.from_numpy(np.array(a["rewards"][sl], dtype=np.float32)),  # (T,)
            "terminated": torch.from_numpy(np.array(a["terminated"][sl], dtype=bool)),  # (T,)
            "labelled": torch.tensor(self.labelled[k]),
            "has_rewards": torch.tensor(self.has_rewards[k]),
        }
        if self.source == "frames":
            item["frames"] = torch.from_numpy(np.array(a["frames"][sl]))  # (T, 72, 128, 3) uint8
        else:
            item["latents"] = torch.from_numpy(np.array(a["latents"][sl], dtype=np.float32))  # (T, C, h, w)
        return item
