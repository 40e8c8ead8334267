"""Closed-loop sampler probe (``matrix-world probe``): road keeping and detail of sampler variants.

The pixel road follower (:mod:`world_model.road_follower`) drives ``--envs`` streams of a world for
``--steps`` steps from its shipped start contexts, once per sampler variant and seed
(:func:`world_model.eval.suite.closed_loop`); for each it reports the fraction of steps with the car
on the road, per quarter of the run, the predicted reward per step, the streams the termination
head ended, the detail of the frames (RMS luma gradient above the dashboard), for CarRacing
worlds the kerb pixels per frame (:func:`world_model.eval.metrics.kerb_pixels`) and the share of
frames whose car is half gone (:func:`world_model.eval.metrics.car_pixels`) and, with
``--palette-data``, the share of pixels whose colour no recorded frame has
(:func:`world_model.eval.metrics.off_palette`: invented colours, blobs), and the share of steps the
follower steered (a world whose road stops curving asks for less steering). ``--hold D`` replaces the
follower by one action held open loop (does the world keep the road under a car that drives
straight, as an agent trained in it would learn to?), and ``--real`` drives the real CarRacing-v3
with the same policy beside it (seeds ``seed .. seed + envs - 1``). A seed fixes the
start contexts and the noise keys, so variants are compared on the same starts and noise (paired).
The README's sampler table was measured with it.

A variant is ``name=value`` pairs of :class:`world_model.swin_dpm.SwinDPMConfig` fields, comma
separated; ``default`` is the checkpoint's own sampler. Example::

    matrix-world probe --checkpoint matrix_env/worlds/default \\
        --variants default level_shift=2 mode=immediate,ctx_noise=0.25 --seeds 0 1
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from world_model.errors import UsageError
from world_model.swin_dpm import SwinDPMConfig

if typing.TYPE_CHECKING:
    from world_model.checkpoint import WorldModel


@dataclass
class Args:
    """Drive a world with the road follower under several sampler variants, side by side."""

    checkpoint: Path = Path("matrix_env/worlds/default")
    """World-model directory."""
    variants: tuple[str, ...] = ("default",)
    """Sampler variants: 'default' or comma-separated SwinDPMConfig name=value pairs."""
    envs: int = 16
    """Streams driven per variant and seed."""
    steps: int = 80
    """Steps per stream."""
    seeds: tuple[int, ...] = (0,)
    """Each seed picks the start contexts and the noise keys (the same for every variant)."""
    threads: int = 0
    """torch.set_num_threads (0 = torch's default)."""
    out: Path | None = None
    """Write the results as JSON here (rewritten after every row)."""
    palette_data: Path | None = None
    """Recorded episodes whose 72x128 frames give the real colours: adds the off-palette share (artifacts)."""
    palette_episodes: int = 16
    """Episodes of --palette-data read (every second frame of each)."""
    hold: str | None = None
    """Hold this action (e.g. D) open loop instead of driving with the road follower."""
    real: bool = False
    """Drive the real game too (CarRacing worlds), with the same policy: its on-road fraction as a column,
    and beside the world's terminated streams the real streams whose episode ended (the car left the
    playfield) with the median step of their first ending."""
    dtype: typing.Literal["float32", "bfloat16"] = "float32"
    """The world's compute dtype: bfloat16 runs the networks under autocast, as agents on a CPU with
    AVX512-BF16 / AMX use it."""


def parse_variant(text: str) -> dict:
    """``"mode=immediate,ctx_noise=0.25"`` -> ``{"mode": "immediate", "ctx_noise": 0.25}``; ``"default"`` -> {}.

    Raises:
        UsageError: an unknown field, a pair without '=', or a value of the wrong type.
    """
    if text.strip() == "default":
        return {}
    types = typing.get_type_hints(SwinDPMConfig)  # field -> int, float or the mode Literal
    out: dict = {}
    for pair in text.split(","):
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise UsageError(f"variant {text!r}: expected name=value pairs separated by commas, got {pair!r}")
        if name not in types:
            raise UsageError(f"variant {text!r}: unknown sampler field {name!r}; known: {sorted(types)}")
        kind = types[name]
        try:
            out[name] = kind(value) if kind in (int, float) else value
        except ValueError as err:
            what = "an int" if kind is int else "a float"
            raise UsageError(f"variant {text!r}: {name} must be {what}, got {value!r}") from err
    return out


def palette_from(world: WorldModel, data: Path, episodes: int) -> np.ndarray:
    """Real colours of a recording: every second 72x128 frame of its first ``episodes`` episodes."""
    from world_model.data import episodes as E
    from world_model.eval.suite import real_palette

    if episodes < 1:
        raise UsageError(f"--palette-episodes {episodes}: must be >= 1")
    try:
        frames, _ = E.sample_frames(data, episodes, 2)  # (N, 72, 128, 3)
    except UsageError as err:
        raise UsageError(f"--palette-data: {err}") from err
    return real_palette(world, frames)


def probe(args: Args) -> list[dict]:
    """Run every (variant, seed); returns one row per pair (also printed as it finishes)."""
    from world_model.checkpoint import load_world
    from world_model.eval.suite import closed_loop, is_carracing
    from world_model.simulator import sampler_config

    if args.envs < 1 or args.steps < 1:
        raise UsageError(f"--envs {args.envs} and --steps {args.steps} must be >= 1")
    if args.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype must be 'float32' or 'bfloat16', got {args.dtype!r}")
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    world = load_world(args.checkpoint)
    palette = None if args.palette_data is None else palette_from(world, args.palette_data, args.palette_episodes)
    real_env = str(world.meta.get("env_id", "")) if args.real else None
    if args.real and not is_carracing(world):
        raise UsageError(f"--real: {args.checkpoint} was recorded from {real_env!r}; the real game is CarRacing only")
    rows: list[dict] = []
    variants = [(v, parse_variant(v)) for v in args.variants]
    for text, overrides in variants:
        cfg = sampler_config(world, None, overrides)  # validates before any rollout
        sampler = dataclasses.asdict(cfg)
        for seed in args.seeds:
            t0 = time.perf_counter()
            out = closed_loop(dataclasses.replace(world, sampler=sampler), world.start_latents, cfg.mode,
                              args.envs, args.steps, seed, "cpu", real_env, palette, args.hold, dtype)
            if "skipped" in out:
                raise UsageError(f"{args.checkpoint}: {out['skipped']}")
            w, r = out["world"], out.get("real")
            row = {"variant": text, "seed": seed, "dtype": args.dtype, "sampler": sampler, "on_road": w["on_road"],
                   "on_road_by_quarter": [q["mean"] for q in w["on_road_by_quarter"]],
                   "reward_per_step": w["reward_per_step"], "terminations": w["terminations"],
                   "first_end_step": w["first_end_step"], "detail": w["detail"],
                   "detail_by_quarter": [q["mean"] for q in w["detail_by_quarter"]],
                   "kerb_pixels": w.get("kerb_pixels"), "car_faded": w.get("car_faded"),
                   "off_palette": w.get("off_palette"),
                   "steer_share": w["steer_share"], "real_steer_share": r["steer_share"] if args.real else None,
                   "real_car_faded": r["car_faded"] if args.real else None,
                   "real_on_road": r["on_road"] if args.real else None,
                   "real_ended_streams": r["ended_streams"] if args.real else None,
                   "real_first_end_step": r["first_end_step"] if args.real else None,
                   "real_on_road_by_quarter": [q["mean"] for q in r["on_road_by_quarter"]] if args.real else None,
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(format_row(row), flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(rows, indent=2))
                tmp.replace(args.out)
    return rows


def _opt(value: float | None, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """A cell with ``digits`` decimals, or "-" for a metric that does not apply (kerbs outside CarRacing)."""
    return "-" if value is None else f"{scale * value:.{digits}f}{unit}"


def mean_row(rows: list[dict]) -> dict:
    """The mean over seeds of one variant's rows, every cell a mean (a metric missing from any row is
    None)."""

    def mean(key: str) -> float | list[float] | None:
        vals = [r.get(key) for r in rows]
        return None if any(v is None for v in vals) else np.mean(vals, axis=0).tolist()

    keys = ("on_road", "on_road_by_quarter", "reward_per_step", "terminations", "first_end_step", "detail",
            "kerb_pixels", "car_faded", "off_palette", "steer_share", "real_on_road", "real_on_road_by_quarter",
            "real_steer_share", "real_car_faded", "real_ended_streams", "real_first_end_step")
    return {"variant": rows[0]["variant"], "seed": f"mean of {len(rows)}", **{k: mean(k) for k in keys}}


def format_row(row: dict) -> str:
    """One markdown table row."""
    quarters = " / ".join(f"{q:.2f}" for q in row["on_road_by_quarter"])
    real = _opt(row["real_on_road"], digits=3)
    if row.get("real_on_road_by_quarter"):
        real += " (" + " / ".join(f"{q:.2f}" for q in row["real_on_road_by_quarter"]) + ")"
    steer, car = _opt(row.get("steer_share")), _opt(row.get("car_faded"), 100, "%")
    if row.get("real_steer_share") is not None:
        steer += f" (real {row['real_steer_share']:.2f})"
    if row.get("real_car_faded") is not None:
        car += f" (real {100 * row['real_car_faded']:.2f}%)"
    ended = f"{row['terminations']:g}"  # streams the world ended, median first step
    ended += f" (median step {row['first_end_step']:g})" if row.get("first_end_step") else ""
    if row.get("real_ended_streams") is not None:  # the real game: streams whose episode ended, median first step
        ended += f" (real {row['real_ended_streams']:g}"
        ended += f", median step {row['real_first_end_step']:g})" if row.get("real_first_end_step") else ")"
    return (f"| {row['variant']} | {row['seed']} | {quarters} | {row['on_road']:.3f} | "
            f"{row['reward_per_step']:.3f} | {ended} | {row['detail']:.2f} | "
            f"{_opt(row['kerb_pixels'])} | {car} | "
            f"{_opt(row['off_palette'], 100, '%')} | {steer} | {real} |")


def main(argv: list[str] | None = None) -> int:
    """``matrix-world probe``: parse Args, print a markdown table."""
    import tyro

    args = tyro.cli(Args, args=argv, prog="matrix-world probe", description=__doc__.split("\n\n")[0])
    driver = "road follower" if args.hold is None else f"action {args.hold} held"
    print(f"{args.envs} streams x {args.steps} steps of {args.checkpoint}, {driver}")
    print("| sampler variant | seed | on road, by quarter | on road, mean | predicted reward / step "
          "| terminated streams | detail | kerb pixels | car faded | off-palette pixels | steering share "
          "| real game on road (by quarter) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = probe(args)
    if len(args.seeds) > 1:
        for text in dict.fromkeys(args.variants):  # each variant once, in order
            print(format_row(mean_row([r for r in rows if r["variant"] == text])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
