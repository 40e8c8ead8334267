"""Windowed loader throughput: random windows/s, single process vs DataLoader workers, side by side.

    python benchmarks/bench_loader.py --data ~/mw/data/carracing --window 8 --batches 200

Prints one table: windows/s and MB/s for num_workers 0, 1, 2 (batch 32, shuffled, memory-mapped
episodes; the page cache is warm after the first row, as it is during training).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from world_model.data.loader import WindowDataset


def windows_per_second(ds: WindowDataset, batch: int, workers: int, batches: int, seed: int = 0) -> float:
    """Random windows/s delivered by a shuffled DataLoader over ``ds``."""
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += len(b["actions"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    """Print the loader table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=100)
    args = p.parse_args()
    ds = WindowDataset(args.data, window=args.window)
    frame_bytes = 72 * 128 * 3
    print(f"data: {args.data}  windows: {len(ds)}  window: {args.window}  batch: {args.batch}")
    print(f"{'num_workers':>11} | {'windows/s':>10} | {'MB/s':>8}")
    print("-" * 36)
    for workers in (0, 1, 2):
        wps = windows_per_second(ds, args.batch, workers, args.batches)
        print(f"{workers:>11} | {wps:>10.0f} | {wps * args.window * frame_bytes / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
