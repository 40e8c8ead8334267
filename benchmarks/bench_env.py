"""Env throughput: MatrixWorld single and batched, at 84x84 and 720p, beside the real CarRacing-v3.

Prints one table: env steps/s, milliseconds per (batched) step, the ratio to CarRacing-v3 measured
in the same run, and the process's peak RSS after each row. CarRacing-v3 runs with discrete
actions and frame-skip 4 (the recorder's setting), so one of its "steps" is one recorded frame =
4 physics steps, the unit MatrixWorld generates.

    PYTHONPATH=. python benchmarks/bench_env.py --world path/to/world [--quick] [--steps 50]
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing

FRAME_SKIP = 4  # CarRacing physics steps per recorded frame
WARMUP_STEPS = 2


@dataclass
class BenchArgs:
    """Benchmark MatrixWorld env throughput against CarRacing-v3."""

    world: str = "default"
    """A shipped world's name ("default", "hold", "fast") or a checkpoint directory."""
    steps: int = 30
    """Timed steps per configuration (after warm-up)."""
    quick: bool = False
    """Fewer configurations and steps (a smoke run)."""
    device: str = "cpu"
    """Torch device of the model."""
    dtype: str = "float32"
    """Network precision: float32, bfloat16 or float16."""
    sampler_mode: str | None = None
    """Swin-DPM mode (default: the checkpoint's)."""
    guidance: float | None = None
    """Classifier-free guidance scale on the actions (default: the checkpoint's; 1 = off)."""
    groups: int | None = None
    """Swin-DPM noise groups G, the frames in flight (default: the checkpoint's)."""
    threads: int = 0
    """torch.set_num_threads (0: torch's default)."""
    carracing: bool = True
    """Also measure the real CarRacing-v3."""
    compile_model: bool = False
    """torch.compile the DiT (each env compiles once, inside the warm-up steps)."""
    compile_mode: str = "default"
    """torch.compile mode with --compile-model; "reduce-overhead" replays CUDA graphs on a GPU."""
    backends: tuple[str, ...] = ("torch",)
    """Who runs the full-window DiT calls: torch, onnxruntime and/or tensorrt (world_model.export.onnx);
    several give adjacent rows per configuration, measured in the same run."""
    num_envs: tuple[int, ...] = (1, 4, 16, 64)
    """Batch sizes of the 84x84 vector-env rows."""
    hd: bool = True
    """Also measure the 720p rows."""
    obs_decoders: tuple[bool, ...] = (True,)
    """For the 84x84 rows: decode observations with the world's observation decoder when it has one
    (``train-obs-decoder``; True, the envs' default) or with the VAE (False); ``--obs-decoders True False``
    gives adjacent rows measured in the same run. The obs column names the decoder a row actually used
    when it is not the VAE's ("(obs decoder)"); 720p rows are measured once (always the VAE's)."""
    parts: bool = False
    """Where a vector-env step's time goes: time the DiT calls and the observation decode inside each
    batched step (ms per batch step; "rest" is the heads, the sampler's own ops and the env)."""


def sampler_overrides(args: BenchArgs) -> dict[str, float | int]:
    """The Swin-DPM fields the command line changes."""
    return {k: v for k, v in (("guidance", args.guidance), ("groups", args.groups)) if v is not None}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compiled(args: BenchArgs) -> bool | str:
    """The env's ``compile_model`` setting: False, or the torch.compile mode."""
    return args.compile_mode if args.compile_model else False


def peak_gpu_mib(device: str) -> float | None:
    """Peak CUDA memory allocated by torch since the last reset, MiB (None off CUDA)."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_gpu_peak(device: str) -> None:
    """Free what earlier rows left and restart the CUDA peak, so each row reports its own."""
    import gc

    import torch

    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after warm-up calls."""
    for _ in range(WARMUP_STEPS):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def bench_carracing(steps: int, frame_skip: int = FRAME_SKIP) -> float:
    """Steps per second of CarRacing-v3 (discrete, random actions); one step = ``frame_skip`` physics steps."""
    import gymnasium as gym

    env = gym.make("CarRacing-v3", continuous=False)
    env.reset(seed=0)
    rng = np.random.default_rng(0)

    def step() -> None:
        action = int(rng.integers(env.action_space.n))
        for _ in range(frame_skip):
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
                break

    seconds = time_steps(step, steps)
    env.close()
    return steps / seconds


def bench_single(
    args: BenchArgs, obs_size: tuple[int, int], steps: int, backend: str = "torch", obs_decoder: bool = True
) -> tuple[float, str]:
    """Env steps/s of one MatrixWorldEnv and the decoder its observations came from."""
    from matrix_env.env import MatrixWorldEnv

    env = MatrixWorldEnv(
        world=args.world,
        obs_size=obs_size,
        sampler_mode=args.sampler_mode,
        sampler=sampler_overrides(args),
        device=args.device,
        dtype=args.dtype,
        compile_model=compiled(args),
        backend=backend,
        obs_decoder=obs_decoder,
    )
    env.reset(seed=0)
    rng = np.random.default_rng(0)

    def step() -> None:
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            env.reset()

    return steps / time_steps(step, steps), env.sim.decoder_name(obs_size)


def timed(obj: object, name: str, totals: dict[str, float], key: str, sync) -> None:
    """Replace the method ``obj.name`` by a wrapper that adds its wall time to ``totals[key]``."""
    method = getattr(obj, name)

    def wrapper(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = method(*a, **k)
        sync()
        totals[key] += time.perf_counter() - t0
        return out

    setattr(obj, name, wrapper)


def bench_vector(
    args: BenchArgs,
    num_envs: int,
    obs_size: tuple[int, int],
    steps: int,
    backend: str = "torch",
    obs_decoder: bool = True,
) -> tuple[float, dict[str, float] | None, str]:
    """Env steps/s (all sub-envs together) of one MatrixWorldVectorEnv, with ``--parts`` the ms per
    batched step of its DiT calls, its observation decode and the rest, and the decoder of its observations."""
    import torch

    from matrix_env.vector import MatrixWorldVectorEnv

    envs = MatrixWorldVectorEnv(
        num_envs=num_envs,
        world=args.world,
        obs_size=obs_size,
        sampler_mode=args.sampler_mode,
        sampler=sampler_overrides(args),
        device=args.device,
        dtype=args.dtype,
        max_episode_steps=1000,
        compile_model=compiled(args),
        backend=backend,
        obs_decoder=obs_decoder,
    )
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    totals = {"dit": 0.0, "decode": 0.0}
    if args.parts:  # on a GPU each timed call waits for its kernels: a little slower than the plain rows
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
        timed(envs.sim, "_denoise", totals, "dit", sync)
        timed(envs.sim, "decode", totals, "decode", sync)

    def step() -> None:
        envs.step(rng.integers(envs.single_action_space.n, size=num_envs))

    for _ in range(WARMUP_STEPS):  # outside the totals: compilation, first-call allocations
        step()
    totals.update(dit=0.0, decode=0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    parts = None
    if args.parts:
        ms = {k: 1000 * v / steps for k, v in totals.items()}
        parts = {**ms, "rest": 1000 * seconds / steps - ms["dit"] - ms["decode"]}
    return num_envs * steps / seconds, parts, envs.sim.decoder_name(obs_size)


def check_backends(args: BenchArgs) -> None:
    """Refuse, before any row runs, backend settings that a later row would fail on."""
    import torch

    from world_model.errors import UsageError
    from world_model.export.onnx import BACKENDS, check_backend
    from world_model.simulator import COMPILE_MODES

    if args.compile_mode not in COMPILE_MODES:
        raise UsageError(f"--compile-mode must be one of {COMPILE_MODES}, got {args.compile_mode!r}")
    if args.compile_mode != "default" and not args.compile_model:
        raise UsageError(f"--compile-mode {args.compile_mode} needs --compile-model")
    if args.dtype not in ("float32", "bfloat16", "float16"):  # one named precision per table
        raise UsageError(f"--dtype must be float32, bfloat16 or float16 (a table measures one named precision; "
                         f"the envs' 'auto' picks per machine and batch), got {args.dtype!r}")
    for backend in args.backends:
        if backend not in BACKENDS:
            raise UsageError(f"--backends: each must be one of {BACKENDS}, got {backend!r}")
        if backend != "torch":
            check_backend(backend, torch.device(args.device))
            if args.compile_model or args.dtype != "float32":
                raise UsageError(f"--backends {backend} runs float32 graphs without torch.compile; "
                                 f"got --dtype {args.dtype} --compile-model {args.compile_model}")


def run(args: BenchArgs) -> list[dict[str, object]]:
    """Measure every configuration; returns the table rows."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    check_backends(args)
    steps = min(args.steps, 10) if args.quick else args.steps
    small, hd = (84, 84), (720, 1280)
    configs: list[tuple[str, int | None, tuple[int, int]]] = [("MatrixWorldEnv", None, small)]
    configs += [("MatrixWorldVectorEnv", n, small) for n in ((1, 4) if args.quick else args.num_envs)]
    if args.hd:
        configs += [("MatrixWorldEnv", None, hd)]
        configs += [("MatrixWorldVectorEnv", n, hd) for n in ((1,) if args.quick else (1, 4))]

    rows: list[dict[str, object]] = []
    base = None
    if args.carracing:
        base = bench_carracing(steps * 2)
        rows.append(
            {
                "env": f"CarRacing-v3 (frame-skip {FRAME_SKIP})",
                "backend": "",
                "num_envs": 1,
                "obs": "96x96",
                "steps_s": base,
                "ms_step": 1000 / base,
                "rss": peak_rss_mib(),
            }
        )
        raw = bench_carracing(steps * 4, frame_skip=1)  # its own env.step, for reference
        rows.append(
            {
                "env": "CarRacing-v3 (raw env.step)",
                "backend": "",
                "num_envs": 1,
                "obs": "96x96",
                "steps_s": raw,
                "ms_step": 1000 / raw,
                "rss": peak_rss_mib(),
            }
        )
    for (name, n, size), backend, obs_dec in itertools.product(configs, args.backends, args.obs_decoders):
        if size == hd and obs_dec != args.obs_decoders[0]:  # 720p frames always come from the VAE: once
            continue
        reset_gpu_peak(args.device)
        parts = None
        if n is None:
            rate, decoder = bench_single(args, size, steps, backend, obs_dec)
            batch = 1
        else:
            rate, parts, decoder = bench_vector(args, n, size, max(2, steps // max(1, n // 4)), backend, obs_dec)
            batch = n
        rows.append(
            {
                "env": name,
                "backend": backend,
                "num_envs": batch,
                "obs": f"{size[0]}x{size[1]}" + (" (obs decoder)" if decoder == "observation decoder" else ""),
                "steps_s": rate,
                "ms_step": 1000 * batch / rate,
                "rss": peak_rss_mib(),
                "gpu": peak_gpu_mib(args.device),
                "parts": parts,
            }
        )
    for row in rows:
        row["vs_carracing"] = row["steps_s"] / base if base else None  # None: CarRacing not measured
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Markdown table of the rows; a "peak GPU MiB" column (each row's own peak) on CUDA."""
    gpu = any(r.get("gpu") is not None for r in rows)
    parts = any(r.get("parts") for r in rows)  # --parts: ms per batched step of the DiT, decode, rest
    lines = [
        "| env | backend | num_envs | obs | env steps/s | ms / step (batch) | x CarRacing | peak RSS MiB |"
        + (" peak GPU MiB |" if gpu else "")
        + (" DiT ms | decode ms | rest ms |" if parts else ""),
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if gpu else "") + ("---:|---:|---:|" if parts else ""),
    ]
    for r in rows:
        cell = "" if r.get("gpu") is None else f"{r['gpu']:.0f}"
        ratio = "-" if r.get("vs_carracing") is None else f"{r['vs_carracing']:.2f}"
        p = r.get("parts")
        split = " | | |" if not p else f" {p['dit']:.1f} | {p['decode']:.1f} | {p['rest']:.1f} |"
        lines.append(
            f"| {r['env']} | {r['backend']} | {r['num_envs']} | {r['obs']} | {r['steps_s']:.1f} | {r['ms_step']:.1f} | "
            f"{ratio} | {r['rss']:.0f} |" + (f" {cell} |" if gpu else "") + (split if parts else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/bench_env.py``."""
    import platform

    import torch
    import tyro

    from world_model.errors import UsageError

    args = tyro.cli(BenchArgs, args=argv, description=__doc__.split("\n\n")[0])
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    rows = run(args)
    print(
        f"# bench_env: world={args.world} device={args.device} dtype={args.dtype} "
        f"compile={compiled(args)} sampler={args.sampler_mode or 'default'} {sampler_overrides(args) or ''} "
        f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    from world_model.errors import UsageError

    try:
        raise SystemExit(main(sys.argv[1:]))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
