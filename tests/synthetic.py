"""Synthetic recorded data in the on-disk format of docs/ARCHITECTURE.md, for fast tests.

A toy "driving" scene: grass, a grey road with lane stripes that scroll with the car's speed, and a
red car whose horizontal position follows the steering. Steering moves the car sideways, throttle
changes the scroll speed, so a model can learn the effect of every one of the nine driving actions
from a few frames. The scene is drawn analytically at any integer scale, so the optional
``video_720p.mp4`` is a genuine 10x render of the same frames (not an upscale).

Usage::

    from tests.synthetic import make_synthetic_dataset
    root = make_synthetic_dataset(tmp_path / "data", episodes=3, steps=20)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from world_model.actions import DRIVING_ACTIONS, DRIVING_SENTENCES, STEER_OF_ACTION, THROTTLE_OF_ACTION
from world_model.data.episodes import (
    TRAIN_HW,
    VIDEO_FILE,
    build_manifest,
    episode_name,
    tmp_episode_dir,
    write_episode,
)

ENV_ID = "Synthetic-v0"
HR_SCALE = 10  # 72x128 -> 720x1280, as the real recorder's 720p video
GRASS = (40, 150, 40)
ROAD = (105, 105, 105)
STRIPE = (235, 235, 235)
CAR = (210, 30, 30)
ROAD_X = (32, 96)  # road band [x0, x1) in 72x128 pixels
CAR_Y, CAR_H, CAR_W = 54, 8, 6  # car top row, height, width (72x128 pixels)
STRIPE_PERIOD, STRIPE_LEN = 12, 6  # vertical period and length of the centre-line dashes
STEER_PX = 3  # sideways move per step for a steering action
MAX_SPEED = 4  # scroll pixels per step at full speed


def render(car_x: int, scroll: int, scale: int = 1) -> np.ndarray:
    """Draw one frame of the toy scene.

    Args:
        car_x: left edge of the car in 72x128 pixels.
        scroll: vertical offset of the lane stripes in 72x128 pixels.
        scale: integer resolution multiplier (1 -> 72x128, 10 -> 720x1280).

    Returns:
        (72*scale, 128*scale, 3) uint8 frame.
    """
    h, w = TRAIN_HW[0] * scale, TRAIN_HW[1] * scale
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GRASS
    img[:, ROAD_X[0] * scale : ROAD_X[1] * scale] = ROAD
    # centre-line dashes, moving down the screen as the car drives forward
    rows = (np.arange(h) // scale - scroll) % STRIPE_PERIOD < STRIPE_LEN  # (H,) bool
    cx = (ROAD_X[0] + ROAD_X[1]) // 2
    img[rows, (cx - 1) * scale : (cx + 1) * scale] = STRIPE
    img[CAR_Y * scale : (CAR_Y + CAR_H) * scale, car_x * scale : (car_x + CAR_W) * scale] = CAR
    return img


def simulate(steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Roll out a sticky random policy in the toy scene.

    Returns:
        dict with car_x, scroll (S+1,) int64 scene state per frame, actions (S+1,) int16 with
        actions[0] = -1, rewards (S+1,) float32 with rewards[0] = 0.
    """
    car_x = np.zeros(steps + 1, np.int64)
    scroll = np.zeros(steps + 1, np.int64)
    actions = np.full(steps + 1, -1, np.int16)
    rewards = np.zeros(steps + 1, np.float32)
    car_x[0] = int(rng.integers(ROAD_X[0] + 4, ROAD_X[1] - CAR_W - 4))
    speed, action = 0, int(rng.integers(9))
    for k in range(1, steps + 1):
        if rng.random() > 0.7:  # sticky actions give coherent motion over several frames
            action = int(rng.integers(9))
        throttle = int(THROTTLE_OF_ACTION[action])  # 0 drive, 1 brake, 2 coast
        speed = {0: min(speed + 1, MAX_SPEED), 1: max(speed - 2, 0), 2: max(speed - 1, 0)}[throttle]
        car_x[k] = np.clip(car_x[k - 1] + STEER_PX * int(STEER_OF_ACTION[action]), 0, TRAIN_HW[1] - CAR_W)
        scroll[k] = scroll[k - 1] + speed
        on_road = ROAD_X[0] <= car_x[k] and car_x[k] + CAR_W <= ROAD_X[1]
        actions[k] = action
        rewards[k] = 0.1 * speed if on_road else -1.0
    return {"car_x": car_x, "scroll": scroll, "actions": actions, "rewards": rewards}


def _write_video(path: Path, car_x: np.ndarray, scroll: np.ndarray, fps: int = 50) -> None:
    """Render the episode at 720p and encode it as H.264 (crf 18), as the real recorder does."""
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        path,
        fps=fps,
        codec="libx264",
        macro_block_size=8,
        ffmpeg_params=["-crf", "18"],
        ffmpeg_log_level="error",
    )
    try:
        for x, s in zip(car_x, scroll, strict=True):
            writer.append_data(render(int(x), int(s), HR_SCALE))
    finally:
        writer.close()


def make_synthetic_dataset(
    root: Path | str,
    episodes: int = 3,
    steps: int = 20,
    seed: int = 0,
    labelled: bool = True,
    video: bool = False,
    split: str = "train",
) -> Path:
    """Write a small recorded data set in the exact on-disk format of docs/ARCHITECTURE.md.

    Even-numbered episodes end with ``terminated`` (so termination heads see positives), odd ones
    with ``truncated``. Unlabelled episodes have every action -1 and zero rewards, like imported
    footage, but their frames still follow a hidden random policy.

    Args:
        root: data directory to create (``manifest.json`` + ``episodes/ep_XXXXXX/``).
        episodes: number of episodes.
        steps: steps per episode (each episode has ``steps + 1`` frames).
        seed: RNG seed; the same seed writes identical arrays.
        labelled: write action ids and rewards (else -1 / 0 like unlabelled footage).
        video: also write ``video_720p.mp4`` (a real 10x render; ~0.1 s per frame to encode).
        split: the episodes' ``meta["split"]`` ("train", or "eval" for evaluation-only data).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    (root / "episodes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        sim = simulate(steps, rng)
        frames = np.stack([render(int(x), int(s)) for x, s in zip(sim["car_x"], sim["scroll"], strict=True)])
        terminated = np.zeros(steps + 1, bool)
        truncated = np.zeros(steps + 1, bool)
        (terminated if e % 2 == 0 else truncated)[-1] = True
        arrays = {
            "frames": frames,  # (S+1, 72, 128, 3) uint8
            "actions": sim["actions"] if labelled else np.full(steps + 1, -1, np.int16),
            "rewards": sim["rewards"] if labelled else np.zeros(steps + 1, np.float32),
            "terminated": terminated if labelled else np.zeros(steps + 1, bool),
            "truncated": truncated if labelled else np.eye(1, steps + 1, steps, dtype=bool)[0],
        }
        name = episode_name(e)
        video_tmp = None
        if video:
            tmp = tmp_episode_dir(root, name)
            tmp.mkdir(parents=True, exist_ok=True)
            video_tmp = tmp / VIDEO_FILE
            _write_video(video_tmp, sim["car_x"], sim["scroll"])
        meta = {
            "env_id": ENV_ID,
            "env_kwargs": {},
            "seed": seed * 1000 + e,
            "policy": "sticky-random",
            "frame_skip": 1,
            "labelled": labelled,
            "has_rewards": labelled,
            "split": split,
            "action_names": list(DRIVING_ACTIONS),
            "sentences": list(DRIVING_SENTENCES),
        }
        write_episode(root, name, arrays, meta, video_tmp=video_tmp)
    build_manifest(root)
    return root
