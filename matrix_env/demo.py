"""Record a 720p demo video of the world model driving a scripted route.

The script drives straight, turns left, turns right, brakes and coasts (cycled until ``--steps``),
decodes every frame at 720p, labels it with the action and writes an H.264 mp4 atomically
(temporary name, then rename), so a killed run never leaves a half-written video.

    matrix-world demo --steps 300 --out demo.mp4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    world: str | None = None
    """World-model checkpoint directory (default: the shipped world)."""
    seed: int = 0
    """Seed of the episode."""
    fps: int = 15
    """Frame rate of the video."""
    sampler_mode: str | None = None
    """Swin-DPM mode: pipelined, reconditioned or immediate (default: the checkpoint's)."""
    device: str = "cpu"
    """Torch device of the model."""
    label: bool = True
    """Write the action name in the corner of each frame."""


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


def demo(args: DemoArgs) -> Path:
    """Roll out the script and write the video; returns its path."""
    out = Path(args.out)
    if args.steps < 1 or args.fps < 1:
        raise UsageError(f"need steps >= 1 and fps >= 1, got steps={args.steps}, fps={args.fps}")
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must end in .mp4, got {str(out)!r}")
    import imageio.v2 as imageio

    from matrix_env.env import MatrixWorldEnv

    env = MatrixWorldEnv(
        world=args.world, obs_size=(720, 1280), sampler_mode=args.sampler_mode, device=args.device
    )
    meanings = env.get_action_meanings()
    names = scripted_actions(args.steps)
    missing = sorted(set(names) - set(meanings))
    if missing:
        raise UsageError(f"this world's actions {meanings} lack the scripted driving actions {missing}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    writer = imageio.get_writer(
        tmp, format="FFMPEG", fps=args.fps, codec="libx264", quality=8, macro_block_size=16
    )
    try:
        obs, _ = env.reset(seed=args.seed)
        writer.append_data(_label(obs, "start") if args.label else obs)
        for name in names:
            obs, _, terminated, truncated, _ = env.step(meanings.index(name))
            writer.append_data(_label(obs, name) if args.label else obs)
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
    return out


def main(argv: list[str] | None = None) -> int:
    """``matrix-world demo``."""
    import tyro

    args = tyro.cli(DemoArgs, args=argv, prog="matrix-world demo", description=__doc__.split("\n\n")[0])
    path = demo(args)
    print(f"wrote {args.steps + 1} frames (1280x720, {args.fps} fps) to {path}")
    return 0


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main(sys.argv[1:]))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
