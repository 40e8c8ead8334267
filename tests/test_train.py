"""Smoke, DDP and crash-resume tests of the training pipeline (tiny presets, synthetic data, CPU).

Pipeline under test: train-vae -> encode-latents -> train-dit -> build-world. Every process runs
single-threaded (OMP_NUM_THREADS=1 / torch.set_num_threads(1)): the CI box is small and shared,
and bitwise equality between a resumed and an uninterrupted run needs equal thread counts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.synthetic import make_synthetic_dataset
from world_model.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
CLI_LINES = {
    "train-vae": ("world_model.train.vae:main", "train the frame VAE"),
    "encode-latents": ("world_model.data.latents:main", "encode episodes into a latent cache"),
    "train-dit": ("world_model.train.dit:main", "train the video DiT and reward/termination heads"),
    "build-world": ("world_model.train.build_world:main", "assemble a world-model directory"),
    "set-sampler": ("world_model.train.build_world:set_sampler_main", "copy a world with other sampler settings"),
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread in this process, like the subprocesses (see module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 labelled episodes of 20 steps with 720p videos (held-out split: 1 episode)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), episodes=3, steps=20, video=True)


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    """A second data directory: 2 unlabelled episodes of 12 steps (actions -1, no rewards), no video."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("footage"), episodes=2, steps=12, seed=1, labelled=False
    )


@pytest.fixture(scope="module")
def vae_dir(data, footage, tmp_path_factory) -> Path:
    from world_model.train import vae

    run = tmp_path_factory.mktemp("runs") / "vae"
    vae.main([
        "--data", str(data), str(footage), "--run-dir", str(run), "--preset", "tiny", "--steps", "3",
        "--batch-size", "4",
        "--num-workers", "0", "--hr-batch", "2", "--hr-shuffle", "4", "--eval-frames", "16",
        "--stats-frames", "64", "--warmup", "1",
    ])  # fmt: skip
    return run / "model"


@pytest.fixture(scope="module")
def latents(data, footage, vae_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Latent caches of both data directories."""
    from world_model.data import latents

    outs = tmp_path_factory.mktemp("latents") / "data", tmp_path_factory.mktemp("latents") / "footage"
    for root, out in zip((data, footage), outs, strict=True):
        latents.main(["--data", str(root), "--vae", str(vae_dir), "--out", str(out), "--batch-size", "8"])
    return outs


def dit_args(roots: tuple[Path, Path], latents: tuple[Path, Path], run: Path, *extra: str) -> list[str]:
    """Tiny DiT run on the labelled data + the unlabelled footage (34 training windows of 8), batch 4."""
    return [
        "--data", str(roots[0]), str(roots[1]), "--latents", str(latents[0]), str(latents[1]),
        "--run-dir", str(run), "--preset", "tiny",
        "--steps", "4", "--batch-size", "4", "--num-workers", "0", "--eval-batches", "1", "--warmup", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dit_run(data, footage, latents, tmp_path_factory) -> Path:
    """One DiT run that encodes the control table with the real MiniLM (the other runs reuse it)."""
    from world_model.train import dit

    run = tmp_path_factory.mktemp("runs") / "dit"
    dit.main(dit_args((data, footage), latents, run, "--ckpt-every", "2"))
    return run


# ----------------------------------------------------------------------------- VAE / latents
def test_vae_trainer_writes_loadable_model(vae_dir):
    from world_model.checkpoint import load_module
    from world_model.train.common import list_checkpoints
    from world_model.vae import FrameVAE, VAEConfig

    vae = load_module(vae_dir, "vae", FrameVAE, VAEConfig)
    summary = json.loads((vae_dir / "train_vae.json").read_text())
    assert summary["hr_trained"], "the synthetic data has 720p videos: the HR head must train"
    assert np.isfinite(summary["eval"]["psnr_72x128"]) and np.isfinite(summary["eval"]["psnr_720p"])
    assert summary["eval"]["eval_split"] == "heldout"
    # latent statistics were fitted and stored in the model's buffers
    assert not torch.equal(vae.latent_scale, torch.ones_like(vae.latent_scale))
    assert torch.allclose(vae.latent_scale, torch.tensor(summary["latent_scale"]))
    assert [s for s, _ in list_checkpoints(vae_dir.parent)] == [3]


@pytest.mark.parametrize(("hr_base", "hr_kernel"), [("nearest", 1), ("bilinear", 3)])
def test_hr_crop_predict_matches_full_decode(hr_base: str, hr_kernel: int):
    """Running the 720p head on a feature crop gives exactly the pixels of a full 720p decode."""
    from dataclasses import replace

    from world_model.train.vae import hr_crop_predict
    from world_model.vae import VAE_PRESETS, FrameVAE

    torch.manual_seed(0)
    vae = FrameVAE(replace(VAE_PRESETS["tiny"], hr_base=hr_base, hr_kernel=hr_kernel)).eval()
    torch.nn.init.normal_(vae.hr_out.weight, std=0.1)  # non-zero detail so the head matters
    x = torch.rand(2, 3, 72, 128) * 2 - 1
    with torch.no_grad():
        full = vae.decode_hr(vae.encode(x))  # (2, 3, 720, 1280)
        yx = torch.tensor([[24, 48], [0, 0]])  # crop corners on the 10x grid: interior, frame corner
        target = torch.stack([full[0, :, 240:420, 480:800], full[1, :, :180, :320]])  # (2, 3, 180, 320)
        pred = hr_crop_predict(vae, x, yx, (180, 320))
        assert pred.shape == target.shape and (pred - target).abs().max().item() < 1e-5
        shifted = torch.stack([full[0, :, 250:430, 480:800], full[1, :, 10:190, :320]])  # off by one LR pixel
        assert (pred - shifted).abs().mean().item() > 1e-3


def test_encode_latents_shapes_and_resume(data, vae_dir, latents):
    from world_model.data import latents as latents_mod

    cache = latents[0]
    info = json.loads((cache / "latents.json").read_text())
    assert info["latent_shape"] == [4, 9, 16] and info["dtype"] == "float16"
    assert sorted(info["episodes"]) == ["ep_000000", "ep_000001", "ep_000002"]
    files = sorted(cache.glob("episodes/*/latents.npy"))
    assert len(files) == 3
    z = np.load(files[0])
    assert z.shape == (21, 4, 9, 16) and z.dtype == np.float16
    assert np.isfinite(z).all()
    assert np.load(sorted(latents[1].glob("episodes/*/latents.npy"))[0]).shape == (13, 4, 9, 16)
    mtimes = [f.stat().st_mtime_ns for f in files]
    latents_mod.main(["--data", str(data), "--vae", str(vae_dir), "--out", str(cache)])  # resumable: no-op
    assert [f.stat().st_mtime_ns for f in files] == mtimes


# ----------------------------------------------------------------------------- DiT / world
def test_dit_trainer_and_build_world(data, footage, vae_dir, latents, dit_run, tmp_path, capsys):
    from world_model.checkpoint import load_world
    from world_model.train import build_world

    model = dit_run / "model"
    for name in ("dit.safetensors", "heads.safetensors", "control_table.safetensors", "train_dit.json"):
        assert (model / name).exists(), name
    summary = json.loads((model / "train_dit.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["eval"]["eval/flow"])
    assert any("footage" in ep for ep in summary["train_episodes"])  # unlabelled footage trains the DiT
    assert summary["termination_pos_weight"] > 1.0  # terminations are rare

    out = tmp_path / "world"
    build_world.main([
        "--vae", str(vae_dir), "--dit", str(model), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(out), "--starts", "6",
    ])  # fmt: skip
    world = load_world(out)
    assert world.start_latents.shape == (6, 4, 4, 9, 16)
    build_world.main([
        "--vae", str(vae_dir), "--dit", str(model), "--data", str(data), "--latents", str(latents[0]),
        "--out", str(tmp_path / "world_subset"), "--starts", "2",
    ])  # fmt: skip
    assert "changed since the DiT was trained" not in capsys.readouterr().out  # a subset of its data
    assert world.heads.cfg.term_threshold == 0.0  # the default: the class-weighted loss's own decision
    recorded = [float(np.load(ep / "rewards.npy")[np.load(ep / "terminated.npy")][0])
                for ep in sorted((data / "episodes").iterdir()) if np.load(ep / "terminated.npy").any()]
    assert recorded and world.heads.cfg.terminal_reward == pytest.approx(float(np.median(recorded)))
    again = tmp_path / "world_t"
    build_world.main([
        "--vae", str(vae_dir), "--dit", str(model), "--data", str(data), str(footage), "--latents",
        str(latents[0]), str(latents[1]), "--out", str(again), "--starts", "2", "--term-threshold", "3.5",
        "--level-shift", "0.5", "--terminal-reward", "-100",
    ])  # fmt: skip
    assert load_world(again).heads.cfg.term_threshold == 3.5
    assert load_world(again).heads.cfg.terminal_reward == -100.0
    assert load_world(again).sampler["level_shift"] == 0.5 and world.sampler["level_shift"] == 1.0
    with pytest.raises(UsageError, match="--level-shift\\): level_shift must be a finite number > 0"):
        build_world.main([
            "--vae", str(vae_dir), "--dit", str(model), "--data", str(data), "--latents", str(latents[0]),
            "--out", str(tmp_path / "bad"), "--level-shift", "0",
        ])  # fmt: skip
    assert not (tmp_path / "bad").exists()
    assert world.sampler["context"] == 4 and world.sampler["groups"] == 4
    assert all(p["frame"] >= 15 for p in world.meta["starts"])
    assert {p["split"] for p in world.meta["starts"]} == {"heldout", "train"}
    assert {p["data"] for p in world.meta["starts"]} == {str(data)}  # starts from labelled episodes only
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]
    stages = ["train-vae", "encode-latents", "encode-latents", "train-dit", "build-world"]
    assert [c[1] for c in recipe["commands"]] == stages


def test_road_starts_skip_windows_that_end_off_the_road(data, latents, tmp_path):
    """--road-starts: a window whose last recorded frame shows grass under the car is never shipped."""
    import shutil

    from world_model.train.build_world import pick_starts

    eps = sorted((data / "episodes").iterdir())[:2]
    copy = tmp_path / "data"
    for ep in eps:
        shutil.copytree(ep, copy / "episodes" / ep.name)
    grass = copy / "episodes" / eps[0].name / "frames_72x128.npy"
    frames = np.load(grass)
    frames[12:] = (102, 204, 102)  # from frame 12 on, the car is on grass
    np.save(grass, frames)
    caches = {copy: latents[0]}
    moved = [copy / "episodes" / ep.name for ep in eps]
    _, on = pick_starts([], moved, caches, 200, 4, 0, 0, road_starts=True)
    _, every = pick_starts([], moved, caches, 200, 4, 0, 0, road_starts=False)
    bad = [p for p in on if p["episode"] == eps[0].name and p["frame"] + 3 >= 12]
    assert not bad and len(on) < len(every)
    assert any(p["episode"] == eps[0].name and p["frame"] + 3 >= 12 for p in every)


def test_weighted_sampler_is_resumable_and_follows_the_weights():
    """Weighted epochs: a pure function of the step (resume-exact), zero-weight items never drawn."""
    from world_model.train.common import ResumableBatchSampler

    w = np.ones(100)
    w[:10] = 20.0
    w[90:] = 0.0
    full = ResumableBatchSampler(100, 8, 0, 1, seed=3, weights=w)
    resumed = ResumableBatchSampler(100, 8, 0, 1, seed=3, start_step=17, weights=w)
    it = iter(resumed)
    assert all(full.batch(s) == next(it) for s in range(17, 40))
    drawn = np.concatenate([full.batch(s) for s in range(400)])
    assert drawn.max() < 90  # weight 0: never
    share = (drawn < 10).mean()  # expected 200 / 280 = 0.71
    assert 0.65 < share < 0.77
    plain = np.concatenate([ResumableBatchSampler(100, 8, 0, 1, seed=3).batch(s) for s in range(12)])
    assert len(set(plain.tolist())) == 96  # unweighted: a (truncated) permutation per epoch, as before
    for bad in (np.ones(99), -w, np.zeros(100), np.full(100, np.nan)):
        with pytest.raises(UsageError, match="sampling weights"):
            ResumableBatchSampler(100, 8, 0, 1, seed=3, weights=bad)


def test_road_weights_favour_on_road_windows(data, latents, tmp_path):
    """--road-weight: windows ending with grass under the car weigh 1, the others the given weight."""
    import shutil

    from world_model.train import common
    from world_model.train.dit import road_window_weights

    ep = sorted((data / "episodes").iterdir())[0]
    copy = tmp_path / "data"
    shutil.copytree(ep, copy / "episodes" / ep.name)
    shutil.copy(data / "manifest.json", copy / "manifest.json")
    grass = copy / "episodes" / ep.name / "frames_72x128.npy"
    frames = np.load(grass)
    frames[:, 30:60] = (102, 204, 102)  # rows around the car
    frames[:12, 30:60] = (107, 107, 107)  # road under the car until frame 11
    np.save(grass, frames)
    dataset = common.window_dataset([copy / "episodes" / ep.name], 4, source="latents", latents={copy: latents[0]})
    weights = road_window_weights(dataset, 4, 5.0)
    assert weights.shape == (len(dataset),) == (len(frames) - 3,)
    term = np.load(copy / "episodes" / ep.name / "terminated.npy")
    holds_term = np.array([term[k : k + 4].any() for k in range(len(weights))])
    on = np.arange(len(weights)) + 3 < 12  # window k ends at frame k + 3
    assert (weights == np.where(on | holds_term, 5.0, 1.0)).all()
    assert on.sum() == 9 and (~on & ~holds_term).sum() > 0 and holds_term.any()

    # --curve-weight: frames 0-5 show the road ahead bending right (the upper look-ahead band's road
    # only on the right), so windows ending there weigh road_weight x curve_weight
    frames[:6, 20:38, :70] = (102, 204, 102)
    np.save(grass, frames)
    weights = road_window_weights(dataset, 4, 5.0, 2.0)
    curve = np.arange(len(weights)) + 3 < 6
    assert (weights == np.where(on | holds_term, 5.0, 1.0) * np.where(curve, 2.0, 1.0)).all() and curve.sum() == 3

    # --leave-weight: the car is on the road until frame 11, so windows starting on or before frame 11
    # and ending after it (k <= 11 < k + 3) show it leaving
    weights = road_window_weights(dataset, 4, 5.0, 2.0, 7.0)
    k = np.arange(len(weights))
    leave = (k <= 11) & (k + 3 > 11)
    expected = np.where(on | holds_term, 5.0, 1.0) * np.where(curve, 2.0, 1.0) * np.where(leave, 7.0, 1.0)
    assert leave.sum() == 3 and (weights == expected).all()


def test_dit_warm_start_loads_parent_weights_and_records_lineage(data, footage, latents, dit_run, tmp_path):
    """--init-from: lr 0 keeps the parent's weights exactly; the recipe chains both commands."""
    from safetensors.torch import load_file

    from world_model.train import common, dit

    parent = dit_run / "model"
    run = tmp_path / "warm"
    dit.main(dit_args((data, footage), latents, run, "--init-from", str(parent), "--lr", "0", "--steps", "1"))
    before, after = load_file(parent / "dit.safetensors"), load_file(run / "model" / "dit.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((run / "model" / "train_dit.json").read_text())
    parent_cmd = json.loads((parent / "train_dit.json").read_text())["command"]
    assert summary["init_from"]["command"] == parent_cmd and "train_episodes" not in summary["init_from"]
    assert common.stage_commands(summary) == [parent_cmd, summary["command"]]
    with pytest.raises(UsageError, match="config differs"):
        dit.main([*dit_args((data, footage), latents, tmp_path / "bad", "--init-from", str(parent)), "--preset", "S"])


def _toy_batch(b: int, t: int, n_act: int = 9, n_tok: int = 3, dt: int = 12):
    """A control table (A+1 rows, the last unknown) and a collated batch of random 4x4 latent windows."""
    from world_model.text import ControlEmbeddings

    tokens = torch.randn(n_act + 1, n_tok, dt)  # (A+1, N, Dt)
    table = ControlEmbeddings(tokens, torch.ones(n_act + 1, n_tok, dtype=torch.bool), tokens.mean(1))
    batch = {"latents": torch.randn(b, t, 4, 4, 4), "actions": torch.randint(-1, n_act, (b, t)),
             "rewards": torch.zeros(b, t), "terminated": torch.zeros(b, t, dtype=torch.bool),
             "labelled": torch.ones(b, dtype=torch.bool), "has_rewards": torch.ones(b, dtype=torch.bool)}  # fmt: skip
    return table, batch


def _randomised(dit: torch.nn.Module) -> torch.nn.Module:
    """``dit`` with every weight drawn N(0, 0.2): its final layer and gates start at zero, so a fresh one is trivial."""
    with torch.no_grad():
        for prm in dit.parameters():
            prm.normal_(0.0, 0.2)
    return dit


class _NoHeads(torch.nn.Module):
    """A DiT as ``compute_losses`` calls the DiT with heads, the heads predicting zeros (not under test)."""

    def __init__(self, dit: torch.nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x, lv, tok, msk, z_prev, z_next, pooled):
        return self.dit(x, lv, tok, msk), torch.zeros(len(z_prev)), torch.zeros(len(z_prev))


def test_action_distillation_runs_each_window_under_another_known_action():
    """--action-distill-weight: every frame gets another known action's control (never its own, never the
    unknown row); the loss is zero for a student equal to its teacher and grows with their difference."""
    from world_model.dit import VideoDiT, get_preset
    from world_model.train.dit import Args, compute_losses, make_inputs

    torch.manual_seed(0)
    b, t, n_act, dt = 256, 6, 9, 12
    table, batch = _toy_batch(b, t, n_act=n_act, dt=dt)
    tokens = table.tokens  # (A+1, N, Dt): row A is the unknown action
    args = Args(data=(), latents=(), ctrl_dropout=0.3, action_distill_weight=1.0, context=2, window=t)
    inp = make_inputs(batch, table, args, torch.Generator().manual_seed(0), torch.device("cpu"))
    row_of = lambda tok: (tok[:, :, :1, None, :] == tokens[None, None, None, :, 0]).all(-1)[:, :, 0].int().argmax(-1)  # noqa: E731
    rows_in, alt = row_of(inp.ctrl_tokens), row_of(inp.alt_ctrl_tokens)  # (B, T) table rows
    assert (alt != rows_in).all() and (alt < n_act).all()  # another known action, everywhere
    assert set(alt[rows_in == n_act].tolist()) == set(range(n_act))  # a dropped frame: any known action
    assert set(alt[rows_in == 0].tolist()) == set(range(1, n_act))  # others: uniform over the rest

    teacher = _randomised(VideoDiT(get_preset("tiny", latent_hw=(4, 4), text_dim=dt, max_frames=t))).eval()
    student = VideoDiT(teacher.cfg)
    student.load_state_dict(teacher.state_dict())

    inp.head_mask[:] = False  # the heads are not under test
    with torch.no_grad():
        same = compute_losses(_NoHeads(student), inp, 1.0, 1.0, teacher, 1.0)
        for name, prm in student.named_parameters():
            if name.startswith(("interactive", "ctrl_embed")):  # the action pathway only
                prm.add_(0.3 * torch.randn_like(prm))
        other = compute_losses(_NoHeads(student), inp, 1.0, 1.0, teacher, 1.0)
        plain = compute_losses(_NoHeads(student), inp, 1.0, 1.0, teacher)  # weight 0: no second pass, no loss/action
    assert float(same["loss/action"]) < 1e-10 and float(other["loss/action"]) > 1e-4
    assert "loss/action" not in plain and float(other["loss/total"]) > float(plain["loss/total"])


def test_focus_box_weighs_the_velocity_errors_inside_it():
    """--focus-box / --focus-weight: the map has mean 1 and the given ratio; an error confined to the box
    counts weight / mean(map) times its plain share in the flow (distillation) and action losses, while the
    held-out eval/* stay unweighted and eval/focus is the error inside the box alone."""
    from world_model.train.dit import Args, compute_losses, evaluate, focus_map, make_inputs

    m = focus_map((1, 3, 1, 3), 5.0, (4, 4), torch.device("cpu"))  # 4 of 16 positions inside
    assert m.shape == (4, 4) and abs(float(m.mean()) - 1.0) < 1e-6
    assert float(m[1, 1]) / float(m[0, 0]) == pytest.approx(5.0) and float(m[2, 2]) == pytest.approx(2.5)
    box_only = focus_map((1, 3, 1, 3), math.inf, (4, 4), torch.device("cpu"))
    assert float(box_only[0, 0]) == 0.0 and float(box_only[1, 2]) == pytest.approx(4.0)

    table, batch = _toy_batch(3, 6)
    delta = torch.zeros(4, 4)
    delta[1:3, 1:3] = 1.0  # the student is off by 1 inside the box only

    class Off(torch.nn.Module):  # a DiT with heads whose velocity is the target plus delta
        def forward(self, x, lv, tok, msk, z_prev, z_next, pooled):
            return self.target + delta, torch.zeros(len(z_prev)), torch.zeros(len(z_prev))

    flows = {}
    for w in (1.0, 5.0):
        args = Args(data=(), latents=(), focus_box=None if w == 1.0 else (1, 3, 1, 3), focus_weight=w)
        inp = make_inputs(batch, table, args, torch.Generator().manual_seed(0), torch.device("cpu"))
        model = Off()
        model.target = inp.v_target
        flows[w] = float(compute_losses(model, inp, 1.0, 1.0)["loss/flow"])
    assert flows[1.0] == pytest.approx(0.25) and flows[5.0] == pytest.approx(0.25 * 2.5)  # 4/16 inside, x 5/2

    class Zero(torch.nn.Module):  # a student with heads that predicts zero velocity
        def forward(self, x, lv, tok, msk, z_prev, z_next, pooled):
            return torch.zeros_like(x), torch.zeros(len(z_prev)), torch.zeros(len(z_prev))

        def heads(self, z_prev, z_next, pooled):
            return torch.zeros(len(z_prev)), torch.zeros(len(z_prev))

    class InBox(torch.nn.Module):  # a teacher whose velocity is delta times a number its action's tokens give
        def forward(self, x, lv, tok, msk):
            return delta * tok[:, :, 0, :1, None, None]  # (B, T, 1, 4, 4): every error lies in the box

    got = {}
    for w in (1.0, 5.0):
        args = Args(data=(), latents=(), action_distill_weight=1.0, context=2, window=6,
                    focus_box=None if w == 1.0 else (1, 3, 1, 3), focus_weight=w)  # fmt: skip
        inp = make_inputs(batch, table, args, torch.Generator().manual_seed(0), torch.device("cpu"))
        got[w] = compute_losses(Zero(), inp, 1.0, 1.0, InBox(), action_weight=1.0)
        dataset = [{k: v[i] for k, v in batch.items()} for i in range(3)]
        got[w] |= evaluate(Zero(), dataset, table, args, 1.0, torch.device("cpu"), InBox())
    for key in ("loss/flow", "loss/action"):  # the distillation and the action's effect, both x 5/2
        assert float(got[1.0][key]) > 0 and float(got[5.0][key]) == pytest.approx(2.5 * float(got[1.0][key]))
    assert got[5.0]["eval/distill"] == pytest.approx(got[1.0]["eval/distill"])  # held-out losses unweighted
    assert got[5.0]["eval/action"] == pytest.approx(got[1.0]["eval/action"])
    assert "eval/focus" not in got[1.0] and got[5.0]["eval/focus"] == pytest.approx(4 * got[5.0]["eval/distill"])


def test_stream_consistency_targets_the_teachers_mean_velocity_over_one_shift():
    """--consistency-weight: the sampler's window before a shift (its levels, context at ctx_noise), and a
    target that is the teacher's k Euler steps' mean velocity: exact for a linear teacher, 0 for a constant one."""
    from world_model.swin_dpm import SwinDPM, SwinDPMConfig
    from world_model.train.dit import Args, consistency_loss, make_inputs

    torch.manual_seed(0)
    b, t = 512, 6
    table, batch = _toy_batch(b, t)
    scm = SwinDPM(SwinDPMConfig(context=2, groups=2, steps_per_shift=3, ctx_noise=0.4, level_shift=2.0))
    args = Args(data=(), latents=(), context=2, window=t)
    inp = make_inputs(batch, table, args, torch.Generator().manual_seed(0), torch.device("cpu"), scm)
    torch.testing.assert_close(inp.cons_t, scm.t_in)
    torch.testing.assert_close(inp.cons_dt, scm.dt)
    assert inp.cons_x.shape == (b, 4, 4, 4, 4) and inp.cons_t[0, :2].tolist() == pytest.approx([0.4, 0.4])
    lv = inp.cons_t[0][None, :, None, None, None]  # (1, L, 1, 1, 1)
    noise = inp.cons_x - (1.0 - lv) * batch["latents"][:, :4]  # (B, L, ...) = t eps
    torch.testing.assert_close(noise.std(dim=(0, 2, 3, 4)), inp.cons_t[0], rtol=0.03, atol=0.0)

    class Linear(torch.nn.Module):  # v = a x + c(controls): Euler steps have a closed form
        def __init__(self, a):
            super().__init__()
            self.a = a

        def forward(self, x, lv, tok, msk):
            return self.a * x + tok.mean(dim=(2, 3))[:, :, None, None, None]

    for a in (0.0, 0.7):
        teacher = Linear(a)
        x0 = inp.cons_x[:, 2:]  # (B, G, C, H, W) the frames in flight
        c = inp.ctrl_tokens[:, 2:4].mean(dim=(2, 3))[:, :, None, None, None]  # (B, G, 1, 1, 1)
        v_student = teacher(inp.cons_x, None, inp.ctrl_tokens[:, :4], None)  # one call: v at the start
        if a == 0.0:  # a constant velocity: k steps move exactly as one
            assert float(consistency_loss(v_student, inp, teacher)) < 1e-12
            continue
        grow = torch.prod(1.0 + a * scm.dt, dim=0)[None, :, None, None, None]  # (1, G, 1, 1, 1)
        x_k = (x0 + c / a) * grow - c / a  # the k Euler steps of x' = a x + c
        target = (x_k - x0) / scm.dt.sum(0)[None, :, None, None, None]
        want = (v_student[:, 2:] - target).pow(2).mean()
        assert float(want) > 1e-4
        torch.testing.assert_close(consistency_loss(v_student, inp, teacher), want)


@pytest.mark.parametrize("cached", [False, True])
def test_stream_consistency_target_is_where_the_sampler_lands_after_one_shift(cached):
    """consistency_loss against SwinDPM.step itself: a student velocity that lands, in one Euler step, where
    the teacher's sampler lands after its k steps of one shift (with and without the context cache) has
    zero loss; the teacher's own one-call velocity does not."""
    from world_model.dit import VideoDiT, get_preset
    from world_model.swin_dpm import SwinDPM, SwinDPMConfig, SwinDPMState
    from world_model.train.dit import StepInputs, consistency_loss

    torch.manual_seed(0)
    b, c_ctx, g, k, s = 3, 2, 2, 3, 0.3
    dit = _randomised(VideoDiT(get_preset("tiny", latent_hw=(4, 4), text_dim=12, max_frames=6, causal=True))).eval()
    tokens, mask = torch.randn(10, 3, 12), torch.ones(10, 3, dtype=torch.bool)  # (A+1, N, Dt), (A+1, N)
    scm = SwinDPM(SwinDPMConfig(context=c_ctx, groups=g, steps_per_shift=k, ctx_noise=s, level_shift=2.0))
    x0, eps = torch.randn(b, c_ctx + g, 4, 4, 4), torch.randn(b, c_ctx + g, 4, 4, 4)
    lv = scm.levels[0][None, :, None, None, None]  # (1, L, 1, 1, 1): context 0, in flight at their levels
    window = (1.0 - lv) * x0 + lv * eps  # (B, L, C, H, W)
    ctrl = torch.randint(0, 9, (b, c_ctx + g))  # (B, L) control rows
    eps_ctx = torch.randn((b, c_ctx, 4, 4, 4), generator=torch.Generator().manual_seed(5))  # step()'s draw
    zeros = torch.zeros(b, dtype=torch.long)
    state = SwinDPMState(window.clone(), ctrl.clone(), zeros, zeros.clone(), torch.zeros(b, 0))
    denoise = lambda x, t, c, cache=None: dit(x, t, tokens[c], mask[c], cache=cache)  # noqa: E731
    context_fn = (lambda x, t, c: dit.encode_context(x, t, tokens[c], mask[c])) if cached else None  # noqa: E731
    with torch.no_grad():
        _, head = scm.step(state, denoise, ctrl[:, -1], torch.Generator().manual_seed(5), context_fn)
    after = torch.stack([head, state.latents[:, c_ctx]], dim=1)  # (B, G, ...): the head, the old tail
    span = scm.dt.sum(0)[None, :, None, None, None]  # (1, G, 1, 1, 1)
    cons_x = torch.cat([(1.0 - s) * x0[:, :c_ctx] + s * eps_ctx, window[:, c_ctx:]], dim=1)  # what the DiT saw
    unused = dict.fromkeys(("x_t", "t", "v_target", "weight", "z_prev", "z_next", "ctrl_pooled", "reward",
                            "terminated", "head_mask"))  # fmt: skip
    inp = StepInputs(**unused, ctrl_tokens=tokens[ctrl], ctrl_mask=mask[ctrl], cons_x=cons_x, cons_t=scm.t_in,
                     cons_dt=scm.dt)  # fmt: skip
    v = torch.zeros_like(cons_x)
    v[:, c_ctx:] = (after - window[:, c_ctx:]) / span  # one Euler step to where the sampler landed
    assert float(consistency_loss(v, inp, dit)) < 1e-10
    with torch.no_grad():
        one_call = dit(cons_x, scm.t_in[0].expand(b, -1), tokens[ctrl], mask[ctrl])
    assert float(consistency_loss(one_call, inp, dit)) > 1e-4  # k steps differ from one


def test_stream_consistency_rows_join_the_students_batch_unseen_by_its_other_frames():
    """compute_losses: the sampler's windows ride in the student's one batch, padded with the window's later
    frames, which a causal DiT never reads: the loss equals the student run on the L frames alone."""
    from world_model.dit import VideoDiT, get_preset
    from world_model.swin_dpm import SwinDPM, SwinDPMConfig
    from world_model.train.dit import Args, compute_losses, consistency_loss, make_inputs

    torch.manual_seed(0)
    b, t = 8, 6
    table, batch = _toy_batch(b, t)
    scm = SwinDPM(SwinDPMConfig(context=2, groups=2, steps_per_shift=2, ctx_noise=0.2, level_shift=2.0))
    args = Args(data=(), latents=(), context=2, window=t, action_distill_weight=1.0)
    inp = make_inputs(batch, table, args, torch.Generator().manual_seed(0), torch.device("cpu"), scm)
    inp.head_mask[:] = False
    cfg = get_preset("tiny", latent_hw=(4, 4), text_dim=12, max_frames=t, causal=True)
    student, teacher = _randomised(VideoDiT(cfg)), _randomised(VideoDiT(cfg)).eval()

    with torch.no_grad():
        got = compute_losses(_NoHeads(student), inp, 1.0, 1.0, teacher, 1.0, 2.0)
        alone = student(inp.cons_x, inp.cons_t[0].expand(b, 4), inp.ctrl_tokens[:, :4], inp.ctrl_mask[:, :4])
        want = consistency_loss(alone, inp, teacher)
        without = compute_losses(_NoHeads(student), inp, 1.0, 1.0, teacher, 1.0)
    torch.testing.assert_close(got["loss/consistency"], want)
    assert float(want) > 1e-4 and "loss/consistency" not in without
    torch.testing.assert_close(got["loss/total"], without["loss/total"] + 2.0 * want)
    torch.testing.assert_close(got["loss/action"], without["loss/action"])


def test_patch_inflation_computes_the_parent_on_the_pooled_latent():
    """inflate_patch: on a latent constant over each 2x2 patch, the inflated DiT is the parent on the pooled latent."""
    import torch.nn.functional as F

    from world_model.dit import VideoDiT, get_preset
    from world_model.train.dit import inflate_patch

    torch.manual_seed(0)
    parent = _randomised(VideoDiT(get_preset("tiny", latent_hw=(8, 8))))
    pooled_parent = VideoDiT(get_preset("tiny", latent_hw=(4, 4)))  # same weights, the pooled grid's positions
    pooled_parent.load_state_dict(parent.state_dict())
    student = VideoDiT(get_preset("tiny", latent_hw=(8, 8), patch=2))
    student.load_state_dict(inflate_patch(parent.state_dict(), 2))

    b, t, n = 2, 3, 5
    small = torch.randn(b, t, 4, 4, 4)  # (B, T, C, 4, 4)
    big = small.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # (B, T, C, 8, 8), 2x2-constant
    levels = torch.rand(b, t)
    tokens, mask = torch.randn(b, t, n, parent.cfg.text_dim), torch.ones(b, t, n, dtype=torch.bool)
    with torch.no_grad():
        want = pooled_parent(small, levels, tokens, mask)  # (B, T, C, 4, 4)
        got = student(big, levels, tokens, mask)  # (B, T, C, 8, 8)
    torch.testing.assert_close(got, want.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))
    assert got.abs().mean() > 0.1  # not a trivially zero output
    with torch.no_grad():  # on any latent the student reads each patch's mean: the parent on the 2x2-pooled latent
        x = torch.randn(b, t, 4, 8, 8)  # (B, T, C, 8, 8), not patch-constant
        pooled = F.avg_pool2d(x.flatten(0, 1), 2).unflatten(0, (b, t))  # (B, T, C, 4, 4)
        want = pooled_parent(pooled, levels, tokens, mask).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        torch.testing.assert_close(student(x, levels, tokens, mask), want)


def test_distillation_targets_the_teacher_and_inflates_a_patch_1_parent(data, footage, latents, dit_run, tmp_path):
    """--teacher: a student equal to its teacher has zero distillation loss; --patch 2 inflates the parent."""
    from world_model.train import common, dit

    parent = dit_run / "model"
    run = tmp_path / "self"
    dit.main(dit_args((data, footage), latents, run, "--init-from", str(parent), "--teacher", str(parent),
                      "--lr", "0", "--steps", "1", "--action-distill-weight", "1"))  # fmt: skip
    summary = json.loads((run / "model" / "train_dit.json").read_text())
    assert summary["eval"]["eval/distill"] < 1e-10 < 1e-3 < summary["eval"]["eval/flow"]
    assert summary["eval"]["eval/action"] < 1e-10  # the same response to another action as the teacher's
    parent_cmd = json.loads((parent / "train_dit.json").read_text())["command"]
    assert summary["teacher"]["command"] == parent_cmd
    assert common.stage_commands(summary) == [parent_cmd, summary["command"]]  # the teacher's lineage, once
    assert common.stage_commands({**summary, "init_from": None}) == [parent_cmd, summary["command"]]  # teacher alone

    run = tmp_path / "patch2"
    dit.main(dit_args((data, footage), latents, run, "--init-from", str(parent), "--teacher", str(parent),
                      "--patch", "2", "--patch-shift", "1", "--lr", "0", "--steps", "1",
                      "--action-distill-weight", "1"))  # fmt: skip
    before, after = load_file(parent / "dit.safetensors"), load_file(run / "model" / "dit.safetensors")
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k.split(".")[0] not in ("patch_embed", "final"))
    torch.testing.assert_close(after["patch_embed.weight"], before["patch_embed.weight"].repeat_interleave(4, 1) / 4)
    torch.testing.assert_close(after["final.weight"], before["final.weight"].repeat_interleave(4, 0))
    torch.testing.assert_close(after["final.bias"], before["final.bias"].repeat_interleave(4, 0))
    got = json.loads((run / "model" / "train_dit.json").read_text())["eval"]
    assert 1e-6 < got["eval/distill"] < got["eval/flow"]  # close to the teacher, not equal to it
    assert got["eval/action"] >= 0.0  # reported (the 4-step parent barely responds to actions: near 0 here)
    assert json.loads((run / "model" / "dit_config.json").read_text())["patch_shift"] == 1  # inflated and moved

    moved = tmp_path / "shift0"  # that student's grid moved back one column: same weights, new grid
    dit.main(dit_args((data, footage), latents, moved, "--init-from", str(run / "model"), "--patch", "2",
                      "--patch-shift", "0", "--lr", "0", "--steps", "1"))  # fmt: skip
    shifted = load_file(moved / "model" / "dit.safetensors")
    assert shifted.keys() == after.keys() and all(torch.equal(after[k], shifted[k]) for k in after)
    assert json.loads((moved / "model" / "dit_config.json").read_text())["patch_shift"] == 0
    with pytest.raises(UsageError, match=r"'patch_shift': \(1, 0\)\} \(give --patch-shift 1 to keep"):  # not silently
        dit.main(dit_args((data, footage), latents, tmp_path / "back", "--init-from", str(run / "model"),
                          "--patch", "2"))  # fmt: skip
    with pytest.raises(UsageError, match=r"--patch-shift 2: expected columns in \[0, 2\)"):
        dit.main(dit_args((data, footage), latents, tmp_path / "bad", "--patch", "2", "--patch-shift", "2"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UsageError, match="give --teacher"):
        dit.main([*dit_args((data, footage), latents, tmp_path / "nt"), "--action-distill-weight", "1"])

    focus = tmp_path / "focus"  # the teacher's own weights with the car's box weighed 4x: still zero, box reported
    dit.main(dit_args((data, footage), latents, focus, "--init-from", str(parent), "--teacher", str(parent),
                      "--lr", "0", "--steps", "1", "--focus-box", "5", "8", "7", "9",
                      "--focus-weight", "4"))  # fmt: skip
    got = json.loads((focus / "model" / "train_dit.json").read_text())["eval"]
    assert got["eval/focus"] < 1e-10 and got["eval/distill"] < 1e-10 < 1e-3 < got["eval/flow"]
    for bad, match in (
        (["--focus-box", "5", "10", "7", "9", "--focus-weight", "4"], r"--focus-box 5 10 7 9: .*latent \(9x16\)"),
        (["--focus-box", "5", "5", "7", "9", "--focus-weight", "4"], r"0 <= ROW0 < ROW1 <= 9"),
        (["--focus-box", "-1", "8", "7", "9", "--focus-weight", "4"], r"--focus-box -1 8 7 9: expected"),
        (["--focus-box", "0", "9", "0", "16", "--focus-weight", "4"], r"not the whole latent \(9x16\)"),
        (["--focus-box", "5", "8", "7", "9"], "give both"),
        (["--focus-weight", "4"], "give both"),
        (["--focus-box", "5", "8", "7", "9", "--focus-weight", "0"], r"--focus-weight 0.0: expected a finite"),
    ):
        with pytest.raises(UsageError, match=match):
            dit.main([*dit_args((data, footage), latents, tmp_path / "badfocus"), *bad])
        assert not (tmp_path / "badfocus").exists()

    with pytest.raises(UsageError, match="at most 16 frames"):
        dit.main([*dit_args((data, footage), latents, tmp_path / "long", "--teacher", str(parent)),
                  "--window", "17"])  # fmt: skip

    acausal = tmp_path / "acausal"  # the parent with full temporal attention: velocities that read the future
    shutil.copytree(parent, acausal)
    cfg = json.loads((acausal / "dit_config.json").read_text())
    (acausal / "dit_config.json").write_text(json.dumps({**cfg, "causal": False}))
    with pytest.raises(UsageError, match="causal=False"):
        dit.main(dit_args((data, footage), latents, tmp_path / "ac", "--teacher", str(acausal)))
    assert not (tmp_path / "ac").exists()  # refused before the run dir was made

    other = tmp_path / "other_controls"  # a teacher that reads other control rows than the warm start's
    shutil.copytree(parent, other)
    table, sentences = dit.load_control_table(other / dit.CONTROL_TABLE_FILE)
    dit.save_control_table(other / dit.CONTROL_TABLE_FILE, type(table)(table.tokens * 2, table.mask, table.pooled),
                           sentences, {})  # fmt: skip
    with pytest.raises(UsageError, match="control table's tokens differ"):
        dit.main(dit_args((data, footage), latents, tmp_path / "ct", "--init-from", str(parent),
                          "--teacher", str(other)))  # fmt: skip
    assert not (tmp_path / "ct" / dit.CONTROL_TABLE_FILE).exists()  # refused before the run dir held a table


def test_consistency_run_distils_the_teacher_worlds_sampler(data, footage, vae_dir, latents, dit_run, tmp_path):
    """train-dit --consistency-weight: reads the teacher world's sampler, reports eval/consistency, build-world
    defaults to the distilled sampler, and what cannot be distilled is refused, naming the value, before the run
    dir is made."""
    from world_model.train import build_world, dit

    parent = dit_run / "model"
    world = tmp_path / "world"  # the parent's DiT as a world: a sampler in its config.json
    shutil.copytree(parent, world)
    (world / "config.json").write_text(json.dumps({"sampler": {"context": 4, "groups": 4, "ctx_noise": 0.4,
                                                               "level_shift": 2.0}}))  # fmt: skip
    run = tmp_path / "scm"
    dit.main(dit_args((data, footage), latents, run, "--init-from", str(parent), "--teacher", str(world),
                      "--lr", "0", "--steps", "1", "--consistency-weight", "1"))  # fmt: skip
    got = json.loads((run / "model" / "train_dit.json").read_text())["eval"]
    assert got["eval/distill"] < 1e-10 and 0.0 <= got["eval/consistency"] < got["eval/flow"]
    assert json.loads((run / "config.json").read_text())["consistency_groups"] == 2
    built = tmp_path / "built"  # build-world's default sampler: the one the student was distilled for
    build_world.main(["--vae", str(vae_dir), "--dit", str(run / "model"), "--data", str(data), "--latents",
                      str(latents[0]), "--out", str(built), "--starts", "2"])  # fmt: skip
    sampler = json.loads((built / "config.json").read_text())["sampler"]
    assert {k: sampler[k] for k in ("groups", "steps_per_shift", "level_shift", "ctx_noise", "mode")} == {
        "groups": 2, "steps_per_shift": 1, "level_shift": 2.0, "ctx_noise": 0.4, "mode": "pipelined"}

    guided = tmp_path / "guided"
    shutil.copytree(world, guided)
    (guided / "config.json").write_text(json.dumps({"sampler": {"context": 4, "guidance": 1.5}}))

    bad = [
        ((), "give --teacher"),
        (("--teacher", str(parent)), "has no sampler settings|must be a world dir"),
        (("--teacher", str(world), "--consistency-substeps", "1"), "k >= 2"),
        (("--teacher", str(world), "--consistency-groups", "5"), "must fit in --window 8"),
        (("--teacher", str(world), "--context", "3"), "holds 4 context frames, this run --context 3"),
        (("--teacher", str(world), "--no-causal"), "block-causal"),
        (("--teacher", str(world), "--consistency-weight", "nan"), "finite number"),
        (("--teacher", str(guided),), "uses guidance 1.5"),
        (("--teacher", str(world), "--consistency-weight", "0", "--consistency-groups", "3"), "give a weight > 0"),
    ]
    for i, (extra, match) in enumerate(bad):
        with pytest.raises(UsageError, match=match):
            dit.main([*dit_args((data, footage), latents, tmp_path / f"bad{i}"), "--consistency-weight", "1", *extra])
        assert not (tmp_path / f"bad{i}").exists()


def test_obs_decoder_learns_the_vae_decode_and_serves_agent_observations(
    data, footage, vae_dir, latents, dit_run, tiny_world_dir, tmp_path
):
    """train-obs-decoder: a narrow decoder fitted to the VAE's decode; the world gains it and nothing else
    changes; agent-sized observations come from it (obs_decoder=False: the VAE's), 720p frames from the VAE."""
    import torch.nn.functional as F

    from world_model.checkpoint import load_world
    from world_model.data.latents import latent_space_sha256
    from world_model.simulator import Simulator
    from world_model.train import build_world, obs_decoder, rollouts
    from world_model.vae import ObsDecoder, ObsDecoderConfig, tensor_to_frames

    world = tmp_path / "world"
    build_world.main([
        "--vae", str(vae_dir), "--dit", str(dit_run / "model"), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(world), "--starts", "2",
    ])  # fmt: skip
    gen = tmp_path / "gen"  # latents the world generates, the other kind the decoder meets
    rollouts.main(["--checkpoint", str(world), "--envs", "2", "--steps", "4", "--skip", "1", "--threads", "1",
                   "--out", str(gen)])  # fmt: skip
    out = tmp_path / "world_obs"
    argv = ["--world", str(world), "--latents", str(latents[0]), str(latents[1]), "--out", str(out),
            "--channels", "4", "4", "4", "--steps", "150", "--batch-size", "16", "--lr", "1e-2", "--warmup", "5",
            "--gen-latents", str(gen)]
    torch.manual_seed(0)
    obs_decoder.main(argv)
    src, got = load_world(world), load_world(out)
    manifest = lambda d: json.loads((d / "manifest.json").read_text())  # noqa: E731
    for f in ("vae.safetensors", "dit.safetensors", "heads.safetensors", "control.safetensors"):
        assert manifest(world)["files"][f] == manifest(out)["files"][f]
    assert manifest(out)["recipe"]["commands"][-1][:2] == ["matrix-world", "train-obs-decoder"]
    assert src.obs_decoder is None and isinstance(got.obs_decoder, ObsDecoder)
    report = got.meta["obs_decoder"]

    fresh = ObsDecoder(ObsDecoderConfig(latent_channels=4, channels=(4, 4, 4)))  # untrained, same statistics
    fresh.latent_shift.copy_(src.vae.latent_shift)
    fresh.latent_scale.copy_(src.vae.latent_scale)
    pools, _ = obs_decoder.load_pool(obs_decoder.Args(world=world, latents=latents, gen_latents=(gen,), out=out),
                                     latent_space_sha256(world), (4, 9, 16))  # fmt: skip
    assert list(pools) == [f"recorded {latents[0].name}", f"recorded {latents[1].name}", f"generated {gen.name}"]
    twice, _ = obs_decoder.load_pool(obs_decoder.Args(world=world, latents=(latents[0],) * 3, out=out),
                                     latent_space_sha256(world), (4, 9, 16))  # fmt: skip
    assert list(twice) == [f"recorded {latents[0].name}{n}" for n in ("", " #2", " #3")]  # a source per argument
    episodes = pools[f"recorded {latents[0].name}"]  # one (S+1, C, h, w) per recorded episode of the first cache
    trained, held = obs_decoder.split(episodes, "recorded")  # the report's held-out latents: whole episodes
    assert len(held) == sum(len(e) for e in episodes[:: obs_decoder.HELDOUT_EVERY])
    assert torch.equal(held[0], episodes[0][0])  # the first episode is held out, whole
    assert len(trained) + len(held) == sum(len(e) for e in episodes)
    before = obs_decoder.compare(src.vae, fresh, held, False, torch.device("cpu"))
    after = report["heldout"][f"recorded {latents[0].name}"]
    assert after["latents"] == len(held) and report["heldout"][f"generated {gen.name}"]["latents"] == 3  # 2 of 3
    z_gen, _ = rollouts.load(gen, latent_space_sha256(world), (4, 9, 16))  # (6, C, h, w): step-major over 2 streams
    streams = pools[f"generated {gen.name}"]
    assert torch.equal(streams[0], z_gen[0::2]) and torch.equal(streams[1], z_gen[1::2])
    with pytest.raises(UsageError, match="1 streams"):
        obs_decoder.split(streams[:1], "generated x")
    assert after["psnr_native_db"] > before["psnr_native_db"] + 3.0  # it learnt the VAE's decode
    assert after["psnr_84_db"] >= after["psnr_native_db"] - 1.0  # resizing down does not add error
    assert 0.0 <= after["follower_same_action"] <= 1.0 and report["obs_decoder_ms"] > 0

    z = torch.randn(3, 4, 9, 16)
    sim, plain = Simulator(got, 3, obs_decoder=True), Simulator(got, 3)
    with torch.no_grad():
        want = F.interpolate(got.obs_decoder(z).float(), size=(20, 20), mode="bilinear", antialias=True,
                             align_corners=False)  # fmt: skip
        np.testing.assert_array_equal(sim.decode(z, (20, 20)).numpy(), tensor_to_frames(want).numpy())
        assert not torch.equal(sim.decode(z, (20, 20)), plain.decode(z, (20, 20)))
        assert torch.equal(plain.decode(z, (20, 20)), Simulator(src, 3, obs_decoder=True).decode(z, (20, 20)))
        assert torch.equal(sim.decode(z, "native"), plain.decode(z, "native"))  # what the evaluations read
        assert torch.equal(sim.decode(z, "720p"), plain.decode(z, "720p"))
    assert (sim.decoder_name((20, 20)), plain.decoder_name((20, 20))) == ("observation decoder", "VAE")
    assert (sim.decoder_name("native"), sim.decoder_name("720p")) == ("VAE", "VAE high-res")

    with pytest.raises(UsageError, match="one width per upsampling"):
        obs_decoder.main([*argv[:7], "--channels", "4", "4", "--steps", "1"])
    with pytest.raises(UsageError, match="latent space"):  # generated latents of another world's latent space
        obs_decoder.main(["--world", str(tiny_world_dir), "--gen-latents", str(gen), "--out", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="--gen-latents"):
        obs_decoder.main(["--world", str(world), "--out", str(tmp_path / "none")])


def test_hr_only_retrains_the_720p_head_and_nothing_else(data, vae_dir, tmp_path):
    """--hr-only --hr-base bilinear --hr-kernel 3: a new head; every other weight and the latent space stay."""
    from safetensors.torch import load_file

    from world_model.checkpoint import load_module
    from world_model.data.latents import latent_space_sha256
    from world_model.train import vae
    from world_model.vae import FrameVAE, VAEConfig

    run = tmp_path / "vae_hr"
    common = ["--data", str(data), "--init-from", str(vae_dir), "--steps", "2", "--batch-size", "4",
              "--num-workers", "0", "--hr-batch", "2", "--hr-shuffle", "4", "--eval-frames", "16", "--warmup", "1"]
    vae.main([*common, "--hr-only", "--hr-base", "bilinear", "--hr-kernel", "3", "--lr", "1e-2", "--run-dir", str(run)])
    before, after = load_file(vae_dir / "vae.safetensors"), load_file(run / "model" / "vae.safetensors")
    head = {"hr_out.weight", "hr_out.bias", "hr_up.weight", "hr_up.bias"}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)
    assert after["hr_out.weight"].shape[-1] == 3 and after["hr_out.weight"].abs().sum() > 0  # trained, 3x3
    assert latent_space_sha256(run / "model") == latent_space_sha256(vae_dir)
    new = load_module(run / "model", "vae", FrameVAE, VAEConfig)
    assert (new.cfg.hr_base, new.cfg.hr_kernel) == ("bilinear", 3)
    assert new.decode_hr(torch.zeros(1, new.cfg.latent_channels, *new.cfg.latent_hw)).shape == (1, 3, 720, 1280)
    with pytest.raises(UsageError, match="--hr-base / --hr-kernel: hr_base must be one of"):
        vae.main([*common, "--hr-only", "--hr-base", "bicubic", "--run-dir", str(tmp_path / "bad")])
    with pytest.raises(UsageError, match="--hr-only needs --init-from"):
        vae.main(["--data", str(data), "--hr-only", "--run-dir", str(tmp_path / "bad2"), "--steps", "1"])


def test_patch_discriminator_and_hinge_losses():
    from world_model.train.adversarial import (
        PatchDiscriminator,
        adaptive_weight,
        discriminator_loss,
        generator_loss,
    )

    torch.manual_seed(0)
    disc = PatchDiscriminator()
    assert disc(torch.zeros(2, 3, 72, 128)).shape == (2, 1, 9, 16)  # one logit per 8x8 patch
    assert disc(torch.zeros(1, 3, 180, 320)).shape == (1, 1, 22, 40)
    confident = discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    fooled = discriminator_loss(torch.full((4,), -1.0), torch.full((4,), 1.0))
    assert confident.item() == 0.0 and fooled.item() == pytest.approx(2.0)
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    # the weight is |grad rec| / |grad g| on the last layer: here d(2w)/dw = 2, d(w/4)/dw = 1/4 -> 8
    w = torch.ones(3, requires_grad=True)
    assert adaptive_weight((2 * w).sum(), (w / 4).sum(), w).item() == pytest.approx(8.0, rel=1e-3)
    with pytest.raises(ValueError, match="does not reach the decoder's output layer"):
        adaptive_weight(torch.ones(3, requires_grad=True).sum(), (w / 4).sum(), w)


def test_critic_generator_term_moves_only_the_decoder_and_step_moves_only_the_critic():
    import contextlib

    from world_model.train.adversarial import Critic

    torch.manual_seed(0)
    critic = Critic(weight=0.5, lr=1e-2, device=torch.device("cpu"))
    last = torch.nn.Conv2d(4, 3, 3, padding=1)  # stands in for the decoder's output layer
    feats, real = torch.randn(2, 4, 72, 128), torch.rand(2, 3, 72, 128) * 2 - 1
    fake = last(feats)  # (2, 3, 72, 128)
    rec = (fake - real).abs().mean()
    g, weight = critic.generator_term(rec, fake, last.weight, contextlib.nullcontext())
    (rec + weight * g).backward()
    assert weight.item() > 0 and not weight.requires_grad
    assert last.weight.grad is not None
    assert all(p.grad is None and p.requires_grad for p in critic.disc.parameters())  # frozen, then restored
    before = [p.detach().clone() for p in critic.disc.parameters()]
    loss = critic.step(real, fake, lr_scale=1.0, autocast=contextlib.nullcontext())
    assert loss.ndim == 0 and not loss.requires_grad
    assert any(not torch.equal(b, p) for b, p in zip(before, critic.disc.parameters(), strict=True))


def _vae_gan_args(data: Path, vae_dir: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--init-from", str(vae_dir), "--run-dir", str(run), "--steps", str(steps),
        "--batch-size", "4", "--num-workers", "0", "--hr-batch", "2", "--hr-shuffle", "4", "--eval-frames", "16",
        "--warmup", "1", "--lr", "1e-3", "--adv-weight", "0.5", "--adv-start", "1", "--ckpt-every", "2", *extra,
    ]  # fmt: skip


def test_adversarial_decoder_finetune_keeps_the_latent_space_and_resumes_exactly(data, vae_dir, tmp_path):
    """--freeze-encoder --adv-weight: the critic trains beside the decoder, is checkpointed, and a
    run resumed at step 2 ends with the same decoder and critic as an uninterrupted one."""
    import shutil

    from world_model.data.latents import latent_space_sha256
    from world_model.train import vae

    args = ("--freeze-encoder", "--hr-weight", "0")  # the 720p stream reseeds on resume; not under test
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "full", 4, *args))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")  # as if killed between the checkpoints at 2 and 4
    shutil.rmtree(tmp_path / "cut" / "model")
    shutil.rmtree(tmp_path / "cut" / "state" / "step_000004")
    assert (tmp_path / "cut" / "state" / "step_000002" / "aux_disc.safetensors").is_file()
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "cut", 4, *args))  # resumes at step 2

    before, after = load_file(vae_dir / "vae.safetensors"), load_file(tmp_path / "full" / "model" / "vae.safetensors")
    enc = [k for k in before if k.startswith(("enc_in.", "encoder.", "latent_"))]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert not torch.equal(before["to_rgb.weight"], after["to_rgb.weight"])
    assert latent_space_sha256(tmp_path / "full" / "model") == latent_space_sha256(vae_dir)
    resumed = load_file(tmp_path / "cut" / "model" / "vae.safetensors")
    assert all(torch.equal(after[k], resumed[k]) for k in after)
    disc_full = load_file(tmp_path / "full" / "state" / "step_000004" / "aux_disc.safetensors")
    disc_cut = load_file(tmp_path / "cut" / "state" / "step_000004" / "aux_disc.safetensors")
    assert all(torch.equal(disc_full[k], disc_cut[k]) for k in disc_full)
    first = load_file(tmp_path / "cut" / "state" / "step_000002" / "aux_disc.safetensors")
    assert any(not torch.equal(first[k], disc_cut[k]) for k in first)  # the critic kept training
    # the adversarial term reached the decoder: without it (same seed, same batches) it ends elsewhere
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "plain", 4, *args, "--adv-weight", "0"))
    plain = load_file(tmp_path / "plain" / "model" / "vae.safetensors")
    assert not torch.equal(plain["to_rgb.weight"], after["to_rgb.weight"])
    assert not (tmp_path / "plain" / "state" / "step_000004" / "aux_disc.safetensors").exists()

    for flag, value in (("--adv-weight", "-1"), ("--adv-start", "-2"), ("--disc-lr", "0")):
        with pytest.raises(UsageError, match=f"{flag} {float(value) if flag != '--adv-start' else value}"):
            vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad", 1, flag, value))


def test_decoder_learns_from_generated_latents(data, footage, vae_dir, latents, dit_run, tmp_path):
    """rollout-latents stores what a world's DiT generates (seeded, in the world's latent space);
    train-vae --gen-latents shows their decodes to the critic, moving the decoder and not the encoder."""
    import shutil

    from world_model.data.latents import latent_space_sha256
    from world_model.train import build_world, rollouts, vae

    world = tmp_path / "world"
    build_world.main([
        "--vae", str(vae_dir), "--dit", str(dit_run / "model"), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(world), "--starts", "2",
    ])  # fmt: skip
    roll = ["--checkpoint", str(world), "--envs", "3", "--steps", "5", "--skip", "1", "--threads", "1"]
    rollouts.main([*roll, "--out", str(tmp_path / "gen")])
    z = load_file(tmp_path / "gen" / rollouts.LATENTS_FILE)["latents"]
    info = json.loads((tmp_path / "gen" / rollouts.INFO_FILE).read_text())
    assert z.shape == (4 * 3, 4, 9, 16) and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert info["count"] == 12 and info["latent_space_sha256"] == latent_space_sha256(vae_dir)
    assert info["command"][:2] == ["matrix-world", "rollout-latents"]
    rollouts.main([*roll, "--out", str(tmp_path / "gen_again")])  # same seed: the same latents
    assert torch.equal(z, load_file(tmp_path / "gen_again" / rollouts.LATENTS_FILE)["latents"])
    rollouts.main([*roll, "--seed", "1", "--out", str(tmp_path / "gen_other")])
    assert not torch.equal(z, load_file(tmp_path / "gen_other" / rollouts.LATENTS_FILE)["latents"])
    assert z[:3].sub(z[-3:]).abs().max() > 0  # the streams moved over the rollout

    args = ("--freeze-encoder", "--hr-weight", "0", "--adv-start", "0")
    gen_args = (*args, "--gen-latents", str(tmp_path / "gen"), "--gen-batch", "3")
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "gen_run", 4, *gen_args))
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "plain_run", 4, *args))
    before = load_file(vae_dir / "vae.safetensors")
    with_gen = load_file(tmp_path / "gen_run" / "model" / "vae.safetensors")
    plain = load_file(tmp_path / "plain_run" / "model" / "vae.safetensors")
    enc = [k for k in before if k.startswith(("enc_in.", "encoder.", "latent_"))]
    assert enc and all(torch.equal(before[k], with_gen[k]) for k in enc)  # same latent space
    assert not torch.equal(plain["to_rgb.weight"], with_gen["to_rgb.weight"])  # the generated decodes mattered
    shutil.copytree(tmp_path / "gen_run", tmp_path / "cut")  # killed after the checkpoint at step 2
    shutil.rmtree(tmp_path / "cut" / "model")
    shutil.rmtree(tmp_path / "cut" / "state" / "step_000004")
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "cut", 4, *gen_args))  # same generated draws after resume
    resumed = load_file(tmp_path / "cut" / "model" / "vae.safetensors")
    assert all(torch.equal(with_gen[k], resumed[k]) for k in with_gen)
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "anchored", 4, *gen_args, "--gen-anchor-weight", "1"))
    anchored = load_file(tmp_path / "anchored" / "model" / "vae.safetensors")
    assert not torch.equal(anchored["to_rgb.weight"], with_gen["to_rgb.weight"])  # the anchor reached the decoder
    # the colour prior: the real colours of the recording; the run records them, the decoder moves
    pal_args = ("--gen-palette-weight", "1", "--gen-palette-data", str(data))
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "palette", 4, *gen_args, *pal_args))
    coloured = load_file(tmp_path / "palette" / "model" / "vae.safetensors")
    assert not torch.equal(coloured["to_rgb.weight"], with_gen["to_rgb.weight"])
    pal = json.loads((tmp_path / "palette" / "model" / "train_vae.json").read_text())["gen_palette"]
    assert pal["data"] == str(data) and pal["colours"] >= 2 and pal["view"] == "whole frame"  # synthetic data
    colours, keep, _ = vae.palette_targets(data)
    assert keep.all() and colours.shape[1] == 3 and colours.abs().max() <= 1
    keep = keep.flatten().nonzero().squeeze(1)  # (72*128,) the pixels the loss reads
    near = colours[:1, :, None, None].expand(1, 3, 72, 128)  # a real colour everywhere: free
    assert vae.palette_loss(near, colours, keep) == 0.0
    far = near + torch.tensor([0.0, 0.0, 1.0])[None, :, None, None]  # one channel 1.0 off: costs ~1 - margin
    assert 0.3 < vae.palette_loss(far, colours, keep) <= 1.0 - vae.PALETTE_MARGIN + 1e-6
    top = torch.cat([far[:, :, :1], near[:, :, 1:]], 2)  # only row 0 off the palette
    assert vae.palette_loss(top, colours, keep[128:]) == 0.0 < vae.palette_loss(top, colours, keep[:256])
    with pytest.raises(UsageError, match="give both"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad_p0", 1, *gen_args, "--gen-palette-weight", "1"))
    with pytest.raises(UsageError, match="--gen-palette-weight 1.0: must be >= 0, and > 0 only with --gen-latents"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad_p1", 1, *args, *pal_args))
    with pytest.raises(UsageError, match="--gen-palette-data: data directory .*nowhere' holds no recorded"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad_p2", 1, *gen_args, "--gen-palette-weight", "1",
                               "--gen-palette-data", str(tmp_path / "nowhere")))
    with pytest.raises(UsageError, match="--gen-anchor-weight 1.0: must be >= 0, and > 0 only with --gen-latents"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad0", 1, *args, "--gen-anchor-weight", "1"))
    cfg = json.loads((tmp_path / "gen_run" / "config.json").read_text())
    assert cfg["gen_latents"] == [str(tmp_path / "gen")] and cfg["gen_batch"] == 3
    build_world.main([  # the new world's recipe: the rollout world's, the rollout, then the fine-tune
        "--vae", str(tmp_path / "gen_run" / "model"), "--dit", str(world), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(tmp_path / "world_gen"), "--starts", "2",
    ])  # fmt: skip
    cmds = [c[1] for c in json.loads((tmp_path / "world_gen" / "manifest.json").read_text())["recipe"]["commands"]]
    assert cmds[-3:] == ["rollout-latents", "train-vae", "build-world"] and cmds.count("build-world") == 2

    with pytest.raises(UsageError, match="--gen-latents .*--freeze-encoder"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad1", 1, "--gen-latents", str(tmp_path / "gen")))
    with pytest.raises(UsageError, match=r"--adv-weight > 0 \(got 0.0\)"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad1b", 1, *gen_args, "--adv-weight", "0"))
    with pytest.raises(UsageError, match="--hr-only trains the 720p head alone"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad1c", 1, *gen_args, "--hr-only"))
    shutil.copytree(tmp_path / "gen", tmp_path / "swapped")  # tensors of another rollout under this info
    shutil.copy(tmp_path / "gen_other" / rollouts.LATENTS_FILE, tmp_path / "swapped" / rollouts.LATENTS_FILE)
    with pytest.raises(UsageError, match="does not match the SHA-256"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad1d", 1, *args, "--gen-latents", str(tmp_path / "swapped")))
    with pytest.raises(UsageError, match="--gen-batch 0"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad2", 1, *args, "--gen-latents", str(tmp_path / "gen"),
                               "--gen-batch", "0"))
    rollouts.save(tmp_path / "other", z, {**info, "latent_space_sha256": "f" * 64})  # another VAE's latents
    with pytest.raises(UsageError, match="latent space ffffffffffff"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad3", 1, *args, "--gen-latents", str(tmp_path / "other")))
    rollouts.save(tmp_path / "shape", z[:, :2], info)
    with pytest.raises(UsageError, match=r"shape \(12, 2, 9, 16\), expected \(N>0, 4, 9, 16\)"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad4", 1, *args, "--gen-latents", str(tmp_path / "shape")))
    with pytest.raises(UsageError, match="has no rollouts.json"):
        vae.main(_vae_gan_args(data, vae_dir, tmp_path / "bad5", 1, *args, "--gen-latents", str(tmp_path / "none")))
    with pytest.raises(UsageError, match="--skip 5"):
        rollouts.main([*roll[:-2], "--skip", "5", "--out", str(tmp_path / "bad6")])
    with pytest.raises(UsageError, match="--random-prob 1.5"):
        rollouts.main([*roll, "--random-prob", "1.5", "--out", str(tmp_path / "bad7")])


def test_adversarial_hr_head_trains_only_the_head(data, vae_dir, tmp_path):
    """--hr-only --adv-weight: the critic judges 720p crops; only the head's weights move."""
    from world_model.train import vae

    run = tmp_path / "hr_gan"
    vae.main(_vae_gan_args(data, vae_dir, run, 2, "--hr-only"))
    before, after = load_file(vae_dir / "vae.safetensors"), load_file(run / "model" / "vae.safetensors")
    head = {"hr_out.weight", "hr_out.bias", "hr_up.weight", "hr_up.bias"}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)
    assert (run / "state" / "step_000002" / "aux_disc.safetensors").is_file()
    vae.main(_vae_gan_args(data, vae_dir, tmp_path / "hr_plain", 2, "--hr-only", "--adv-weight", "0"))
    plain = load_file(tmp_path / "hr_plain" / "model" / "vae.safetensors")
    assert not torch.equal(plain["hr_out.weight"], after["hr_out.weight"])  # the critic shaped the head


def test_a_world_is_a_parent_for_encode_train_and_build(data, footage, vae_dir, latents, dit_run, tmp_path):
    """A world dir stands in for train-vae's / train-dit's output: same latent space, weights, lineage."""
    from safetensors.torch import load_file

    from world_model.checkpoint import load_world
    from world_model.data import latents as latent_cache
    from world_model.data.latents import latent_space_sha256
    from world_model.train import build_world, dit

    world = tmp_path / "world"
    build_world.main([
        "--vae", str(vae_dir), "--dit", str(dit_run / "model"), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(world), "--starts", "2",
        "--steps-per-shift", "1", "--ctx-noise", "0.3", "--level-shift", "3", "--term-threshold", "2",
    ])  # fmt: skip
    world_cmds = json.loads((world / "manifest.json").read_text())["recipe"]["commands"]
    assert latent_space_sha256(world) == latent_space_sha256(vae_dir)

    cache = tmp_path / "lat_world"  # encode-latents --vae WORLD: the same cache as with the VAE's own dir
    latent_cache.main(["--data", str(footage), "--vae", str(world), "--out", str(cache), "--batch-size", "8"])
    assert latent_cache.read_info(cache)["vae_sha256"] == latent_cache.read_info(latents[1])["vae_sha256"]
    for ep in sorted((latents[1] / "episodes").iterdir()):
        a, b = np.load(ep / "latents.npy"), np.load(cache / "episodes" / ep.name / "latents.npy")
        np.testing.assert_array_equal(a, b)

    run = tmp_path / "warm"  # train-dit --init-from WORLD: its weights and control rows, its recipe as lineage
    dit.main(dit_args((data, footage), latents, run, "--init-from", str(world), "--lr", "0", "--steps", "1"))
    before, after = load_file(world / "dit.safetensors"), load_file(run / "model" / "dit.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    parent = json.loads((run / "model" / "train_dit.json").read_text())["init_from"]
    assert parent["world_recipe"] == world_cmds and parent["steps"] == 4

    out = tmp_path / "world2"  # build-world --vae WORLD: the recipe is the parent world's, then the new stages
    build_world.main([
        "--vae", str(world), "--dit", str(run / "model"), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(out), "--starts", "2",
    ])  # fmt: skip
    cmds = json.loads((out / "manifest.json").read_text())["recipe"]["commands"]
    assert cmds[: len(world_cmds)] == world_cmds
    assert [c[1] for c in cmds[len(world_cmds) :]] == ["train-dit", "build-world"]

    rebuilt = tmp_path / "world3"  # build-world --dit WORLD: a world's DiT with another sampler setting
    build_world.main([
        "--vae", str(world), "--dit", str(world), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(rebuilt), "--starts", "2", "--level-shift", "2",
    ])  # fmt: skip
    again = load_world(rebuilt)
    assert again.sampler["level_shift"] == 2.0 and again.meta["dit_steps"] == 4  # the one setting changed
    assert (again.sampler["steps_per_shift"], again.sampler["ctx_noise"]) == (1, 0.3)  # the others inherited
    assert again.heads.cfg.term_threshold == 2.0
    assert torch.equal(again.control_tokens, load_world(world).control_tokens)
    assert again.sampler["groups"] == 4  # the DiT's training window (8) minus its context (4)
    cmds = json.loads((rebuilt / "manifest.json").read_text())["recipe"]["commands"]
    assert cmds[: len(world_cmds)] == world_cmds and [c[1] for c in cmds[len(world_cmds) :]] == ["build-world"]

    fewer = tmp_path / "world4"  # --groups: fewer frames in flight; a world built from it inherits them
    build_world.main([
        "--vae", str(world), "--dit", str(rebuilt), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(fewer), "--starts", "2", "--groups", "2",
    ])  # fmt: skip
    assert load_world(fewer).sampler["groups"] == 2
    build_world.main([
        "--vae", str(world), "--dit", str(fewer), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(tmp_path / "world5"), "--starts", "2",
    ])  # fmt: skip
    inherited = load_world(tmp_path / "world5").sampler
    assert (inherited["groups"], inherited["level_shift"]) == (2, 2.0)


def test_set_sampler_changes_only_the_sampler_and_extends_the_recipe(tiny_world_dir, tmp_path, cli, capsys):
    """set-sampler: a world with other default sampler settings, same weights and starts, one more command."""
    import dataclasses
    import shutil

    from world_model.checkpoint import load_world
    from world_model.simulator import Simulator
    from world_model.swin_dpm import SwinDPMConfig
    from world_model.train.build_world import set_sampler_main

    world = tmp_path / "world"
    shutil.copytree(tiny_world_dir, world)
    before = load_world(world)
    assert before.sampler["groups"] == 2
    old_cmds = json.loads((world / "manifest.json").read_text())["recipe"].get("commands", [])
    out = tmp_path / "g1"
    set_sampler_main(["--world", str(world), "--out", str(out), "--groups", "1", "--ctx-noise", "0.2"])
    after = load_world(out)
    full = dataclasses.asdict(SwinDPMConfig(**before.sampler))  # the tiny world stores only some fields
    changed = {k for k in full if full[k] != after.sampler[k]}
    assert changed == {"groups", "ctx_noise"} and (after.sampler["groups"], after.sampler["ctx_noise"]) == (1, 0.2)
    assert torch.equal(after.start_latents, before.start_latents)
    sd0, sd1 = before.dit.state_dict(), after.dit.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    cmds = json.loads((out / "manifest.json").read_text())["recipe"]["commands"]
    assert cmds[:-1] == old_cmds and cmds[-1][1] == "set-sampler" and "--groups" in cmds[-1]
    sim = Simulator(after, 2, "cpu")
    assert sim.sampler.window_len == before.sampler["context"] + 1
    sim.reset(torch.ones(2, dtype=torch.bool), torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    latents, _, _ = sim.step(torch.zeros(2, dtype=torch.long))
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()

    set_sampler_main(["--world", str(out), "--out", str(out), "--mode", "immediate"])  # in place
    assert load_world(out).sampler["mode"] == "immediate"
    unedited = load_world(out)
    assert unedited.heads.cfg.terminal_reward is None  # the tiny world's heads: none set
    set_sampler_main(["--world", str(out), "--out", str(out), "--terminal-reward", "-100"])  # only the heads' setting
    edited = load_world(out)
    assert edited.heads.cfg.terminal_reward == -100.0 and edited.sampler == unedited.sampler
    assert dataclasses.replace(edited.heads.cfg, terminal_reward=None) == unedited.heads.cfg
    for argv, needle in [
        ([], "nothing to change"),
        (["--groups", "0"], "groups must be an int >= 1, got 0"),
        (["--groups", "20"], "max_frames=8"),
        (["--ctx-noise", "1.5"], "ctx_noise must be in [0, 1)"),
        (["--terminal-reward", "nan"], "--terminal-reward nan: expected a finite reward"),
    ]:
        assert cli(["set-sampler", "--world", str(world), "--out", str(tmp_path / "bad"), *argv]) == 2
        assert needle in capsys.readouterr().err
    assert cli(["set-sampler", "--world", str(tmp_path), "--out", str(tmp_path / "bad"), "--groups", "1"]) == 2
    assert "not a world directory" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_decoder_finetune_keeps_the_latent_space(data, footage, vae_dir, latents, dit_run, tmp_path):
    """--init-from/--freeze-encoder: encoder and latent stats unchanged, decoder trained, the world builds."""
    from safetensors.torch import load_file

    from world_model.data.latents import latent_space_sha256
    from world_model.train import build_world, vae

    run = tmp_path / "vae_dec"
    vae.main([
        "--data", str(data), "--init-from", str(vae_dir), "--freeze-encoder", "--detail-weight", "5",
        "--run-dir", str(run), "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--hr-batch", "2",
        "--hr-shuffle", "4", "--eval-frames", "16", "--warmup", "1",
    ])  # fmt: skip
    before, after = load_file(vae_dir / "vae.safetensors"), load_file(run / "model" / "vae.safetensors")
    enc = [k for k in before if k.startswith(("enc_in.", "encoder.", "latent_"))]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert latent_space_sha256(run / "model") == latent_space_sha256(vae_dir)
    build_world.main([
        "--vae", str(run / "model"), "--dit", str(dit_run / "model"), "--data", str(data), str(footage),
        "--latents", str(latents[0]), str(latents[1]), "--out", str(tmp_path / "world"), "--starts", "2",
    ])  # fmt: skip
    recipe = json.loads((tmp_path / "world" / "manifest.json").read_text())["recipe"]
    assert [c[1] for c in recipe["commands"]][:3] == ["train-vae", "train-vae", "encode-latents"]  # parent first
    with pytest.raises(UsageError, match="init-from"):
        vae.main(["--data", str(data), "--freeze-encoder", "--run-dir", str(tmp_path / "x"), "--steps", "1"])


def test_ddp_two_ranks_end_with_identical_weights(data, footage, latents, dit_run, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "world_model.train.dit",
        *dit_args((data, footage), latents, run, "--steps", "2", "--batch-size", "2", "--debug-hashes",
                  "--control-table", str(dit_run / "control_table.safetensors")),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = [(run / "debug" / f"dit_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert hashes[0] == hashes[1] and hashes[0][0] == "2"
    ckpt = run / "state" / "step_000002"
    assert (ckpt / "rng_rank0.safetensors").exists() and (ckpt / "rng_rank1.safetensors").exists()


def test_ddp_two_ranks_adversarial_vae_end_with_identical_decoder_and_critic(data, vae_dir, tmp_path):
    """2 ranks, --adv-weight: the critic is DDP-wrapped for its own step and frozen in the decoder's."""
    run = tmp_path / "ddp_gan"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "world_model.train.vae",
        *_vae_gan_args(data, vae_dir, run, 2, "--freeze-encoder", "--adv-start", "0", "--debug-hashes"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("vae", "vae_critic"):
        hashes = [(run / "debug" / f"{name}_rank{r}.txt").read_text().split() for r in (0, 1)]
        assert hashes[0] == hashes[1] and hashes[0][0] == "2", name


def test_resume_after_kill_matches_uninterrupted(data, footage, latents, dit_run, tmp_path, capsys):
    """SIGKILL a run after its first checkpoint, rerun it: same step count, bitwise-equal weights."""
    from world_model.train import dit

    table = str(dit_run / "control_table.safetensors")
    steps = ["--steps", "6", "--ckpt-every", "2", "--control-table", table]

    ref = tmp_path / "uninterrupted"
    dit.main(dit_args((data, footage), latents, ref, *steps))

    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "world_model.train.dit",
        *dit_args((data, footage), latents, run, *steps, "--step-sleep", "1"),
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "state" / "step_000002").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("_")[1]) for p in (run / "state").glob("step_*"))
    assert done and done[-1] < 6 and not (run / "model").exists(), "the run finished before the kill"

    capsys.readouterr()
    dit.main(
        dit_args((data, footage), latents, run, *steps, "--step-sleep", "0")
    )  # step_sleep may change on resume
    assert f"at step {done[-1]}" in capsys.readouterr().out
    trainer = json.loads((run / "state" / "step_000006" / "trainer.json").read_text())
    assert trainer["step"] == 6

    for name in ("model", "ema", "optimizer"):
        a = load_file(str(ref / "state" / "step_000006" / f"{name}.safetensors"))
        b = load_file(str(run / "state" / "step_000006" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from the uninterrupted run"
    assert load_file(str(ref / "model" / "dit.safetensors")).keys()  # exported too

    # --stop-at: a budget-limited invocation checkpoints and exports the EMA model at that step, on
    # the full run's schedule; continuing it ends bitwise where the uninterrupted run ended
    cut = tmp_path / "stopped"
    dit.main(dit_args((data, footage), latents, cut, *steps, "--stop-at", "3"))
    summary = json.loads((cut / "model" / "train_dit.json").read_text())
    assert (summary["steps"], summary["schedule_steps"]) == (3, 6)
    ema3 = load_file(str(cut / "state" / "step_000003" / "ema.safetensors"))
    exported = load_file(str(cut / "model" / "dit.safetensors"))
    assert all(torch.equal(exported[k], ema3[f"dit.{k}"]) for k in exported)
    for bad, msg in [("0", "expected a step count >= 1"), ("2", "below step 3, which")]:
        with pytest.raises(UsageError, match=msg):
            dit.main(dit_args((data, footage), latents, cut, *steps, "--stop-at", bad))
    capsys.readouterr()
    dit.main(dit_args((data, footage), latents, cut, *steps))
    assert "at step 3" in capsys.readouterr().out
    assert json.loads((cut / "model" / "train_dit.json").read_text())["steps"] == 6
    a, b = load_file(str(ref / "model" / "dit.safetensors")), load_file(str(cut / "model" / "dit.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "stop-at + resume differs from the uninterrupted run"

    # --max-minutes: a wall-clock budget stops like --stop-at at the step reached (here the first:
    # a budget shorter than one step), and the same command without it resumes to the same end
    timed = tmp_path / "timed"
    for bad in ("0", "-1", "nan"):
        with pytest.raises(UsageError, match="expected a number of minutes > 0"):
            dit.main(dit_args((data, footage), latents, timed, *steps, "--max-minutes", bad))
    dit.main(dit_args((data, footage), latents, timed, *steps, "--max-minutes", "1e-9"))
    summary = json.loads((timed / "model" / "train_dit.json").read_text())
    assert (summary["steps"], summary["schedule_steps"]) == (1, 6)
    assert sorted(p.name for p in (timed / "state").glob("step_*")) == ["step_000001"]
    capsys.readouterr()
    dit.main(dit_args((data, footage), latents, timed, *steps))
    assert "at step 1" in capsys.readouterr().out
    c = load_file(str(timed / "model" / "dit.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a), "max-minutes + resume differs from the uninterrupted run"


def test_eval_split_episodes_are_never_trained_on(data, tmp_path):
    from world_model.train.common import resolve_episodes

    eval_root = make_synthetic_dataset(tmp_path / "dr_eval", episodes=2, steps=4, split="eval")
    train, heldout = resolve_episodes([data, eval_root], holdout_fraction=0.1, seed=0)
    assert len(train) + len(heldout) == 3 and all(str(eval_root) not in str(ep) for ep in [*train, *heldout])
    with pytest.raises(UsageError, match="no training-split episodes"):
        resolve_episodes([eval_root], holdout_fraction=0.1, seed=0)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def cli(monkeypatch):
    """agents.cli.main with this package's subcommands registered (cli.py itself is not edited here)."""
    from agents import cli as cli_mod

    monkeypatch.setattr(cli_mod, "COMMANDS", {**cli_mod.COMMANDS, **CLI_LINES})
    return cli_mod.main


def test_missing_and_empty_data_dir_exit_2(cli, tmp_path, capsys):
    assert cli(["train-vae", "--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty" / "episodes").mkdir(parents=True)
    assert cli(["train-vae", "--data", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "no complete episodes" in capsys.readouterr().err


def test_corrupt_episode_file_is_named(cli, tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "data", episodes=2, steps=6)
    bad = root / "episodes" / "ep_000001" / "frames_72x128.npy"
    bad.write_bytes(b"not a numpy file")
    assert cli(["train-vae", "--data", str(root), "--run-dir", str(tmp_path / "r"), "--preset", "tiny"]) == 2
    assert str(bad) in capsys.readouterr().err


def test_missing_latents_and_mismatched_resume_config(cli, data, footage, latents, dit_run, tmp_path, capsys):
    args = dit_args((data, footage), latents, dit_run)  # the run that the dit_run fixture finished
    assert (
        cli(
            [
                "train-dit",
                *dit_args((data, footage), (tmp_path / "no-latents", tmp_path / "x"), tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "no-latents" in capsys.readouterr().err
    assert cli(["train-dit", *dit_args((data, footage), latents, tmp_path / "r2"), "--road-weight", "0"]) == 2
    assert "--road-weight 0.0: expected a finite number > 0" in capsys.readouterr().err
    assert cli(["train-dit", *dit_args((data, footage), latents, tmp_path / "r3"), "--curve-weight", "nan"]) == 2
    assert "--curve-weight nan: expected a finite number > 0" in capsys.readouterr().err
    assert cli(["train-dit", *dit_args((data, footage), latents, tmp_path / "r4"), "--patch", "0"]) == 2
    assert "--patch 0: expected a patch size >= 1" in capsys.readouterr().err
    assert cli(["train-dit", *args, "--lr", "0.5", "--window", "6"]) == 2
    err = capsys.readouterr().err
    assert "lr" in err and "window" in err and "0.5" in err
    with pytest.raises(UsageError, match="preset"):
        from world_model.train import dit

        dit.main([*args, "--preset", "S"])


def test_a_run_resumes_after_the_trainer_gains_a_field_at_its_default(tmp_path):
    """A run's config.json written before a field existed: the field at its default resumes, another value does not."""
    from world_model.train import common
    from world_model.train.dit import Args

    defaults = common.field_defaults(Args)
    assert defaults["patch"] is None and defaults["road_weight"] == 1.0 and "data" not in defaults
    now = {**defaults, "data": ["/d"], "latents": ["/l"], "lr": 0.001}  # the Args of the resumed run
    stored = {k: v for k, v in now.items() if k != "patch"}  # written before --patch existed
    (tmp_path / common.RUN_CONFIG).write_text(json.dumps(stored))
    common.check_run_config(tmp_path, now, (), resuming=True, write=False, defaults=defaults)
    with pytest.raises(UsageError, match="patch"):
        common.check_run_config(tmp_path, now, (), resuming=True, write=False)  # without the defaults
    with pytest.raises(UsageError, match=r"patch: run has None, now 2"):
        common.check_run_config(tmp_path, {**now, "patch": 2}, (), resuming=True, write=False, defaults=defaults)
