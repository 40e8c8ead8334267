"""Drive the world model yourself: a real-time pygame window, keyboard controls.

Keys: Up / W drive, Down / S brake, neither coast; Left / A and Right / D steer; R restarts the
episode; Esc or closing the window quits. Each frame shows the action, the reward and the speed.

    matrix-world play --world path/to/world --fps 15
    python -m matrix_env.play --max-steps 100        # SDL_VIDEODRIVER=dummy runs it headless
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from world_model.actions import DRIVING_ACTIONS, action_id
from world_model.errors import UsageError

TEXT_COLOUR = (255, 255, 0)


@dataclass
class PlayArgs:
    """Play MatrixWorld with the keyboard."""

    world: str = "default"
    """A shipped world's name ("default", "hold", "fast") or a checkpoint directory."""
    seed: int = 0
    """Seed of the first episode."""
    fps: int = 15
    """Target frames per second (the model's recording rate)."""
    scale: float = 1.0
    """Window size relative to 1280x720."""
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
    max_steps: int = 0
    """Stop after this many steps (0: run until the window is closed)."""


def keys_to_action(up: bool, down: bool, left: bool, right: bool) -> int:
    """Driving action id of a key state: down brakes (wins over up), up drives, else coast."""
    throttle = 1 if down else 0 if up else 2
    steer = -1 if left and not right else 1 if right and not left else 0
    return action_id(steer, throttle)


def driving_ids(action_meanings: list[str]) -> np.ndarray:
    """Map driving-table ids to the world's action ids (the world must use the driving table).

    Raises:
        UsageError: a driving action is missing from the world's actions.
    """
    missing = [a for a in DRIVING_ACTIONS if a not in action_meanings]
    if missing:
        raise UsageError(
            f"this world's actions {action_meanings} lack the driving actions {missing}; "
            "keyboard play needs the driving action table"
        )
    return np.array([action_meanings.index(a) for a in DRIVING_ACTIONS], dtype=np.int64)


def play(args: PlayArgs) -> dict[str, float]:
    """Run the interactive loop; returns summary statistics (steps, episodes, return, fps)."""
    if args.fps < 1 or args.scale <= 0 or args.max_steps < 0:
        raise UsageError(
            f"need fps >= 1, scale > 0, max_steps >= 0; got {args.fps}, {args.scale}, {args.max_steps}"
        )
    import gymnasium as gym
    import pygame

    import matrix_env  # noqa: F401  (registers the env)

    env = gym.make(
        "MatrixWorld-v0",
        world=args.world,
        sampler_mode=args.sampler_mode,
        sampler=None if args.guidance is None else {"guidance": args.guidance},
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )
    meanings = env.unwrapped.get_action_meanings()
    ids = driving_ids(meanings)
    h, w = env.observation_space.shape[:2]
    size = (max(1, round(w * args.scale)), max(1, round(h * args.scale)))

    pygame.init()
    pygame.display.set_caption("MatrixWorld - arrows/WASD drive, R restart, Esc quit")
    screen = pygame.display.set_mode(size)
    font = pygame.font.Font(None, 28)
    clock = pygame.time.Clock()

    obs, _ = env.reset(seed=args.seed)
    steps, episodes, ep_return, total_return = 0, 1, 0.0, 0.0
    action = ids[keys_to_action(False, False, False, False)]
    t0 = time.perf_counter()
    running = True
    try:
        while running:
            restart = False
            for event in pygame.event.get():
                if event.type == pygame.QUIT or (
                    event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE
                ):
                    running = False
                elif event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                    restart = True
            if not running:
                break
            keys = pygame.key.get_pressed()
            action = ids[
                keys_to_action(
                    keys[pygame.K_UP] or keys[pygame.K_w],
                    keys[pygame.K_DOWN] or keys[pygame.K_s],
                    keys[pygame.K_LEFT] or keys[pygame.K_a],
                    keys[pygame.K_RIGHT] or keys[pygame.K_d],
                )
            ]
            if restart:
                obs, _ = env.reset()
                episodes, ep_return = episodes + 1, 0.0
            else:
                obs, reward, terminated, truncated, _ = env.step(action)
                ep_return += reward
                total_return += reward
                steps += 1
                if terminated or truncated:
                    obs, _ = env.reset()
                    episodes, ep_return = episodes + 1, 0.0

            surface = pygame.surfarray.make_surface(np.ascontiguousarray(obs.transpose(1, 0, 2)))  # (W, H, 3)
            if surface.get_size() != size:
                surface = pygame.transform.smoothscale(surface, size)
            screen.blit(surface, (0, 0))
            text = f"{meanings[action]:>2}  return {ep_return:7.2f}  {clock.get_fps():4.1f} fps"
            screen.blit(font.render(text, True, TEXT_COLOUR), (10, 10))
            pygame.display.flip()
            clock.tick(args.fps)
            if args.max_steps and steps >= args.max_steps:
                break
    finally:
        env.close()
        pygame.quit()
    elapsed = time.perf_counter() - t0
    return {"steps": steps, "episodes": episodes, "return": total_return, "fps": steps / max(elapsed, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    """``matrix-world play``."""
    import tyro

    args = tyro.cli(PlayArgs, args=argv, prog="matrix-world play", description=__doc__.split("\n\n")[0])
    stats = play(args)
    print(
        f"played {stats['steps']} steps, {stats['episodes']} episode(s), return {stats['return']:.2f}, "
        f"{stats['fps']:.1f} steps/s"
    )
    return 0


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main(sys.argv[1:]))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
