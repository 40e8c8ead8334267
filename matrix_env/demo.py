"""Record a 720p demo video of the world model being driven.

Two drivers: ``--policy road`` (default) is the closed-loop pixel road follower
(:mod:`world_model.road_follower`): it reads each generated frame and steers towards the road it
sees, so the video shows whether the imagined road responds to the steering and stays in view;
``--policy script`` replays a fixed open-loop sequence (straight, left, right, brake, coast, cycled).
Every frame is decoded at 720p, labelled with the action and written to an H.264 mp4 atomically
(temporary name, then rename), so a killed run never leaves a half-written video. The summary line
reports the fraction of steps the car was on the road and the model-predicted return.

    matrix-world demo --steps 300 --out demo.mp4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from world_model.errors import UsageError

# (action name, steps): a lap-like sequence of every kind of driving action.
SCRIPT: tuple[tuple[str, int], ...] = (
    ("D", 30),
    ("DL", 15),
    ("D", 20),
    ("DR", 15),
    ("D", 20),
    ("B", 10),
    ("N", 10),
    ("NL", 10),
    ("NR", 10),
    ("D", 20),
    ("BL", 8),
    ("BR", 8),
)


@dataclass
class DemoArgs:
    """Write a 720p demo video of MatrixWorld driving a scripted route."""

    steps: int = 300
    """Env steps to record (the video has steps + 1 frames)."""
    out: Path = Path("demo.mp4")
    """Output .mp4 path."""
    world: str = "default"
    """A shipped world's name ("default", "hold", "fast") or a checkpoint directory."""
    seed: int = 0
    """Seed of the episode."""
    fps: int = 15
    """Frame rate of the video."""
    sampler_mode: Literal["pipelined", "reconditioned", "immediate"] | None = None
    """Swin-DPM mode: pipelined, reconditioned or immediate (default: the checkpoint's)."""
    guidance: float | None = None
    """Classifier-free guidance scale on the actions (default: the checkpoint's; 1 = off)."""
    device: str = "cpu"
    """Torch device of the model."""
    dtype: str = "float32"
    """Network precision: float32, bfloat16 or float16 (autocast; bfloat16 is fast only on a GPU or a
    CPU with AVX512-BF16 / AMX, and warns elsewhere), or auto (the faster of the two here)."""
    backend: str = "torch"
    """Who runs the DiT's full-window calls: torch, onnxruntime (CPU/CUDA) or tensorrt (CUDA)."""
    label: bool = True
    """Write the action name in the corner of each frame."""
    policy: Literal["road", "script"] = "road"
    """road: closed-loop pixel road follower; script: the fixed open-loop action sequence."""


def scripted_actions(steps: int) -> list[str]:
    """The first ``steps`` action names of the cycled :data:`SCRIPT`."""
    cycle = [name for name, n in SCRIPT for _ in range(n)]
    return [cycle[i % len(cycle)] for i in range(steps)]


def _label(frame: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    size = max(12, frame.shape[0] // 24)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # older Pillow: fixed-size bitmap font
        font = None
    draw.text(
        (size // 2, size // 2), text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0)
    )
    return np.asarray(img)


def demo(args: DemoArgs) -> dict:
    """Drive the world with the chosen policy and write the video.

    Returns:
        ``{"path", "steps", "on_road", "return"}``: on_road is the fraction of steps with the car on
        the road (:func:`world_model.road_follower.on_road`), return the sum of predicted rewards.
    """
    out = Path(args.out)
    if args.steps < 1 or args.fps < 1:
        raise UsageError(f"need steps >= 1 and fps >= 1, got steps={args.steps}, fps={args.fps}")
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must end in .mp4, got {str(out)!r}")
    import imageio.v2 as imageio

    from matrix_env.env import MatrixWorldEnv

    env = MatrixWorldEnv(
        world=args.world, obs_size=(720, 1280), sampler_mode=args.sampler_mode, device=args.device, dtype=args.dtype,
        sampler=None if args.guidance is None else {"guidance": args.guidance}, backend=args.backend,
    )
    from world_model.road_follower import RoadFollower, on_road

    meanings = env.get_action_meanings()
    names = scripted_actions(args.steps)
    missing = sorted(set(names) - set(meanings))
    if missing:
        raise UsageError(f"this world's actions {meanings} lack the driving actions {missing}")
    follower = RoadFollower(meanings)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    writer = imageio.get_writer(
        tmp, format="FFMPEG", fps=args.fps, codec="libx264", quality=8, macro_block_size=16
    )
    on, total = [], 0.0
    try:
        obs, _ = env.reset(seed=args.seed)
        writer.append_data(_label(obs, "start") if args.label else obs)
        for t in range(args.steps):
            small = obs[:: max(1, obs.shape[0] // 72), :: max(1, obs.shape[1] // 128)]  # ~72x128 view
            action = int(follower(small[None])[0]) if args.policy == "road" else meanings.index(names[t])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            on.append(bool(on_road(obs[None])[0]))
            writer.append_data(_label(obs, meanings[action]) if args.label else obs)
            if terminated or truncated:
                obs, _ = env.reset()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        env.close()
    return {"path": out, "steps": args.steps, "on_road": float(np.mean(on)), "return": total}


def main(argv: list[str] | None = None) -> int:
    """``matrix-world demo``."""
    import tyro

    args = tyro.cli(DemoArgs, args=argv, prog="matrix-world demo", description=__doc__.split("\n\n")[0])
    stats = demo(args)
    print(
        f"wrote {args.steps + 1} frames (1280x720, {args.fps} fps) to {stats['path']}; policy {args.policy}: "
        f"car on the road in {stats['on_road']:.0%} of steps, predicted return {stats['return']:.1f}"
    )
    return 0


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main(sys.argv[1:]))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
