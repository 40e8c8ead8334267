"""How full-resolution frames become the model's training frames (numpy only: the recorder, which must
not import torch, and the simulator, which must not import the data package, both use it)."""

from __future__ import annotations

import numpy as np


def block_mean(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 frames (..., H, W, 3), (H, W) a multiple of ``hw`` -> (..., *hw, 3) uint8, a new array.

    Each output pixel is the rounded mean of its block (720x1280 -> 72x128 by 10x10 blocks).
    """
    (th, tw), (h, w) = hw, frames.shape[-3:-1]
    lead = frames.shape[:-3]
    blocks = frames.reshape(*lead, th, h // th, tw, w // tw, 3).astype(np.float32)  # (..., th, bh, tw, bw, 3)
    return np.round(blocks.mean(axis=(-4, -2))).astype(np.uint8)
