"""The recorder: real 720p CarRacing episodes, labels, unlabelled footage, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio
import numpy as np
import pytest

from world_model.data import episodes as E
from world_model.data.record import RecordArgs, parse_resolution, record, to_train_res
from world_model.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "agents.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def test_record_carracing_720p(tmp_path: Path) -> None:
    out = tmp_path / "data"
    r = cli("record", "--env", "CarRacing-v3", "--episodes", "2", "--steps", "30", "--out", str(out))
    assert r.returncode == 0, r.stderr
    eps = E.list_episodes(out)
    assert [p.name for p in eps] == ["ep_000000", "ep_000001"]
    for ep in eps:
        arrays = E.open_episode(ep)
        meta = E.read_meta(ep)
        n = meta["steps"] + 1
        assert arrays["frames"].shape == (n, 72, 128, 3) and arrays["frames"].dtype == np.uint8
        assert arrays["actions"][0] == -1 and set(arrays["actions"][1:].tolist()) <= set(range(9))
        assert arrays["rewards"].dtype == np.float32 and arrays["terminated"].dtype == bool
        assert meta["labelled"] and meta["frame_skip"] == 4 and meta["env_id"] == "CarRacing-v3"
        reader = imageio.get_reader(ep / E.VIDEO_FILE)
        frames = [f for f in reader]
        reader.close()
        assert len(frames) == n
        assert frames[5].shape == (720, 1280, 3) and frames[5].dtype == np.uint8
        # the training frame is the 720p frame averaged down (up to H.264's near-lossless error)
        err = np.abs(to_train_res(frames[5]).astype(int) - arrays["frames"][5].astype(int)).mean()
        assert err < 4.0
        # file hashes in meta match the files
        for fname, digest in meta["sha256"].items():
            assert E.sha256_file(ep / fname) == digest
    manifest = json.loads((out / E.MANIFEST).read_text())
    assert manifest["format_version"] == E.FORMAT_VERSION and manifest["totals"]["episodes"] == 2
    assert sum(manifest["action_counts"].values()) == manifest["totals"]["steps"]
    info = cli("data-info", str(out))
    assert info.returncode == 0 and "episodes: 2" in info.stdout and "MB per 1,000 steps" in info.stdout


def test_unlabelled_has_no_action_labels(tmp_path: Path) -> None:
    record(RecordArgs(out=tmp_path, unlabelled=True, episodes=1, steps=8, resolution="320x180"))
    (ep,) = E.list_episodes(tmp_path)
    meta = E.read_meta(ep)
    assert not meta["labelled"] and meta["env_kwargs"]["domain_randomize"] is True
    assert (E.open_episode(ep)["actions"] == -1).all()
    assert json.loads((tmp_path / E.MANIFEST).read_text())["action_counts"] == {"unknown": meta["steps"]}


def test_no_video_stores_the_same_training_frames(tmp_path: Path) -> None:
    """--no-video skips the full-resolution video only: same seed -> the same arrays, no video file."""
    kw = dict(episodes=1, steps=10, resolution="320x180", seed=3)
    record(RecordArgs(out=tmp_path / "with", **kw))
    record(RecordArgs(out=tmp_path / "without", no_video=True, **kw))
    (a,), (b,) = E.list_episodes(tmp_path / "with"), E.list_episodes(tmp_path / "without")
    assert (a / E.VIDEO_FILE).exists() and not (b / E.VIDEO_FILE).exists()
    ea, eb = E.open_episode(a), E.open_episode(b)
    assert ea.keys() == eb.keys()
    for k in ea:
        np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)
    assert E.read_meta(b)["video_hw"] is None and E.read_meta(a)["video_hw"] == [180, 320]
    info = cli("data-info", str(tmp_path / "without"))
    assert info.returncode == 0 and "episodes: 1" in info.stdout, info.stderr


def test_generic_discrete_env(tmp_path: Path) -> None:
    record(RecordArgs(out=tmp_path, env="CartPole-v1", episodes=1, steps=12, resolution="320x240"))
    (ep,) = E.list_episodes(tmp_path)
    meta = E.read_meta(ep)
    assert meta["sentences"] == ["Action 0.", "Action 1."] and meta["policy"] == "random"
    a = E.open_episode(ep)["actions"][1:]
    assert set(a.tolist()) <= {0, 1}


def test_kill_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "data"
    args = ["record", "--episodes", "3", "--steps", "40", "--resolution", "320x180", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    first = out / E.EPISODES_DIR / "ep_000000"
    while time.time() < deadline:  # kill while the second episode is half written
        if first.exists() and list((out / E.EPISODES_DIR).glob(f"{E.TMP_PREFIX}ep_000001*")):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = E.list_episodes(out)
    assert [p.name for p in done] == ["ep_000000"]  # only complete episodes count
    first_hash = E.sha256_file(first / "meta.json")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    names = [p.name for p in E.list_episodes(out)]
    assert names == ["ep_000000", "ep_000001", "ep_000002"]  # resumed, no duplicates
    assert E.sha256_file(first / "meta.json") == first_hash  # the finished episode was not re-recorded
    assert not list((out / E.EPISODES_DIR).glob(f"{E.TMP_PREFIX}*"))
    manifest = json.loads((out / E.MANIFEST).read_text())
    assert [e["name"] for e in manifest["episodes"]] == names


def test_killed_recorder_leaves_no_worker_recording(tmp_path: Path) -> None:
    """SIGKILL reaches only the recorder; its worker processes stop at their next step instead of
    recording the episodes still queued, and a rerun completes the set."""
    out = tmp_path / "data"
    args = ["record", "--episodes", "6", "--steps", "60", "--resolution", "320x180", "--workers", "2"]
    args += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "agents.cli", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    episodes = out / E.EPISODES_DIR
    deadline = time.time() + 240
    while time.time() < deadline and len(list(episodes.glob(f"{E.TMP_PREFIX}*"))) < 2:  # both workers recording
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workers = {int(d.name.rsplit("-", 1)[1]) for d in episodes.glob(f"{E.TMP_PREFIX}*")}  # .tmp-<name>-<pid>
    assert len(workers) == 2

    def alive(pid: int) -> bool:  # running (a zombie waiting for init to reap it has stopped)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "orphaned recorder workers kept running"
    assert len(E.list_episodes(out)) <= 2  # at most the episodes that were finishing when killed
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in E.list_episodes(out)] == [E.episode_name(i) for i in range(6)]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--env", "NoSuchEnv-v9"], "NoSuchEnv-v9"),
        (["--env", "Pendulum-v1"], "Discrete"),
        (["--resolution", "big"], "'big'"),
        (["--episodes", "0"], "--episodes 0"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "data"
    r = cli("record", "--out", str(out), "--steps", "2", *extra)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert not out.exists()


def test_out_is_a_file_or_foreign_manifest(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("record", "--out", str(f), "--steps", "2")
    assert r.returncode == 2 and "is a file" in r.stderr
    d = tmp_path / "old"
    d.mkdir()
    (d / E.MANIFEST).write_text(json.dumps({"format_version": 99}))
    r = cli("record", "--out", str(d), "--steps", "2")
    assert r.returncode == 2 and "format_version 99" in r.stderr
    assert sorted(p.name for p in d.iterdir()) == [E.MANIFEST]


def test_parse_resolution() -> None:
    assert parse_resolution("1280x720") == (1280, 720)
    with pytest.raises(UsageError, match="'12x7'"):
        parse_resolution("12x7")


def test_import_videos(tmp_path: Path) -> None:
    src = tmp_path / "videos"
    src.mkdir()
    rng = np.random.default_rng(0)
    imageio.mimwrite(src / "clip.mp4", rng.integers(0, 255, (6, 64, 96, 3), dtype=np.uint8), fps=10, macro_block_size=8)
    r = cli("import-videos", "--src", str(src), "--out", str(tmp_path / "data"), "--resolution", "320x180")
    assert r.returncode == 0, r.stderr
    (ep,) = E.list_episodes(tmp_path / "data")
    meta = E.read_meta(ep)
    assert not meta["labelled"] and meta["steps"] == 5
    assert (E.open_episode(ep)["actions"] == -1).all()
    r = cli("import-videos", "--src", str(src), "--out", str(tmp_path / "data"), "--resolution", "320x180")
    assert r.returncode == 0 and len(E.list_episodes(tmp_path / "data")) == 1  # resumable, no duplicate


@pytest.mark.slow
def test_twenty_episodes_cover_all_nine_actions(tmp_path: Path) -> None:
    record(RecordArgs(out=tmp_path, episodes=20, steps=250, resolution="320x180", workers=2))
    counts = json.loads((tmp_path / E.MANIFEST).read_text())["action_counts"]
    assert set(counts) == {"D", "DL", "DR", "B", "BL", "BR", "N", "NL", "NR"}


def test_exit_policy_ends_in_termination(tmp_path: Path) -> None:
    """--policy exit drives off the playfield: the episode ends terminated with CarRacing's -100."""
    record(RecordArgs(out=tmp_path, episodes=1, steps=400, resolution="320x180", policy="exit", seed=3))
    (ep,) = E.list_episodes(tmp_path)
    arrays, meta = E.open_episode(ep), E.read_meta(ep)
    assert meta["policy"] == "exit" and meta["steps"] < 400
    assert arrays["terminated"][-1] and not arrays["terminated"][:-1].any()
    assert arrays["rewards"][-1] <= -99.0
    frames = arrays["frames"]
    assert (frames[-1].max(-1) < 10).mean() > (frames[0].max(-1) < 10).mean() + 0.05  # the black void


def test_exit_policy_needs_carracing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--policy exit drives CarRacing only"):
        record(RecordArgs(out=tmp_path, env="CartPole-v1", episodes=1, steps=5, policy="exit"))


def test_hold_policy_starts_holds_on_the_road_and_leaves_it() -> None:
    """TrackHold: open-loop holds of one action, each begun from the road; the holds run off the road."""
    import gymnasium as gym

    from world_model.actions import CARRACING_CONTROLS
    from world_model.data.policy import TrackHold

    env = gym.make("CarRacing-v3", continuous=True)
    env.reset(seed=4)
    car_env, policy = env.unwrapped, TrackHold(np.random.default_rng(4))
    on_road, holding, actions = [], [], []
    for _ in range(250):
        on_road.append(any(len(w.tiles) > 0 for w in car_env.car.wheels))  # before the action
        a = policy(car_env)
        holding.append(policy.holding)
        actions.append(a)
        for _ in range(4):
            *_, term, trunc, _ = env.step(CARRACING_CONTROLS[a])
        if term or trunc:
            break
    env.close()
    on_road, holding, actions = np.array(on_road), np.array(holding), np.array(actions)
    starts = np.flatnonzero(holding & ~np.r_[False, holding[:-1]])  # first step of each hold
    assert len(starts) >= 3 and len(policy.holds) == len(starts)
    assert on_road[starts].all()  # each hold begins on the road
    left_road = 0
    for s, (action, length) in zip(starts, policy.holds, strict=True):
        assert (actions[s : s + length] == action).all()  # one action, open loop, for the whole hold
        left_road += int(not on_road[s : s + length + 1].all())
    assert sum(a == 0 for a, _ in policy.holds) >= 1  # "D" is among them
    # holds run off the road, and the car was back on it for the next hold (each starts on the road)
    assert left_road >= 2


def test_hold_policy_needs_carracing_and_checks_its_ranges(tmp_path: Path) -> None:
    from world_model.data.policy import TrackHold

    with pytest.raises(UsageError, match="--policy hold drives CarRacing only"):
        record(RecordArgs(out=tmp_path, env="CartPole-v1", episodes=1, steps=5, policy="hold"))
    with pytest.raises(ValueError, match=r"hold=\(5, 2\)"):
        TrackHold(np.random.default_rng(0), hold=(5, 2))
    with pytest.raises(ValueError, match="p_straight=1.5"):
        TrackHold(np.random.default_rng(0), p_straight=1.5)
