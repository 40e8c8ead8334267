"""Evaluation suite: every metric reacts to a deliberate fault, and `matrix-world eval` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_world
from tests.synthetic import MAX_SPEED, ROAD_X, STEER_PX, make_synthetic_dataset, render
from world_model.actions import STEER_OF_ACTION, THROTTLE_OF_ACTION
from world_model.data.loader import split_episodes
from world_model.errors import UsageError
from world_model.eval import metrics as M
from world_model.eval import suite as S
from world_model.eval.idm import (
    IDM_PRESETS,
    IDMTrainConfig,
    InverseDynamicsModel,
    TransitionSet,
    load_idm,
    predict,
    save_idm,
    train_idm,
)
from world_model.eval.latent_idm import LatentIDM, LatentIDMConfig, LatentTransitions, train_latent_idm

A = 9


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core CPU it is many times faster than two, and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("eval") / "data", episodes=8, steps=60, seed=1)


@pytest.fixture(scope="module")
def toy_idm(toy_data: Path) -> InverseDynamicsModel:
    """An IDM trained briefly on the toy scene's training split (~5 s)."""
    train, _ = split_episodes(toy_data, 0.1, 0)
    transitions = TransitionSet([toy_data / "episodes" / n for n in train], 3, A)
    model, info = train_idm(IDM_PRESETS["tiny"], transitions.sample,
                            IDMTrainConfig(steps=150, batch_size=32, lr=3e-3, log_every=0))
    assert info["final_train_accuracy"] > 0.4
    return model


class ToySource:
    """A 'perfect' generator: the toy scene's own dynamics and renderer (tests/synthetic.py).

    With ``latency`` L, the action given at step t takes effect at step t + L (a pipelined sampler);
    with ``ignore_actions`` the car coasts straight whatever it is told.
    """

    def __init__(self, num_envs: int, latency: int = 0, ignore_actions: bool = False,
                 brighten: float = 0.0) -> None:
        self.num_envs, self.latency = num_envs, latency
        self.ignore_actions, self.brighten = ignore_actions, brighten
        self.t = 0

    def _frames(self) -> np.ndarray:
        frames = np.stack([render(int(x), int(s)) for x, s in zip(self.car_x, self.scroll, strict=True)])
        if self.brighten:
            frames = np.clip(frames.astype(np.float64) + self.brighten * self.t, 0, 255).astype(np.uint8)
        return frames

    def _advance(self, actions: np.ndarray) -> None:
        throttle = THROTTLE_OF_ACTION[actions]
        self.speed = np.select([throttle == 0, throttle == 1], [np.minimum(self.speed + 1, MAX_SPEED),
                               np.maximum(self.speed - 2, 0)], np.maximum(self.speed - 1, 0))
        self.car_x = np.clip(self.car_x + STEER_PX * STEER_OF_ACTION[actions], 0, 128 - 6)
        self.scroll = self.scroll + self.speed

    def start(self, rng: np.random.Generator) -> np.ndarray:
        b = self.num_envs
        self.car_x = rng.integers(ROAD_X[0] + 8, ROAD_X[1] - 14, size=b)
        self.speed = rng.integers(0, MAX_SPEED + 1, size=b)
        self.scroll = rng.integers(0, 12, size=b)
        self.queue = [np.full(b, 6)] * self.latency  # coast until the first action lands
        self.t = 0
        history = [self._frames()]
        self._advance(np.full(b, 6))
        history.append(self._frames())
        return np.stack(history, axis=1)  # (B, 2, H, W, 3)

    def step(self, actions: np.ndarray, decode: bool = True) -> np.ndarray | None:
        self.queue.append(np.asarray(actions))
        act = self.queue.pop(0)
        self.t += 1
        self._advance(np.full(self.num_envs, 6) if self.ignore_actions else act)
        return self._frames() if decode else None


# ------------------------------------------------------------------------------- pure metrics
def test_psnr_identical_is_inf_and_falls_with_noise() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(4, 72, 128, 3), dtype=np.uint8)
    assert M.psnr(img, img) == float("inf")
    scores = []
    for sigma in (2, 8, 32):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
        scores.append(M.psnr(noisy, img))
    assert scores[0] > 40 and scores[0] > scores[1] > scores[2]


def test_frechet_zero_for_identical_and_grows_with_shift() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 16))
    assert M.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    other = rng.normal(size=(500, 16))  # same distribution, other samples: small
    fds = [M.frechet_distance(feats, other + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert fds[0] < 1.0
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False))
    assert fds[-1] == pytest.approx(16 * 4.0, rel=0.2)  # |mu|^2 dominates: 16 dims x 2^2
    scaled = M.frechet_distance(feats, 3.0 * other)  # a covariance change counts too
    assert scaled > 10 * fds[0]


def test_histogram_brightness_and_accuracy_report() -> None:
    dark = np.zeros((2, 8, 8, 3), np.uint8)
    light = np.full((2, 8, 8, 3), 255, np.uint8)
    assert M.histogram_distance(M.color_histogram(dark), M.color_histogram(dark)) == 0.0
    assert M.histogram_distance(M.color_histogram(dark), M.color_histogram(light)) == pytest.approx(1.0)
    assert M.mean_brightness(dark) == 0.0 and M.mean_brightness(light) == pytest.approx(255.0)

    true = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    rep = M.accuracy_report(np.array([0, 1, 1, 1, 2, 2, 0, 2]), true, 3)
    assert rep["accuracy"] == pytest.approx(6 / 8) and rep["n"] == 8
    assert rep["per_action"] == [0.5, 1.0, 0.75]
    assert rep["chance_uniform"] == pytest.approx(1 / 3) and rep["chance_majority"] == pytest.approx(0.5)
    assert np.array(rep["confusion"]).sum() == 8 and rep["confusion"][0][1] == 1

    actions = M.hold_actions(3, 10, A, 4, np.random.default_rng(0))
    assert actions.shape == (3, 10) and (actions[:, :4] == actions[:, :1]).all() and actions.max() < A


def test_rms_gradient_falls_with_blur_and_ignores_rows_below_the_view() -> None:
    rng = np.random.default_rng(0)
    sharp = np.repeat(rng.integers(0, 256, (2, 24, 32, 1)), 3, axis=-1).astype(np.uint8)  # grey noise
    blurred = ((sharp[:, :-1, :-1].astype(np.float32) + sharp[:, 1:, 1:]) / 2).astype(np.uint8)
    assert M.rms_gradient(np.full((2, 24, 32, 3), 90, np.uint8)) == 0.0
    assert M.rms_gradient(blurred) < 0.8 * M.rms_gradient(sharp)
    flat_top = sharp.copy()
    flat_top[:, :12] = 40
    assert M.rms_gradient(flat_top, rows=12) == 0.0 and M.rms_gradient(flat_top) > 0.0
    # a mean of per-frame values: the same for any grouping of the frames
    assert M.rms_gradient(blurred, chunk=1) == pytest.approx(np.mean([M.rms_gradient(f[None]) for f in blurred]))
    with pytest.raises(ValueError, match="at least 2x2"):
        M.rms_gradient(sharp, rows=1)


def test_kerb_pixels_counts_red_and_white_in_the_view_but_not_the_car_or_pink_blur() -> None:
    frames = np.full((2, 72, 128, 3), 105, np.uint8)  # grey road
    frames[:, 20, 10:16] = (255, 0, 0)  # 6 red kerb pixels
    frames[:, 21, 10:14] = 255  # 4 white ones
    frames[1, 30, 40:50] = (200, 140, 140)  # a blurred, pinkish edge is not a kerb
    frames[:, 50:58, 62:66] = (204, 0, 0)  # the car
    frames[:, 65, :20] = 255  # dashboard digits, below the view
    assert M.kerb_pixels(frames, rows=62) == 10.0
    assert M.kerb_pixels(frames) == 30.0  # the dashboard row counts without ``rows``; the car never does
    assert M.kerb_pixels(np.full((1, 72, 128, 3), 105, np.uint8)) == 0.0
    with pytest.raises(ValueError, match=r"\(N, 72, 128, 3\) frames with N >= 1, got uint8 \(2, 84, 84, 3\)"):
        M.kerb_pixels(np.zeros((2, 84, 84, 3), np.uint8))
    with pytest.raises(ValueError, match="got float32"):  # frames in [-1, 1] would silently count 0
        M.kerb_pixels(frames.astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match=r"rows must be in \[1, 72\], got 0"):
        M.kerb_pixels(frames, rows=0)


def test_car_pixels_count_the_red_car_in_its_box_only() -> None:
    frames = np.full((3, 72, 128, 3), 105, np.uint8)  # grey road
    frames[:, 50:58, 62:66] = (204, 0, 0)  # the car: 32 red pixels in its box
    frames[1, 50:58, 62:66] = (150, 110, 110)  # frame 1: the car faded into the road
    frames[2, 20, 10:16] = (255, 0, 0)  # a kerb outside the box is not the car
    counts = M.car_pixels(frames)
    assert counts.dtype == np.int64 and counts.tolist() == [32, 0, 32]
    assert (counts < M.CAR_FADED_BELOW).tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"car_pixels needs uint8 \(N, 72, 128, 3\).*got float32"):
        M.car_pixels(frames.astype(np.float32))


def test_off_palette_counts_invented_colours_but_not_real_ones_blur_the_car_or_the_dashboard() -> None:
    real = np.zeros((2, 72, 128, 3), np.uint8)
    real[..., :] = (102, 204, 102)  # grass
    real[:, :, 40:80] = (102, 102, 102)  # road
    real[:, :, 39] = (102, 153, 102)  # a resampled road edge
    real[:, 20, 38] = (255, 0, 0)  # a kerb pixel
    real[:, 50:58, 62:66] = (0, 0, 0)  # the car's black wheels (left out)
    real[:, 62:] = (0, 0, 0)  # the dashboard (below the view)
    palette = M.color_palette(real, rows=62, ignore=M.KERB_CAR_BOX)
    assert palette.shape == (512,) and palette.dtype == bool and palette.sum() == 4  # grass, road, edge, red
    assert M.off_palette(real, palette, 62, M.KERB_CAR_BOX) == 0.0
    gen = real.copy()
    gen[0, 40:45, 50:60] = (255, 255, 0)  # a yellow blob: 50 pixels
    gen[1, 40:45, 50:60] = (0, 0, 0)  # a black one, as dark as the wheels and the dashboard
    gen[:, 21, 38] = (255, 0, 0)  # one more kerb pixel: a real colour
    gen[:, 30, 39] = (102, 150, 102)  # a slightly different blend of road and grass: the same cell
    view = 62 * 128 - 14 * 12  # pixels counted per frame: the view without the car's box
    assert M.off_palette(gen, palette, 62, M.KERB_CAR_BOX) == pytest.approx(50 / view)
    assert M.off_palette(gen[:1], palette, 62, M.KERB_CAR_BOX) == pytest.approx(50 / view)
    # without rows and box the dashboard and wheels join the palette, so black is no longer invented
    assert M.off_palette(gen, M.color_palette(real), None) == pytest.approx(25 / (72 * 128))
    with pytest.raises(ValueError, match=r"uint8 \(N >= 1, H, W, 3\) frames, got float32"):
        M.off_palette(gen.astype(np.float32), palette)
    with pytest.raises(ValueError, match=r"no pixel of \(72, 128\) frames is left to count \(rows=0"):
        M.color_palette(gen, rows=0)
    with pytest.raises(ValueError, match="palette must be a bool"):
        M.off_palette(gen, palette.astype(np.float64))
    with pytest.raises(ValueError, match=r"got int64 \(100,\)"):
        M.off_palette(gen, np.zeros(100, np.int64))


def test_reward_and_termination_metrics() -> None:
    true = np.array([0.0, 1.0, 2.0, 3.0])
    good = M.reward_metrics(true + 0.1, true, baseline=1.5)
    assert good["mae"] == pytest.approx(0.1) and good["corr"] == pytest.approx(1.0)
    assert good["mae_constant_baseline"] == pytest.approx(1.0)
    flat = M.reward_metrics(np.zeros(4), true)
    assert flat["mae"] == pytest.approx(1.5) and np.isnan(flat["corr"])

    term = np.array([True, False, False, False])
    perfect = M.termination_metrics(term, term)
    assert perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    never = M.termination_metrics(np.zeros(4, bool), term)
    assert never["recall"] == 0.0 and np.isnan(never["precision"])
    noisy = np.array([True, True, False, False])
    assert M.termination_metrics(noisy, term)["precision"] == pytest.approx(0.5)
    assert M.termination_metrics(noisy, term)["false_positive_rate"] == pytest.approx(1 / 3)
    assert perfect["false_positive_rate"] == 0.0
    # negatives sampled at 1/10 of their real rate: one false alarm weighs 10
    weighted = M.termination_metrics(noisy, term, weight=np.array([1, 10, 10, 10]))
    assert weighted["precision"] == pytest.approx(1 / 11)


# ------------------------------------------------------------------------------------ control
def test_idm_is_accurate_on_real_held_out_data(toy_data: Path, toy_idm: InverseDynamicsModel) -> None:
    _, held = split_episodes(toy_data, 0.1, 0)
    seg = S.read_segments([toy_data / "episodes" / n for n in held], 60, 20, 0)
    pred, feats, labels = seg.idm_predictions(toy_idm)
    assert feats.shape == (len(labels), toy_idm.cfg.feature_dim)
    assert (pred == labels).mean() > 0.3  # chance is 1/9


def test_control_accuracy_perfect_generator_high_action_ignoring_world_at_chance(
    toy_idm: InverseDynamicsModel,
) -> None:
    rng = np.random.default_rng(0)
    frames, actions = S.collect_control(ToySource(8), 24, 2, A, rng)
    perfect, feats = S.control_scores(toy_idm, frames, actions, latency=0, max_lag=1)
    assert feats.shape == (8 * 24, toy_idm.cfg.feature_dim)
    frames, actions = S.collect_control(ToySource(8, ignore_actions=True), 24, 2, A, rng)
    ignoring_stub, _ = S.control_scores(toy_idm, frames, actions, latency=0, max_lag=1)

    # a world model that ignores its actions: interactive gates shut AND every control row identical
    world = build_tiny_world()
    with torch.no_grad():
        for gate in world.dit.gates():
            gate.zero_()
        world.control_tokens[:] = world.control_tokens[0].clone()
        world.control_mask[:] = world.control_mask[0].clone()
        world.control_pooled[:] = world.control_pooled[0].clone()
    src = S.SimulatorSource(world, world.start_latents, 8, None, history=2)
    assert src.latency == 1  # the tiny world's pipelined sampler: G - 1
    frames, actions = S.collect_control(src, 24, 2, A, rng)
    assert frames.shape == (8, 26, 72, 128, 3) and frames.dtype == np.uint8
    ignoring_world, _ = S.control_scores(toy_idm, frames, actions, src.latency, max_lag=1)

    chance = perfect["chance_uniform"]
    assert perfect["accuracy"] > 0.4
    for rep in (ignoring_stub, ignoring_world):
        assert rep["accuracy"] < chance + 0.12, rep["accuracy"]
        assert perfect["accuracy"] > rep["accuracy"] + 0.25


def test_control_labels_follow_the_action_latency(toy_idm: InverseDynamicsModel) -> None:
    rng = np.random.default_rng(1)
    frames, actions = S.collect_control(ToySource(8, latency=2), 24, 1, A, rng)  # a new action every step
    aligned, _ = S.control_scores(toy_idm, frames, actions, latency=2, max_lag=2)
    assert aligned["latency"] == 2 and len(aligned["by_lag"]) == 3
    assert aligned["accuracy"] == pytest.approx(aligned["by_lag"][2])
    assert aligned["accuracy"] > 0.4
    assert aligned["unaligned_accuracy"] < aligned["accuracy"] - 0.2  # lag 0 labels the wrong action


# ---------------------------------------------------------------------------------- latent IDM
def toy_latents(actions: np.ndarray, rng: np.random.Generator, latency: int = 0) -> np.ndarray:
    """Latent sequences (B, T+2, 4, 9, 16) whose step t rolls the field by the steer of ``actions[t - latency]``
    and offsets channel 0 by its throttle (two history frames first; actions (B, T))."""
    b, t_len = actions.shape
    z = [rng.normal(size=(b, 4, 9, 16)).astype(np.float32)]
    z.append(z[0].copy())
    steer = np.asarray(STEER_OF_ACTION)[actions]  # (B, T) in {-1, 0, 1}
    throttle = np.asarray(THROTTLE_OF_ACTION)[actions]
    for t in range(t_len):
        src = max(t - latency, 0)
        nxt = np.stack([np.roll(z[-1][i], int(round(steer[i, src])), axis=-1) for i in range(b)])
        nxt[:, 0] += 0.5 * throttle[:, src, None, None]
        z.append(nxt)
    return np.stack(z, axis=1)


@pytest.fixture(scope="module")
def toy_latent_idm() -> LatentIDM:
    rng = np.random.default_rng(0)
    acts = rng.integers(0, A, size=(16, 40))
    z = toy_latents(acts, rng)  # (16, 42, 4, 9, 16); actions[k] produced frame k
    labels = [np.concatenate([[-1, -1], a]) for a in acts]
    data = LatentTransitions(list(z), labels, 3, A)
    assert len(data) == 16 * 40
    cfg = LatentIDMConfig(num_actions=A, frames=3, latent_channels=4, latent_hw=(9, 16), width=32)
    model, info = train_latent_idm(cfg, data.sample, steps=150, batch_size=64, lr=3e-3)
    assert info["steps"] == 150
    return model


def test_latent_idm_reads_controls_in_latent_space_and_ignoring_world_scores_chance(
    toy_latent_idm: LatentIDM,
) -> None:
    rng = np.random.default_rng(5)
    acts = rng.integers(0, A, size=(8, 24))
    obeying = torch.from_numpy(toy_latents(acts, rng))
    ignoring = torch.from_numpy(toy_latents(rng.integers(0, A, size=(8, 24)), rng))  # other actions drove it
    good = S.latent_control_scores(toy_latent_idm, obeying, acts, latency=0, max_lag=1)
    bad = S.latent_control_scores(toy_latent_idm, ignoring, acts, latency=0, max_lag=1)
    assert good["accuracy"] > 0.7, good["accuracy"]
    assert bad["accuracy"] < 1 / A + 0.12, bad["accuracy"]

    late = torch.from_numpy(toy_latents(acts, rng, latency=2))  # effect lands two steps later
    aligned = S.latent_control_scores(toy_latent_idm, late, acts, latency=2, max_lag=2)
    assert aligned["accuracy"] == pytest.approx(aligned["by_lag"][2]) and aligned["accuracy"] > 0.6
    assert aligned["unaligned_accuracy"] < aligned["accuracy"] - 0.3
    with pytest.raises(ValueError, match="history"):
        S.latent_control_scores(toy_latent_idm, obeying[:, :10], acts, latency=0, max_lag=1)


def test_latent_idm_hud_rows_are_ignored_and_bad_labels_named() -> None:
    cfg = LatentIDMConfig(num_actions=A, frames=2, latent_channels=4, latent_hw=(9, 16), hud_rows=2, width=16)
    model = LatentIDM(cfg).eval()
    x = torch.randn(3, 2, 4, 9, 16)
    y = x.clone()
    y[..., -2:, :] += 100.0  # only the ignored rows change
    torch.testing.assert_close(model(x), model(y))
    with pytest.raises(UsageError, match="action id 9"):
        LatentTransitions([np.zeros((3, 4, 9, 16), np.float32)], [np.array([-1, 9, 0])], 2, A)
    with pytest.raises(ValueError, match="hud_rows"):
        LatentIDMConfig(latent_hw=(9, 16), hud_rows=9)


# -------------------------------------------------------------------------------------- drift
def test_drift_curve_rises_for_a_drifting_generator_and_stays_flat_otherwise(
    toy_idm: InverseDynamicsModel,
) -> None:
    rng = np.random.default_rng(0)
    real = np.stack([render(int(x), int(s)) for x in range(40, 80, 5) for s in range(0, 12, 3)])
    _, real_feats = predict(toy_idm, np.stack([real[:-2], real[1:-1], real[2:]], axis=1))
    edges = (0, 4, 16, 48)

    def curve(source: ToySource) -> dict:
        acc = M.DriftAccumulator(real_feats, real, edges)
        return S.run_drift(source, toy_idm, acc, 48, 8, 4, A, rng)

    flat = curve(ToySource(2))
    drifting = curve(ToySource(2, brighten=2.0))  # +2 grey levels per generated frame
    assert [r["start"] for r in flat["buckets"]] == [0, 4, 16]
    assert flat["horizon_reached"] == 48 and not flat["stopped_by_budget"]
    gaps = [r["brightness_gap"] for r in drifting["buckets"]]
    hists = [r["hist_distance"] for r in drifting["buckets"]]
    fds = [r["frechet"] for r in drifting["buckets"]]
    assert gaps[0] < gaps[1] < gaps[2] and gaps[2] > 40
    assert hists[0] < hists[1] < hists[2]
    assert fds[2] > fds[0]
    assert drifting["summary"]["abs_brightness_gap_change"] > 30
    flat_gaps = [abs(r["brightness_gap"]) for r in flat["buckets"]]
    assert max(flat_gaps) < 5 and max(r["hist_distance"] for r in flat["buckets"]) < 0.1
    assert abs(flat["summary"]["abs_brightness_gap_change"]) < 5


def test_drift_stops_at_its_time_budget(toy_idm: InverseDynamicsModel) -> None:
    real = np.stack([render(50, s) for s in range(8)])
    feats = np.random.default_rng(0).normal(size=(8, toy_idm.cfg.feature_dim))
    acc = M.DriftAccumulator(feats, real, (0, 10**6))
    out = S.run_drift(ToySource(1), toy_idm, acc, 10**6, 4, 4, A, np.random.default_rng(0), budget_s=1e-9)
    assert out["stopped_by_budget"] and out["horizon_reached"] == 1


# ------------------------------------------------------------------------------------- suite
def test_idm_save_load_round_trip(tmp_path: Path, toy_idm: InverseDynamicsModel) -> None:
    save_idm(tmp_path / "idm", toy_idm)
    loaded = load_idm(tmp_path / "idm")
    x = torch.randint(0, 256, (2, 3, 72, 128, 3), dtype=torch.uint8)
    inp = InverseDynamicsModel.prepare(x)
    torch.testing.assert_close(loaded(inp), toy_idm(inp))


def test_eval_suite_end_to_end(tmp_path: Path, tiny_world_dir: Path, toy_data: Path) -> None:
    dr = make_synthetic_dataset(tmp_path / "dr", episodes=2, steps=30, seed=7)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tiny_world_dir), "--data", str(toy_data), "--dr-data", str(dr),
            "--out", str(out), "--quick", "--threads", "1"]
    assert S.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("idm", "control", "fidelity", "drift", "heads", "speed", "machine", "timings_s"):
        assert key in metrics, key
    assert set(metrics["control"]["modes"]) == {"pipelined", "reconditioned", "immediate"}
    assert metrics["control"]["modes"]["pipelined"]["latency"] == 1
    assert metrics["control"]["modes"]["immediate"]["latency"] == 0
    assert 0.0 <= metrics["control"]["dr"]["accuracy"] <= 1.0
    assert 0.0 <= metrics["idm"]["real_dr"]["accuracy"] <= 1.0
    assert metrics["fidelity"]["vae_psnr"] > 0 and metrics["fidelity"]["teacher_forced"]["n"] == 6
    assert metrics["fidelity"]["frechet"]["generated"] >= 0
    assert [b["start"] for b in metrics["drift"]["buckets"]] == [0, 4, 12]
    assert metrics["heads"]["reward"]["n"] > 0 and "recall" in metrics["heads"]["termination"]
    assert metrics["speed"]["pipelined"]["steps_per_s_b1"] > 0
    assert metrics["speed"]["pipelined"]["fps_720p_b1"] > 0
    for png in ("confusion.png", "control.png", "drift.png", "reward.png"):
        assert (out / png).stat().st_size > 1000, png
    summary = (out / "summary.md").read_text()
    assert "| metric | value | reference |" in summary and "matrix-world eval" in summary
    assert (out / "idm" / "idm.safetensors").exists()
    assert (out / "latent_idm" / "latent_idm.safetensors").exists()
    assert 0.0 <= metrics["idm"]["latent"]["real_heldout"]["accuracy"] <= 1.0
    assert 0.0 <= metrics["idm"]["latent"]["real_dr"]["accuracy"] <= 1.0
    assert metrics["control"]["modes"]["pipelined"]["latent"]["latency"] == 1
    assert len(metrics["control"]["modes"]["pipelined"]["latent"]["by_lag"]) == 2
    assert 0.0 <= metrics["control"]["dr"]["latent"]["accuracy"] <= 1.0
    assert "latent IDM accuracy, generated (pipelined" in summary
    loop = metrics["closed_loop"]
    assert loop["steps"] == 8 and len(loop["world"]["on_road_by_quarter"]) == 4
    assert 0.0 <= loop["world"]["on_road"] <= 1.0 and "skipped" in loop["real"]  # synthetic data: no real game
    assert "closed loop, road follower" in summary
    assert loop["world"]["detail"] > 0.0 and 0.0 < metrics["fidelity"]["detail"]["vae_recon"]
    assert "detail (RMS luma gradient" in summary
    assert "kerb pixels" not in summary  # synthetic data is not CarRacing
    metrics["fidelity"]["kerb_pixels"] = {"real": 6.28, "vae_recon": 3.23}
    loop["world"]["kerb_pixels"], loop["world"]["car_faded"] = 1.5, 0.05
    loop["real"] = {**loop["world"], "kerb_pixels": 6.0, "car_faded": 0.0, "steer_share": 0.55}
    loop["world"]["steer_share"] = 0.09
    rendered = S.summary_markdown(metrics)
    assert "| car half gone, share of closed-loop frames | 5.00% | real game 0.00% (after its zoom-in) |" in rendered
    assert "| steering share: follower steps that turned, of those on the road | 0.09 | real game 0.55" in rendered
    assert "| kerb pixels per frame (red/white, above the dashboard), VAE-reconstructed held-out | 3.23 | " \
           "real frames 6.28 |" in rendered
    assert "| kerb pixels per frame, closed-loop frames | 1.50 | real game 6.00 |" in rendered
    op = metrics["fidelity"]["off_palette"]  # the tiny untrained world emits colours the toy data lacks
    assert 0.0 <= op["vae_recon"] <= 1.0 and 0.0 < op["generated"] <= 1.0 and op["palette_cells"] >= 1
    assert "| off-palette pixels (colours no held-out frame has), generated | " in summary
    assert 0.0 < loop["world"]["off_palette"] <= 1.0
    assert f"| off-palette pixels, closed-loop frames | {100 * loop['world']['off_palette']:.2f}% | real game " \
           in rendered

    # a second run reuses the first run's IDM (fixed features: comparable Fréchet distances) and tests
    # the heads on a second data directory (its held-out split + its eval-split episodes)
    heads_data = make_synthetic_dataset(tmp_path / "heads", episodes=6, steps=20, seed=3)
    make_synthetic_dataset(tmp_path / "heads_eval", episodes=2, steps=20, seed=4, split="eval")
    for ep in sorted((tmp_path / "heads_eval" / "episodes").iterdir()):  # same directory, new names
        ep.rename(heads_data / "episodes" / ep.name.replace("ep_0000", "ep_0100"))
    out2 = tmp_path / "out2"
    argv2 = ["--checkpoint", str(tiny_world_dir), "--data", str(toy_data), "--out", str(out2), "--quick",
             "--threads", "1", "--idm", str(out / "idm"), "--latent-idm", str(out / "latent_idm"),
             "--modes", "immediate", "--horizon", "8", "--heads-data", str(heads_data)]
    assert S.main(argv2) == 0
    again = json.loads((out2 / "metrics.json").read_text())
    extra = again["heads"]["extra"]  # 1 held-out train-split episode + 2 eval-split episodes
    assert extra["episodes"] == len(S.unseen_episodes(heads_data, 0.1, 0)) == 3
    assert extra["termination"]["positives"] >= 1 and extra["termination"]["recall"] == 0.0  # bias -10: never
    assert "termination precision / recall, same episodes" in (out2 / "summary.md").read_text()
    ends = extra["endings"]  # the reward head at the recorded endings, beside the recorded reward there
    assert ends["n"] == extra["termination"]["positives"] and ends["terminal_reward"] is None
    assert np.isfinite(ends["head"]) and np.isfinite(ends["recorded"])
    assert ends["env"] == ends["head"]  # no terminal_reward: the env returns the head's reward
    assert (f"| reward at recorded endings, same episodes: reward head / env / recorded | {ends['head']:.2f} / "
            f"{ends['env']:.2f} / {ends['recorded']:.2f} | {ends['n']} endings; the world's terminal_reward: "
            "none (the head's) |"
            in (out2 / "summary.md").read_text())
    assert again["idm"]["train"] == {"loaded_from": str(out / "idm")}
    assert again["idm"]["real_heldout"] == metrics["idm"]["real_heldout"]
    assert again["idm"]["latent"]["real_heldout"] == metrics["idm"]["latent"]["real_heldout"]
    assert list(again["control"]["modes"]) == ["immediate"]
    assert again["drift"]["horizon_reached"] == 8
    # a latent IDM is tied to the latent space it was trained on: another encoder is refused by name
    cfg_path = out / "latent_idm" / "latent_idm_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert len(cfg["encoder_fingerprint"]) == 64
    cfg_path.write_text(json.dumps({**cfg, "encoder_fingerprint": "0" * 64}))
    with pytest.raises(UsageError, match="another encoder's latents .*fingerprint 000000000000"):
        S.main([*argv2[:5], str(tmp_path / "out3"), *argv2[6:]])
    assert not (tmp_path / "out3" / "metrics.json").exists()
    cfg_path.write_text(json.dumps({**cfg, "latent_hw": [8, 16]}))  # would run: the IDM pools over space
    with pytest.raises(UsageError, match=r"4 channels x \(8, 16\); this world.s VAE makes 4 x \(9, 16\)"):
        S.main([*argv2[:5], str(tmp_path / "out3"), *argv2[6:]])


def test_eval_refuses_data_without_a_held_out_split(tmp_path: Path, tiny_world_dir: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "one", episodes=1, steps=20)
    with pytest.raises(UsageError, match="held-out"):
        S.main(["--checkpoint", str(tiny_world_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                "--quick"])


def test_void_share_counts_black_pixels_in_the_view_only() -> None:
    frames = np.full((3, 72, 128, 3), (102, 204, 102), np.uint8)  # grass
    frames[1, :31] = 0  # the top half of the view beyond the playfield
    frames[2, 62:] = 0  # the dashboard is black too, and not counted
    frames[2, :62, :64] = (10, 10, 25)  # dark but blue: not void
    share = M.void_share(frames)
    assert share.dtype == np.float64 and share.tolist() == [0.0, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"void_share needs uint8 \(N, 72, 128, 3\).*got uint8 \(0, 72, 128, 3\)"):
        M.void_share(frames[:0])


def test_endings_replays_recorded_endings_from_their_real_context(tmp_path: Path, tiny_world_dir: Path,
                                                                  capsys) -> None:
    """The context is the recorded frames `before` steps before each ending; the recorded actions follow."""
    from world_model.data import episodes as E
    from world_model.eval import endings as N

    root = make_synthetic_dataset(tmp_path / "toy", episodes=4, steps=8)  # episodes 0 and 2 end terminated
    eps = N.ending_episodes(root)
    assert [ep.name for ep in eps] == ["ep_000000", "ep_000002"]
    cut = N.cut_endings(eps, 2, 3)
    rec = E.open_episode(eps[1])  # 9 frames: the ending is frame 8, three steps before it frame 5
    assert cut.context.shape == (2, 2, 72, 128, 3) and cut.actions.shape == (2, 3) and cut.skipped == 0
    assert np.array_equal(cut.context[1], rec["frames"][4:6])
    assert cut.actions[1].tolist() == rec["actions"][6:9].tolist()
    assert np.array_equal(cut.last[1], rec["frames"][7:9]) and cut.actions[1, -1] == rec["actions"][8]
    rec0 = E.open_episode(eps[0])  # its last actions change: a one-step shift would show
    assert rec0["actions"][5:8].tolist() != rec0["actions"][6:9].tolist() and rec0["actions"][7] != rec0["actions"][8]
    assert cut.actions[0].tolist() == rec0["actions"][6:9].tolist()
    assert np.array_equal(N.cut_endings(eps, 2, 7).context[1], rec["frames"][0:2])  # the longest cut: frames 0-1
    with pytest.raises(UsageError, match=r"no ending episode among 2 has 12 frames \(context 3 \+ --before 9\)"):
        N.cut_endings(eps, 3, 9)
    with pytest.raises(UsageError, match=r"--before 0: must be >= 1"):
        N.cut_endings(eps, 2, 0)
    unlabelled = make_synthetic_dataset(tmp_path / "unl", episodes=2, steps=4, labelled=False)
    with pytest.raises(UsageError, match=r"none of its 2 episodes ends terminated"):
        N.ending_episodes(unlabelled)

    world = build_tiny_world()  # its termination head never fires (bias -10); a positive bias always does
    row = N.replay(world, cut, 2, 0)
    assert row["streams"] == 2 and row["world_ended"] == 0 and row["world_first_end_step"] is None
    assert row["head_fires_on_real_ending"] == 0 and row["real_void_at_ending"] == 0.0  # toy frames: no void
    # pipelined with G=2: the ending action (step 3) shapes the frame of step 4, which the row reports
    assert row["latency"] == 1 and len(row["world_void_by_step"]) == 3 + 2
    assert row["world_void_at_ending"] == row["world_void_by_step"][3]
    assert 0.0 <= row["world_void_at_ending"] <= row["world_void_max"] <= 1.0
    assert N.replay(world, cut, 0, 0, mode="immediate")["latency"] == 0
    with pytest.raises(UsageError, match=r"--after 0: must be >= the pipelined sampler's action latency 1"):
        N.replay(world, cut, 0, 0)
    # the head is read on the real ending transition: the last two recorded frames and the last action
    z = S.encode_frames(world.vae, cut.last.reshape(4, 72, 128, 3)).reshape(2, 2, *world.start_latents.shape[2:])
    with torch.no_grad():
        _, expect = world.heads(z[:, 0], z[:, 1], world.control_pooled[torch.from_numpy(cut.actions[:, -1])])
    assert np.allclose(row["head_logit_on_real_ending"], expect.numpy(), atol=1e-6)
    bad = N.Endings(cut.names, cut.context, cut.actions.copy(), cut.last, 0)
    bad.actions[0, 0] = 9
    with pytest.raises(UsageError, match=r"the recorded actions go up to 9; the world has 9 actions"):
        N.replay(world, bad, 2, 0)
    assert row == N.replay(world, cut, 2, 0)  # a seed fixes the noise
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = 10.0
    fires = N.replay(world, cut, 2, 0)
    assert fires["world_ended"] == 2 and fires["world_first_end_steps"] == [1, 1]
    assert fires["head_fires_on_real_ending"] == 2
    assert N.format_row(fires).startswith("| 3 | 2 | 2 (step 1) | ")
    assert N.format_row({**fires, "skipped": 3}).startswith("| 3 | 2 (3 too short) | 2 (step 1) | ")

    out = tmp_path / "endings.json"
    assert N.main(["--data", str(root), "--checkpoint", str(tiny_world_dir), "--before", "1", "3", "--after", "1",
                   "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["before"] for r in rows] == [1, 3] and all(r["streams"] == 2 and r["after"] == 1 for r in rows)
    table = capsys.readouterr().out
    assert table.splitlines()[1] == N.HEADER
    assert "(recorded actions, then the last one held for 1 steps; endings: threshold)" in table
    with pytest.raises(UsageError, match=r"--before \[3, 0\]: each must be >= 1"):
        N.main(["--data", str(root), "--checkpoint", str(tiny_world_dir), "--before", "3", "0"])
    assert table.splitlines()[1] == N.HEADER and table.splitlines()[3].startswith("| 1 | 2 | 0 | ")


def test_held_action_is_one_action_for_every_frame() -> None:
    policy = S.held_action(["D", "DL", "DR"], "DR")
    actions = policy(np.zeros((3, 72, 128, 3), np.uint8))
    assert actions.dtype == np.int64 and actions.tolist() == [2, 2, 2]
    with pytest.raises(UsageError, match=r"hold action 'L' is not one of the world's actions \['D', 'DL', 'DR'\]"):
        S.held_action(["D", "DL", "DR"], "L")


def test_closed_loop_compares_the_world_with_the_real_game() -> None:
    """The road follower drives both; a CarRacing world gets the real game's numbers beside its own."""
    world = build_tiny_world()
    out = S.closed_loop(world, world.start_latents, "pipelined", 2, 16, 0, "cpu", "CarRacing-v3")
    assert out["steps"] == 16 and out["envs"] == 2
    for side in ("world", "real"):
        assert 0.0 <= out[side]["on_road"] <= 1.0
        assert [q["start"] for q in out[side]["on_road_by_quarter"]] == [0, 4, 8, 12]
        quarters = [q["mean"] for q in out[side]["detail_by_quarter"]]
        assert len(quarters) == 4 and np.isclose(np.mean(quarters), out[side]["detail"])
    assert out["real"]["on_road"] > 0.5  # the real game starts on the road and the follower keeps to it
    assert 0.0 <= out["real"]["steer_share"] <= 1.0  # its turns among the steps it saw the road
    # the tiny untrained world emits noise, which also has "detail": the metric is a match-the-real one
    assert out["real"]["detail"] > 0.0 and out["world"]["detail"] > 0.0
    # kerbs are a CarRacing statistic: measured on the real game, and on a world recorded from CarRacing
    assert "kerb_pixels" in out["real"] and "kerb_pixels" not in out["world"]
    # after the opening zoom-in (not counted) the real car is always drawn
    assert out["real"]["car_faded"] == 0.0 and "car_faded" not in out["world"]
    # a two-colour palette (grass, road): the untrained world's noise leaves it more than the real game does
    palette = M.color_palette(np.stack([np.full((72, 128, 3), c, np.uint8) for c in ((102, 204, 102),
                                                                                   (102, 102, 102))]))
    out = S.closed_loop(world, world.start_latents, "pipelined", 2, 2, 0, "cpu", "CarRacing-v3", palette)
    assert 0.0 <= out["real"]["off_palette"] < out["world"]["off_palette"] <= 1.0
    # an action held open loop: the real game drives the same action in every step
    held = S.closed_loop(world, world.start_latents, "pipelined", 2, 4, 0, "cpu", "CarRacing-v3", hold="D")
    assert held["policy"] == "D" and 0.0 <= held["real"]["on_road"] <= 1.0
    assert held["world"]["steer_share"] is None and held["real"]["steer_share"] is None  # a held action: no share
    assert held["real"]["ended_streams"] == 0 and held["real"]["first_end_step"] is None  # 4 steps: no exit yet
    # full throttle straight on leaves the real playfield (-100) within ~45-70 steps: the real side counts it
    held = S.closed_loop(world, world.start_latents, "pipelined", 1, 80, 0, "cpu", "CarRacing-v3", hold="D")
    assert held["real"]["ended_streams"] == 1 and 0 < held["real"]["first_end_step"] < 80
    assert held["real"]["terminations"] >= 1
    assert held["world"]["terminations"] == 0 and held["world"]["first_end_step"] is None  # bias -10: never
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = 10.0  # every transition ends: each stream first at step 1
    ends = S.closed_loop(world, world.start_latents, "pipelined", 2, 3, 0, "cpu", None, hold="D")["world"]
    assert ends["terminations"] == 2 and ends["first_end_step"] == 1.0
    assert S._share([[1.0, np.nan], [0.0, np.nan]]) == 0.5 and S._share([[np.nan, np.nan]]) is None
    world.meta["env_id"] = "gymnasium.envs.box2d:CarRacing-v3"  # the recorder's spelling with a module
    as_carracing = S.closed_loop(world, world.start_latents, "pipelined", 2, 2, 0, "cpu", None)["world"]
    assert "kerb_pixels" in as_carracing and 0.0 <= as_carracing["car_faded"] <= 1.0
    world.action_names[:] = [f"a{i}" for i in range(len(world.action_names))]
    assert "driving actions" in S.closed_loop(world, world.start_latents, "pipelined", 1, 2, 0, "cpu", None)["skipped"]


def test_probe_compares_sampler_variants_on_the_same_starts(tmp_path: Path, tiny_world_dir: Path, capsys) -> None:
    from world_model.eval import probe as P

    assert P.parse_variant("default") == {}
    parsed = P.parse_variant("mode=immediate, ctx_noise=0.25,groups=2")
    assert parsed == {"mode": "immediate", "ctx_noise": 0.25, "groups": 2}
    for bad, msg in [("nope=1", "unknown sampler field 'nope'"), ("level_shift", "name=value"),
                     ("groups=2.5", "groups must be an int")]:
        with pytest.raises(UsageError, match=msg):
            P.parse_variant(bad)

    out = tmp_path / "probe.json"
    argv = ["--checkpoint", str(tiny_world_dir), "--variants", "default", "default", "level_shift=2",
            "--envs", "2", "--steps", "4", "--seeds", "0", "1", "--out", str(out), "--threads", "1"]
    assert P.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("default", 0), ("default", 1), ("default", 0), ("default", 1), ("level_shift=2", 0), ("level_shift=2", 1)]
    assert rows[0] == {**rows[2], "wall_s": rows[0]["wall_s"]}  # same variant and seed: the same rollout
    assert rows[4]["sampler"]["level_shift"] == 2.0 and rows[0]["sampler"]["level_shift"] == 1.0
    assert all(0.0 <= r["on_road"] <= 1.0 and len(r["on_road_by_quarter"]) == 4 and r["detail"] > 0 for r in rows)
    assert all(np.mean(r["detail_by_quarter"]) == pytest.approx(r["detail"]) for r in rows)  # blur over time
    assert all(r["kerb_pixels"] is None for r in rows)  # the tiny world is not CarRacing: no kerb count
    assert all(r["off_palette"] is None for r in rows)  # no --palette-data
    assert all(r["dtype"] == "float32" for r in rows)
    table = capsys.readouterr().out
    assert "| level_shift=2 | mean of 2 |" in table and table.count("| default | 0 |") == 2
    assert table.splitlines()[1].endswith(
        "| car faded | off-palette pixels | steering share | real game on road (by quarter) |")
    for line, row in zip(table.splitlines()[3:], rows, strict=False):  # "not applicable" cells, then the share
        assert line.endswith(f" | - | - | - | {P._opt(row['steer_share'])} | - |")
    assert all(r["real_steer_share"] is None for r in rows)
    both = {**rows[0], "steer_share": 0.25, "real_steer_share": 0.5, "car_faded": 0.02, "real_car_faded": 0.0}
    assert P.format_row(both).endswith("| 2.00% (real 0.00%) | - | 0.25 (real 0.50) | - |")
    assert all(r["real_on_road"] is None and r["real_on_road_by_quarter"] is None for r in rows)  # no --real
    with_real = {**rows[0], "real_on_road": 0.5, "real_on_road_by_quarter": [0.625, 0.5, 0.375, 0.5]}
    assert P.format_row(with_real).endswith("| 0.500 (0.62 / 0.50 / 0.38 / 0.50) |")  # --real: its quarters too
    ended = {**rows[0], "terminations": 0, "real_ended_streams": 16, "real_first_end_step": 61.5}
    assert f"| {rows[0]['reward_per_step']:.3f} | 0 (real 16, median step 61.5) |" in P.format_row(ended)
    assert "| 0 (real 0) |" in P.format_row({**ended, "real_ended_streams": 0, "real_first_end_step": None})
    assert "| 5 (median step 12) (real 16, median step 61.5) |" in P.format_row({**ended, "terminations": 5,
                                                                           "first_end_step": 12.0})
    assert all(r["first_end_step"] is None for r in rows)  # the tiny world never ends a stream
    other = {**rows[1], "real_on_road": 0.25, "real_on_road_by_quarter": [0.125, 0.25, 0.375, 0.25]}
    mean = P.mean_row([with_real, other])  # the mean-of-seeds row keeps both sets of quarters
    assert mean["seed"] == "mean of 2" and mean["real_on_road_by_quarter"] == [0.375, 0.375, 0.375, 0.375]
    assert mean["on_road_by_quarter"] == pytest.approx(np.mean([rows[0]["on_road_by_quarter"],
                                                                rows[1]["on_road_by_quarter"]], axis=0).tolist())
    assert P.format_row(mean).endswith("| 0.375 (0.38 / 0.38 / 0.38 / 0.38) |")
    assert P.mean_row([rows[0], with_real])["real_on_road"] is None  # missing from one seed: not averaged
    # --dtype bfloat16: the same starts and noise through autocast networks: close to, not equal to, float32
    assert P.main([*argv[:argv.index("--variants")], "--variants", "default", *argv[argv.index("--envs"):],
                   "--dtype", "bfloat16"]) == 0
    bf16 = json.loads(out.read_text())
    assert [(r["variant"], r["seed"], r["dtype"]) for r in bf16] == [("default", s, "bfloat16") for s in (0, 1)]
    assert bf16[0]["detail"] != rows[0]["detail"] and bf16[0]["detail"] == pytest.approx(rows[0]["detail"], rel=0.2)
    capsys.readouterr()
    # --palette-data: the real colours of a recording; the untrained world invents others
    toy = make_synthetic_dataset(tmp_path / "toy", episodes=2, steps=6)
    argv = ["--checkpoint", str(tiny_world_dir), "--envs", "2", "--steps", "2", "--threads", "1",
            "--palette-data", str(toy), "--out", str(out)]
    assert P.main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert 0.0 < row["off_palette"] <= 1.0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        f"| {100 * row['off_palette']:.2f}% | {P._opt(row['steer_share'])} | - |")
    with pytest.raises(UsageError, match="--palette-data: data directory .*empty' holds no recorded episodes"):
        P.main([*argv[:-4], "--palette-data", str(tmp_path / "empty"), "--out", str(out)])
    with pytest.raises(UsageError, match="--palette-episodes 0: must be >= 1"):
        P.main([*argv, "--palette-episodes", "0"])
    with pytest.raises(UsageError, match="level_shift must be a finite number > 0"):
        P.main(["--checkpoint", str(tiny_world_dir), "--variants", "level_shift=-1", "--envs", "1", "--steps", "1"])
    with pytest.raises(UsageError, match="--real: .* the real game is CarRacing only"):
        P.main(["--checkpoint", str(tiny_world_dir), "--envs", "1", "--steps", "1", "--real"])
    with pytest.raises(UsageError, match="hold action 'X' is not one of the world's actions"):
        P.main(["--checkpoint", str(tiny_world_dir), "--envs", "1", "--steps", "1", "--hold", "X"])
