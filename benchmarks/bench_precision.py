"""Precision, compilation and runtime of the batched env's DiT, side by side in one run.

For ``--num-envs`` streams at 84x84 (the agent setting): env steps/s with float32 / bfloat16
autocast, eager / ``torch.compile``, and the DiT exported to ONNX and run by ONNX Runtime (float32),
the speed ratio to eager float32 measured in the same process,
and how far each variant's latents are from eager float32 after ``--steps`` steps from the same
seed and actions (RMS over the stream, in units of the latents' own RMS): the price of the speed.

    PYTHONPATH=. python benchmarks/bench_precision.py [--world DIR] [--num-envs 16] [--steps 20]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing

from benchmarks.bench_env import time_steps  # noqa: E402


@dataclass
class PrecisionArgs:
    """Compare float32 / bfloat16 and eager / compiled DiT evaluation of the batched env."""

    world: str = "default"
    """A shipped world's name ("default", "hold", "fast") or a checkpoint directory."""
    num_envs: int = 16
    """Streams in the batched env."""
    steps: int = 20
    """Timed steps per variant (after 2 warm-up steps, which include the compilation)."""
    threads: int = 0
    """torch.set_num_threads (0: torch's default)."""
    compile_model: bool = True
    """Include the torch.compile variants."""
    onnxruntime: bool = True
    """Include the ONNX Runtime variant (float32; the export is cached, see world_model.export.onnx);
    skipped with a note when onnxruntime / onnxscript are not installed."""


def rollout(args: PrecisionArgs, dtype: str, compiled: bool, backend: str) -> tuple[float, np.ndarray]:
    """(env steps/s, latents (T, B, C, h, w) of a fixed-action rollout) of one variant."""
    from matrix_env.vector import MatrixWorldVectorEnv

    envs = MatrixWorldVectorEnv(num_envs=args.num_envs, world=args.world, obs_size=(84, 84), obs_type="rgb",
                                dtype=dtype, compile_model=compiled, max_episode_steps=10_000,
                                backend=backend)
    envs.reset(seed=0)
    actions = np.random.default_rng(0).integers(envs.single_action_space.n, size=(10_000, args.num_envs))
    t = iter(range(10_000))
    lat: list[np.ndarray] = []

    def step() -> None:
        envs.step(actions[next(t)])
        lat.append(envs.sim.latest.clone().float().cpu().numpy())

    rate = args.num_envs * args.steps / time_steps(step, args.steps)
    envs.close()
    return rate, np.stack(lat)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/bench_precision.py``."""
    import platform

    import torch
    import tyro

    args = tyro.cli(PrecisionArgs, args=argv, description=__doc__.split("\n\n")[0])
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [("float32", False, "torch"), ("bfloat16", False, "torch")]
    if args.compile_model:
        variants += [("float32", True, "torch"), ("bfloat16", True, "torch")]
    if args.onnxruntime:
        import importlib.util

        missing = [m for m in ("onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"note: no ONNX Runtime row ({', '.join(missing)} not installed: pip install -e '.[export]')")
        else:
            variants += [("float32", False, "onnxruntime")]
    results = {v: rollout(args, *v) for v in variants}
    base_rate, base_lat = results[("float32", False, "torch")]
    scale = float(np.sqrt((base_lat**2).mean()))
    print(f"# bench_precision: world={args.world} num_envs={args.num_envs} obs=84x84 "
          f"steps={args.steps} threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}")
    print("| backend | dtype | torch.compile | env steps/s | x eager float32 | latent RMS gap to eager float32 |")
    print("|---|---|---|---:|---:|---:|")
    for (dtype, compiled, backend), (rate, lat) in results.items():
        gap = float(np.sqrt(((lat - base_lat) ** 2).mean())) / scale
        cells = [backend, dtype, "yes" if compiled else "no", f"{rate:.1f}", f"{rate / base_rate:.2f}", f"{gap:.3f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
