"""``matrix-world record``: record episodes of a real Gymnasium env (and ``import-videos``).

CarRacing-v3 is driven through the nine-action driving table (``world_model.actions``) with
continuous controls; one recorded step holds an action for ``--frame-skip`` simulator steps.
Frames are real renders at ``--resolution`` (default 1280x720: CarRacing draws straight onto a
1280x720 canvas, nothing is upscaled), stored as a near-lossless H.264 video (unless
``--no-video``), and at the training resolution 72x128 as a memory-mappable uint8 array. Any env
with a ``Discrete`` action space and ``rgb_array`` rendering can be recorded (``--env ID``); its
actions get the sentences "Action k." unless ``--sentences FILE`` (a JSON list) overrides them.

Nothing is lost: each episode is written under a temporary name and renamed when complete; rerunning
with the same ``--out`` skips complete episodes (episode i always uses seed ``--seed + i``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from world_model.actions import CARRACING_CONTROLS, DRIVING_ACTIONS, DRIVING_SENTENCES, default_sentences
from world_model.data import episodes as E
from world_model.errors import UsageError
from world_model.frames import block_mean

CARRACING_IDS = ("CarRacing-v3",)
DEFAULT_RESOLUTION = "1280x720"
DEFAULT_FPS = 50  # CarRacing's simulator runs at 50 steps/s; the video runs at 50 / frame_skip


@dataclass
class RecordArgs:
    """Record episodes of a real Gymnasium env into a MatrixWorld data directory."""

    out: Path
    """Data directory (created; rerunning resumes it)."""
    env: str = "CarRacing-v3"
    """Gymnasium env id: CarRacing-v3, or any env with a Discrete action space and rgb_array rendering."""
    episodes: int = 2
    """Number of episodes the directory should hold when done (episode i uses seed --seed + i)."""
    steps: int = 250
    """Maximum recorded steps per episode (each holds one action for --frame-skip simulator steps)."""
    frame_skip: int = 4
    """Simulator steps per recorded step (the env later uses the same step)."""
    resolution: str = DEFAULT_RESOLUTION
    """Full-resolution frame size WIDTHxHEIGHT stored as video (CarRacing renders at this size)."""
    unlabelled: bool = False
    """Store no action labels (the 'unknown' marker only); for CarRacing also turns on domain_randomize."""
    domain_randomize: bool = False
    """CarRacing's randomised colours WITH labels: an evaluation-only split (stored with split='eval')."""
    split: str = ""
    """Split name stored in every episode; empty: 'train', or 'eval' for a labelled randomised domain."""
    workers: int = 1
    """Recorder processes."""
    seed: int = 0
    """Base seed: episode i resets the env with seed + i and seeds its policy likewise."""
    policy: str = "auto"
    """'auto' (track-follower with noise on CarRacing, random elsewhere), 'track', 'exit' (CarRacing:
    follow the track, then drive off the playfield until the episode terminates), 'hold' (CarRacing:
    follow the track between long open-loop holds of one action, mostly straight on the gas), or
    'random'."""
    env_kwargs: str = "{}"
    """Extra gym.make keyword arguments as JSON, e.g. '{\"lap_complete_percent\": 0.9}'."""
    sentences: Path | None = None
    """JSON list of one sentence per action (generic envs; default 'Action k.')."""
    crf: int = 18
    """H.264 constant rate factor of the full-resolution video (18 = visually lossless)."""
    no_video: bool = False
    """Store only the training-resolution arrays, no full-resolution video (frames are still rendered
    at --resolution and downsampled, so they match a recording with video). Enough for the DiT, the
    heads and the VAE at 72x128; the 720p head (train-vae --hr-only) needs the video. For machines
    without ffmpeg (imageio-ffmpeg), or to save ~20% of the disk."""


def parse_resolution(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> (1280, 720); a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--resolution {text!r} is not WIDTHxHEIGHT; expected e.g. 1280x720")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise UsageError(f"--resolution {text!r}: width and height must be even and >= 16")
    return w, h


def is_carracing(env_id: str) -> bool:
    """Whether ``env_id`` is CarRacing (driven through the nine-action driving table)."""
    return env_id.split(":")[-1] in CARRACING_IDS


@contextlib.contextmanager
def carracing_canvas(width: int, height: int) -> Iterator[None]:
    """Make CarRacing's renderer draw on a ``width`` x ``height`` canvas for rgb_array renders.

    CarRacing sizes its pygame surface and its rgb_array output from module constants; we point those
    at the requested size for the duration of one render (the 96x96 observation that ``step`` draws
    is unaffected, it renders outside this context).
    """
    import gymnasium.envs.box2d.car_racing as cr

    saved = cr.WINDOW_W, cr.WINDOW_H, cr.VIDEO_W, cr.VIDEO_H
    cr.WINDOW_W, cr.WINDOW_H, cr.VIDEO_W, cr.VIDEO_H = width, height, width, height
    try:
        yield
    finally:
        cr.WINDOW_W, cr.WINDOW_H, cr.VIDEO_W, cr.VIDEO_H = saved


def to_train_res(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 full-resolution frame -> (72, 128, 3) uint8 training frame (area average)."""
    th, tw = E.TRAIN_HW
    h, w = frame.shape[:2]
    if h % th == 0 and w % tw == 0:  # exact block average, e.g. 720x1280 -> 72x128 by 10x10 blocks
        return block_mean(frame, E.TRAIN_HW)
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((tw, th), Image.BOX))


def resize_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 frame to (height, width, 3) (no-op when it already matches)."""
    if frame.shape[:2] == (height, width):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


@dataclass
class Source:
    """What to record: resolved and validated once in the parent, sent to each worker."""

    env_id: str
    env_kwargs: dict[str, Any]
    carracing: bool
    action_names: list[str]
    sentences: list[str]
    labelled: bool
    split: str
    policy: str
    frame_skip: int
    max_steps: int
    width: int
    height: int
    crf: int
    video: bool = True


def make_env(src: Source):  # noqa: ANN201 - a gymnasium.Env
    """Create the real env described by ``src``."""
    import gymnasium as gym

    kwargs = dict(src.env_kwargs)
    if src.carracing:
        kwargs.setdefault("continuous", True)
    try:
        return gym.make(src.env_id, render_mode="rgb_array", **kwargs)
    except gym.error.Error as err:
        raise UsageError(f"--env {src.env_id!r} cannot be made: {err}") from err
    except TypeError as err:
        raise UsageError(f"--env-kwargs {json.dumps(src.env_kwargs)} rejected by {src.env_id!r}: {err}") from err


def resolve_source(args: RecordArgs) -> Source:
    """Validate the arguments and build the recording ``Source`` (raises UsageError, creates nothing)."""
    import gymnasium as gym

    for name in ("episodes", "steps", "frame_skip", "workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    width, height = parse_resolution(args.resolution)
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as err:
        raise UsageError(f"--env-kwargs {args.env_kwargs!r} is not JSON: {err}") from err
    if not isinstance(env_kwargs, dict):
        raise UsageError(f"--env-kwargs {args.env_kwargs!r}: expected a JSON object")
    if args.policy not in ("auto", "track", "exit", "hold", "random"):
        raise UsageError(f"--policy {args.policy!r}: expected one of auto, track, exit, hold, random")
    carracing = is_carracing(args.env)
    if args.env.split(":")[-1] not in gym.registry and ":" not in args.env:
        raise UsageError(f"--env {args.env!r} is not a registered Gymnasium env id")
    if carracing:
        env_kwargs.setdefault("domain_randomize", bool(args.unlabelled or args.domain_randomize))
        names, sentences = list(DRIVING_ACTIONS), list(DRIVING_SENTENCES)
    if args.policy in ("track", "exit", "hold") and not carracing:
        raise UsageError(
            f"--policy {args.policy} drives CarRacing only; --env {args.env!r} needs --policy random"
        )
    split = args.split or ("eval" if env_kwargs.get("domain_randomize") and not args.unlabelled else "train")
    src = Source(
        env_id=args.env,
        env_kwargs=env_kwargs,
        carracing=carracing,
        action_names=[],
        sentences=[],
        labelled=not args.unlabelled,
        split=split,
        policy=("track" if carracing else "random") if args.policy == "auto" else args.policy,
        frame_skip=args.frame_skip,
        max_steps=args.steps,
        width=width,
        height=height,
        crf=args.crf,
        video=not args.no_video,
    )
    env = make_env(src)
    try:
        space = env.action_space
        if carracing:
            src.action_names, src.sentences = names, sentences
        elif isinstance(space, gym.spaces.Discrete):
            n = int(space.n)
            src.action_names = [f"a{k}" for k in range(n)]
            src.sentences = list(default_sentences(n))
            if args.sentences is not None:
                try:
                    custom = json.loads(Path(args.sentences).read_text())
                except (OSError, json.JSONDecodeError) as err:
                    raise UsageError(f"--sentences {str(args.sentences)!r} is not a readable JSON list: {err}") from err
                if not (isinstance(custom, list) and len(custom) == n and all(isinstance(s, str) for s in custom)):
                    raise UsageError(f"--sentences {str(args.sentences)!r}: expected a JSON list of {n} strings")
                src.sentences = custom
        else:
            raise UsageError(
                f"--env {args.env!r} has action space {space}; only Discrete action spaces can be recorded "
                "(CarRacing-v3 is driven through the built-in nine-action driving map)"
            )
        if env.metadata.get("render_modes") and "rgb_array" not in env.metadata["render_modes"]:
            raise UsageError(
                f"--env {args.env!r} cannot render rgb_array (render modes: {env.metadata['render_modes']})"
            )
    finally:
        env.close()
    return src


def record_episode(
    root: Path, index: int, seed: int, src: Source, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Record one episode and write it atomically; returns a small summary."""
    import gymnasium as gym
    import imageio

    from world_model.data.policy import RandomPolicy, TrackExit, TrackFollower, TrackHold

    name = E.episode_name(index)
    env = make_env(src)
    rng = np.random.default_rng(seed)
    n_actions = len(src.action_names)
    policies = {"track": TrackFollower, "exit": TrackExit, "hold": TrackHold}
    policy = policies[src.policy](rng) if src.policy in policies else RandomPolicy(n_actions, rng)
    tmp = E.tmp_episode_dir(root, name)
    tmp.mkdir(parents=True, exist_ok=True)
    fps = DEFAULT_FPS / src.frame_skip if src.carracing else 15
    video_path = tmp / E.VIDEO_FILE if src.video else None
    writer = None if video_path is None else imageio.get_writer(
        video_path,
        fps=fps,
        codec="libx264",
        quality=None,
        ffmpeg_params=["-crf", str(src.crf), "-preset", "veryfast"],
        macro_block_size=2,
        ffmpeg_log_level="error",
    )
    canvas = (lambda: carracing_canvas(src.width, src.height)) if src.carracing else contextlib.nullcontext

    def render() -> np.ndarray:
        with canvas():
            frame = env.render()
        return resize_frame(np.asarray(frame, dtype=np.uint8), src.width, src.height)

    frames, actions, rewards, terminated, truncated = [], [-1], [0.0], [False], [False]
    t0 = time.perf_counter()
    try:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        unwrapped = env.unwrapped
        full = render()
        if writer is not None:
            writer.append_data(full)
        frames.append(to_train_res(full))
        for _ in range(src.max_steps):
            a = policy(unwrapped)
            ctrl = CARRACING_CONTROLS[a] if src.carracing else a
            reward, term, trunc = 0.0, False, False
            for _ in range(src.frame_skip):
                _, r, term, trunc, _ = env.step(ctrl)
                reward += float(r)
                if term or trunc:
                    break
            full = render()
            if writer is not None:
                writer.append_data(full)
            frames.append(to_train_res(full))
            actions.append(a)
            rewards.append(reward)
            terminated.append(bool(term))
            truncated.append(bool(trunc))
            if on_step is not None:
                on_step(1)
            if term or trunc:
                break
        else:
            truncated[-1] = True  # the --steps cap ended the episode
    finally:
        if writer is not None:
            writer.close()
        env.close()
    labels = np.array(actions, dtype=np.int16)
    if not src.labelled:
        labels[:] = -1
    arrays = {
        "frames": np.stack(frames),  # (S+1, 72, 128, 3) uint8
        "actions": labels,  # (S+1,) int16, -1 = unknown
        "rewards": np.array(rewards, dtype=np.float32),
        "terminated": np.array(terminated, dtype=bool),
        "truncated": np.array(truncated, dtype=bool),
    }
    meta = {
        "name": name,
        "env_id": src.env_id,
        "env_kwargs": src.env_kwargs,
        "seed": seed,
        "policy": src.policy,
        "policy_params": policy.params() if hasattr(policy, "params") else {},
        "frame_skip": src.frame_skip,
        "labelled": src.labelled,
        "has_rewards": True,
        "split": src.split,
        "action_names": src.action_names,
        "sentences": src.sentences,
        "video_hw": [src.height, src.width] if src.video else None,
        "video_fps": fps if src.video else None,
        "gymnasium_version": gym.__version__,
        "versions": E.versions(),
        "record_seconds": round(time.perf_counter() - t0, 2),
    }
    E.write_episode(root, name, arrays, meta, video_tmp=video_path)
    return {"name": name, "steps": len(frames) - 1}


_progress_queue: Any = None
_parent_pid: int | None = None


def _init_worker(queue: Any, parent_pid: int) -> None:
    global _progress_queue, _parent_pid
    _progress_queue, _parent_pid = queue, parent_pid


def _worker_step(n: int) -> None:
    """Report progress; a worker whose recorder was killed (SIGKILL/SIGTERM reach only the parent)
    stops at once instead of recording the episodes still queued: its half-written episode stays a
    temporary directory that the next run removes."""
    if os.getppid() != _parent_pid:
        os._exit(1)
    _progress_queue.put(n)


def _worker(root: Path, index: int, seed: int, src: Source) -> dict[str, Any]:
    _worker_step(0)
    return record_episode(root, index, seed, src, on_step=_worker_step)


def record(args: RecordArgs) -> dict[str, Any]:
    """Record (or resume recording) ``args.episodes`` episodes into ``args.out``; returns the manifest."""
    from tqdm import tqdm

    src = resolve_source(args)  # validates everything before anything is written
    root = E.check_data_root(args.out, create=True)
    if E.remove_stale_tmp(root):
        print("removed half-written episodes left by an interrupted run", file=sys.stderr)
    done = {p.name for p in E.list_episodes(root)}
    todo = [i for i in range(args.episodes) if E.episode_name(i) not in done]
    recipe = {
        "command": "matrix-world record " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["record"]
        else None,
        "args": {k: str(v) for k, v in asdict(args).items()},
    }
    E.build_manifest(root, extra={"recipe": recipe})
    if not todo:
        print(f"{root}: all {args.episodes} episodes already recorded")
        return E.build_manifest(root)
    bar = tqdm(total=len(todo) * args.steps, unit="step", desc=f"record {args.env}", smoothing=0.1)
    try:
        if args.workers == 1:
            for i in todo:
                record_episode(root, i, args.seed + i, src, on_step=bar.update)
                E.build_manifest(root)
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            init = {"initializer": _init_worker, "initargs": (queue, os.getpid())}
            with ProcessPoolExecutor(args.workers, mp_context=ctx, **init) as pool:
                futures = [pool.submit(_worker, root, i, args.seed + i, src) for i in todo]
                pending = set(futures)
                while pending:
                    while not queue.empty():
                        bar.update(queue.get())
                    finished = {f for f in pending if f.done()}
                    for f in as_completed(finished) if finished else ():
                        f.result()
                        E.build_manifest(root)
                    pending -= finished
                    time.sleep(0.1)
    finally:
        bar.close()
    manifest = E.build_manifest(root)
    t = manifest["totals"]
    print(f"{root}: {t['episodes']} episodes, {t['steps']} steps")
    return manifest


def main(argv: list[str]) -> int:
    """``matrix-world record``."""
    import tyro

    args = tyro.cli(RecordArgs, args=argv, prog="matrix-world record")
    record(args)
    return 0


@dataclass
class ImportArgs:
    """Import a folder of the user's own video files as unlabelled footage."""

    src: Path
    """Folder of video files (.mp4, .mov, .avi, .mkv, .webm)."""
    out: Path
    """Data directory to add the footage to (one episode per video file)."""
    resolution: str = DEFAULT_RESOLUTION
    """Full-resolution size WIDTHxHEIGHT the frames are resized to."""
    stride: int = 1
    """Keep every stride-th frame of the source video."""
    max_frames: int = 10_000
    """Cap on frames per video."""
    crf: int = 18
    """H.264 constant rate factor of the stored video."""


VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


def import_videos(args: ImportArgs) -> dict[str, Any]:
    """Add each video in ``args.src`` as one unlabelled episode (resumable: files already imported are skipped)."""
    import imageio

    width, height = parse_resolution(args.resolution)
    if not args.src.is_dir():
        raise UsageError(f"--src {str(args.src)!r} is not a folder of video files")
    files = sorted(p for p in args.src.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise UsageError(f"--src {str(args.src)!r} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
    if args.stride < 1:
        raise UsageError(f"--stride {args.stride}: expected an integer >= 1")
    root = E.check_data_root(args.out, create=True)
    E.remove_stale_tmp(root)
    existing = E.list_episodes(root)
    imported = {E.read_meta(p).get("source_file") for p in existing}
    next_index = max([int(p.name.split("_")[1]) for p in existing], default=-1) + 1
    for path in files:
        if path.name in imported:
            continue
        name = E.episode_name(next_index)
        tmp = E.tmp_episode_dir(root, name)
        tmp.mkdir(parents=True, exist_ok=True)
        writer = imageio.get_writer(
            tmp / E.VIDEO_FILE,
            fps=15,
            codec="libx264",
            quality=None,
            ffmpeg_params=["-crf", str(args.crf), "-preset", "veryfast"],
            macro_block_size=2,
            ffmpeg_log_level="error",
        )
        frames = []
        try:
            reader = imageio.get_reader(path)
        except Exception as err:  # noqa: BLE001 - imageio raises many kinds
            raise UsageError(f"video {str(path)!r} cannot be read: {err}") from err
        try:
            for k, frame in enumerate(reader):
                if k % args.stride:
                    continue
                full = resize_frame(np.asarray(frame)[..., :3].astype(np.uint8), width, height)
                writer.append_data(full)
                frames.append(to_train_res(full))
                if len(frames) >= args.max_frames:
                    break
        finally:
            reader.close()
            writer.close()
        if len(frames) < 2:
            raise UsageError(f"video {str(path)!r} has fewer than 2 frames")
        n = len(frames)
        arrays = {
            "frames": np.stack(frames),
            "actions": np.full(n, -1, np.int16),
            "rewards": np.zeros(n, np.float32),
            "terminated": np.zeros(n, bool),
            "truncated": np.zeros(n, bool),
        }
        arrays["truncated"][-1] = True
        meta = {
            "name": name,
            "env_id": f"video:{path.name}",
            "source_file": path.name,
            "labelled": False,
            "has_rewards": False,
            "split": "train",
            "action_names": list(DRIVING_ACTIONS),
            "sentences": list(DRIVING_SENTENCES),
            "video_hw": [height, width],
            "stride": args.stride,
        }
        E.write_episode(root, name, arrays, meta, video_tmp=tmp / E.VIDEO_FILE)
        next_index += 1
        print(f"imported {path.name} -> {name} ({n} frames)")
    return E.build_manifest(root)


def import_videos_main(argv: list[str]) -> int:
    """``matrix-world import-videos``."""
    import tyro

    import_videos(tyro.cli(ImportArgs, args=argv, prog="matrix-world import-videos"))
    return 0
