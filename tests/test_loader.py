"""The windowed loader over recorded episodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from world_model.data import episodes as E
from world_model.data.loader import WindowDataset, split_episodes
from world_model.errors import UsageError


def write_fake(root: Path, lengths: list[int], labelled: bool = True) -> None:
    E.check_data_root(root, create=True)
    for i, n in enumerate(lengths):
        frames = np.zeros((n + 1, *E.TRAIN_HW, 3), np.uint8)
        frames[:, 0, 0, 0] = np.arange(n + 1)  # frame index written into a pixel
        actions = np.concatenate([[-1], np.arange(n) % 9]).astype(np.int16)
        arrays = {
            "frames": frames,
            "actions": actions if labelled else np.full(n + 1, -1, np.int16),
            "rewards": np.arange(n + 1, dtype=np.float32),
            "terminated": np.zeros(n + 1, bool),
            "truncated": np.zeros(n + 1, bool),
        }
        E.write_episode(
            root, E.episode_name(i), arrays, {"env_id": "Fake-v0", "labelled": labelled, "action_names": ["a"] * 9}
        )
    E.build_manifest(root)


def test_windows_are_aligned_and_complete(tmp_path: Path) -> None:
    write_fake(tmp_path, [10, 3, 7])
    ds = WindowDataset(tmp_path, window=4)
    assert len(ds) == (11 - 3) + (4 - 3) + (8 - 3)
    item = ds[0]
    assert item["frames"].shape == (4, 72, 128, 3) and item["frames"].dtype == torch.uint8
    assert item["actions"].tolist() == [-1, 0, 1, 2] and item["rewards"].tolist() == [0, 1, 2, 3]
    last = ds[len(ds) - 1]  # last window of the last episode ends on its last frame
    assert last["frames"][:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    # every window is consecutive frames of one episode
    for i in range(len(ds)):
        idx = ds[i]["frames"][:, 0, 0, 0].long()
        assert (idx[1:] - idx[:-1] == 1).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataloader_workers_and_multiple_roots(tmp_path: Path) -> None:
    write_fake(tmp_path / "a", [12, 12])
    write_fake(tmp_path / "b", [12], labelled=False)
    ds = WindowDataset([tmp_path / "a", tmp_path / "b"], window=5)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert sum(len(b["actions"]) for b in batches) == len(ds) == 3 * 9
    labelled = torch.cat([b["labelled"] for b in batches])
    assert labelled.sum() == 18


def test_split_is_deterministic_and_stable(tmp_path: Path) -> None:
    write_fake(tmp_path, [3] * 20)
    train, held = split_episodes(tmp_path, 0.1, seed=0)
    assert len(held) == 2 and not set(train) & set(held) and len(train) + len(held) == 20
    assert split_episodes(tmp_path, 0.1, seed=0) == (train, held)
    write_fake(tmp_path, [3] * 20)  # rewriting the same names keeps the split
    assert split_episodes(tmp_path, 0.1, seed=0)[1] == held
    ds = WindowDataset(tmp_path, window=2, episodes=held)
    assert len(ds) == 2 * 3


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no recorded episodes"):
        WindowDataset(tmp_path, window=4)
    write_fake(tmp_path, [3])
    with pytest.raises(UsageError, match="long enough"):
        WindowDataset(tmp_path, window=10)
    with pytest.raises(UsageError, match="latents_root"):
        WindowDataset(tmp_path, window=2, source="latents")
    (tmp_path / "episodes" / "ep_000000" / "rewards.npy").write_bytes(b"garbage")
    ds = WindowDataset(tmp_path, window=2)
    with pytest.raises(UsageError, match="rewards.npy"):
        ds[0]
