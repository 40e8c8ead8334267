"""``matrix-world``: one command line for every stage of the pipeline.

This module sits at the top of the import graph. Subcommands are dispatched by string so that
``matrix-world --help`` imports no torch and the env never imports training code. Each target is a
``main(argv: list[str]) -> int`` function; it raises :class:`world_model.errors.UsageError` for bad input, which is
printed without a traceback and exits with code 2.
"""

from __future__ import annotations

import importlib
import sys

from world_model.errors import UsageError

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "record": ("world_model.data.record:main", "record episodes of a real Gymnasium env (frames, actions, rewards)"),
    "import-videos": (
        "world_model.data.record:import_videos_main",
        "import a folder of video files as unlabelled footage",
    ),
    "data-info": ("world_model.data.episodes:data_info_main", "print the data set card of a recorded data directory"),
    "train-vae": ("world_model.train.vae:main", "train the frame VAE (72x128 <-> latents, 720p head); DDP, resumable"),
    "encode-latents": (
        "world_model.data.latents:main",
        "encode a data directory into a latent cache with a trained VAE",
    ),
    "train-dit": (
        "world_model.train.dit:main",
        "train the video DiT + reward/termination heads on latents; DDP, resumable",
    ),
    "rollout-latents": (
        "world_model.train.rollouts:main",
        "drive a world in closed loop and store the latents it generates (for train-vae --gen-latents)",
    ),
    "build-world": (
        "world_model.train.build_world:main",
        "assemble a world-model directory from VAE/DiT runs and data",
    ),
    "train-hazard": (
        "world_model.train.hazard:main",
        "train a world's hazard head (ends within H steps, calibrated) on latents; the rest of the world unchanged",
    ),
    "train-obs-decoder": (
        "world_model.train.obs_decoder:main",
        "train a narrow decoder for agent-sized observations to match a world's VAE; the rest of the world unchanged",
    ),
    "set-sampler": (
        "world_model.train.build_world:set_sampler_main",
        "copy a world with other default sampler settings (e.g. --groups 2); no data needed",
    ),
    "eval": (
        "world_model.eval.suite:main",
        "evaluate a world: IDM control accuracy, PSNR/Frechet fidelity, drift, reward heads, speed",
    ),
    "probe": (
        "world_model.eval.probe:main",
        "drive a world with the road follower under sampler variants: road keeping and detail, side by side",
    ),
    "endings": (
        "world_model.eval.endings:main",
        "replay recorded endings (the car leaving the playfield) in a world: does it end them, draw the void?",
    ),
    "plan-check": (
        "world_model.eval.plan_check:main",
        "rank a planner's action sequences in a world and in the real game from the same real states",
    ),
    "demo": ("matrix_env.demo:main", "drive a world (the road follower, or --policy script) and write a 720p video"),
    "play": ("matrix_env.play:main", "drive a world with the keyboard (arrows / WASD) in a window, in real time"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: matrix-world <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "matrix-world <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``matrix-world`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
